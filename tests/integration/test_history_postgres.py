"""
The PostgreSQL backend and the history service against the REAL server at
127.0.0.1:5432 (trust auth, database C{test}).  Each test uses its own table
and drops it afterwards.  The fault test stops and restarts the server with
pg_ctlcluster, and always restarts it in cleanup.
"""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import time
import uuid
from typing import Any, List

import psycopg2  # type: ignore[import-untyped]
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from aura_proxy.history import HistoryService
from aura_proxy.history.postgres import PostgresBackend
from aura_proxy.history.schema import COLUMNS, to_row
from tests.history_helpers import history_config, make_record, make_stream_record, segments

DSN = "postgresql://postgres@127.0.0.1:5432/test"


def _sync_query(sql: str, *params: Any) -> List[Any]:
    """Run C{sql} on a short-lived blocking connection (test side only)."""
    conn = psycopg2.connect(DSN, connect_timeout=3)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def _wait_accepting(deadline: float = 60.0) -> None:
    """Block until PostgreSQL accepts connections, or raise after C{deadline} s."""
    end = time.monotonic() + deadline
    while True:
        try:
            _sync_query("SELECT 1")
            return
        except psycopg2.OperationalError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


def _pg_ctl(action: str, check: bool = True) -> None:
    """Start or stop the local cluster the way the issue describes."""
    version = os.listdir("/etc/postgresql")[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
        check=check, capture_output=True, timeout=60,
    )


def _ensure_running() -> None:
    """Start the cluster unless it runs ("already running" is fine), then wait for it."""
    _pg_ctl("start", check=False)
    _wait_accepting()


