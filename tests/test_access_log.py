"""
Tests for L{aura_proxy.access_log} (the line formats, the buffered writer, its
service) and L{aura_proxy.stages.access_log.AccessLog} (the end stage).
"""

from __future__ import annotations

import json
import os
import signal
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from aura_proxy.access_log import (
    AccessLogService,
    AccessLogWriter,
    _pieces,
    access_log_service,
    install_usr1,
    json_line,
    line_format,
    text_line,
)
from aura_proxy.config import LogConfig
from aura_proxy.stages.access_log import AccessLog
from aura_proxy.stages.recording import Record
from tests.history_helpers import EPOCH, make_record, make_stream_record
from tests.test_stages import C, History, make_call

#: A user agent with everything a client could use to forge or break a line.
NASTY = 'a "quoted" \\ back\nslash\r\x00\x1b[31m é 漢 \u2028 end'


class JsonLineTests(SynchronousTestCase):
    """L{json_line}: one JSON object per line, the history row's fields."""

    def test_plain_call(self) -> None:
        """A plain call's line holds every history field (ISO time, the id as request_id); stream fields null."""
        row = make_record(1)
        line = json_line(row)
        self.assertTrue(line.endswith("}\n"))
        self.assertEqual(line.count("\n"), 1)
        got = json.loads(line)
        self.assertEqual(got, {
            "created_at": "2026-01-01T00:00:00.001Z", "request_id": "req-000001", "trace_id": "trace-1",
            "client_ip": "10.0.0.1", "method": "POST", "path": "/v1/agents/agent-1/run/1",
            "query_string": "x=1", "route": "agents", "status_code": 200, "latency_ms": 12.5,
            "request_size_bytes": 100, "response_size_bytes": 2000, "is_stream": False,
            "first_event_ms": None, "event_count": None, "end_reason": None,
            "tenant_id": "tenant-a", "user_id": "user-1", "agent_id": "agent-1", "source": "header",
            "caller_type": "user", "user_agent": "pytest",
        })

    def test_stream(self) -> None:
        """A stream's line has its first event time, event count and end reason; sizes and query null."""
        got = json.loads(json_line(make_stream_record(2)))
        self.assertEqual(
            (got["is_stream"], got["first_event_ms"], got["event_count"], got["end_reason"],
             got["query_string"], got["request_size_bytes"], got["response_size_bytes"]),
            (True, 3.25, 42, "completed", None, None, None),
        )

    def test_unset_values_are_null(self) -> None:
        """Missing identity, route, trace id and client address are JSON null, never the text None."""
        row = make_record(3, tenant_id=None, user_id=None, agent_id=None, source=None, caller_type=None,
                          route=None, trace_id=None, client_ip=None, user_agent=None, query_string=None,
                          response_size_bytes=None)
        got = json.loads(json_line(row))
        for key in ("tenant_id", "user_id", "agent_id", "source", "caller_type", "route", "trace_id",
                    "client_ip", "user_agent", "query_string", "response_size_bytes"):
            self.assertIsNone(got[key], key)
        stream = make_stream_record(4)
        stream.first_event_ms = stream.event_count = stream.end_reason = None
        got = json.loads(json_line(stream))
        self.assertEqual((got["first_event_ms"], got["event_count"], got["end_reason"]), (None, None, None))

    def test_client_strings_are_escaped(self) -> None:
        """
        Quotes, backslashes, line breaks, control and non-ASCII characters in
        client strings cannot break or forge a line: the line is one line of
        ASCII and reads back as the very strings.
        """
        row = make_record(5, user_agent=NASTY, path='/x"},{"status_code":200', tenant_id="t\n{")
        line = json_line(row)
        self.assertEqual(line.count("\n"), 1)
        line.encode("ascii")
        got = json.loads(line)
        self.assertEqual((got["user_agent"], got["path"], got["tenant_id"]),
                         (NASTY, '/x"},{"status_code":200', "t\n{"))

    def test_milliseconds(self) -> None:
        """The time is rounded to the millisecond, and the cached second changes when the second does."""
        self.assertEqual(json.loads(json_line(make_record(0, created_at=EPOCH + 59.9994)))["created_at"],
                         "2026-01-01T00:00:59.999Z")
        self.assertEqual(json.loads(json_line(make_record(0, created_at=EPOCH + 59.9996)))["created_at"],
                         "2026-01-01T00:01:00.000Z")
        self.assertEqual(json.loads(json_line(make_record(0, created_at=EPOCH + 60.25)))["created_at"],
                         "2026-01-01T00:01:00.250Z")


