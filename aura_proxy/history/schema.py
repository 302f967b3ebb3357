"""
The shape of a stored call: column list, row normalisation, versioned DDL.

A I{row} is a plain JSON-able C{dict} keyed by column name.  It is what the
queue holds, what the spool writes as one JSON line and what the backends
bind as parameters, so the three always agree.  Rows read back from an older
spool may lack a column added later: backends read missing keys as NULL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from typing import Any, Dict, List, Optional, Tuple

from aura_proxy.history.record import CallRecord

__all__ = ["COLUMNS", "Row", "Migration", "to_row", "load_migrations", "insert_sql"]

#: A normalised call, keyed by column name; values are str, int, float, bool or None.
Row = Dict[str, Any]

#: Stored columns, in insert order.  A new column is appended here AND in a new
#: migration of both .sql files.
COLUMNS: Tuple[str, ...] = (
    "id",
    "created_at",
    "tenant_id",
    "user_id",
    "agent_id",
    "source",
    "caller_type",
    "method",
    "path",
    "route",
    "query_string",
    "status_code",
    "latency_ms",
    "request_size_bytes",
    "response_size_bytes",
    "client_ip",
    "user_agent",
    "trace_id",
    "is_stream",
    "first_event_ms",
    "event_count",
    "end_reason",
)


def _bounded(value: Optional[str], limit: int) -> Optional[str]:
    """
    Make a client-supplied string storable: at most C{limit} characters, no NUL
    (PostgreSQL text refuses it) and no lone surrogate (not encodable as UTF-8).
    """
    if value is None:
        return None
    if type(value) is str and len(value) <= limit and value.isascii() and "\x00" not in value:
        return value  # the common case, with nothing to change
    text = str(value)[:limit]
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _utc_iso(moment: datetime) -> str:
    """ISO-8601 in UTC with microseconds: sorts as text, parses everywhere."""
    if moment.tzinfo is None:
        # The proxy stamps UTC; a naive value is taken to be UTC, not local time.
        moment = moment.replace(tzinfo=timezone.utc)
    elif moment.tzinfo is not timezone.utc:
        moment = moment.astimezone(timezone.utc)
    return moment.isoformat(timespec="microseconds")


def to_row(rec: CallRecord, max_value_length: int) -> Row:
    """
    Normalise C{rec} into a L{Row}: strings bounded to C{max_value_length}
    characters, C{created_at} as UTC ISO text, numbers and booleans as-is.
    """
    # Runs once per call on the gateway's reactor thread: per column kind,
    # not per column with type tests.
    row: Row = {name: getattr(rec, name) for name in COLUMNS}
    row["created_at"] = _utc_iso(row["created_at"])
    row["is_stream"] = bool(row["is_stream"])
    for name in _TEXT_COLUMNS:
        value = row[name]
        if value is not None:
            row[name] = _bounded(value, max_value_length)
    for name in _INT_COLUMNS:
        value = row[name]
        if value is not None:
            # plain int: an IntEnum (HTTPStatus) is not JSON/DB-neutral
            row[name] = int(value)
    for name in _FLOAT_COLUMNS:
        value = row[name]
        if value is not None:
            row[name] = float(value)
    return row


_TEXT_COLUMNS = (
    "id", "tenant_id", "user_id", "agent_id", "source", "caller_type", "method", "path",
    "route", "query_string", "client_ip", "user_agent", "trace_id", "end_reason",
)
_INT_COLUMNS = ("status_code", "request_size_bytes", "response_size_bytes", "event_count")
_FLOAT_COLUMNS = ("latency_ms", "first_event_ms")
assert set(_TEXT_COLUMNS + _INT_COLUMNS + _FLOAT_COLUMNS + ("created_at", "is_stream")) == set(COLUMNS)


def insert_sql(table: str, paramstyle: str, rows: int) -> str:
    """
    C{INSERT ... ON CONFLICT (id) DO NOTHING} for C{rows} rows with bound
    placeholders (C{paramstyle} "qmark" or "format"): values never become SQL
    text.  C{table} is a validated identifier, so it may be interpolated.
    """
    mark = "?" if paramstyle == "qmark" else "%s"
    one = "(" + ", ".join([mark] * len(COLUMNS)) + ")"
    return (
        f"INSERT INTO {table} ({', '.join(COLUMNS)}) VALUES "
        + ", ".join([one] * rows)
        + " ON CONFLICT (id) DO NOTHING"
    )


@dataclass(frozen=True)
class Migration:
    """One schema step: applied once, in order, recorded in the version table."""

    version: int
    description: str
    statements: Tuple[str, ...]


_MIGRATION = re.compile(r"^--\s*migration\s+(\d+)\s*:\s*(.*)$")


def version_table(table: str) -> str:
    """Name of the table recording applied migrations for C{table}."""
    return f"{table}_schema_version"


def load_migrations(dialect: str, table: str) -> List[Migration]:
    """
    Read C{schema_<dialect>.sql} (shipped as package data) and split it into
    L{Migration}s, with C{{table}} replaced by C{table}.

    @raise ValueError: if versions are not 1, 2, 3... in order.
    """
    text = resources.files("aura_proxy.history").joinpath(f"schema_{dialect}.sql").read_text(
        encoding="utf-8"
    )
    found: List[Tuple[int, str, List[str]]] = []
    for line in text.splitlines():
        match = _MIGRATION.match(line.strip())
        if match:
            found.append((int(match.group(1)), match.group(2).strip(), []))
        elif found and not line.strip().startswith("--"):
            found[-1][2].append(line)
    migrations = []
    for expected, (version, description, lines) in enumerate(found, start=1):
        if version != expected:
            raise ValueError(f"schema_{dialect}.sql: migration {version} out of order")
        body = "\n".join(lines).replace("{table}", table)
        # Statements end with ";" at a line end; the DDL holds no string literals.
        statements = tuple(s.strip() for s in re.split(r";\s*$", body, flags=re.M) if s.strip())
        migrations.append(Migration(version, description, statements))
    return migrations