def _closed_port() -> int:
    """A local TCP port nobody listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


async def _until(predicate: Any, deadline: float = 30.0) -> None:
    """Poll C{predicate} on the real reactor until true, failing after C{deadline} s."""
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached before the deadline")
        await deferLater(reactor, 0.1, lambda: None)


class PostgresTests(TestCase):
    """History on the real PostgreSQL."""

    timeout = 60

    def setUp(self) -> None:
        try:
            _sync_query("SELECT 1")
        except psycopg2.OperationalError as e:
            raise SkipTest(f"PostgreSQL not reachable at {DSN}: {e}")
        self.table = "hist_test_" + uuid.uuid4().hex[:12]
        self.addCleanup(self._drop_table)
        self.spool_dir = os.path.abspath(self.mktemp())

    def _drop_table(self) -> None:
        _wait_accepting()
        _sync_query(f"DROP TABLE IF EXISTS {self.table}")
        _sync_query(f"DROP TABLE IF EXISTS {self.table}_schema_version")

    def count(self) -> Any:
        """(rows, distinct ids) in the test table."""
        return tuple(_sync_query(f"SELECT count(*), count(DISTINCT id) FROM {self.table}")[0])

    def backend(self, dsn: str = DSN) -> PostgresBackend:
        """A backend on the test table, closed at cleanup."""
        b = PostgresBackend(dsn, self.table, reactor, reactor, timeout=10.0)
        self.addCleanup(b.close)
        return b

    def service(self, dsn: str = DSN, clock: Any = None, **changes: Any) -> HistoryService:
        """A started service on the test table."""
        config = history_config(self.spool_dir, dsn=dsn, table=self.table, **changes)
        svc = HistoryService(
            config, reactor, clock=clock, retry_initial=0.1, retry_max=0.5
        )
        svc.startService()
        return svc

    async def test_schema_and_versions(self) -> None:
        """connect() creates table, indexes and version row; a second connect is a no-op."""
        b = self.backend()
        await b.connect()
        await b.connect()
        cols = _sync_query(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
            "ORDER BY ordinal_position", self.table,
        )
        self.assertEqual(tuple(c[0] for c in cols), COLUMNS)
        idx = {r[0] for r in _sync_query("SELECT indexname FROM pg_indexes WHERE tablename = %s", self.table)}
        self.assertIn(f"{self.table}_tenant_created_idx", idx)
        self.assertEqual(_sync_query(f"SELECT version FROM {self.table}_schema_version ORDER BY version"),
                         [(1,), (2,), (3,)])

    async def test_round_trip_idempotent(self) -> None:
        """Rows are stored with proper types; re-inserting the same ids adds nothing."""
        b = self.backend()
        await b.connect()
        rows = [to_row(make_record(1), 64), to_row(make_stream_record(2), 64)]
        self.assertEqual(await b.insert(rows), 2)
        self.assertEqual(await b.insert(rows), 0)
        got = _sync_query(
            f"SELECT id, is_stream, query_string, response_size_bytes, event_count, end_reason, "
            f"created_at = '2026-01-01T00:00:00.001+00'::timestamptz FROM {self.table} ORDER BY id"
        )
        self.assertEqual(
            got,
            [
                ("req-000001", False, "x=1", 2000, None, None, True),
                ("req-000002", True, None, None, 42, "completed", False),
            ],
        )

    async def test_out_of_range_is_row_error(self) -> None:
        """A status code outside integer range is a row error, not a connection failure."""
        b = self.backend()
        await b.connect()
        try:
            await b.insert([to_row(make_record(1, status_code=2**40), 64)])
        except Exception as e:
            self.assertTrue(b.is_row_error(Failure(e)))
        else:
            self.fail("insert should fail")
        self.assertEqual(self.count(), (0, 0))

    async def test_closed_port_is_not_row_error(self) -> None:
        """Connecting to a closed port fails as a connection error."""
        b = self.backend(f"postgresql://postgres@127.0.0.1:{_closed_port()}/test")
        try:
            await b.connect()
        except Exception as e:
            self.assertFalse(b.is_row_error(Failure(e)))
        else:
            self.fail("connect should fail")

    async def test_service_with_bad_row(self) -> None:
        """1000 calls with one unstorable: 999 rows, the bad one logged and skipped."""
        svc = self.service(batch_size=200, queue_size=5000, flush_interval=0.05)
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        await svc._attempt
        for i in range(1000):
            svc.record(make_record(i, status_code=2**40) if i == 500 else make_record(i))
        await svc.flush()
        await svc.stopService()
        self.assertEqual(self.count(), (999, 999))
        self.assertEqual(svc.stats()["failed"], 1)

    async def test_server_stopped_and_restarted(self) -> None:
        """
        Fault test: with PostgreSQL stopped, 1000 recorded calls are spooled;
        once it is started again exactly 1000 rows arrive, none twice.
        """
        if not os.path.isdir("/etc/postgresql") or not glob.glob("/etc/postgresql/*/main"):
            raise SkipTest("no local pg_ctlcluster-managed cluster")
        svc = self.service(batch_size=100, queue_size=300, flush_interval=0.05)
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        await svc._attempt
        svc.record(make_record(100000))  # one row before the outage
        await svc.flush()
        # Cleanups run last-in first-out: the server is started before the table is dropped.
        self.addCleanup(_ensure_running)
        _pg_ctl("stop")
        for i in range(500):
            svc.record(make_record(i))
        await svc.flush()
        # Let the service fail to reconnect a few times while still recording.
        await _until(lambda: svc.stats()["connect_failures"] >= 3)
        for i in range(500, 1000):
            svc.record(make_record(i))
        await svc.flush()
        self.assertEqual(svc.stats()["spooled"], 1000)
        _pg_ctl("start")
        _wait_accepting()
        await _until(lambda: svc.stats()["db_up"] == 1 and svc.stats()["spool_pending"] == 0)
        await svc.flush()
        self.assertEqual(self.count(), (1001, 1001))
        self.assertEqual(segments(self.spool_dir), [])
        await svc.stopService()

    async def test_unreachable_then_new_instance(self) -> None:
        """
        kill -9: an instance whose database is unreachable spools rows and dies
        without stopService(); a new instance with the database reachable
        stores every row exactly once.
        """
        dead = f"postgresql://postgres@127.0.0.1:{_closed_port()}/test"
        first = self.service(dsn=dead, clock=Clock())
        await first._attempt
        for i in range(300):
            first.record(make_record(i))
        await first.flush()
        self.assertEqual(first.stats()["spooled"], 300)
        # The "process" dies: only its spool thread is released.
        assert first._spool_pool is not None
        first._spool_pool.stop()
        first._spool.close()

        second = self.service(flush_interval=0.05)
        self.addCleanup(lambda: second.stopService() if second.running else None)
        await second._attempt
        await second.flush()
        await second.stopService()
        self.assertEqual(self.count(), (300, 300))
        self.assertEqual(second.stats()["replayed"], 300)
        self.assertEqual(segments(self.spool_dir), [])
