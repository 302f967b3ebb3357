"""
Streams that survive their instance, measured end to end with real processes:
gateways run by twistd, Redis for the stream logs, SQLite or PostgreSQL for
call history, HAProxy as the load balancer, ssesrv (shared/bench/ssesrv.c) as
a resumable upstream (a request with Last-Event-ID N starts at event N+1), and
clients that reconnect exactly as a browser's EventSource does (after the
stream's retry: time, with Last-Event-ID).

Scenarios (bench/rolling-restart SCENARIO --help):

  rolling   two gateways behind HAProxy, N streams; SIGTERM one, start it
            again, then the other: every stream must complete with 0 lost
            and 0 duplicated events, and history must hold every connection
            (a resumed one is its own row) exactly once.
  takeover  two gateways; one stream on A; after event 21, A gets SIGTERM (or
            SIGKILL with --signal KILL); the client resumes on B and must get
            every event exactly once, within seconds.
  drain     one gateway; open streams and POSTs in flight; SIGTERM: every POST
            answered whole, every stream ended after a whole event with a
            retry: hint, history has every call, the gateway exits.

Prints one JSON object (the result) on stdout; exits 1 if the checks fail,
77 if something it needs is missing (cc, haproxy, Redis, PostgreSQL).
Uses only free ports on 127.0.0.1, its own history table / files and a
random Redis key space (stream ids); it deletes nothing shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
SKIP = 77


class Missing(Exception):
    """Something the scenario needs is not there (exit 77)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def twistd() -> str:
    for cand in (ROOT / ".venv" / "bin" / "twistd", Path(sys.executable).parent / "twistd"):
        if cand.exists():
            return str(cand)
    found = shutil.which("twistd")
    if not found:
        raise Missing("twistd not found")
    return found


def build_ssesrv(workdir: Path) -> Path:
    """Compile ssesrv.c into C{workdir}."""
    cc = shutil.which("cc")
    if cc is None:
        raise Missing("no C compiler (cc)")
    for cand in (os.environ.get("BENCH_TOOLS_SRC"), ROOT.parent / "shared" / "bench", "/work/shared/bench"):
        if cand and (Path(cand) / "ssesrv.c").exists():
            exe = workdir / "ssesrv"
            subprocess.run([cc, "-O2", "-o", str(exe), str(Path(cand) / "ssesrv.c")], check=True)
            return exe
    raise Missing("ssesrv.c not found (set BENCH_TOOLS_SRC)")


def redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def wait_http(url: str, timeout: float = 30.0, proc: Optional[subprocess.Popen[bytes]] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before {url} answered")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


# -- processes -------------------------------------------------------------------------


class Gateway:
    """One twistd aura-proxy process, restartable with the same ports and config."""

    def __init__(self, name: str, workdir: Path, upstream: int, history_dsn: str, table: str,
                 drain_timeout: float, extra_routes: str = "", workers: int = 1) -> None:
        self.name = name
        self.port, self.admin = free_port(), free_port()
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = self.workdir / "gateway.ini"
        self.config.write_text(
            f"[gateway]\nlisten = tcp:{self.port}:interface=127.0.0.1\n"
            f"admin_listen = tcp:{self.admin}:interface=127.0.0.1\n"
            f"heartbeat_interval = 5\ndrain_timeout = {drain_timeout}\naccess_log = false\n"
            f"workers = {workers}\n\n"
            f"[route:aura]\npath = /api/aura/**\nupstream = http://127.0.0.1:{upstream}\nstrip_prefix = 2\n\n"
            f"{extra_routes}"
            f"[headers]\nrequired = X-Tenant-ID\n\n"
            f"[history]\ndsn = {history_dsn}\ntable = {table}\nflush_interval = 0.2\n"
            f"spool_dir = {self.workdir / 'spool'}\n\n"
            f"[sse]\nresume = redis://127.0.0.1:6379/0\nresume_ttl = 120\n"
        )
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.workdir / f"twistd-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [twistd(), "-n", "--pidfile=", "aura-proxy", "--config", str(self.config)],
            cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        wait_http(f"http://127.0.0.1:{self.admin}/healthz", proc=self.proc)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig) if sig == signal.SIGKILL else self.proc.send_signal(sig)

    def wait(self, timeout: float) -> Optional[int]:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(60) is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Fleet:
    """The processes of one run; stopped (all of them) on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.gateways: list[Gateway] = []

    def ssesrv(self) -> int:
        exe = build_ssesrv(self.workdir)
        port = free_port()
        self.procs.append(subprocess.Popen([str(exe), str(port)], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, start_new_session=True))
        wait_port(port)
        return port

    def haproxy(self, backends: list[Gateway]) -> int:
        exe = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
        if exe is None:
            raise Missing("haproxy not installed (apt-get install -y haproxy)")
        port = free_port()
        servers = "\n".join(
            f"    server {g.name} 127.0.0.1:{g.port} check port {g.admin} inter 300ms fall 1 rise 2"
            for g in backends
        )
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(port=port, servers=servers))
        self.procs.append(subprocess.Popen([exe, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, start_new_session=True))
        wait_port(port)
        return port

    def close(self) -> None:
        for g in self.gateways:
            g.stop()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


#: The load balancer in front of the gateways, as docs/deployment.md shows it:
#: health checks on the admin port's /healthz (a draining instance has closed
#: its listener and its admin site), a connection refused is retried on the
#: other server, and streams have no server timeout.
HAPROXY_CFG = """\
global
    maxconn 4096
defaults
    mode http
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    retries 3
    option redispatch
    option httpchk GET /healthz
frontend fe
    bind 127.0.0.1:{port}
    default_backend gateways
