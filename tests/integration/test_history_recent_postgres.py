"""
Reading the last calls back from the REAL PostgreSQL at 127.0.0.1:5432
(trust auth, database C{test}): the queries of
L{tests.test_history_recent.RecentQueryMixin}, through txpostgres, on a table
of each test's own (dropped afterwards).  The server is never stopped here.
"""

from __future__ import annotations

import uuid
from typing import Any, Sequence

import psycopg2  # type: ignore[import-untyped]
from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase

from aura_proxy.history.postgres import PostgresBackend
from aura_proxy.history.reader import HistoryReader
from aura_proxy.history.recent import CallFilter
from aura_proxy.history.schema import to_row
from tests.history_helpers import history_config
from tests.test_history_recent import RecentQueryMixin

DSN = "postgresql://postgres@127.0.0.1:5432/test"


def _sync(sql: str) -> None:
    """Run C{sql} on a short-lived blocking connection (test side only)."""
    conn = psycopg2.connect(DSN, connect_timeout=3)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


class PostgresRecentTests(RecentQueryMixin, TestCase):
    """The queries on PostgreSQL, written by one backend, read by a reader of its own."""

    def setUp(self) -> None:
        try:
            _sync("SELECT 1")
        except psycopg2.OperationalError as e:
            raise SkipTest(f"PostgreSQL not reachable at {DSN}: {e}")
        self.table = "dash_recent_" + uuid.uuid4().hex[:12]
        self.addCleanup(_sync, f"DROP TABLE IF EXISTS {self.table}_schema_version")
        self.addCleanup(_sync, f"DROP TABLE IF EXISTS {self.table}")
        self.config = history_config(self.mktemp(), dsn=DSN, table=self.table, max_value_length=2048)
        self._reader: Any = None

    def backend(self) -> PostgresBackend:
        b = PostgresBackend(DSN, self.table, reactor, reactor, timeout=10.0)
        self.addCleanup(b.close)
        return b

    async def write(self, records: Sequence[Any]) -> None:
        writer = self.backend()
        await writer.connect()
        await writer.insert([to_row(r, 2048) for r in records])

    def reader(self) -> HistoryReader:
        if self._reader is None:
            self._reader = HistoryReader(self.config, reactor)
            self.addCleanup(self._reader.close)
        return self._reader  # type: ignore[no-any-return]

    async def add_column(self) -> None:
        _sync(f"ALTER TABLE {self.table} ADD COLUMN later text")

    async def test_timesAreUtcIsoText(self) -> None:
        """A timestamptz comes back as ISO-8601 text with its offset."""
        await self.store_calls()
        call = (await self.reader().recent(CallFilter(1, tenant="a")))[0]
        self.assertRegex(str(call["created_at"]), r"^2026-01-01T00:00:08(\.\d+)?\+00:00$")

    async def test_unreachableFailsThenRecovers(self) -> None:
        """A reader whose database is unreachable fails the read (within the timeout), and reconnects later."""
        bad = HistoryReader(history_config(self.mktemp(), dsn="postgresql://postgres@127.0.0.1:1/test",
                                           table=self.table), reactor)
        self.addCleanup(bad.close)
        with self.assertRaises(Exception):
            await bad.recent(CallFilter(1))
        await self.store_calls()
        self.assertEqual(len(await self.reader().recent(CallFilter(5))), 5)
