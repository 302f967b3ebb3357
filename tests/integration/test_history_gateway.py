"""
Call history through the whole gateway: twistd subprocesses, a FastAPI
upstream, SQLite files and the real PostgreSQL on 127.0.0.1:5432.

The fault tests stop PostgreSQL with pg_ctlcluster, as the issue asks, and
always start it again in cleanup.
"""

from __future__ import annotations

import http.client
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.integration.test_history_postgres import DSN, _ensure_running, _pg_ctl, _sync_query
from tests.integration.upstreams import free_port, start_fastapi_upstream, start_process, stop_process

TWISTD = str(Path(sys.executable).with_name("twistd"))


def gateway_config(
    listen: int, admin: int, upstream: int, dsn: str, table: str, spool: str, gateway: str = "drain_timeout = 0.5"
) -> str:
    """A gateway on C{listen} with history in C{dsn}; C{gateway}: more lines of its C{[gateway]} section."""
    return f"""\
[gateway]
listen = tcp:{listen}:interface=127.0.0.1
admin_listen = tcp:{admin}:interface=127.0.0.1
{gateway}
[route:aura]
path = /api/aura/**
upstream = http://127.0.0.1:{upstream}
[headers]
default.X-DWP-Source = FRONTEND
default.X-DWP-Caller-Type = USER
[history]
dsn = {dsn}
table = {table}
spool_dir = {spool}
flush_interval = 0.2
batch_size = 100
"""


def call(conn: http.client.HTTPConnection, method: str, path: str, body: Optional[bytes] = None,
         headers: Optional[dict[str, str]] = None) -> tuple[int, bytes]:
    conn.request(method, path, body=body, headers={"X-Tenant-ID": "t1", **(headers or {})})
    response = conn.getresponse()
    return response.status, response.read()