class TextLineTests(SynchronousTestCase):
    """L{text_line}: one line for people and grep."""

    def test_plain_call(self) -> None:
        """Time, client, quoted request line, status, latency, sizes, then key=value fields."""
        self.assertEqual(
            text_line(make_record(1)),
            '2026-01-01T00:00:00.001Z 10.0.0.1 "POST /v1/agents/agent-1/run/1?x=1" 200 12.500ms in=100 '
            'out=2000 route=agents tenant="tenant-a" user="user-1" agent="agent-1" source="header" '
            'caller_type="user" ua="pytest" id=req-000001 trace="trace-1"\n',
        )

    def test_stream(self) -> None:
        """A stream's line says stream, its first event time, events and end reason instead of sizes."""
        line = text_line(make_stream_record(2))
        self.assertIn(
            '"POST /v1/agents/agent-1/run/2" 200 12.500ms stream first_event=3.250ms events=42 '
            "end=completed route=agents ", line)

    def test_unset_values(self) -> None:
        """A value that is not set is a bare -, never the text None."""
        row = make_record(3, tenant_id=None, user_id=None, agent_id=None, source=None, caller_type=None,
                          route=None, trace_id=None, client_ip=None, user_agent=None, query_string=None,
                          request_size_bytes=None, response_size_bytes=None)
        self.assertEqual(
            text_line(row),
            '2026-01-01T00:00:00.003Z - "POST /v1/agents/agent-1/run/3" 200 12.500ms in=- out=- route=- '
            "tenant=- user=- agent=- source=- caller_type=- ua=- id=req-000003 trace=-\n",
        )
        self.assertNotIn("None", text_line(make_stream_record(4)))

    def test_client_strings_are_escaped(self) -> None:
        """
        Client strings are quoted and escaped as JSON strings: no line break,
        no unescaped quote, only ASCII; a forwarded client address that is
        not a plain address is quoted too.
        """
        row = make_record(5, user_agent=NASTY, path='/x" 200 1ms', client_ip="1.2.3.4 evil", trace_id='"')
        line = text_line(row)
        self.assertEqual(line.count("\n"), 1)
        line.encode("ascii")
        self.assertIn(' ua=%s ' % json.dumps(NASTY), line)
        self.assertIn('"POST /x\\" 200 1ms?x=1"', line)
        self.assertIn(' "1.2.3.4 evil" ', line)
        self.assertIn(' trace="\\""', line)

    def test_line_format(self) -> None:
        """[log] format names the formatter."""
        self.assertIs(line_format("json"), json_line)
        self.assertIs(line_format("text"), text_line)