backend gateways
    balance roundrobin
{servers}
"""


# -- the EventSource client ---------------------------------------------------------------


@dataclass
class Connection:
    """One HTTP exchange of a stream client."""

    status: int = 0
    request_id: str = ""
    events: int = 0
    clean_end: bool = False  # the chunked body ended with its last chunk
    tail: bytes = b""  # the last bytes of the body
    retry: Optional[int] = None


@dataclass
class Stream:
    """What one EventSource saw, over all its connections."""

    index: int
    seqs: list[int] = field(default_factory=list)
    connections: list[Connection] = field(default_factory=list)
    last_id: Optional[str] = None
    done: bool = False
    error: str = ""
    gaps: list[float] = field(default_factory=list)  # seconds between a connection's end and the next event


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


async def _chunks(reader: asyncio.StreamReader, conn: Connection) -> Any:
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            conn.clean_end = True
            return
        data = await reader.readexactly(size + 2)
        yield data[:-2]


class EventSource:
    """
    Reads one stream like a browser's EventSource: parses events, remembers
    the last id and the retry time, reconnects after the connection ends
    (clean or not) with Last-Event-ID, until it has event C{count}.
    """

    def __init__(self, stream: Stream, ports: list[int], path: str, count: int, method: str = "GET",
                 default_retry: float = 1.0, connect_timeout: float = 30.0) -> None:
        self.s = stream
        self.ports = ports  # tried in turn: the next one after a failure
        self.path = path
        self.count = count
        self.method = method
        self.retry = default_retry
        self.connect_timeout = connect_timeout
        self.port_index = 0
        self.ended_at: Optional[float] = None

    async def run(self, deadline: float) -> None:
        while not self.s.done and time.monotonic() < deadline:
            conn = Connection()
            try:
                await asyncio.wait_for(self._one(conn), max(0.1, deadline - time.monotonic()))
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                    asyncio.TimeoutError) as e:
                conn.tail += f"<{type(e).__name__}>".encode()
            if conn.status or conn.events:
                self.s.connections.append(conn)
            if self.s.done:
                return
            if self.ended_at is None:  # the pause runs from the first connection that ended
                self.ended_at = time.monotonic()
            self.port_index = (self.port_index + 1) % len(self.ports)
            await asyncio.sleep(self.retry)
        if not self.s.done:
            self.s.error = f"incomplete: {len(set(self.s.seqs))} of {self.count} events"

    async def _one(self, conn: Connection) -> None:
        port = self.ports[self.port_index]
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), self.connect_timeout)
        try:
            head = (f"{self.method} {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Tenant-ID: bench\r\n"
                    "Accept: text/event-stream\r\nContent-Length: 0\r\n")
            if self.s.last_id is not None:
                head += f"Last-Event-ID: {self.s.last_id}\r\n"
            writer.write((head + "\r\n").encode())
            status, headers = await _read_head(reader)
            conn.status = status
            conn.request_id = headers.get("x-request-id", "")
            if status != 200:
                if headers.get("transfer-encoding") == "chunked":
                    async for _ in _chunks(reader, conn):
                        pass
                return
            buf = b""
            data: list[str] = []
            pending_id: Optional[str] = None
            async for chunk in _chunks(reader, conn):
                conn.tail = (conn.tail + chunk)[-200:]
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    line = raw.rstrip(b"\r").decode("utf-8", "replace")
                    if not line:
                        if pending_id is not None:
                            self.s.last_id = pending_id
                        if data:
                            self._event("\n".join(data), conn)
                        data, pending_id = [], None
                        if self.s.done:
                            return
                        continue
                    if line.startswith(":"):
                        continue
                    name, _, value = line.partition(":")
                    value = value[1:] if value.startswith(" ") else value
                    if name == "data":
                        data.append(value)
                    elif name == "id":
                        pending_id = value
                    elif name == "retry" and value.isdigit():
                        conn.retry = int(value)
                        self.retry = int(value) / 1000
        finally:
            writer.close()

    def _event(self, data: str, conn: Connection) -> None:
        # ssesrv's data: "<monotonic ns> <seq> <pad>"
        seq = int(data.split()[1])
        if self.ended_at is not None:
            self.s.gaps.append(time.monotonic() - self.ended_at)
            self.ended_at = None
        self.s.seqs.append(seq)
        conn.events += 1
        if seq >= self.count:
            self.s.done = True


def tally(streams: list[Stream], count: int) -> dict[str, Any]:
    lost = sum(len(set(range(1, count + 1)) - set(s.seqs)) for s in streams)
    dup = sum(len(s.seqs) - len(set(s.seqs)) for s in streams)
    out_of_order = sum(1 for s in streams if s.seqs != sorted(s.seqs))
    gaps = sorted(g for s in streams for g in s.gaps)
    return {
        "streams": len(streams),
        "events_per_stream": count,
        "completed": sum(1 for s in streams if s.done),
        "lost": lost,
        "duplicated": dup,
        "out_of_order": out_of_order,
        "connections": sum(len(s.connections) for s in streams),
        "resumed_streams": sum(1 for s in streams if len(s.connections) > 1),
        "max_gap_s": round(gaps[-1], 2) if gaps else 0.0,
        "errors": [s.error for s in streams if s.error][:5],
    }


# -- history -------------------------------------------------------------------------------


def history_rows(dsn: str, table: str, paths: list[Path]) -> list[tuple[str, Optional[str], int]]:
    """(id, end_reason, status) of every row, from PostgreSQL (dsn) or the SQLite files."""
    rows: list[tuple[str, Optional[str], int]] = []
    if dsn.startswith("postgresql://"):
        import psycopg2  # type: ignore[import-untyped]

        with psycopg2.connect(dsn) as db, db.cursor() as cur:
            cur.execute(f"SELECT id, end_reason, status_code FROM {table}")
            rows = list(cur.fetchall())
        return rows
    for path in paths:
        if path.exists():
            with sqlite3.connect(path) as db:
                rows += db.execute(f"SELECT id, end_reason, status_code FROM {table}").fetchall()
    return rows


def drop_table(dsn: str, table: str) -> None:
    if dsn.startswith("postgresql://"):
        import psycopg2

        try:
            with psycopg2.connect(dsn) as db, db.cursor() as cur:
                cur.execute(f"DROP TABLE IF EXISTS {table}")
        except Exception as e:
            print(f"could not drop history table {table}: {e}", file=sys.stderr)


def postgres_up(dsn: str) -> None:
    """Raise L{Missing} unless PostgreSQL answers at C{dsn} (waits up to 30 s: it may be restarting)."""
    try:
        import psycopg2
    except ImportError:
        raise Missing("psycopg2 not installed")
    deadline = time.monotonic() + 30
    while True:
        try:
            psycopg2.connect(dsn, connect_timeout=2).close()
            return
        except Exception as e:
            if time.monotonic() > deadline:
                raise Missing(f"no PostgreSQL at {dsn}: {e}")
            time.sleep(1)


def check_history(rows: list[tuple[str, Optional[str], int]], streams: list[Stream],
                  extra_ids: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    ids = [r[0] for r in rows]
    wanted = [c.request_id for s in streams for c in s.connections if c.request_id] + list(extra_ids)
    return {
        "history_rows": len(rows),
        "history_connections": len(wanted),
        "history_missing": len(set(wanted) - set(ids)),
        "history_twice": len(ids) - len(set(ids)),
    }


def wait_history(dsn: str, table: str, paths: list[Path], streams: list[Stream], extra: list[str],
                 timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            rows = history_rows(dsn, table, paths)
        except Exception:  # the database restarting (another test's), the table not there yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        report = check_history(rows, streams, extra)
        if report["history_missing"] == 0 or time.monotonic() > deadline:
            return report
        time.sleep(0.3)


# -- scenarios -----------------------------------------------------------------------------


def rolling(args: argparse.Namespace, fleet: Fleet) -> dict[str, Any]:
    if not redis_up():
        raise Missing("no Redis on 127.0.0.1:6379")
    if args.history == "postgresql":
        postgres_up(args.pg_dsn)
    upstream = fleet.ssesrv()
    table = f"rr_{uuid.uuid4().hex[:12]}"
    dsns = {}
    for name in ("a", "b"):
        dsns[name] = (args.pg_dsn if args.history == "postgresql"
                      else f"sqlite:///{fleet.workdir / name / 'history.db'}")
    a = Gateway("a", fleet.workdir, upstream, dsns["a"], table, args.drain, workers=args.workers)
    b = Gateway("b", fleet.workdir, upstream, dsns["b"], table, args.drain, workers=args.workers)
    fleet.gateways += [a, b]
    a.start()
    b.start()
    lb = fleet.haproxy([a, b])
    time.sleep(1.0)  # health checks up
    count = args.events
    path = f"/api/aura/sse?rate={args.rate}&count={count}&size=64"
    streams = [Stream(i) for i in range(args.streams)]
    timeline: list[tuple[float, str]] = []
    t0 = time.monotonic()

    async def restarts() -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(args.settle)
        for g in (a, b):
            timeline.append((time.monotonic() - t0, f"SIGTERM {g.name}"))
            g.signal(signal.SIGTERM)
            code = await loop.run_in_executor(None, g.wait, args.drain + 60)
            timeline.append((time.monotonic() - t0, f"{g.name} exited ({code})"))
            await loop.run_in_executor(None, g.start)
            timeline.append((time.monotonic() - t0, f"{g.name} started"))
            await asyncio.sleep(args.settle)

    async def main() -> None:
        deadline = time.monotonic() + args.timeout
        clients = []
        for s in streams:
            clients.append(asyncio.create_task(EventSource(s, [lb], path, count).run(deadline)))
            await asyncio.sleep(0.005)
        await restarts()
        await asyncio.gather(*clients)

    asyncio.run(main())
    result = tally(streams, count)
    result["timeline"] = [f"{t:.1f}s {what}" for t, what in timeline]
    paths = [fleet.workdir / n / "history.db" for n in ("a", "b")]
    time.sleep(0.5)
    result.update(wait_history(dsns["a"], table, paths, streams, []))
    if args.history == "postgresql" and not args.keep_table:
        drop_table(args.pg_dsn, table)
    result["ok"] = (result["completed"] == len(streams) and result["lost"] == 0 and result["duplicated"] == 0
                    and result["history_missing"] == 0 and result["history_twice"] == 0)
    return result


def takeover(args: argparse.Namespace, fleet: Fleet) -> dict[str, Any]:
    if not redis_up():
        raise Missing("no Redis on 127.0.0.1:6379")
    upstream = fleet.ssesrv()
    table = "history"
    a = Gateway("a", fleet.workdir, upstream, f"sqlite:///{fleet.workdir / 'a' / 'history.db'}", table, args.drain)
    b = Gateway("b", fleet.workdir, upstream, f"sqlite:///{fleet.workdir / 'b' / 'history.db'}", table, args.drain)
    fleet.gateways += [a, b]
    a.start()
    b.start()
    count, cut_after = args.events, 21
    sig = signal.SIGKILL if args.signal == "KILL" else signal.SIGTERM
    path = f"/api/aura/sse?rate={args.rate}&count={count}&size=64"
    streams = [Stream(i) for i in range(args.streams)]
    signalled: list[float] = []

    async def main() -> None:
        deadline = time.monotonic() + args.timeout
        clients = [asyncio.create_task(EventSource(s, [a.port, b.port], path, count).run(deadline))
                   for s in streams]
        while not all(len(s.seqs) >= cut_after for s in streams):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        signalled.append(time.monotonic())
        a.signal(sig)
        await asyncio.gather(*clients)

    asyncio.run(main())
    code = a.wait(args.drain + 30)
    result = tally(streams, count)
    result["signal"] = args.signal
    result["a_exit"] = code
    paths = [fleet.workdir / n / "history.db" for n in ("a", "b")]
    if sig == signal.SIGTERM:
        result.update(wait_history("", table, paths, streams, []))
    else:  # A's own rows die with it; B's must all be there
        b_streams = [Stream(s.index, connections=s.connections[1:]) for s in streams]
        result.update(wait_history("", table, paths, b_streams, []))
    result["ok"] = (result["completed"] == len(streams) and result["lost"] == 0 and result["duplicated"] == 0
                    and result["history_missing"] == 0 and result["history_twice"] == 0
                    and result["max_gap_s"] < args.max_gap)
    return result


class _SlowUpstream:
    """A plain upstream that answers every request after C{delay} seconds (POSTs in flight)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.port = 0

    async def start(self) -> None:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
                length = head.split("content-length:", 1)[1].split("\r\n", 1)[0] if "content-length:" in head else "0"
                await reader.readexactly(int(length))
                await asyncio.sleep(self.delay)
                body = b'{"ok": true}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError):
            writer.close()


