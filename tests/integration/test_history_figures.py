"""
What a history row says the client got, through the whole gateway: twistd,
the FastAPI + sse-starlette upstream, real sockets, an SQLite history file.
Also: the gateway's own errors carry their request id (the row's), the
routing check comes before the body limit, and an existing PostgreSQL table
of the previous schema is migrated at start.

Nothing here stops PostgreSQL (the migration test uses a table of its own).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import sqlite3
import time
import uuid
from typing import Any, Optional

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from aura_proxy.history.postgres import PostgresBackend
from aura_proxy.history.schema import COLUMNS, load_migrations, to_row
from tests.history_helpers import make_stream_record
from tests.integration.test_history_gateway import TWISTD, GatewayHistory, wait_for
from tests.integration.test_history_gateway import gateway_config as history_gateway_config
from tests.integration.upstreams import free_port, start_process


def gateway_config(listen: int, admin: int, upstream: int, dsn: str, table: str, spool: str) -> str:
    """A gateway on C{listen} with SQLite history, the shipped SSE defaults and a 1 KB body limit."""
    return history_gateway_config(listen, admin, upstream, dsn, table, spool, gateway="max_request_body = 1024")


def events_in(body: bytes) -> list[bytes]:
    """The gateway ids of the complete events (blocks with data) in an SSE body."""
    text = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    ids = []
    for block in text.split(b"\n\n")[:-1]:
        lines = block.split(b"\n")
        if any(line.startswith(b"data:") for line in lines):
            [event_id] = [line[3:].strip() for line in lines if line.startswith(b"id:")]
            ids.append(event_id)
    return ids


class Stream:
    """One SSE request through the gateway, read as the test says."""

    def __init__(self, port: int, path: str, last_event_id: Optional[bytes] = None) -> None:
        headers = {"X-Tenant-ID": "t1"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id.decode()
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.conn.request("GET", path, headers=headers)
        self.response = self.conn.getresponse()
        assert self.response.status == 200, self.response.status
        self.body = b""

    def read_events(self, n: int) -> list[bytes]:
        """Read until at least C{n} complete events came; their ids."""
        while len(events_in(self.body)) < n:
            data = self.response.read1(65536)
            if not data:
                break
            self.body += data
        return events_in(self.body)

    def read_to_end(self) -> list[bytes]:
        """Read until the gateway ends the response; the ids of every event."""
        while True:
            data = self.response.read1(65536)
            if not data:
                return events_in(self.body)
            self.body += data

    def leave(self) -> None:
        """Close the connection, as a browser tab that goes away."""
        self.response.close()
        self.conn.close()


def exchange(port: int, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Send raw C{request}, read until the gateway closes: status, headers (lower-case names), body."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


class StreamFiguresTests(GatewayHistory, SynchronousTestCase):
    """Streams and refusals through a twistd gateway, rows read from its SQLite file."""

    def setUp(self) -> None:
        self.use_sqlite()

    def start(self) -> int:
        """A twistd gateway with L{gateway_config}; stopped at cleanup."""
        listen, admin = free_port(), free_port()
        path = os.path.abspath(self.mktemp() + ".ini")
        with open(path, "w") as f:
            f.write(gateway_config(listen, admin, self.upstream, self.dsn, self.table, self.spool))
        process = start_process(
            self, [TWISTD, "-n", "--pidfile=", "aura-proxy", "--config", path],
            f"http://127.0.0.1:{admin}/healthz", cwd=self.workdir,
        )
        self.addCleanup(self.stop_gateway, process)
        return listen

    def rows(self, where: str = "1 = 1") -> list[sqlite3.Row]:
        """The history rows matching C{where}, oldest first ([] before the table exists)."""
        if not os.path.exists(self.db):
            return []
        conn = sqlite3.connect(self.db)
        conn.row_factory = sqlite3.Row
        try:
            return list(conn.execute(f"SELECT * FROM {self.table} WHERE {where} ORDER BY created_at"))
        except sqlite3.OperationalError:  # no table yet
            return []
        finally:
            conn.close()

    def test_client_reads_three_events_and_leaves(self) -> None:
        """
        A client that reads 3 of a stream's 9 events and leaves (the
        gateway detaches and reads the rest into the stream log): its one
        row, written when the tail ends, says 3 events delivered, the bytes
        the client got, the time until it left, and the 6 events read after
        it left as the detached tail, with the stream id of its event ids.
        """
        port = self.start()
        stream = Stream(port, "/api/aura/stream?count=8&interval=0.5")
        ids = stream.read_events(3)
        stream.leave()
        left = time.monotonic()
        self.assertEqual(len(ids), 3)
        self.assertEqual(self.rows("is_stream = 1"), [])  # not while the tail is read
        wait_for(lambda: bool(self.rows("is_stream = 1")), 30, "the stream's row")
        [row] = self.rows("is_stream = 1")
        self.assertEqual(
            (row["event_count"], row["detached_event_count"], row["end_reason"], row["resumed_after"]),
            (3, 6, "client_disconnect", None),
        )
        self.assertEqual(row["stream_id"].encode(), ids[0].split(b".")[0])
        self.assertGreaterEqual(row["response_size_bytes"], len(stream.body))
        self.assertLess(row["response_size_bytes"], len(stream.body) + 200)
        # The client's time: it left after about 1.5 s of a 4.5 s stream; the
        # gateway read 3 s more.
        self.assertLess(row["first_event_ms"], row["latency_ms"])
        self.assertGreater(row["detached_ms"], 1500)
        self.assertGreater(row["latency_ms"] + row["detached_ms"], 4000)
        self.assertLess(row["latency_ms"], 1500 + (time.monotonic() - left) * 1000 + 1000)

    def test_resumed_stream_sums_to_its_events(self) -> None:
        """
        A stream of 7 events read as 2, then (after a reconnect with
        Last-Event-ID) 5: two rows with the same stream id, delivered counts
        2 and 5 summing to the 7 events, the second naming the event it
        resumed after, the first the 5 read while detached.
        """
        port = self.start()
        first = Stream(port, "/api/aura/stream?count=6&interval=0.3")
        ids = first.read_events(2)
        first.leave()
        self.assertEqual(len(ids), 2)
        second = Stream(port, "/api/aura/stream?count=6&interval=0.3", last_event_id=ids[-1])
        rest = second.read_to_end()
        second.leave()
        self.assertEqual(len(ids) + len(rest), 7)
        wait_for(lambda: len(self.rows("is_stream = 1")) == 2, 30, "both rows of the stream")
        rows = {row["resumed_after"]: row for row in self.rows("is_stream = 1")}
        original, resumed = rows[None], rows[2]
        self.assertEqual(original["stream_id"], resumed["stream_id"])
        self.assertEqual(original["stream_id"].encode(), ids[0].split(b".")[0])
        self.assertEqual((original["event_count"], resumed["event_count"]), (2, 5))
        self.assertEqual((original["detached_event_count"], resumed["detached_event_count"]), (5, None))
        self.assertEqual((original["end_reason"], resumed["end_reason"]), ("client_disconnect", "completed"))
        self.assertEqual(resumed["response_size_bytes"], len(second.body))
        [(total,)] = [tuple(r) for r in self.sum_by_stream(original["stream_id"])]
        self.assertEqual(total, 7)

    def sum_by_stream(self, stream_id: str) -> list[Any]:
        """What a DBA runs: a stream's events delivered, over all its rows."""
        conn = sqlite3.connect(self.db)
        try:
            return list(conn.execute(
                f"SELECT sum(event_count) FROM {self.table} WHERE stream_id = ?", (stream_id,)))
        finally:
            conn.close()

    def test_refusals_carry_the_rows_request_id(self) -> None:
        """
        Through a real socket: a body over max_request_body is 413 and an
        unrouted path with such a body 404 (routing comes first), malformed
        HTTP a JSON 400; each carries a request id in its body and
        X-Request-ID, and the two recorded calls are rows with those ids.
        Refused before going upstream, a row's source and caller type are
        what the client sent (here: a source, no caller type); a forwarded
        call records the defaults it went upstream with.
        """
        port = self.start()
        too_big = (b"POST %s HTTP/1.1\r\nHost: gw\r\nX-Tenant-ID: t1\r\nX-DWP-Source: MOBILE\r\n"
                   b"Content-Type: application/json\r\nContent-Length: 2048\r\n\r\n")
        answers = {}
        for path, status, code in ((b"/api/aura/echo", 413, "body_too_large"),
                                   (b"/nowhere", 404, "no_route")):
            got, headers, body = exchange(port, too_big % path)
            error = json.loads(body)["error"]
            self.assertEqual((got, error["code"]), (status, code))
            self.assertEqual(headers[b"x-request-id"].decode(), error["request_id"])
            self.assertEqual(headers[b"connection"], b"close")
            answers[status] = error["request_id"]
        got, headers, body = exchange(port, b"NOT HTTP AT ALL\r\n\r\n")
        error = json.loads(body)["error"]
        self.assertEqual((got, error["code"]), (400, "bad_request"))
        self.assertEqual(headers[b"x-request-id"].decode(), error["request_id"])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api/aura/json", headers={"X-Tenant-ID": "t1"})
        forwarded = conn.getresponse()
        forwarded.read()
        self.assertEqual(forwarded.status, 200)
        forwarded_id = forwarded.getheader("X-Request-ID")
        conn.close()
        wait_for(lambda: len(self.rows()) == 3, 20, "three rows")
        rows = {row["id"]: row for row in self.rows()}
        self.assertEqual(set(rows), {answers[413], answers[404], forwarded_id})
        for status, request_id in answers.items():
            row = rows[request_id]
            self.assertEqual((row["status_code"], row["source"], row["caller_type"]), (status, "MOBILE", None))
        self.assertEqual((rows[answers[413]]["route"], rows[answers[404]]["route"]), ("aura", None))
        row = rows[forwarded_id]
        self.assertEqual((row["source"], row["caller_type"]), ("FRONTEND", "USER"))