class WriterTests(SynchronousTestCase):
    """L{AccessLogWriter}: buffered lines, one write per flush, reopening."""

    def setUp(self) -> None:
        self.path = self.mktemp()

    def read(self, path: str = "") -> str:
        with open(path or self.path, encoding="ascii") as f:
            return f.read()

    def test_buffers_until_flushed(self) -> None:
        """Lines stay in memory until flush, which writes them all, in order, in one write."""
        writer = AccessLogWriter(self.path)
        writer.open()
        self.addCleanup(writer.close)
        writer.write("one\n")
        writer.write("two\n")
        self.assertEqual(self.read(), "")
        writes: list[int] = []
        real = os.write

        def counting(fd: int, data: Any) -> int:
            writes.append(fd)
            return real(fd, data)

        self.patch(os, "write", counting)
        writer.flush()
        self.assertEqual(self.read(), "one\ntwo\n")
        self.assertEqual(len(writes), 1)
        self.assertEqual(writer.written, 2)
        writer.flush()  # nothing buffered: no write
        self.assertEqual(len(writes), 1)

    def test_full_buffer_is_written(self) -> None:
        """At max_lines buffered lines, the writer writes without waiting for the timer."""
        writer = AccessLogWriter(self.path, max_lines=3)
        writer.open()
        self.addCleanup(writer.close)
        writer.write("1\n")
        writer.write("2\n")
        self.assertEqual(self.read(), "")
        writer.write("3\n")
        self.assertEqual(self.read(), "1\n2\n3\n")

    def test_appends(self) -> None:
        """An existing file is appended to, never truncated."""
        with open(self.path, "w") as f:
            f.write("old\n")
        writer = AccessLogWriter(self.path)
        writer.open()
        writer.write("new\n")
        writer.close()
        self.assertEqual(self.read(), "old\nnew\n")

    def test_reopen_after_move(self) -> None:
        """
        After the file is moved away (logrotate), reopen writes what was
        buffered to the moved file and later lines to a new file at the path.
        """
        writer = AccessLogWriter(self.path)
        writer.open()
        self.addCleanup(writer.close)
        writer.write("before\n")
        os.rename(self.path, self.path + ".1")
        writer.write("buffered\n")
        writer.reopen()
        writer.write("after\n")
        writer.flush()
        self.assertEqual(self.read(self.path + ".1"), "before\nbuffered\n")
        self.assertEqual(self.read(), "after\n")

    def test_reopen_failure_keeps_the_old_file(self) -> None:
        """When the path cannot be opened again, lines keep going to the file already open."""
        opened: list[str] = []

        def open_file(path: str) -> int:
            if opened:
                raise PermissionError(13, "Permission denied")
            opened.append(path)
            return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

        writer = AccessLogWriter(self.path, open_file=open_file)
        writer.open()
        self.addCleanup(writer.close)
        writer.reopen()
        writer.write("still\n")
        writer.flush()
        self.assertEqual(self.read(), "still\n")

    def test_write_failure_drops_and_recovers(self) -> None:
        """A failed write drops its lines (counted) without raising; the next good write goes through."""
        writer = AccessLogWriter(self.path)
        writer.open()
        self.addCleanup(writer.close)
        real = os.write

        def broken(fd: int, data: Any) -> int:
            raise OSError(28, "No space left on device")

        self.patch(os, "write", broken)
        writer.write("lost\n")
        writer.flush()
        self.assertEqual((writer.dropped, writer.written), (1, 0))
        self.patch(os, "write", real)
        writer.write("kept\n")
        writer.flush()
        self.assertEqual(self.read(), "kept\n")
        self.assertEqual((writer.dropped, writer.written), (1, 1))

    def test_stdout_is_descriptor_1_never_closed(self) -> None:
        """stdout writes to the process's descriptor (given here as a pipe) and close leaves it open."""
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        writer = AccessLogWriter("stdout", stdout_fd=w)
        writer.open()
        writer.write("line\n")
        writer.close()
        self.assertEqual(os.read(r, 100), b"line\n")
        os.fstat(w)  # still open
        writer.reopen()  # stdout: nothing to reopen, nothing fails

    def test_pipe_writes_are_whole_lines(self) -> None:
        """To a pipe (shared by worker processes), writes are cut after line breaks, each at most 4096 bytes."""
        line = "x" * 99 + "\n"
        data = (line * 100).encode()
        pieces = _pieces(data, 4096)
        self.assertEqual(b"".join(pieces), data)
        self.assertTrue(all(len(p) <= 4096 and p.endswith(b"\n") for p in pieces))
        long = b"y" * 5000 + b"\n" + b"z\n"
        self.assertEqual(_pieces(long, 4096), [b"y" * 5000 + b"\n", b"z\n"])

    def test_pipe_flush(self) -> None:
        """A flush to a pipe delivers every line, in order."""
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        writer = AccessLogWriter("stdout", stdout_fd=w)
        writer.open()
        for i in range(100):
            writer.write("%04d%s\n" % (i, "." * 95))
        writer.flush()
        got = b""
        while len(got) < 10000:
            got += os.read(r, 65536)
        self.assertEqual(got.decode().splitlines(), ["%04d%s" % (i, "." * 95) for i in range(100)])


