"""
The shape of a stored call: column list, row normalisation, versioned DDL.

A I{row} is a tuple of plain values in L{COLUMNS} order: what the queue
holds and what the backends bind as parameters, as it is (a tuple costs the
reactor thread a third of what a dict keyed by column name did).  The spool
writes each row as one JSON object keyed by column name (L{row_to_json}), so
a spool written before a column was added reads back with that column NULL
(L{row_from_json}).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any, Dict, List, Optional, Tuple

from aura_proxy.history.record import CallRecord

__all__ = [
    "COLUMNS", "ID", "Row", "Migration", "to_row", "row_to_json", "row_from_json",
    "load_migrations", "insert_sql",
]

#: A normalised call: values in L{COLUMNS} order, each str, int, float, bool or None.
Row = Tuple[Any, ...]

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
    # Migration 3: what a stream's client got, and which stream it was.
    "stream_id",
    "resumed_after",
    "detached_event_count",
    "detached_ms",
)

#: Where a row holds its id.
ID = 0


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


def _utc_iso(seconds: float) -> str:
    """
    Unix time as ISO-8601 text in UTC with microseconds
    (C{2026-01-31T12:00:00.123456+00:00}): sorts as text, parses everywhere.
    """
    global _last_second
    whole = math.floor(seconds)
    micros = round((seconds - whole) * 1_000_000)
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    cached, prefix = _last_second
    if whole != cached:
        # Calls end many to a second: format the date and time once per second
        # (datetime.isoformat() cost 1.8 microseconds per row).
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _last_second = (whole, prefix)
    return f"{prefix}.{micros:06d}+00:00"


_last_second: Tuple[int, str] = (0, "1970-01-01T00:00:00")


def to_row(rec: CallRecord, max_value_length: int) -> Row:
    """
    Normalise C{rec} into a L{Row}: strings bounded to C{max_value_length}
    characters, C{created_at} (Unix seconds) as UTC ISO text, numbers and
    booleans as plain C{int}, C{float} and C{bool} (an C{IntEnum} such as
    C{HTTPStatus} is neither JSON- nor database-neutral).
    """
    # Runs once per call on the gateway's reactor thread, so the common case
    # (every string short ASCII without NUL) is one check of all the strings
    # together: if their sum fits the limit, each one does.
    texts: Tuple[Optional[str], ...] = (
        rec.id, rec.tenant_id, rec.user_id, rec.agent_id, rec.source, rec.caller_type,
        rec.method, rec.path, rec.route, rec.query_string, rec.client_ip, rec.user_agent,
        rec.trace_id, rec.end_reason, rec.stream_id,
    )
    try:
        joined = "".join([t for t in texts if t is not None])
    except TypeError:  # not all str: the slow path makes them so
        joined = None
    if joined is None or len(joined) > max_value_length or not joined.isascii() or "\x00" in joined:
        texts = tuple(_bounded(t, max_value_length) for t in texts)
    (call_id, tenant_id, user_id, agent_id, source, caller_type, method, path, route,
     query_string, client_ip, user_agent, trace_id, end_reason, stream_id) = texts
    request_size, response_size = rec.request_size_bytes, rec.response_size_bytes
    first_event, events = rec.first_event_ms, rec.event_count
    resumed_after, tail_events, tail_ms = rec.resumed_after, rec.detached_event_count, rec.detached_ms
    return (
        call_id,
        _utc_iso(rec.created_at),
        tenant_id,
        user_id,
        agent_id,
        source,
        caller_type,
        method,
        path,
        route,
        query_string,
        int(rec.status_code),
        float(rec.latency_ms),
        None if request_size is None else int(request_size),
        None if response_size is None else int(response_size),
        client_ip,
        user_agent,
        trace_id,
        bool(rec.is_stream),
        None if first_event is None else float(first_event),
        None if events is None else int(events),
        end_reason,
        stream_id,
        None if resumed_after is None else int(resumed_after),
        None if tail_events is None else int(tail_events),
        None if tail_ms is None else float(tail_ms),
    )


def row_to_json(row: Row) -> Dict[str, Any]:
    """C{row} as a JSON object keyed by column name (the spool's line format)."""
    return dict(zip(COLUMNS, row))


def row_from_json(obj: Dict[str, Any]) -> Row:
    """
    The row a spool line holds.  A column the line lacks (written before the
    column existed) is NULL; a key that is not a column is ignored.
    """
    return tuple(obj.get(name) for name in COLUMNS)


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
