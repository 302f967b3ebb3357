"""
An in-process gateway (and helpers around it) for integration tests.

(trial has no setUpClass, so tests start the FastAPI upstream per test with
L{tests.integration.upstreams.start_fastapi_upstream}.)

L{start_gateway} builds the gateway through the assembly
(L{aura_proxy.assembly.gateway_service}: L{Gateway} + L{GatewaySite} +
L{UpstreamClient}, the drain of open streams), with its own site (a
L{TrackingSite}) and listener (127.0.0.1, a free port, the real reactor), no
admin port and no process tuning (the test runner's process is not a
gateway's).  Its cleanup stops the tree as twistd does: the listener stops
and aborts every client connection still open, then open relays end and the
upstream pool closes, so that trial finds a clean reactor.

L{client} is a treq client without connection reuse; L{ChunkCollector}
reads a body as it arrives; L{RawClient} speaks raw TCP; L{start_site} and
L{start_hang_server} are in-process fake upstreams.
"""

from __future__ import annotations

import dataclasses

import os
import time
from typing import Any, Callable, Optional

from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import FailTest, SynchronousTestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from aura_proxy.assembly import gateway_service
from aura_proxy.config import parse_config
from aura_proxy.proxy import Gateway
from aura_proxy.site import GatewaySite

__all__ = [
    "BASE_INI",
    "GATEWAY_DEFAULTS",
    "HangFactory",
    "RawClient",
    "TrackingPlainSite",
    "Upstream",
    "connect_raw",
    "header_values",
    "listen",
    "parse_events",
    "start_hang_server",
    "start_site",
    "ChunkCollector",
    "Upstream",
    "TrackingSite",
    "client",
    "gateway_ini",
    "sleep",
    "start_gateway",
    "wait_until",
]

reactor: Any = _global_reactor

#: A test configuration: listeners are unused (start_gateway listens itself),
#: history and the access log are off.  Format with routes=..., gateway=..., extra=...
BASE_INI = """\
[gateway]
{gateway}

{routes}

[headers]
required = X-Tenant-ID
public_paths = /api/public/**
default.X-DWP-Source = FRONTEND
default.X-DWP-Caller-Type = USER

[cors]
allowed_origins = http://allowed.example
allowed_methods = GET, POST, OPTIONS
allowed_headers = Authorization, Content-Type, Last-Event-ID, X-Tenant-ID
exposed_headers = X-Request-ID
allow_credentials = true
max_age = 600

[history]
enabled = false

; Plain pass-through streams: no id rewriting, no replay log, and a client
; that leaves ends its upstream stream.
[sse]
inject_ids = false
resume = off
on_client_disconnect = cancel

; The access log off: the gateway runs inside trial's process.
[log]
access = off
{extra}
"""

#: What a tuned gateway process logs at start (aura_proxy.process.log_hot_path),
#: with the fast paths on, or off for the whole run (AURA_PROXY_FAST_PATH=off,
#: as .ci/run's stock-mode pass sets it).
HOT_PATH = (
    "hot path: fast_path = off: stock Twisted and pure Python"
    if os.environ.get("AURA_PROXY_FAST_PATH", "").lower() in ("off", "false", "no", "0")
    else "hot path: fast_path = on: chunked reads, SSE rewriter, event store and client "
    "writes in C, lean epoll loop on, every Twisted internal found"
)


#: The [gateway] keys of a test configuration (start_gateway listens itself).
GATEWAY_DEFAULTS = {
    "listen": "tcp:0:interface=127.0.0.1",
    "admin_listen": "tcp:0:interface=127.0.0.1",
    "connect_timeout": "5",
    "response_timeout": "10",
    "idle_timeout": "30",
    "heartbeat_interval": "0",
    "max_request_body": "1048576",
    "max_idle_connections": "10",
}


