"""
Reading the last calls back: the dashboard's view of call history.

L{CallFilter} is what a reader may ask for (a tenant, a status or status
class, a path prefix), checked where it comes in (L{parse_call_filter}:
query parameters of the admin site).  L{recent_sql} writes the one SELECT
both backends run (C{SQLiteBackend.recent}, C{PostgresBackend.recent}); it
names the columns it reads, so that columns added to the table later change
nothing here.  L{aura_proxy.history.reader.HistoryReader} runs it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping, Optional, Sequence

__all__ = [
    "MAX_LIMIT",
    "RECENT_COLUMNS",
    "CallFilter",
    "parse_call_filter",
    "recent_rows",
    "recent_sql",
]

#: The columns a recent call is read with, in this order (all in migration 1).
RECENT_COLUMNS = (
    "id",
    "created_at",
    "tenant_id",
    "method",
    "path",
    "route",
    "status_code",
    "latency_ms",
    "is_stream",
    "first_event_ms",
    "event_count",
    "end_reason",
)

#: Most calls one query returns.
MAX_LIMIT = 500

_STATUS = re.compile(r"^(?:[1-5][0-9][0-9]|[1-5]xx)$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class CallFilter:
    """
    Which calls to read: all of them, or those of one tenant, one status
    (C{"404"}) or status class (C{"5xx"}), and a path prefix; C{limit} newest.
    """

    limit: int = 50
    tenant: Optional[str] = None
    status: Optional[str] = None
    path_prefix: Optional[str] = None

    def as_dict(self) -> dict[str, object]:
        """The filter as JSON (what the snapshot says it shows)."""
        return {"limit": self.limit, "tenant": self.tenant, "status": self.status, "path": self.path_prefix}


def parse_call_filter(args: Mapping[bytes, Sequence[bytes]], default_limit: int = 50) -> CallFilter:
    """
    The filter in query parameters C{tenant}, C{status}, C{path} and
    C{limit} (twisted.web's C{request.args}); empty ones are ignored.

    @raise ValueError: with a message for the client, when a parameter is
        repeated, not UTF-8, or not of its form (C{status}: a code 100-599
        or a class like C{5xx}; C{path}: starts with C{/}; C{limit}: 1 to
        L{MAX_LIMIT}; no control characters; at most 256 characters).
    """
    values: dict[str, str] = {}
    for name in ("tenant", "status", "path", "limit"):
        given = args.get(name.encode("ascii"), [])
        if len(given) > 1:
            raise ValueError(f"query parameter {name} may appear once, it appears {len(given)} times")
        if not given:
            continue
        try:
            text = given[0].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"query parameter {name} is not UTF-8")
        if len(text) > 256:
            raise ValueError(f"query parameter {name} is longer than 256 characters")
        if _CONTROL.search(text):
            raise ValueError(f"query parameter {name} holds a control character")
        if text.strip():
            values[name] = text.strip()
    status = values.get("status")
    if status is not None:
        status = status.lower()
        if not _STATUS.match(status):
            raise ValueError(f"query parameter status: expected a code (404) or a class (5xx), got {status!r}")
    path = values.get("path")
    if path is not None and not path.startswith("/"):
        raise ValueError(f"query parameter path: expected a path prefix starting with /, got {path!r}")
    limit = default_limit
    if "limit" in values:
        try:
            limit = int(values["limit"])
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"query parameter limit: expected 1 to {MAX_LIMIT}, got {values['limit']!r}")
    return CallFilter(limit, values.get("tenant"), status, path)


def _like_prefix(prefix: str) -> str:
    """A LIKE pattern matching strings starting with C{prefix} (escape character C{\\})."""
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def recent_sql(table: str, paramstyle: str, where: CallFilter) -> tuple[str, list[object]]:
    """
    The SELECT of the newest calls matching C{where}, and its parameters;
    C{paramstyle} is C{"qmark"} (sqlite3) or C{"format"} (psycopg2).
    """
    mark = "?" if paramstyle == "qmark" else "%s"
    clauses: list[str] = []
    params: list[object] = []
    if where.tenant is not None:
        clauses.append(f"tenant_id = {mark}")
        params.append(where.tenant)
    if where.status is not None:
        if where.status.endswith("xx"):
            low = int(where.status[0]) * 100
            clauses.append(f"status_code BETWEEN {mark} AND {mark}")
            params.extend([low, low + 99])
        else:
            clauses.append(f"status_code = {mark}")
            params.append(int(where.status))
    if where.path_prefix is not None:
        clauses.append(f"path LIKE {mark} ESCAPE '\\'")
        params.append(_like_prefix(where.path_prefix))
    sql = f"SELECT {', '.join(RECENT_COLUMNS)} FROM {table}"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += f" ORDER BY created_at DESC LIMIT {mark}"
    params.append(max(1, min(where.limit, MAX_LIMIT)))
    return sql, params


def recent_rows(rows: Sequence[Sequence[Any]]) -> list[dict[str, object]]:
    """Database rows of L{RECENT_COLUMNS} as JSON-ready dicts (times as ISO-8601 text)."""
    out = []
    for row in rows:
        call = dict(zip(RECENT_COLUMNS, row))
        created = call["created_at"]
        if isinstance(created, datetime):
            call["created_at"] = created.isoformat()
        if call["is_stream"] is not None:
            call["is_stream"] = bool(call["is_stream"])
        out.append(call)
    return out

