"""
The SQLite backend and the service over a real SQLite file in a temp dir.

I/O runs in real threads, so these tests return Deferreds; timers use a
L{Clock} so nothing is left scheduled on the reactor.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, List

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from aura_proxy.history import HistoryService
from aura_proxy.history.schema import COLUMNS, load_migrations, to_row
from aura_proxy.history.sqlite import SQLiteBackend, sqlite_path
from tests.history_helpers import history_config, make_record, make_stream_record, segments


#: The columns of the schema's first two migrations, before migration 3.
V1_COLUMNS = COLUMNS[:COLUMNS.index("stream_id")]


def insert_v1(conn: sqlite3.Connection, table: str, row: Any) -> None:
    """Store C{row}'s values of the first schema's columns, as a gateway of that time did."""
    marks = ", ".join("?" * len(V1_COLUMNS))
    conn.execute(f"INSERT INTO {table} ({', '.join(V1_COLUMNS)}) VALUES ({marks})", row[:len(V1_COLUMNS)])


class SQLiteTests(TestCase):
    """Real SQLite, one database file per test."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.db = os.path.join(self.dir, "history.db")
        self.table = "sys_api_call_histories"

    def backend(self) -> SQLiteBackend:
        """A backend on the test database, closed at cleanup."""
        b = SQLiteBackend(self.db, self.table, reactor)
        self.addCleanup(b.close)
        return b

    def query(self, sql: str, *params: Any) -> List[Any]:
        """Run C{sql} on the test database from the test (a separate connection)."""
        conn = sqlite3.connect(self.db)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def service(self, dsn: str = "", **changes: Any) -> HistoryService:
        """A started service on the test database (or C{dsn})."""
        config = history_config(
            os.path.join(self.dir, "spool"), dsn=dsn or "sqlite:///" + self.db, **changes
        )
        svc = HistoryService(config, reactor, clock=Clock(), retry_initial=0.01)
        svc.startService()
        return svc

    def test_dsn_path(self) -> None:
        """sqlite:///rel is a relative path, sqlite:////abs an absolute one."""
        self.assertEqual(sqlite_path("sqlite:///h.db"), "h.db")
        self.assertEqual(sqlite_path("sqlite:////var/h.db"), "/var/h.db")

    async def test_schema_created_once(self) -> None:
        """
        connect() creates the table with every column, its indexes and the
        version table; connecting again applies nothing twice.
        """
        b = self.backend()
        await b.connect()
        await b.connect()
        columns = [r[1] for r in self.query(f"PRAGMA table_info({self.table})")]
        self.assertEqual(tuple(columns), COLUMNS)
        indexes = {r[1] for r in self.query(f"PRAGMA index_list({self.table})")}
        self.assertTrue(
            {f"{self.table}_created_at_idx", f"{self.table}_tenant_created_idx"} <= indexes
        )
        self.assertEqual(
            self.query(f"SELECT version FROM {self.table}_schema_version"), [(1,), (2,), (3,)]
        )

    async def test_trace_lookup_uses_partial_index(self) -> None:
        """A lookup by trace id uses the trace index, which holds traced calls only."""
        b = self.backend()
        await b.connect()
        await b.insert([to_row(make_record(1), 64), to_row(make_record(2, trace_id=None), 64)])
        (sql,), = self.query(
            "SELECT sql FROM sqlite_master WHERE name = ?", f"{self.table}_trace_idx"
        )
        self.assertIn("WHERE trace_id IS NOT NULL", sql)
        plan = " ".join(
            str(r[-1]) for r in self.query(
                f"EXPLAIN QUERY PLAN SELECT id FROM {self.table} WHERE trace_id = ?", "trace-1"
            )
        )
        self.assertIn(f"{self.table}_trace_idx", plan)
        self.assertEqual(
            self.query(f"SELECT id FROM {self.table} WHERE trace_id = ?", "trace-1"),
            [("req-000001",)],
        )

    async def test_upgrade_from_version_1_keeps_rows(self) -> None:
        """A database made by the first schema version is migrated in place, rows kept."""
        conn = sqlite3.connect(self.db, isolation_level=None)
        first = load_migrations("sqlite", self.table)[0]
        for statement in first.statements:
            conn.execute(statement)
        conn.execute(
            f"CREATE TABLE {self.table}_schema_version ("
            "version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        conn.execute(f"INSERT INTO {self.table}_schema_version VALUES (1, 'v1', 'then')")
        insert_v1(conn, self.table, to_row(make_record(7), 64))
        conn.close()
        b = self.backend()
        await b.connect()
        self.assertEqual(
            self.query(f"SELECT version FROM {self.table}_schema_version"), [(1,), (2,), (3,)]
        )
        self.assertEqual(self.query(f"SELECT id, trace_id FROM {self.table}"), [("req-000007", "trace-7")])
        (sql,), = self.query(
            "SELECT sql FROM sqlite_master WHERE name = ?", f"{self.table}_trace_idx"
        )
        self.assertIn("WHERE trace_id IS NOT NULL", sql)

    def old_schema_file(self, migrations: int = 2) -> None:
        """
        The test database as a gateway of an earlier release left it: the
        first C{migrations} migrations applied, one row of that time stored.
        """
        conn = sqlite3.connect(self.db, isolation_level=None)
        conn.execute(
            f"CREATE TABLE {self.table}_schema_version ("
            "version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        for migration in load_migrations("sqlite", self.table)[:migrations]:
            for statement in migration.statements:
                conn.execute(statement)
            conn.execute(
                f"INSERT INTO {self.table}_schema_version VALUES (?, ?, 'then')",
                (migration.version, migration.description),
            )
        insert_v1(conn, self.table, to_row(make_stream_record(7), 64))
        conn.close()

    async def test_old_schema_gains_the_stream_columns(self) -> None:
        """
        A database of the previous schema (no stream id, no detached tail) is
        migrated at start: the columns are added, the old row is kept with
        them NULL, and rows with the new figures are stored.
        """
        self.old_schema_file()
        self.assertNotIn("stream_id", [r[1] for r in self.query(f"PRAGMA table_info({self.table})")])
        b = self.backend()
        await b.connect()
        self.assertEqual(tuple(r[1] for r in self.query(f"PRAGMA table_info({self.table})")), COLUMNS)
        self.assertEqual(
            self.query(f"SELECT version FROM {self.table}_schema_version"), [(1,), (2,), (3,)]
        )
        new = to_row(make_stream_record(8, stream_id="S1", resumed_after=4,
                                        detached_event_count=6, detached_ms=1500.0), 64)
        self.assertEqual(await b.insert([new]), 1)
        self.assertEqual(
            self.query(f"SELECT id, event_count, stream_id, resumed_after, detached_event_count, "
                       f"detached_ms FROM {self.table} ORDER BY id"),
            [("req-000007", 42, None, None, None, None), ("req-000008", 42, "S1", 4, 6, 1500.0)],
        )
        indexes = {r[1] for r in self.query(f"PRAGMA index_list({self.table})")}
        self.assertIn(f"{self.table}_stream_idx", indexes)

    async def test_column_already_there_is_not_added_again(self) -> None:
        """
        A table that already has one of the new columns (added by hand before
        the upgrade) is migrated all the same: only the missing ones are added.
        """
        self.old_schema_file()
        conn = sqlite3.connect(self.db, isolation_level=None)
        conn.execute(f"ALTER TABLE {self.table} ADD COLUMN stream_id TEXT")
        conn.close()
        b = self.backend()
        await b.connect()
        columns = [r[1] for r in self.query(f"PRAGMA table_info({self.table})")]
        self.assertEqual(sorted(columns), sorted(COLUMNS))
        self.assertEqual(await b.insert([to_row(make_stream_record(8, stream_id="S1"), 64)]), 1)

    async def test_round_trip_and_idempotent(self) -> None:
        """Values are stored as given (stream NULLs included); a repeated id is ignored."""
        b = self.backend()
        await b.connect()
        plain, stream = to_row(make_record(1), 64), to_row(make_stream_record(2), 64)
        self.assertEqual(await b.insert([plain, stream]), 2)
        self.assertEqual(await b.insert([plain]), 0)
        got = self.query(
            f"SELECT id, created_at, is_stream, query_string, request_size_bytes, "
            f"event_count, end_reason FROM {self.table} ORDER BY id"
        )
        self.assertEqual(
            got,
            [
                ("req-000001", "2026-01-01T00:00:00.001000+00:00", 0, "x=1", 100, None, None),
                ("req-000002", "2026-01-01T00:00:00.002000+00:00", 1, None, None, 42, "completed"),
            ],
        )
        # None and bool are bound as SQL NULL and integers, not as text.
        self.assertEqual(
            self.query(f"SELECT typeof(is_stream), typeof(query_string) FROM {self.table} ORDER BY id"),
            [("integer", "text"), ("integer", "null")],
        )

    async def test_large_batch_counts_new_rows(self) -> None:
        """
        A batch larger than one INSERT statement holds is stored whole, and the
        count of new rows skips the duplicates in every statement of it.
        """
        b = self.backend()
        await b.connect()
        first = [to_row(make_record(i), 64) for i in range(250)]
        self.assertEqual(await b.insert(first), 250)
        again = [to_row(make_record(i), 64) for i in range(245, 262)] + first[:100]
        self.assertEqual(await b.insert(again), 12)
        self.assertEqual(self.query(f"SELECT count(*) FROM {self.table}"), [(262,)])

    async def test_small_variable_limit(self) -> None:
        """
        Under an SQLite built with the old limit of 999 bound values (38 rows
        of 26 columns a statement), batches are split to fit.
        """
        connect = sqlite3.connect

        def old_library(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            conn = connect(*args, **kwargs)
            conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
            return conn

        self.patch(sqlite3, "connect", old_library)
        b = self.backend()
        await b.connect()
        self.assertEqual(b._rows_per_statement, 999 // len(COLUMNS))
        self.assertEqual(await b.insert([to_row(make_record(i), 64) for i in range(100)]), 100)

    async def test_bad_value_is_row_error(self) -> None:
        """An integer SQLite cannot hold fails the batch as a row error, storing nothing."""
        b = self.backend()
        await b.connect()
        bad = to_row(make_record(1, status_code=2**70), 64)
        try:
            await b.insert([to_row(make_record(0), 64), bad])
        except Exception as e:
            from twisted.python.failure import Failure

            self.assertTrue(b.is_row_error(Failure(e)))
        else:
            self.fail("insert should fail")
        self.assertEqual(self.query(f"SELECT count(*) FROM {self.table}"), [(0,)])

    async def test_service_end_to_end(self) -> None:
        """500 recorded calls (one unstorable) end up as 499 rows; stop fires when done."""
        svc = self.service(batch_size=50, queue_size=1000)
        await svc._attempt
        for i in range(500):
            svc.record(make_record(i, status_code=2**70) if i == 250 else make_record(i))
        await svc.flush()
        await svc.stopService()
        self.assertEqual(self.query(f"SELECT count(DISTINCT id), count(*) FROM {self.table}"), [(499, 499)])
        self.assertEqual(svc.stats()["failed"], 1)
        self.flushLoggedErrors()

    async def test_stop_flushes_partial_batch(self) -> None:
        """Rows still queued at stopService() are written before its Deferred fires."""
        svc = self.service(batch_size=100)
        await svc._attempt
        for i in range(7):
            svc.record(make_record(i))
        await svc.stopService()
        self.assertEqual(self.query(f"SELECT count(*) FROM {self.table}"), [(7,)])

    async def test_unreachable_then_restart_replays_once(self) -> None:
        """
        kill -9: an instance that cannot open its database spools rows and
        dies without stopService(); the next instance stores each row once.
        """
        blocker = os.path.join(self.dir, "not-a-dir")
        open(blocker, "w").close()  # the database path below cannot be created
        first = self.service(dsn=f"sqlite:///{blocker}/history.db")
        await first._attempt
        for i in range(30):
            first.record(make_record(i))
        await first.flush()
        self.assertEqual(first.stats()["spooled"], 30)
        # Simulated crash: release the threads only, leave the spool as it is.
        assert first._spool_pool is not None
        first._spool_pool.stop()
        first._spool.close()
        await first._backend.close()

        second = self.service()
        await second._attempt
        second.record(make_record(30))
        await second.flush()
        await second.stopService()
        ids = [r[0] for r in self.query(f"SELECT id FROM {self.table} ORDER BY rowid")]
        self.assertEqual(ids, [f"req-{i:06d}" for i in range(31)])
        self.assertEqual(segments(os.path.join(self.dir, "spool")), [])