def gateway_ini(upstream_port: int, gateway: str = "", routes: str = "", extra: str = "") -> str:
    """
    A test configuration routing C{/api/aura/**} (and C{/api/public/**}) to
    the upstream on C{upstream_port}, with C{gateway} lines ("key = value") overriding
    L{GATEWAY_DEFAULTS} and C{routes} sections added.
    """
    base_routes = (
        f"[route:aura]\npath = /api/aura/**\nupstream = http://127.0.0.1:{upstream_port}\n\n"
        f"[route:public]\npath = /api/public/**\nupstream = http://127.0.0.1:{upstream_port}/api/aura\n"
        f"strip_prefix = 2\n"
    )
    keys = dict(GATEWAY_DEFAULTS)
    for line in gateway.splitlines():
        if line.strip():
            key, _, value = line.partition("=")
            keys[key.strip()] = value.strip()
    section = "\n".join(f"{k} = {v}" for k, v in keys.items())
    return BASE_INI.format(gateway=section, routes=base_routes + "\n" + routes, extra=extra)


def twistd_ini(
    listen: int,
    admin: int,
    upstream: int,
    *,
    gateway: str = "",
    headers: str = "",
    sections: str = "",
) -> str:
    """
    The INI of a gateway run as its own twistd process: listening on
    C{listen} (admin on C{admin}), no heartbeats, C{/api/aura/**} routed to
    the upstream on C{upstream}, C{X-Tenant-ID} required.  C{gateway} and
    C{headers} lines go into those sections; C{sections} (more routes,
    C{[history]}, C{[sse]}...) follows.
    """
    return (
        f"[gateway]\nlisten = tcp:{listen}:interface=127.0.0.1\n"
        f"admin_listen = tcp:{admin}:interface=127.0.0.1\nheartbeat_interval = 0\n{gateway}\n"
        f"[route:aura]\npath = /api/aura/**\nupstream = http://127.0.0.1:{upstream}\n\n"
        f"[headers]\nrequired = X-Tenant-ID\n{headers}\n"
        f"{sections}"
    )


class TwistdLog:
    """
    For tests of a twistd gateway in C{self.gateway} (from
    L{tests.integration.upstreams.start_process}): its log, and waiting on a
    condition with the log's tail in the failure.
    """

    gateway: Any

    def log(self) -> str:
        """What the gateway has logged so far."""
        with open(self.gateway.log_path) as f:
            return f.read()

    def wait_for(self, condition: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
        """Poll C{condition} until true; fail (naming C{what}) after C{timeout} seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}; log:\n{self.log()[-3000:]}")  # type: ignore[attr-defined]
            time.sleep(0.05)


class Tracking:
    """Factory mixin: knows its open connections, can close them all."""

    def _init_tracking(self) -> None:
        self.open: set[Any] = set()
        self._lost: dict[Any, Deferred[None]] = {}
        self.connections_made = 0

    def lost(self, protocol: Any) -> "Deferred[None]":
        """Fires when C{protocol}'s connection is lost."""
        return self._lost[protocol]

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)  # type: ignore[misc]
        self.open.add(protocol)
        self.connections_made += 1
        lost: Deferred[None] = Deferred()
        self._lost[protocol] = lost
        original = protocol.connectionLost

        def connectionLost(reason: Failure) -> None:
            self.open.discard(protocol)
            try:
                original(reason)
            finally:
                if not lost.called:
                    lost.callback(None)

        protocol.connectionLost = connectionLost
        return protocol

    def close_all(self) -> "Deferred[Any]":
        """Abort every open client connection; fires when all are closed."""
        waits = []
        for protocol in list(self.open):
            waits.append(self._lost[protocol])
            # An HTTP site's protocol is a wrapper: its channel has the transport.
            transport = getattr(protocol, "transport", None) or getattr(
                getattr(protocol, "_channel", None), "transport", None
            )
            if transport is not None:
                transport.abortConnection()
        return DeferredList(waits)


