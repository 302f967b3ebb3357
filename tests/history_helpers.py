"""Shared fixtures for the call history tests (no tests here)."""

from __future__ import annotations

import dataclasses
import os
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Sequence, Set

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure

from aura_proxy.config import HistoryConfig
from aura_proxy.history.record import CallRecord
from aura_proxy.history.schema import ID, Row, row_to_json

EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()


def make_record(i: int, **changes: Any) -> CallRecord:
    """A plain (non-stream) call numbered C{i}; C{changes} override fields."""
    rec = CallRecord(
        id=f"req-{i:06d}",
        created_at=EPOCH + i / 1000,
        tenant_id="tenant-a" if i % 2 else "tenant-b",
        user_id=f"user-{i % 7}",
        agent_id="agent-1",
        source="header",
        caller_type="user",
        method="POST",
        path=f"/v1/agents/agent-1/run/{i}",
        route="agents",
        query_string="x=1",
        status_code=200 if i % 10 else 500,
        latency_ms=12.5,
        request_size_bytes=100,
        response_size_bytes=2000,
        client_ip="10.0.0.1",
        user_agent="pytest",
        trace_id=f"trace-{i}",
        is_stream=False,
    )
    return dataclasses.replace(rec, **changes) if changes else rec


def make_stream_record(i: int, **changes: Any) -> CallRecord:
    """A stream summary numbered C{i}: sizes and query NULL, stream fields set; C{changes} override fields."""
    fields: Dict[str, Any] = dict(
        query_string=None,
        request_size_bytes=None,
        response_size_bytes=None,
        is_stream=True,
        first_event_ms=3.25,
        event_count=42,
        end_reason="completed",
    )
    fields.update(changes)
    return make_record(i, **fields)


def history_config(spool_dir: str, **changes: Any) -> HistoryConfig:
    """A L{HistoryConfig} spooling to C{spool_dir}, small batches by default."""
    base = HistoryConfig(
        enabled=True,
        dsn="sqlite:///" + os.path.join(spool_dir, "unused.db"),
        table="sys_api_call_histories",
        batch_size=10,
        flush_interval=1.0,
        queue_size=100,
        spool_dir=spool_dir,
        max_value_length=64,
    )
    return dataclasses.replace(base, **changes)


def segments(spool_dir: str) -> List[str]:
    """Spool segment files currently in C{spool_dir}."""
    if not os.path.isdir(spool_dir):
        return []
    return sorted(n for n in os.listdir(spool_dir) if n.endswith(".jsonl"))


class RowRejected(Exception):
    """What L{FakeBackend} raises for a row listed in C{bad_ids}."""


class FakeBackend:
    """
    An in-memory backend with the real one's contract: all-or-nothing
    batches, ON CONFLICT (id) DO NOTHING, and switchable failures.
    """

    name = "fake"

    def __init__(self) -> None:
        self.up = True
        self.connects = 0
        #: Committed rows by id, each keyed by column name.
        self.rows: Dict[str, Dict[str, Any]] = {}
        #: Ids in commit order (each id once: the table's UNIQUE constraint).
        self.order: List[str] = []
        self.batches: List[List[str]] = []
        self.bad_ids: Set[str] = set()
        #: Commit the next batch, then report a lost connection (crash before ack).
        self.lose_ack_once = False
        #: A slow database: insert() waits until release() commits.
        self.slow = False
        self.pending: List[Any] = []
        self.closed = False
        #: A connection that takes its time: connect() waits until connected().
        self.slow_connect = False
        self.pending_connects: List["Deferred[None]"] = []

    def connect(self) -> "Deferred[None]":
        self.connects += 1
        if self.slow_connect:
            d: Deferred[None] = Deferred()
            self.pending_connects.append(d)
            return d
        if not self.up:
            return fail(ConnectionLost("database down"))
        return succeed(None)

    def insert(self, rows: Sequence[Row]) -> "Deferred[int]":
        if self.slow:
            d: Deferred[int] = Deferred()
            self.pending.append((list(rows), d))
            return d
        return self._commit(rows)

    def connected(self) -> None:
        """Let the connection attempts waiting on C{slow_connect} succeed."""
        self.slow_connect = False
        pending, self.pending_connects = self.pending_connects, []
        for d in pending:
            d.callback(None)

    def release(self) -> None:
        """Commit the inserts waiting on the slow database, in order."""
        self.slow = False
        pending, self.pending = self.pending, []
        for rows, d in pending:
            self._commit(rows).chainDeferred(d)

    def _commit(self, rows: Sequence[Row]) -> "Deferred[int]":
        if not self.up:
            return fail(ConnectionLost("database down"))
        bad = [r[ID] for r in rows if r[ID] in self.bad_ids]
        if bad:
            return fail(RowRejected(f"bad value in {bad[0]}"))
        new = 0
        for row in rows:
            if row[ID] not in self.rows:
                self.rows[row[ID]] = row_to_json(row)
                self.order.append(row[ID])
                new += 1
        self.batches.append([r[ID] for r in rows])
        if self.lose_ack_once:
            self.lose_ack_once = False
            return fail(ConnectionLost("lost after commit"))
        return succeed(new)

    def is_row_error(self, failure: Failure) -> bool:
        return failure.check(RowRejected) is not None

    def close(self) -> "Deferred[None]":
        self.closed = True
        return succeed(None)
