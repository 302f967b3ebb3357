"""
The access log: C{[log] access = off | stdout | PATH}, C{format = json | text}.

One line per call, written when the call ends (for a stream: when it ends,
one line for the whole stream; nothing per event), made from the same
L{CallRecord} as the call's history row (L{aura_proxy.stages.access_log}).

It is cheap enough to stay on (docs/operations.md, BENCHMARKS.md):

  - a line is one C{%} format of the row's values into a fixed template
    (L{json_line}, L{text_line}); client strings go through the C encoder
    of the C{json} module, which escapes quotes, backslashes, control and
    non-ASCII characters, so a line is always one line of ASCII;
  - L{AccessLogWriter} appends the line to a list: no system call, no
    twisted.logger event; the list is written with one C{write(2)} when
    the timer of L{AccessLogService} fires (every second), when it holds
    L{AccessLogWriter.max_lines} lines, and when the service stops.

A file is opened with C{O_APPEND} (several worker processes may share it:
each write lands whole at the end) and reopened on SIGUSR1, so logrotate can
move it away and signal the gateway (L{install_usr1}; with C{workers = N}
the parent forwards the signal to every worker).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
import time
from json.encoder import encode_basestring_ascii
from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from aura_proxy.config import ACCESS_LOG_OFF, ACCESS_LOG_STDOUT, LogConfig
from aura_proxy.history.record import CallRecord

__all__ = [
    "AccessLogService",
    "AccessLogWriter",
    "FLUSH_INTERVAL",
    "LineFormat",
    "access_log_service",
    "install_usr1",
    "json_line",
    "line_format",
    "text_line",
]

_log = Logger()

#: Seconds between two writes of the buffered lines.
FLUSH_INTERVAL = 1.0

#: Makes one access-log line (ending in a line break) from a call's row.
LineFormat = Callable[[CallRecord], str]

# -- formats ---------------------------------------------------------------------

#: A JSON string literal of a str, quotes included, only ASCII (C when built).
_quote = encode_basestring_ascii

#: The last second formatted: [Unix second, "YYYY-MM-DDTHH:MM:SS"].
_second: list[Any] = [None, ""]


def _iso(t: float) -> str:
    """C{t} (Unix time) as ISO 8601 UTC, rounded to the millisecond; the seconds formatted once per second."""
    whole, ms = divmod(int(t * 1000.0 + 0.5), 1000)
    cache = _second
    if cache[0] != whole:
        cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        cache[0] = whole
    return "%s.%03dZ" % (cache[1], ms)


_JSON_CALL = (
    '{"created_at":"%s","request_id":"%s","trace_id":%s,"client_ip":%s,"method":%s,'
    '"path":%s,"query_string":%s,"route":%s,"status_code":%d,"latency_ms":%.3f,'
    '"request_size_bytes":%s,"response_size_bytes":%s,"is_stream":false,'
    '"first_event_ms":null,"event_count":null,"end_reason":null,'
    '"tenant_id":%s,"user_id":%s,"agent_id":%s,"source":%s,"caller_type":%s,"user_agent":%s}\n'
)
_JSON_STREAM = (
    '{"created_at":"%s","request_id":"%s","trace_id":%s,"client_ip":%s,"method":%s,'
    '"path":%s,"query_string":null,"route":%s,"status_code":%d,"latency_ms":%.3f,'
    '"request_size_bytes":null,"response_size_bytes":null,"is_stream":true,'
    '"first_event_ms":%s,"event_count":%s,"end_reason":%s,'
    '"tenant_id":%s,"user_id":%s,"agent_id":%s,"source":%s,"caller_type":%s,"user_agent":%s}\n'
)


def json_line(r: CallRecord) -> str:
    """
    The JSON line of a call: one object with the history row's fields (the
    same names; C{created_at} in ISO 8601 UTC, the row's C{id} as
    C{request_id}), every key always present (null when not set).
    """
    q = _quote
    head = (
        _iso(r.created_at), r.id,
        "null" if r.trace_id is None else q(r.trace_id),
        "null" if r.client_ip is None else q(r.client_ip),
        q(r.method), q(r.path),
    )
    route = "null" if r.route is None else q(r.route)
    tail = (
        "null" if r.tenant_id is None else q(r.tenant_id),
        "null" if r.user_id is None else q(r.user_id),
        "null" if r.agent_id is None else q(r.agent_id),
        "null" if r.source is None else q(r.source),
        "null" if r.caller_type is None else q(r.caller_type),
        "null" if r.user_agent is None else q(r.user_agent),
    )
    if r.is_stream:
        first = r.first_event_ms
        return _JSON_STREAM % (head + (
            route, r.status_code, r.latency_ms,
            "null" if first is None else "%.3f" % first,
            "null" if r.event_count is None else r.event_count,
            "null" if r.end_reason is None else q(r.end_reason),
        ) + tail)
    return _JSON_CALL % (head + (
        "null" if r.query_string is None else q(r.query_string),
        route, r.status_code, r.latency_ms,
        "null" if r.request_size_bytes is None else r.request_size_bytes,
        "null" if r.response_size_bytes is None else r.response_size_bytes,
    ) + tail)


#: What may stand unquoted in a text line (an IP address, a route name).
_BARE = re.compile(r"[A-Za-z0-9_.:\-]+").fullmatch

_TEXT_CALL = (
    "%s %s %s %d %.3fms in=%s out=%s route=%s tenant=%s user=%s agent=%s source=%s "
    "caller_type=%s ua=%s id=%s trace=%s\n"
)
_TEXT_STREAM = (
    "%s %s %s %d %.3fms stream first_event=%s events=%s end=%s route=%s tenant=%s user=%s "
    "agent=%s source=%s caller_type=%s ua=%s id=%s trace=%s\n"
)


def _bare(value: Optional[str]) -> str:
    if value is None:
        return "-"
    return value if _BARE(value) else _quote(value)


def text_line(r: CallRecord) -> str:
    """
    The text line of a call, for people and grep::

        TIME CLIENT_IP "METHOD PATH?QUERY" STATUS LATENCYms in=BYTES out=BYTES route=NAME
            tenant="…" user="…" agent="…" source="…" caller_type="…" ua="…" id=REQUEST_ID trace="…"

    a stream with C{stream first_event=MSms events=N end=REASON} in place of
    the sizes.  Client strings are quoted and escaped as JSON strings (ASCII
    only); a value that is not set is C{-}.
    """
    q = _quote
    query = r.query_string
    request = q(f"{r.method} {r.path}?{query}" if query else f"{r.method} {r.path}")
    head = (_iso(r.created_at), _bare(r.client_ip), request, r.status_code, r.latency_ms)
    tail = (
        _bare(r.route),
        "-" if r.tenant_id is None else q(r.tenant_id),
        "-" if r.user_id is None else q(r.user_id),
        "-" if r.agent_id is None else q(r.agent_id),
        "-" if r.source is None else q(r.source),
        "-" if r.caller_type is None else q(r.caller_type),
        "-" if r.user_agent is None else q(r.user_agent),
        r.id,
        "-" if r.trace_id is None else q(r.trace_id),
    )
    if r.is_stream:
        first = r.first_event_ms
        return _TEXT_STREAM % (head + (
            "-" if first is None else "%.3fms" % first,
            "-" if r.event_count is None else r.event_count,
            r.end_reason or "-",
        ) + tail)
    return _TEXT_CALL % (head + (
        "-" if r.request_size_bytes is None else r.request_size_bytes,
        "-" if r.response_size_bytes is None else r.response_size_bytes,
    ) + tail)


def line_format(name: str) -> LineFormat:
    """The formatter C{[log] format} names: C{json} or C{text}."""
    return {"json": json_line, "text": text_line}[name]


# -- the writer ------------------------------------------------------------------

#: The largest write that a pipe takes whole (POSIX PIPE_BUF on Linux): lines
#: of several worker processes sharing one stdout pipe are not interleaved.
_PIPE_ATOMIC = 4096


def _open_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


class AccessLogWriter:
    """
    Access-log lines, buffered in memory and written in one piece.

    L{write} only appends to a list (writing when it holds L{max_lines});
    L{flush} writes the lot.  A failed write drops the lines it held (counted
    in L{dropped}) and is logged once until writing works again: the access
    log never stops a call.

    @ivar target: C{stdout} or a file path.
    @ivar written: lines written so far.
    @ivar dropped: lines lost to failed writes.
    """

    def __init__(
        self,
        target: str,
        *,
        max_lines: int = 1000,
        open_file: Callable[[str], int] = _open_append,
        stdout_fd: int = 1,
    ) -> None:
        self.target = target
        self.max_lines = max_lines
        self._open_file = open_file
        self._stdout_fd = stdout_fd
        self._fd: Optional[int] = None
        self._chunked = False
        self._lines: list[str] = []
        self._failing = False
        self.written = 0
        self.dropped = 0

    @property
    def is_open(self) -> bool:
        """Whether lines are being written somewhere (after L{open}, before L{close})."""
        return self._fd is not None

    def open(self) -> None:
        """
        Open the target: stdout is the process's descriptor 1 (never closed
        here); a file is opened for appending, created when missing.

        @raise OSError: when the file cannot be opened.
        """
        if self.target == ACCESS_LOG_STDOUT:
            fd = self._stdout_fd
        else:
            fd = self._open_file(self.target)
        self._use(fd)

    def _use(self, fd: int) -> None:
        self._fd = fd
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            regular = False
        # O_APPEND writes to a regular file land whole; a pipe's only up to PIPE_BUF.
        self._chunked = not regular

    def write(self, line: str) -> None:
        """Buffer one line (ending in a line break): no system call until full or flushed."""
        lines = self._lines
        lines.append(line)
        if len(lines) >= self.max_lines:
            self.flush()

    def flush(self) -> None:
        """Write every buffered line now (nothing when there is none)."""
        lines = self._lines
        if not lines:
            return
        self._lines = []
        fd = self._fd
        if fd is None:
            self.dropped += len(lines)
            return
        data = "".join(lines).encode("utf-8", "backslashreplace")
        try:
            if self._chunked and len(data) > _PIPE_ATOMIC:
                for piece in _pieces(data, _PIPE_ATOMIC):
                    _write_all(fd, piece)
            else:
                _write_all(fd, data)
        except OSError as e:
            self.dropped += len(lines)
            if not self._failing:
                self._failing = True
                _log.warn(
                    "access log: cannot write to {target} ({why}); lines are dropped until it works",
                    target=self.target, why=e.strerror or e,
                )
            return
        if self._failing:
            self._failing = False
            _log.info("access log: writing to {target} again", target=self.target)
        self.written += len(lines)

    def reopen(self) -> None:
        """
        Write what is buffered to the file, then open its path anew (after
        logrotate moved it away); stdout is kept.  When the path cannot be
        opened, the old file stays in use (logged).
        """
        self.flush()
        if self.target == ACCESS_LOG_STDOUT or self._fd is None:
            return
        try:
            fd = self._open_file(self.target)
        except OSError as e:
            _log.warn(
                "access log: cannot reopen {target} ({why}); still writing to the file it had open",
                target=self.target, why=e.strerror or e,
            )
            return
        old = self._fd
        self._use(fd)
        os.close(old)
        _log.info("access log: reopened {target}", target=self.target)

    def close(self) -> None:
        """Write what is buffered and close the file (stdout stays open)."""
        self.flush()
        fd, self._fd = self._fd, None
        if fd is not None and fd != self._stdout_fd:
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except BlockingIOError:
            # A non-blocking pipe that is full: wait for room rather than lose lines.
            import select

            select.select([], [fd], [], 1.0)
            continue
        view = view[n:]


def _pieces(data: bytes, limit: int) -> list[bytes]:
    """C{data} cut after line breaks into pieces of at most C{limit} bytes (a longer line whole)."""
    pieces = []
    start = 0
    end = len(data)
    while start < end:
        if end - start <= limit:
            pieces.append(data[start:])
            break
        cut = data.rfind(b"\n", start, start + limit)
        if cut < 0:
            cut = data.find(b"\n", start + limit)
            if cut < 0:
                cut = end - 1
        pieces.append(data[start:cut + 1])
        start = cut + 1
    return pieces


# -- SIGUSR1 ---------------------------------------------------------------------


def install_usr1(reactor: Any, callback: Callable[[], None]) -> Callable[[], None]:
    """
    Run C{callback} in the reactor whenever the process gets SIGUSR1; the
    handler that was there before (twistd's own, which rotates its
    C{--logfile}) still runs too.  Returns what puts the old handler back.
    """
    previous = signal.getsignal(signal.SIGUSR1)

    def handler(number: int, frame: Any) -> None:
        # Not in the middle of a write: the reactor runs it next.
        reactor.callFromThread(callback)
        if callable(previous):
            previous(number, frame)

    signal.signal(signal.SIGUSR1, handler)

    def restore() -> None:
        if signal.getsignal(signal.SIGUSR1) is handler:
            signal.signal(signal.SIGUSR1, previous if previous is not None else signal.SIG_DFL)

    return restore


# -- the service -----------------------------------------------------------------


class AccessLogService(Service):
    """
    Runs an L{AccessLogWriter}: opens it at start, flushes it every
    C{interval} seconds on C{clock} (the reactor: it also runs the SIGUSR1
    handler's work), reopens it on SIGUSR1 (with C{signals}; for stdout the
    handler only flushes, but it is there: SIGUSR1's default would end the
    process), writes the rest and closes it at stop.

    @ivar writer: the writer; L{write} is its bound C{write}.
    """

    name = "access-log"

    def __init__(
        self,
        writer: AccessLogWriter,
        clock: Any,
        *,
        interval: float = FLUSH_INTERVAL,
        signals: bool = True,
    ) -> None:
        self.writer = writer
        self.write = writer.write
        self._clock = clock
        self._interval = interval
        self._signals = signals
        self._ticker: Optional[LoopingCall] = None
        self._restore: Optional[Callable[[], None]] = None

    def privilegedStartService(self) -> None:
        """
        Open the log before twistd gives up its privileges (C{--uid}), as
        nginx opens its logs: a file that cannot be opened stops the start
        here, before the reactor runs.
        """
        Service.privilegedStartService(self)
        self._open()

    def _open(self) -> None:
        if self.writer.is_open:
            return
        try:
            self.writer.open()
        except OSError as e:
            raise OSError(
                e.errno or errno.EIO,
                f"[log] access: cannot open {self.writer.target!r} ({e.strerror or e})",
            ) from e

    def startService(self) -> None:
        """Open the log if not yet open (a file that cannot be opened stops the start), start the timer."""
        self._open()
        Service.startService(self)
        self._ticker = LoopingCall(self.writer.flush)
        self._ticker.clock = self._clock  # type: ignore[assignment]
        self._ticker.start(self._interval, now=False)
        if self._signals:
            self._restore = install_usr1(self._clock, self.writer.reopen)

    def stopService(self) -> None:
        """Stop the timer, write what is buffered, close the file."""
        Service.stopService(self)
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._ticker = None
        if self._restore is not None:
            self._restore()
            self._restore = None
        self.writer.close()


def access_log_service(config: LogConfig, clock: Any, *, signals: bool = True) -> Optional[AccessLogService]:
    """The access log C{config} asks for, or None for C{access = off}."""
    if config.access == ACCESS_LOG_OFF:
        return None
    return AccessLogService(AccessLogWriter(config.access), clock, signals=signals)