def drain(args: argparse.Namespace, fleet: Fleet) -> dict[str, Any]:
    if not redis_up():
        raise Missing("no Redis on 127.0.0.1:6379")
    upstream = fleet.ssesrv()
    streams = [Stream(i) for i in range(args.streams)]
    posts: list[tuple[int, str, bytes]] = []
    result: dict[str, Any] = {}

    async def main() -> None:
        slow = _SlowUpstream(args.post_seconds)
        await slow.start()
        g = Gateway("a", fleet.workdir, upstream, f"sqlite:///{fleet.workdir / 'a' / 'history.db'}",
                    "history", args.drain,
                    extra_routes=f"[route:slow]\npath = /api/slow/**\nupstream = http://127.0.0.1:{slow.port}\n\n")
        fleet.gateways.append(g)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, g.start)
        conns = [Connection() for _ in streams]
        sources = [EventSource(s, [g.port], f"/api/aura/sse?rate={args.rate}&count=0", 10**9)
                   for s in streams]
        tasks = [asyncio.create_task(src._one(c)) for src, c in zip(sources, conns)]
        await asyncio.sleep(1.5)

        async def post(i: int) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", g.port)
            body = b'{"n": %d}' % i
            writer.write(b"POST /api/slow/x HTTP/1.1\r\nHost: x\r\nX-Tenant-ID: bench\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            status, headers = await _read_head(reader)
            got = await reader.readexactly(int(headers.get("content-length", "0")))
            posts.append((status, headers.get("x-request-id", ""), got))
            writer.close()

        post_tasks = [asyncio.create_task(post(i)) for i in range(args.posts)]
        await asyncio.sleep(0.3)  # the POSTs are in flight
        started = time.monotonic()
        g.signal(signal.SIGTERM)
        await asyncio.gather(*post_tasks, return_exceptions=True)
        await asyncio.gather(*tasks, return_exceptions=True)
        code = await loop.run_in_executor(None, g.wait, args.drain + 30)
        result["exit_code"] = code
        result["exit_s"] = round(time.monotonic() - started, 2)
        for s, c in zip(streams, conns):
            s.connections.append(c)

    asyncio.run(main())
    whole = [c.clean_end and c.tail.endswith(b"\n\nretry: 1000\n\n") for s in streams for c in s.connections]
    result.update({
        "streams": len(streams),
        "streams_events": [c.events for s in streams for c in s.connections][:5],
        "streams_cut_whole_with_retry": sum(whole),
        "posts": len(posts),
        "posts_answered_200": sum(1 for p in posts if p[0] == 200 and p[2].startswith(b'{"ok"')),
    })
    result.update(wait_history("", "history", [fleet.workdir / "a" / "history.db"], streams,
                               [p[1] for p in posts], timeout=5))
    # twistd re-raises the SIGTERM it handled once it has shut down: -15 is a clean exit
    result["ok"] = (result["exit_code"] in (0, -signal.SIGTERM) and result["streams_cut_whole_with_retry"] == len(streams)
                    and result["posts_answered_200"] == args.posts and result["history_missing"] == 0
                    and result["history_twice"] == 0)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=("rolling", "takeover", "drain"))
    parser.add_argument("--streams", type=int, default=None, help="streams (rolling: 200, takeover: 1, drain: 20)")
    parser.add_argument("--events", type=int, default=60, help="events per stream")
    parser.add_argument("--rate", type=float, default=None, help="events per second per stream")
    parser.add_argument("--drain", type=float, default=2.0, help="[gateway] drain_timeout of the gateways")
    parser.add_argument("--workers", type=int, default=1, help="[gateway] workers of each gateway")
    parser.add_argument("--signal", choices=("TERM", "KILL"), default="TERM", help="takeover: how A ends")
    parser.add_argument("--posts", type=int, default=10, help="drain: POSTs in flight")
    parser.add_argument("--post-seconds", type=float, default=1.0, help="drain: how long each POST takes upstream")
    parser.add_argument("--settle", type=float, default=4.0, help="rolling: seconds between restarts")
    parser.add_argument("--history", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--pg-dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--keep-table", action="store_true", help="rolling: keep the history table")
    parser.add_argument("--max-gap", type=float, default=15.0, help="takeover: longest allowed pause, s")
    parser.add_argument("--timeout", type=float, default=180.0, help="give up after this many seconds")
    parser.add_argument("--workdir", default=None, help="keep logs and configs here (default: a temp dir)")
    args = parser.parse_args(argv)
    defaults = {"rolling": (200, 2.0), "takeover": (1, 5.0), "drain": (20, 5.0)}[args.scenario]
    args.streams = args.streams if args.streams is not None else defaults[0]
    args.rate = args.rate if args.rate is not None else defaults[1]
    workdir = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="aura-rr-"))
    workdir.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(workdir)
    try:
        result = {"rolling": rolling, "takeover": takeover, "drain": drain}[args.scenario](args, fleet)
    except Missing as e:
        print(json.dumps({"skipped": str(e)}))
        return SKIP
    finally:
        fleet.close()
    result["workdir"] = str(workdir)
    print(json.dumps(result))
    if result["ok"] and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