class ServiceTests(SynchronousTestCase):
    """L{AccessLogService}: the flush timer, stop, SIGUSR1."""

    def setUp(self) -> None:
        self.path = self.mktemp()

    def read(self) -> str:
        with open(self.path) as f:
            return f.read()

    def test_timer_flushes(self) -> None:
        """Buffered lines are written when the one-second timer fires, not before."""
        clock = Clock()
        service = AccessLogService(AccessLogWriter(self.path), clock, signals=False)
        service.startService()
        self.addCleanup(service.stopService)
        service.write("a\n")
        clock.advance(0.9)
        self.assertEqual(self.read(), "")
        clock.advance(0.1)
        self.assertEqual(self.read(), "a\n")
        service.write("b\n")
        clock.advance(1)
        self.assertEqual(self.read(), "a\nb\n")

    def test_stop_flushes_and_closes(self) -> None:
        """Stopping writes what is buffered, stops the timer and closes the file."""
        clock = Clock()
        service = AccessLogService(AccessLogWriter(self.path), clock, signals=False)
        service.startService()
        service.write("last\n")
        service.stopService()
        self.assertEqual(self.read(), "last\n")
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertFalse(service.writer.is_open)

    def test_unopenable_file_stops_the_start(self) -> None:
        """A file that cannot be opened fails the start with an error naming [log] access and the path."""
        path = os.path.join(self.mktemp(), "missing-dir", "access.log")
        service = AccessLogService(AccessLogWriter(path), Clock(), signals=False)
        error = self.assertRaises(OSError, service.startService)
        self.assertIn("[log] access", str(error))
        self.assertIn(path, str(error))

    def test_opened_before_privileges_are_dropped(self) -> None:
        """privilegedStartService opens the file (before twistd's --uid); startService keeps that descriptor."""
        service = AccessLogService(AccessLogWriter(self.path), Clock(), signals=False)
        service.privilegedStartService()
        self.assertTrue(service.writer.is_open)
        os.rename(self.path, self.path + ".moved")
        service.startService()
        service.write("x\n")
        service.stopService()
        with open(self.path + ".moved") as f:
            self.assertEqual(f.read(), "x\n")
        path = os.path.join(self.mktemp(), "missing-dir", "access.log")
        error = self.assertRaises(
            OSError, AccessLogService(AccessLogWriter(path), Clock(), signals=False).privilegedStartService)
        self.assertIn("[log] access", str(error))

    def test_sigusr1_reopens(self) -> None:
        """
        With signals, SIGUSR1 has the reactor reopen the file (the handler
        only schedules it) and the handler there before still runs; stopping
        puts that handler back.
        """
        reactor = MemoryReactorClock()
        scheduled: list[Any] = []
        reactor.callFromThread = lambda f, *a, **kw: scheduled.append(f)  # type: ignore[attr-defined]
        before: list[int] = []
        previous = signal.signal(signal.SIGUSR1, lambda n, frame: before.append(n))
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        previous_handler = signal.getsignal(signal.SIGUSR1)
        service = AccessLogService(AccessLogWriter(self.path), reactor)
        service.startService()
        service.write("one\n")
        os.rename(self.path, self.path + ".1")
        os.kill(os.getpid(), signal.SIGUSR1)
        self.assertEqual(before, [signal.SIGUSR1])
        [reopen] = scheduled
        reopen()
        service.write("two\n")
        service.stopService()
        with open(self.path + ".1") as f:
            self.assertEqual(f.read(), "one\n")
        self.assertEqual(self.read(), "two\n")
        self.assertIs(signal.getsignal(signal.SIGUSR1), previous_handler)

    def test_install_usr1_restore(self) -> None:
        """install_usr1's restore puts back the default disposition it found."""
        previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        restore = install_usr1(MemoryReactorClock(), lambda: None)
        self.assertNotEqual(signal.getsignal(signal.SIGUSR1), signal.SIG_DFL)
        restore()
        self.assertEqual(signal.getsignal(signal.SIGUSR1), signal.SIG_DFL)

    def test_off(self) -> None:
        """access = off makes no service; stdout and a path do."""
        self.assertIsNone(access_log_service(LogConfig(access="off"), Clock()))
        self.assertEqual(access_log_service(LogConfig(access="stdout"), Clock()).writer.target, "stdout")  # type: ignore[union-attr]
        self.assertEqual(access_log_service(LogConfig(access=self.path), Clock()).writer.target, self.path)  # type: ignore[union-attr]


class AccessLogStageTests(SynchronousTestCase):
    """L{AccessLog}: the end stage."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100.5)
        self.history = History()
        self.record = Record(C.headers, self.clock, self.history)  # type: ignore[arg-type]
        self.lines: list[str] = []

    def test_one_line_from_the_history_row(self) -> None:
        """An ended call gives one line, made from the very row history got (made once)."""
        stage = AccessLog(self.record, json_line, self.lines.append)
        call = make_call(b"/api/aura/x?q=1", X_Tenant_ID="t1", X_Trace_ID="tr")
        call.route, call.status = C.routes[0], 200
        self.record.ended(call.request, call)
        stage.ended(call.request, call)
        [row] = self.history.records
        self.assertIs(call.row, row)
        [line] = self.lines
        self.assertEqual(line, json_line(row))
        got = json.loads(line)
        self.assertEqual((got["request_id"], got["trace_id"], got["tenant_id"], got["query_string"]),
                         (call.id, "tr", "t1", "q=1"))

    def test_without_history(self) -> None:
        """With history off, the access log still gets its line (the row is made for it)."""
        record = Record(C.headers, self.clock, None)
        stage = AccessLog(record, text_line, self.lines.append)
        call = make_call(X_Tenant_ID="t1")
        call.status = 404
        record.ended(call.request, call)
        stage.ended(call.request, call)
        [line] = self.lines
        self.assertIn(" 404 ", line)
        self.assertIn(call.id, line)