class TrackingSite(Tracking, GatewaySite):
    """A L{GatewaySite} that knows its open client connections."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        GatewaySite.__init__(self, *args, **kwargs)
        self._init_tracking()


class TrackingPlainSite(Tracking, Site):
    """A twisted.web L{Site} that knows its open connections."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        Site.__init__(self, *args, **kwargs)
        self._init_tracking()
        self.noisy = False


class _Hang(Protocol):
    """Accepts, records what it receives, never answers."""

    def connectionMade(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class HangFactory(Tracking, Factory):
    """A TCP server that accepts connections and never answers."""

    protocol = _Hang
    noisy = False

    def __init__(self) -> None:
        self._init_tracking()


async def _close_listener(listening: Any, factory: Tracking) -> None:
    await listening.stopListening()
    await factory.close_all()


def listen(testcase: SynchronousTestCase, factory: Any) -> int:
    """Listen with C{factory} (a L{Tracking} one) on 127.0.0.1, port 0;
    cleanup stops listening and aborts its connections.  Returns the port."""
    listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    testcase.addCleanup(lambda: Deferred.fromCoroutine(_close_listener(listening, factory)))
    return int(listening.getHost().port)


def start_site(testcase: SynchronousTestCase, resource: Any) -> tuple[int, TrackingPlainSite]:
    """Serve C{resource} in-process on 127.0.0.1 (a fake upstream)."""
    site = TrackingPlainSite(resource, reactor=reactor)
    return listen(testcase, site), site


def start_hang_server(testcase: SynchronousTestCase) -> tuple[int, HangFactory]:
    """A server that accepts and never answers."""
    factory = HangFactory()
    return listen(testcase, factory), factory


class RawClient(Protocol):
    """
    A raw TCP client: what was received, when the connection ended, and a
    way to wait for some received data.
    """

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[None] = Deferred()
        self.reason: Optional[Failure] = None
        self._waiters: list[tuple[Callable[[bytes], bool], Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for entry in list(self._waiters):
            if entry[0](self.data):
                self._waiters.remove(entry)
                entry[1].callback(None)

    def wait_for(self, predicate: Callable[[bytes], bool], timeout: float = 5.0) -> "Deferred[None]":
        """Fires once the data so far satisfies C{predicate}; fails after C{timeout}."""
        if predicate(self.data):
            return succeed(None)
        d: Deferred[None] = Deferred()
        entry = (predicate, d)
        self._waiters.append(entry)

        def expire() -> None:
            if entry in self._waiters:
                self._waiters.remove(entry)
                d.errback(FailTest(f"expected data not received within {timeout} s; got {self.data[:2000]!r}"))

        call = reactor.callLater(timeout, expire)
        d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return d

    def head(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        """The status code and the header lines (names lower-cased) received."""
        head = self.data.split(b"\r\n\r\n", 1)[0]
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        return status, headers

    def body(self) -> bytes:
        return self.data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.data else b""

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.reason = reason
        for _, d in self._waiters:
            d.errback(FailTest(f"connection lost before the expected data; got {self.data[:2000]!r}"))
        self._waiters = []
        self.closed.callback(None)


async def connect_raw(testcase: SynchronousTestCase, port: int, request: bytes = b"") -> RawClient:
    """Connect a L{RawClient} to 127.0.0.1:C{port} and send C{request};
    cleanup aborts the connection and waits for it to close."""
    protocol = RawClient()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    await connectProtocol(endpoint, protocol)

    def close() -> "Deferred[None]":
        if not protocol.closed.called:
            protocol.transport.abortConnection()  # type: ignore[union-attr]
        return protocol.closed

    testcase.addCleanup(close)
    if request:
        protocol.transport.write(request)  # type: ignore[union-attr]
    return protocol


def header_values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """The values of header C{name} (lower-case) in a L{RawClient.head} list."""
    return [v for n, v in headers if n == name]


def sleep(seconds: float) -> "Deferred[None]":
    """A Deferred that fires after C{seconds} on the real reactor."""
    return deferLater(reactor, seconds, lambda: None)


async def wait_until(
    predicate: Callable[[], Any], timeout: float, message: str, interval: float = 0.02
) -> Any:
    """Poll C{predicate} until it is true (returned) or fail after C{timeout} s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise FailTest(f"{message} (not within {timeout} s)")
        await sleep(interval)


class _TestListener(Service):
    """
    The tree's public listener in tests: 127.0.0.1, a free port; stopping
    it stops listening and aborts the site's open connections.
    """

    def __init__(self, site: TrackingSite) -> None:
        self._site = site
        self._port: Any = None

    @property
    def port(self) -> int:
        return int(self._port.getHost().port)

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self._port = reactor.listenTCP(0, self._site, interface="127.0.0.1")

    async def _stop(self) -> None:
        await self._port.stopListening()
        await self._site.close_all()

    def stopService(self) -> "Deferred[None]":
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())


def _tracking_site(gateway: Gateway, *, reactor: Any) -> TrackingSite:
    site = TrackingSite(gateway, reactor=reactor)
    site.noisy = False
    site.displayTracebacks = False
    return site


def start_gateway(testcase: SynchronousTestCase, ini_text: str) -> tuple[int, Gateway]:
    """
    Build the gateway for C{ini_text} through the assembly and listen on
    127.0.0.1, port 0.

    @return: the port and the L{Gateway}.
    """
    config = parse_config(ini_text, "test-gateway.ini")
    if "drain_timeout" not in ini_text:
        # A test's cleanup stops the tree: streams it left open end at once.
        config = dataclasses.replace(config, gateway=dataclasses.replace(config.gateway, drain_timeout=0.0))
    listeners: list[_TestListener] = []

    def listener(site: GatewaySite) -> _TestListener:
        assert isinstance(site, TrackingSite)
        listeners.append(_TestListener(site))
        return listeners[-1]

    tree = gateway_service(
        config, reactor, listener=listener, site_factory=_tracking_site, admin=False, tuning=False
    )
    tree.privilegedStartService()
    tree.startService()

    async def cleanup() -> None:
        await tree.stopService()
        # Let connectionLost of closed connections run.
        await sleep(0.01)

    testcase.addCleanup(lambda: Deferred.fromCoroutine(cleanup()))
    return listeners[0].port, tree.gateway


def client() -> tuple[HTTPClient, Agent]:
    """A treq client and its bare L{Agent}, one connection per request."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, pool=pool, connectTimeout=5)
    return HTTPClient(agent), agent


class ChunkCollector(Protocol):
    """
    Collects a response body as it arrives, with the monotonic arrival time of
    each chunk; can abort the connection after C{abort_after} bytes.
    """

    def __init__(self, abort_after: Optional[int] = None) -> None:
        self.chunks: list[bytes] = []
        self.times: list[float] = []
        self.abort_after = abort_after
        self.reason: Optional[Failure] = None
        #: Fires with None when the body ends, however it ends (see C{reason}).
        self.done: Deferred[None] = Deferred()
        self._waiters: list[tuple[Callable[[bytes], bool], Deferred[None]]] = []

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        self.times.append(time.monotonic())
        for entry in list(self._waiters):
            if entry[0](self.body):
                self._waiters.remove(entry)
                entry[1].callback(None)
        if self.abort_after is not None and len(self.body) >= self.abort_after:
            self.abort_after = None
            self.abort()

    def abort(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]

    def wait_for(self, predicate: Callable[[bytes], bool]) -> "Deferred[None]":
        """Fires once the body so far satisfies C{predicate}."""
        if predicate(self.body):
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append((predicate, d))
        return d

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.reason = reason
        for _, d in self._waiters:
            d.errback(FailTest(f"body ended ({reason.getErrorMessage()}) before the expected data"))
        self._waiters = []
        self.done.callback(None)


def parse_events(body: bytes) -> list[dict[str, str]]:
    """Complete SSE events in C{body} (any line ending), as dicts of fields."""
    text = body.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
        if fields:
            events.append(fields)
    return events


class Upstream:
    """Where an upstream listens: C{port} and C{base} URL."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