DSN = "postgresql://postgres@127.0.0.1:5432/test"


class PostgresMigrationTests(TestCase):
    """An existing PostgreSQL table of the previous schema, migrated at start (a table of its own)."""

    timeout = 60

    def setUp(self) -> None:
        import psycopg2  # type: ignore[import-untyped]

        try:
            self.conn = psycopg2.connect(DSN, connect_timeout=3)
        except psycopg2.OperationalError as e:
            raise SkipTest(f"PostgreSQL not reachable at {DSN}: {e}")
        self.conn.autocommit = True
        self.addCleanup(self.conn.close)
        self.table = "hist_fig_" + uuid.uuid4().hex[:12]
        self.addCleanup(self.query, f"DROP TABLE IF EXISTS {self.table}_schema_version")
        self.addCleanup(self.query, f"DROP TABLE IF EXISTS {self.table}")

    def query(self, sql: str, *params: Any) -> list[Any]:
        """Run C{sql} on the test's own blocking connection."""
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    async def test_old_table_gains_the_stream_columns(self) -> None:
        """
        A table made by the previous release (migrations 1 and 2, one row)
        is migrated when a gateway connects: the four columns are added (the
        old row keeps its values, NULL in them), migration 3 is recorded, and
        rows with the new figures are stored.
        """
        old = COLUMNS[:COLUMNS.index("stream_id")]
        self.query(
            f"CREATE TABLE {self.table}_schema_version (version integer PRIMARY KEY, "
            "description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in load_migrations("postgres", self.table)[:2]:
            for statement in migration.statements:
                self.query(statement)
            self.query(f"INSERT INTO {self.table}_schema_version (version, description) VALUES (%s, %s)",
                       migration.version, migration.description)
        row = to_row(make_stream_record(1), 64)[:len(old)]
        self.query(f"INSERT INTO {self.table} ({', '.join(old)}) VALUES ({', '.join(['%s'] * len(old))})", *row)
        backend = PostgresBackend(DSN, self.table, reactor, reactor, timeout=10.0)
        self.addCleanup(backend.close)
        await backend.connect()
        columns = self.query(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s ORDER BY ordinal_position",
            self.table,
        )
        self.assertEqual(tuple(c[0] for c in columns), COLUMNS)
        self.assertEqual(self.query(f"SELECT version FROM {self.table}_schema_version ORDER BY version"),
                         [(1,), (2,), (3,)])
        new = make_stream_record(2, stream_id="S1", resumed_after=4, detached_event_count=6, detached_ms=1.5)
        self.assertEqual(await backend.insert([to_row(new, 64)]), 1)
        self.assertEqual(
            self.query(f"SELECT id, event_count, stream_id, resumed_after, detached_event_count, detached_ms "
                       f"FROM {self.table} ORDER BY id"),
            [("req-000001", 42, None, None, None, None), ("req-000002", 42, "S1", 4, 6, 1.5)],
        )
        await backend.connect()  # again: nothing applied twice
        self.assertEqual(len(self.query(f"SELECT version FROM {self.table}_schema_version")), 3)