def wait_for(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    end = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class GatewayHistory:
    """Runs gateways on one history table; mixed into the tests below."""

    dsn: str
    table: str

    def start_gateway(self: Any, spool: Optional[str] = None) -> tuple[subprocess.Popen[bytes], int]:
        listen, admin = free_port(), free_port()
        path = os.path.abspath(self.mktemp() + ".ini")
        with open(path, "w") as f:
            f.write(gateway_config(listen, admin, self.upstream, self.dsn, self.table, spool or self.spool))
        process = start_process(
            self, [TWISTD, "-n", "--pidfile=", "aura-proxy", "--config", path],
            f"http://127.0.0.1:{admin}/healthz", cwd=self.workdir,
        )
        return process, listen

    def use_sqlite(self: Any) -> None:
        """A work directory with the history in its SQLite file and its spool, and a FastAPI upstream."""
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.db = os.path.join(self.workdir, "history.db")
        self.dsn = "sqlite:///" + self.db
        self.table = "sys_api_call_histories"
        self.spool = os.path.join(self.workdir, "spool")
        self.upstream = start_fastapi_upstream(self)

    def stop_gateway(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)


class SqliteHistoryTests(GatewayHistory, SynchronousTestCase):
    """The default backend: an SQLite file next to the gateway."""

    def setUp(self) -> None:
        self.use_sqlite()

    def rows(self) -> list[sqlite3.Row]:
        conn = sqlite3.connect(self.db)
        conn.row_factory = sqlite3.Row
        try:
            return list(conn.execute(f"SELECT * FROM {self.table} ORDER BY created_at"))
        finally:
            conn.close()

    def test_rows_for_calls_errors_and_streams(self) -> None:
        """
        A GET, a POST, an error and a stream through the gateway are four rows;
        the stream's row is one summary with NULL query and request size and
        its bytes and events delivered, first-event time, end reason and
        stream id; the error, refused before going upstream, records no
        default source or caller type.
        """
        process, port = self.start_gateway()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.assertEqual(call(conn, "GET", "/api/aura/json?x=1")[0], 200)
        self.assertEqual(call(conn, "POST", "/api/aura/echo", body=b"hello",
                              headers={"X-User-ID": "u1", "X-Agent-ID": "a1"})[0], 200)
        self.assertEqual(call(conn, "GET", "/nowhere")[0], 404)
        status, body = call(conn, "GET", "/api/aura/stream?count=3&interval=0.01")
        self.assertEqual(status, 200)
        self.assertEqual(body.count(b"\nid: ") + body.startswith(b"id: "), 4)
        conn.close()
        self.stop_gateway(process)

        rows = {(r["method"], r["path"]): r for r in self.rows()}
        self.assertEqual(len(rows), 4)
        get = rows[("GET", "/api/aura/json")]
        self.assertEqual((get["query_string"], get["status_code"], get["is_stream"], get["route"]),
                         ("x=1", 200, 0, "aura"))
        self.assertGreater(get["response_size_bytes"], 0)
        post = rows[("POST", "/api/aura/echo")]
        self.assertEqual((post["request_size_bytes"], post["user_id"], post["agent_id"],
                          post["source"], post["caller_type"]), (5, "u1", "a1", "FRONTEND", "USER"))
        missing = rows[("GET", "/nowhere")]
        self.assertEqual((missing["status_code"], missing["route"]), (404, None))
        self.assertEqual((missing["source"], missing["caller_type"]), (None, None))  # never went upstream
        stream = rows[("GET", "/api/aura/stream")]
        self.assertEqual(
            (stream["is_stream"], stream["query_string"], stream["request_size_bytes"],
             stream["response_size_bytes"], stream["event_count"], stream["end_reason"],
             stream["tenant_id"], stream["detached_event_count"]),
            (1, None, None, len(body), 4, "completed", "t1", None),
        )
        self.assertIsNotNone(stream["stream_id"])
        self.assertIsNotNone(stream["first_event_ms"])
        self.assertGreaterEqual(stream["latency_ms"], stream["first_event_ms"])

    def test_open_stream_recorded_at_sigterm(self) -> None:
        """
        A stream still open at SIGTERM is ended and its summary row written
        to the database (not left to the spool) before the gateway exits.
        """
        process, port = self.start_gateway()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api/aura/endless", headers={"X-Tenant-ID": "t1"})
        response = conn.getresponse()
        self.assertEqual(response.status, 200)
        self.assertIn(b"data:", response.read1(4096))
        self.stop_gateway(process)
        conn.close()
        [row] = [r for r in self.rows() if r["is_stream"]]
        self.assertEqual((row["path"], row["end_reason"]), ("/api/aura/endless", "shutdown"))
        spooled = [n for n in os.listdir(self.spool) if os.path.getsize(os.path.join(self.spool, n))] \
            if os.path.isdir(self.spool) else []
        self.assertEqual(spooled, [])

    def test_database_locked_until_sigterm(self) -> None:
        """
        A gateway whose database is locked from its start until just before
        SIGTERM (another writer holds the file) still puts every call in the
        table as it stops, not in the spool: the stopping history service
        waits for its connection and writes.
        """
        lock = sqlite3.connect(self.db, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        try:
            process, port = self.start_gateway()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            for i in range(3):
                self.assertEqual(call(conn, "GET", f"/api/aura/json?i={i}")[0], 200)
            conn.close()
            time.sleep(0.5)  # a flush tick: the rows go to the spool while locked
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        self.stop_gateway(process)
        self.assertEqual(sorted(r["query_string"] for r in self.rows()), ["i=0", "i=1", "i=2"])
        spooled = [n for n in os.listdir(self.spool) if os.path.getsize(os.path.join(self.spool, n))] \
            if os.path.isdir(self.spool) else []
        self.assertEqual(spooled, [])


class PostgresHistoryTests(GatewayHistory, SynchronousTestCase):
    """PostgreSQL in production: faults lose and double nothing."""

    def setUp(self) -> None:
        try:
            _sync_query("SELECT 1")
        except Exception as e:
            raise SkipTest(f"PostgreSQL not reachable at {DSN}: {e}")
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.dsn = DSN
        self.table = "gw_hist_" + uuid.uuid4().hex[:10]
        self.spool = os.path.join(self.workdir, "spool")
        self.upstream = start_fastapi_upstream(self)
        self.addCleanup(self.drop)

    def drop(self) -> None:
        _ensure_running()
        _sync_query(f"DROP TABLE IF EXISTS {self.table}")
        _sync_query(f"DROP TABLE IF EXISTS {self.table}_schema_version")

    def count(self) -> tuple[int, int]:
        [(rows, ids)] = _sync_query(f"SELECT count(*), count(DISTINCT id) FROM {self.table}")
        return int(rows), int(ids)

    def test_database_down_during_calls(self) -> None:
        """
        PostgreSQL stopped, 1000 calls through the gateway, PostgreSQL
        started again: exactly 1000 rows arrive, none twice.
        """
        process, conn = self.gateway_with_database_stopped()
        for n in range(1000):
            self.assertEqual(call(conn, "GET", f"/api/aura/json?n={n}")[0], 200)
        conn.close()
        _ensure_running()
        wait_for(lambda: self.count()[0] >= 1000, 60, "1000 rows")
        time.sleep(1.0)  # anything doubled would show up by now
        self.assertEqual(self.count(), (1000, 1000))
        self.stop_gateway(process)
        self.assertEqual(self.count(), (1000, 1000))

    def test_kill_9_with_rows_spooled(self) -> None:
        """
        Rows spooled while PostgreSQL is down survive a kill -9 of the
        gateway: the next gateway on the same spool stores them, once.
        """
        process, conn = self.gateway_with_database_stopped()
        for n in range(200):
            self.assertEqual(call(conn, "GET", f"/api/aura/json?n={n}")[0], 200)
        conn.close()

        def spooled() -> bool:
            total = 0
            for name in os.listdir(self.spool) if os.path.isdir(self.spool) else []:
                with open(os.path.join(self.spool, name), "rb") as f:
                    total += f.read().count(b"\n")
            return total >= 200

        wait_for(spooled, 20, "200 spooled rows")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        stop_process(process)
        _ensure_running()
        self.assertEqual(self.count(), (0, 0))
        second, _ = self.start_gateway()
        wait_for(lambda: self.count()[0] >= 200, 60, "200 replayed rows")
        time.sleep(1.0)
        self.assertEqual(self.count(), (200, 200))
        self.stop_gateway(second)

    def gateway_with_database_stopped(self) -> tuple[subprocess.Popen[bytes], http.client.HTTPConnection]:
        """A gateway whose history table exists, then PostgreSQL stopped (restarted at cleanup)."""
        if not os.path.isdir("/etc/postgresql"):
            raise SkipTest("no pg_ctlcluster-managed PostgreSQL here")
        process, port = self.start_gateway()
        wait_for(lambda: self.table_exists(), 20, "the history table")
        self.addCleanup(_ensure_running)
        _pg_ctl("stop")
        return process, http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def table_exists(self) -> bool:
        try:
            return bool(_sync_query("SELECT to_regclass(%s) IS NOT NULL", self.table)[0][0])
        except Exception:
            return False
