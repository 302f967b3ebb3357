"""
TLS and HTTP/2 at the edge, and https:// upstreams, with certificates made
in the tests (L{tests.tls_certs}).

  - L{TwistdTlsTests}: C{twistd -n aura-proxy} listening on a tcp: and an
    ssl: endpoint at once, the FastAPI upstream behind it, C{curl --http2}
    and C{--http1.1} over TLS (JSON, an SSE stream, a POST stream).
  - L{Http2Tests}: the gateway in this process on an ssl: endpoint, a raw
    HTTP/2 client (the C{h2} package) to see frames: a reset stream cancels
    its upstream, a client that does not open its window pauses the
    upstream, heartbeats on a silent stream.
  - L{HttpsUpstreamTests}: an https:// upstream in this process, verified
    against the route's C{ca_file}; an untrusted one is a 502; one that
    requires a client certificate gets the route's.
  - L{BrowserTlsTests}: headless chromium's C{EventSource} over HTTP/2 and TLS.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString, wrapClientTLS
from twisted.internet.interfaces import IOpenSSLContextFactory, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate, optionsForClientTLS
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web._http2 import H2Connection
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from aura_proxy.assembly import gateway_service
from aura_proxy.config import parse_config
from aura_proxy.proxy import Gateway
from aura_proxy.site import GatewaySite
from tests.integration.gateway import (
    TrackingPlainSite,
    TrackingSite,
    gateway_ini,
    reactor,
    sleep,
    start_hang_server,
    twistd_ini,
    wait_until,
)
from tests.integration.test_browser import CHROMIUM_FLAGS, _kill_group, find_chromium
from tests.integration.upstreams import free_port, start_fastapi_upstream, start_process
from tests.tls_certs import TestPki, make_pki

TWISTD = str(Path(sys.executable).with_name("twistd"))


def _curl_http2() -> Optional[str]:
    curl = shutil.which("curl")
    if curl is None:
        return None
    features = subprocess.run([curl, "--version"], capture_output=True, text=True).stdout
    return curl if "HTTP2" in features else None


# -- the upstream in this process ------------------------------------------------------


def curl_tls(test: Any, curl: str, ca: str, *args: str) -> tuple[str, str, str]:
    """
    curl C{args} (one request, on a new connection, trusting C{ca}, with a
    tenant); its response head, body and HTTP version. C{test} fails when
    curl does.
    """
    done = subprocess.run(
        [curl, "-sS", "-N", "--max-time", "20", "--cacert", ca, "-H", "X-Tenant-ID: t1",
         "-D", "-", "-w", "\n%{http_version}", *args],
        capture_output=True, text=True, timeout=30,
    )
    test.assertEqual(done.returncode, 0, done.stderr)
    # Text mode: curl's CRLFs are LFs here.
    head, _, rest = done.stdout.replace("\r\n", "\n").partition("\n\n")
    body, _, version = rest.rpartition("\n")
    return head, body, version


class _Endless(Resource):
    """An SSE stream with an event every 50 ms until the client leaves; records when it left."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.open: list[Request] = []
        self.gone_at: list[float] = []

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        self.open.append(request)
        n = [0]

        def tick() -> None:
            if request.finished or request.channel is None:
                return
            n[0] += 1
            request.write(b"data: %d\n\n" % n[0])
            call[0] = reactor.callLater(0.05, tick)

        call = [reactor.callLater(0, tick)]

        def gone(_: object) -> None:
            self.gone_at.append(time.monotonic())
            self.open.remove(request)
            if call[0].active():
                call[0].cancel()

        request.notifyFinish().addBoth(gone)
        return NOT_DONE_YET


@implementer(IPushProducer)
class _Flood:
    """Writes 64 KiB pieces as fast as its consumer lets it (a push producer)."""

    def __init__(self, request: Request, limit: int) -> None:
        self.request = request
        self.limit = limit
        self.written = 0
        self.paused = False
        self.done = False
        request.registerProducer(self, True)
        reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        piece = b"x" * 65536
        while not self.paused and not self.done and self.written < self.limit:
            self.request.write(piece)
            self.written += len(piece)
        if not self.paused and not self.done and self.written < self.limit:
            reactor.callLater(0, self._pump)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            reactor.callLater(0, self._pump)

    def stopProducing(self) -> None:
        self.done = True


class _FloodResource(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.floods: list[_Flood] = []

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"content-type", b"application/octet-stream")
        self.floods.append(_Flood(request, 256 * 1024 * 1024))
        request.notifyFinish().addBoth(lambda _: setattr(self.floods[-1], "done", True))
        return NOT_DONE_YET


class _Silent(Resource):
    """An SSE stream: one event, then silence until the client leaves."""

    isLeaf = True

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"data: first\n\n")
        request.notifyFinish().addBoth(lambda _: None)
        return NOT_DONE_YET


class _Hop(Resource):
    """JSON with a header its Connection header names (hop-by-hop, RFC 9110 7.6.1)."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"connection", b"X-Secret")
        request.setHeader(b"x-secret", b"1")
        request.setHeader(b"x-kept", b"2")
        return b'{"ok": true}'


def upstream_root() -> tuple[Resource, _Endless, _FloodResource]:
    root = Resource()
    api = Resource()
    aura = Resource()
    root.putChild(b"api", api)
    api.putChild(b"aura", aura)
    endless, flood = _Endless(), _FloodResource()
    aura.putChild(b"endless", endless)
    aura.putChild(b"flood", flood)
    aura.putChild(b"silent", _Silent())
    aura.putChild(b"hop", _Hop())
    return root, endless, flood


async def _listen_endpoint(testcase: TestCase, description: str, factory: Any) -> int:
    port = await serverFromString(reactor, description).listen(factory)

    async def close() -> None:
        await port.stopListening()
        await factory.close_all()

    testcase.addCleanup(lambda: Deferred.fromCoroutine(close()))
    return int(port.getHost().port)


async def start_upstream(testcase: TestCase, tls: Optional[CertificateOptions] = None) -> tuple[int, _Endless, _FloodResource]:
    """The upstream in this process, on plain TCP or (C{tls}) TLS; its port and resources."""
    root, endless, flood = upstream_root()
    site = TrackingPlainSite(root, reactor=reactor)
    if tls is None:
        port = await _listen_endpoint(testcase, "tcp:0:interface=127.0.0.1", site)
    else:
        listening = reactor.listenSSL(0, site, tls, interface="127.0.0.1")

        async def close() -> None:
            await listening.stopListening()
            await _abort_tls(site)

        testcase.addCleanup(lambda: Deferred.fromCoroutine(close()))
        port = int(listening.getHost().port)
    return port, endless, flood


# -- the gateway in this process, on TLS ---------------------------------------------


class _EndpointListener(Service):
    """The tree's public listener: one endpoint description; stopping aborts open connections."""

    def __init__(self, site: TrackingSite, description: str) -> None:
        self._site = site
        self._description = description
        self.port: Optional[int] = None
        self.ready: Deferred[int] = Deferred()
        self._listening: Any = None

    def startService(self) -> None:
        Service.startService(self)

        def listening(port: Any) -> None:
            self._listening = port
            self.port = int(port.getHost().port)
            self.ready.callback(self.port)

        serverFromString(reactor, self._description).listen(self._site).addCallbacks(listening, self.ready.errback)

    async def _stop(self) -> None:
        if self._listening is not None:
            await self._listening.stopListening()
        await _abort_tls(self._site)

    def stopService(self) -> "Deferred[None]":
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())


async def _abort_tls(site: Any) -> None:
    """
    Abort every open connection of C{site}, a tracking one behind TLS, at
    the TCP level.  (Its record of lost connections misses those switched
    to HTTP/2: the tracker wraps the HTTP/1.1 channel the switch replaces;
    a short wait lets the aborts land instead.)
    """
    for protocol in list(site.open):
        # An HTTP site's protocol is a wrapper: its channel has the transport.
        tls = getattr(protocol, "transport", None) or getattr(getattr(protocol, "_channel", None), "transport", None)
        tcp = getattr(tls, "transport", None) or tls
        if tcp is not None and not getattr(tcp, "disconnected", False):
            tcp.abortConnection()
    await sleep(0.05)


#: The client-facing site's idle timeout in these tests (twisted.web's default: 60 s).
SITE_TIMEOUT = 60.0


def _tracking_site(gateway: Gateway, *, reactor: Any) -> TrackingSite:
    site = TrackingSite(gateway, reactor=reactor, timeout=SITE_TIMEOUT)
    site.noisy = False
    site.displayTracebacks = False
    return site


async def start_tls_gateway(testcase: TestCase, ini_text: str, pki: TestPki) -> tuple[int, Gateway]:
    """The gateway for C{ini_text} on an ssl: endpoint (127.0.0.1, a free port) with C{pki}'s server certificate."""
    config = parse_config(ini_text, "test-gateway.ini")
    description = (
        f"ssl:0:interface=127.0.0.1:privateKey={pki.server_key}:certKey={pki.server_cert}"
    )
    listeners: list[_EndpointListener] = []

    def listener(site: GatewaySite) -> _EndpointListener:
        assert isinstance(site, TrackingSite)
        listeners.append(_EndpointListener(site, description))
        return listeners[-1]

    tree = gateway_service(config, reactor, listener=listener, site_factory=_tracking_site, admin=False, tuning=False)
    tree.privilegedStartService()
    tree.startService()

    async def cleanup() -> None:
        await tree.stopService()
        await sleep(0.01)

    testcase.addCleanup(lambda: Deferred.fromCoroutine(cleanup()))
    port = await listeners[0].ready
    return port, tree.gateway


# -- a raw HTTP/2 client ------------------------------------------------------------------


class H2Client(Protocol):
    """
    An HTTP/2 client over TLS (the C{h2} package): streams' headers, data and
    ends as they arrive.  With C{window}, its streams' receive window is
    that small and never reopened (a client that does not read).
    """

    def __init__(self, window: Optional[int] = None) -> None:
        self.window = window
        self.conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
        self.headers: dict[int, list[tuple[bytes, bytes]]] = {}
        self.data: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.reset: set[int] = set()
        #: Whether the server sent GOAWAY (closing the connection).
        self.goaway = False
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.conn.initiate_connection()
        if self.window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.window})
        self.transport.write(self.conn.data_to_send())  # type: ignore[union-attr]

    def request(self, path: str, method: str = "GET", length: Optional[int] = None) -> int:
        """Open a stream; with C{length}, a request body of that declared length follows (unsent)."""
        stream = self.conn.get_next_available_stream_id()
        headers = [
            (":method", method), (":path", path), (":scheme", "https"), (":authority", "127.0.0.1"),
            ("x-tenant-id", "t1"),
        ]
        if length is not None:
            headers.append(("content-length", str(length)))
        self.conn.send_headers(stream, headers, end_stream=length is None)
        self.data[stream] = b""
        self.transport.write(self.conn.data_to_send())  # type: ignore[union-attr]
        return stream

    def cancel(self, stream: int) -> None:
        """Reset C{stream} (RST_STREAM, CANCEL)."""
        self.conn.reset_stream(stream, error_code=8)
        self.transport.write(self.conn.data_to_send())  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.headers[event.stream_id] = list(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                self.data[event.stream_id] = self.data.get(event.stream_id, b"") + event.data
                if self.window is None:
                    self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.reset.add(event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = True
        out = self.conn.data_to_send()
        if out:
            self.transport.write(out)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.lost.callback(None)


async def h2_connect(testcase: TestCase, port: int, pki: TestPki, window: Optional[int] = None) -> H2Client:
    """An L{H2Client} connected to 127.0.0.1:C{port}, trusting C{pki}'s CA, h2 by ALPN."""
    ca = Certificate.loadPEM(Path(pki.ca).read_bytes())
    options = optionsForClientTLS("127.0.0.1", trustRoot=ca, acceptableProtocols=[b"h2"])
    client = H2Client(window)
    await connectProtocol(wrapClientTLS(options, TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)), client)

    def close() -> "Deferred[None]":
        if not client.lost.called:
            client.transport.abortConnection()  # type: ignore[union-attr]
        return client.lost

    testcase.addCleanup(close)
    await wait_until(lambda: client.transport.negotiatedProtocol is not None,  # type: ignore[union-attr]
                     5, "no ALPN result")
    testcase.assertEqual(client.transport.negotiatedProtocol, b"h2")  # type: ignore[union-attr]
    return client


# -- the tests ------------------------------------------------------------------------------


class TwistdTlsTests(TestCase):
    """twistd serving a tcp: and an ssl: listener; curl over HTTP/2 and HTTP/1.1."""

    timeout = 60

    def test_curl_http2_and_http1_over_tls(self) -> None:
        """
        One gateway listens on tcp: and ssl: (listen = tcp:A, ssl:B, with
        the test CA as extraCertChain).  Over TLS, curl --http2 gets HTTP/2
        (ALPN): a JSON document, an SSE stream and a POST stream, every
        event there, no Connection or Transfer-Encoding header; the upstream
        hears X-Forwarded-Proto https and the :authority as X-Forwarded-Host;
        curl --http1.1 gets HTTP/1.1 over the same port; plain tcp: still answers.
        """
        curl = _curl_http2()
        if curl is None:
            raise SkipTest("curl with HTTP/2 is not installed")
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        pki = make_pki(workdir / "pki")
        upstream = start_fastapi_upstream(self)
        plain, secure, admin = free_port(), free_port(), free_port()
        text = twistd_ini(plain, admin, upstream, sections=(
            "[history]\nenabled = false\n\n[sse]\ninject_ids = false\nresume = off\n"))
        text = text.replace(
            f"listen = tcp:{plain}:interface=127.0.0.1\n",
            f"listen = tcp:{plain}:interface=127.0.0.1, ssl:{secure}:interface=127.0.0.1"
            f":privateKey={pki.server_key}:certKey={pki.server_cert}:extraCertChain={pki.ca}\n",
        )
        (workdir / "gw.ini").write_text(text)
        start_process(
            self, [TWISTD, "-n", "--pidfile=", "aura-proxy", "--config", str(workdir / "gw.ini")],
            f"http://127.0.0.1:{admin}/healthz", cwd=workdir,
        )

        def run(*args: str) -> tuple[str, str, str]:
            return curl_tls(self, curl, pki.ca, *args)

        base = f"https://127.0.0.1:{secure}/api/aura"
        head, body, version = run("--http2", f"{base}/json")
        self.assertEqual(version, "2")
        self.assertTrue(head.startswith("HTTP/2 200"), head)
        self.assertEqual(json.loads(body), {"service": "aura", "ok": True, "items": [1, 2, 3]})
        head, body, version = run("--http2", f"{base}/stream?count=5&interval=0.02")
        self.assertEqual(version, "2")
        lower = head.lower()
        self.assertIn("content-type: text/event-stream", lower)
        self.assertNotIn("connection:", lower)
        self.assertNotIn("transfer-encoding:", lower)
        self.assertEqual(body.count("event: token"), 5, body)
        self.assertIn("event: done", body)
        head, body, version = run(
            "--http2", "-H", "Content-Type: application/json", "--data", json.dumps({"count": 3}),
            f"{base}/stream")
        self.assertEqual(version, "2")
        self.assertEqual(body.count("event: token"), 3, body)
        _, body, version = run("--http2", f"{base}/echo/x?q=1")
        echoed = dict((k, v) for k, v in json.loads(body)["headers"])
        self.assertEqual((version, echoed.get("x-forwarded-proto")), ("2", "https"))
        self.assertEqual(echoed.get("x-forwarded-host"), f"127.0.0.1:{secure}")
        head, body, version = run("--http1.1", f"{base}/stream?count=2&interval=0.02")
        self.assertEqual(version, "1.1")
        self.assertIn("transfer-encoding: chunked", head.lower())
        self.assertEqual(body.count("event: token"), 2, body)
        _, body, version = run(f"http://127.0.0.1:{plain}/api/aura/json")
        self.assertEqual((version, json.loads(body)["ok"]), ("1.1", True))


class Http2Tests(TestCase):
    """The gateway in this process on TLS, a raw HTTP/2 client."""

    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.pki = make_pki(self.mktemp())
        self.upstream, self.endless, self.flood = await start_upstream(self)

    async def gateway(self, gateway: str = "") -> int:
        port, _ = await start_tls_gateway(self, gateway_ini(self.upstream, gateway=gateway), self.pki)
        return port

    async def test_reset_stream_cancels_upstream(self) -> None:
        """
        Two SSE streams on one HTTP/2 connection; the client resets one
        (RST_STREAM): its upstream request sees the disconnect within a
        second, the other stream goes on on the same connection.
        """
        client = await h2_connect(self, await self.gateway(), self.pki)
        first = client.request("/api/aura/endless")
        second = client.request("/api/aura/endless")
        await wait_until(lambda: b"data: 3\n\n" in client.data[first] and b"data: 3\n\n" in client.data[second],
                         10, "both streams flowing")
        self.assertEqual(len(self.endless.open), 2)
        reset_at = time.monotonic()
        client.cancel(first)
        await wait_until(lambda: self.endless.gone_at, 5, "the upstream of the reset stream saw no disconnect")
        self.assertLess(self.endless.gone_at[0] - reset_at, 1.0)
        self.assertEqual(len(self.endless.open), 1)
        before = len(client.data[second])
        await wait_until(lambda: len(client.data[second]) > before + 20, 5, "the other stream stopped")
        self.assertNotIn(second, client.reset)
        headers = dict(client.headers[second])
        self.assertEqual(headers[b":status"], b"200")
        self.assertEqual(headers[b"content-type"], b"text/event-stream")
        self.assertNotIn(b"connection", headers)
        self.assertNotIn(b"transfer-encoding", headers)

    async def test_flow_control_pauses_upstream(self) -> None:
        """
        A client whose stream window is 64 KiB and never reopened (it does
        not read) gets no more than that window; the gateway stops reading
        the upstream, which is paused with a bounded amount written (the
        socket buffers between), not the 256 MiB it would send.
        """
        client = await h2_connect(self, await self.gateway(), self.pki, window=65535)
        stream = client.request("/api/aura/flood")
        await wait_until(lambda: self.flood.floods and self.flood.floods[0].paused, 20, "upstream never paused")
        await sleep(1.0)
        flood = self.flood.floods[0]
        written = flood.written
        self.assertLessEqual(len(client.data[stream]), 65535)
        self.assertLess(written, 64 * 1024 * 1024)
        await sleep(0.5)
        self.assertTrue(flood.paused)
        self.assertEqual(flood.written, written)

    async def test_heartbeats_keep_idle_stream(self) -> None:
        """
        A silent SSE stream over HTTP/2 gets C{: keep-alive} comments (DATA
        frames) every heartbeat_interval.
        """
        client = await h2_connect(self, await self.gateway("heartbeat_interval = 0.2"), self.pki)
        stream = client.request("/api/aura/silent")
        await wait_until(lambda: client.data[stream].count(b": keep-alive\n\n") >= 3, 10, "no heartbeats")
        self.assertTrue(client.data[stream].startswith(b"data: first\n\n"))
        self.assertNotIn(stream, client.ended)


    async def test_served_connection_not_timed_out(self) -> None:
        """
        With the site's idle timeout at 0.5 s and no heartbeats, an HTTP/2
        connection whose SSE stream stays silent for 2 s is not closed (its
        timeout is suspended while a request is served, as HTTP/1.1's is);
        once the stream is reset, the idle connection times out again.
        """
        self.patch(sys.modules[__name__], "SITE_TIMEOUT", 0.5)
        client = await h2_connect(self, await self.gateway("heartbeat_interval = 0"), self.pki)
        stream = client.request("/api/aura/silent")
        await wait_until(lambda: b"data: first" in client.data[stream], 10, "no first event")
        await sleep(2.0)
        self.assertFalse(client.goaway or client.lost.called, "the connection was timed out with a stream open")
        self.assertNotIn(stream, client.reset)
        client.cancel(stream)
        await wait_until(lambda: client.goaway, 10, "the idle connection was never timed out (GOAWAY)")

    async def test_lost_connection_not_timed_out_later(self) -> None:
        """
        A client that drops its TCP connection with a stream open: the
        stream's upstream request ends, and no idle timer is left behind (the
        stream's release comes from the connection's own connectionLost):
        nothing times the dead connection out afterwards.
        """
        self.patch(sys.modules[__name__], "SITE_TIMEOUT", 0.3)
        timed_out: list[object] = []
        self.patch(H2Connection, "timeoutConnection", lambda conn: timed_out.append(conn))
        client = await h2_connect(self, await self.gateway("heartbeat_interval = 0"), self.pki)
        stream = client.request("/api/aura/endless")
        await wait_until(lambda: b"data: 2\n\n" in client.data[stream], 10, "no events")
        client.transport.abortConnection()  # type: ignore[union-attr]
        await wait_until(lambda: self.endless.gone_at, 5, "the upstream of a dropped connection went on")
        await sleep(1.0)
        self.assertEqual(timed_out, [])

    async def test_body_too_large_on_one_stream(self) -> None:
        """
        A request declaring a body over max_request_body gets 413 with the
        JSON error on its own stream, then RST_STREAM NO_ERROR so that the
        client stops sending; the body DATA it sent meanwhile is dropped and
        the connection goes on serving other streams.
        """
        client = await h2_connect(self, await self.gateway(), self.pki)
        big = client.request("/api/aura/endless", "POST", length=2 * 1048576)
        # The body follows at once, as fast as the window allows, until the
        # gateway's 413 and RST_STREAM (NO_ERROR) stop it: DATA still on its
        # way when the stream ended must not end the connection.
        sent = 0
        while big not in client.reset and sent < 2 * 1048576:
            try:
                window = client.conn.local_flow_control_window(big)
                if window:
                    client.conn.send_data(big, b"x" * min(window, 16384))
                    sent += min(window, 16384)
                    client.transport.write(client.conn.data_to_send())  # type: ignore[union-attr]
            except h2.exceptions.StreamClosedError:
                break
            await sleep(0.005)
        await wait_until(lambda: big in client.reset, 10, "the 413 stream was not reset (NO_ERROR)")
        self.assertEqual(dict(client.headers[big])[b":status"], b"413")
        self.assertEqual(json.loads(client.data[big])["error"]["code"], "body_too_large")
        stream = client.request("/api/aura/endless")
        await wait_until(lambda: b"data: 2\n\n" in client.data[stream], 10, "the connection stopped serving")


class HttpsUpstreamTests(TestCase):
    """https:// upstreams: verified, SNI, mutual TLS, streaming."""

    timeout = 60

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())

    def server_options(self, pki: TestPki, require_client: bool = False) -> CertificateOptions:
        me = PrivateCertificate.loadPEM(pki.server_pem)
        if not require_client:
            return me.options()
        ca = Certificate.loadPEM(Path(pki.ca).read_bytes())
        return CertificateOptions(
            privateKey=me.privateKey.original, certificate=me.original,
            verify=True, requireCertificate=True, caCerts=[ca.original],
        )

    async def gateway(self, upstream: int, route_keys: str) -> int:
        text = gateway_ini(0, routes=(
            f"[route:secure]\npath = /api/secure/**\nupstream = https://127.0.0.1:{upstream}/api/aura\n"
            f"strip_prefix = 2\n{route_keys}\n"))
        port, _ = await start_tls_gateway(self, text, self.pki)
        return port

    async def test_verified_upstream_streams(self) -> None:
        """
        An https:// upstream whose certificate chains to the route's
        ca_file: an SSE stream flows through (HTTP/2 client), and a header
        the upstream's Connection header names is not passed on.
        """
        upstream, _, _ = await start_upstream(self, self.server_options(self.pki))
        port = await self.gateway(upstream, f"ca_file = {self.pki.ca}")
        client = await h2_connect(self, port, self.pki)
        stream = client.request("/api/secure/endless")
        await wait_until(lambda: b"data: 5\n\n" in client.data[stream], 10, "no events from the https upstream")
        hop = client.request("/api/secure/hop")
        await wait_until(lambda: hop in client.ended, 10, "no answer from /hop")
        headers = dict(client.headers[hop])
        self.assertEqual(headers[b":status"], b"200")
        self.assertEqual(headers.get(b"x-kept"), b"2")
        self.assertNotIn(b"x-secret", headers)
        self.assertEqual(json.loads(client.data[hop]), {"ok": True})

    async def test_sni_and_host_name_verified(self) -> None:
        """
        An https://localhost:PORT upstream gets the host name as SNI, and its
        certificate is checked for that name (the test certificate names
        localhost and 127.0.0.1).
        """
        names: list[Optional[bytes]] = []
        options = self.server_options(self.pki)

        @implementer(IOpenSSLContextFactory)
        class RecordingContext:
            def getContext(self) -> Any:
                context = options.getContext()
                context.set_tlsext_servername_callback(lambda conn: names.append(conn.get_servername()))
                return context

        upstream, _, _ = await start_upstream(self, RecordingContext())  # type: ignore[arg-type]
        text = gateway_ini(0, routes=(
            f"[route:secure]\npath = /api/secure/**\nupstream = https://localhost:{upstream}/api/aura\n"
            f"strip_prefix = 2\nca_file = {self.pki.ca}\n"))
        port, _ = await start_tls_gateway(self, text, self.pki)
        client = await h2_connect(self, port, self.pki)
        hop = client.request("/api/secure/hop")
        await wait_until(lambda: hop in client.ended, 10, "no answer through https://localhost")
        self.assertEqual(dict(client.headers[hop])[b":status"], b"200")
        self.assertEqual(set(names), {b"localhost"})

    async def test_untrusted_upstream_is_502(self) -> None:
        """An https:// upstream whose certificate does not chain to ca_file: 502 with a JSON body."""
        other = make_pki(self.mktemp(), "other")
        upstream, endless, _ = await start_upstream(self, self.server_options(other))
        port = await self.gateway(upstream, f"ca_file = {self.pki.ca}")
        client = await h2_connect(self, port, self.pki)
        stream = client.request("/api/secure/endless")
        await wait_until(lambda: stream in client.ended, 15, "no answer")
        self.assertEqual(dict(client.headers[stream])[b":status"], b"502")
        self.assertEqual(json.loads(client.data[stream])["error"]["code"], "upstream_unavailable")
        self.assertEqual(endless.open, [])

    async def test_silent_handshake_is_504(self) -> None:
        """
        An https:// upstream that accepts the TCP connection but never
        answers the TLS handshake: 504 upstream_timeout after response_timeout.
        """
        hang_port, _ = start_hang_server(self)
        text = gateway_ini(0, gateway="response_timeout = 1", routes=(
            f"[route:secure]\npath = /api/secure/**\nupstream = https://127.0.0.1:{hang_port}\n"
            f"ca_file = {self.pki.ca}\n"))
        port, _ = await start_tls_gateway(self, text, self.pki)
        client = await h2_connect(self, port, self.pki)
        stream = client.request("/api/secure/x")
        await wait_until(lambda: stream in client.ended, 10, "no answer")
        self.assertEqual(dict(client.headers[stream])[b":status"], b"504")
        self.assertEqual(json.loads(client.data[stream])["error"]["code"], "upstream_timeout")

    async def test_mutual_tls(self) -> None:
        """
        An https:// upstream that requires a client certificate from the
        test CA: without client_cert the route gets a 502; with client_cert
        and client_key the stream flows.
        """
        upstream, _, _ = await start_upstream(self, self.server_options(self.pki, require_client=True))
        refused = await self.gateway(upstream, f"ca_file = {self.pki.ca}")
        client = await h2_connect(self, refused, self.pki)
        stream = client.request("/api/secure/hop")
        await wait_until(lambda: stream in client.ended, 15, "no answer without a client certificate")
        self.assertEqual(dict(client.headers[stream])[b":status"], b"502")

        port = await self.gateway(upstream, (
            f"ca_file = {self.pki.ca}\nclient_cert = {self.pki.client_cert}\nclient_key = {self.pki.client_key}"))
        client = await h2_connect(self, port, self.pki)
        stream = client.request("/api/secure/endless")
        await wait_until(lambda: b"data: 3\n\n" in client.data.get(stream, b""), 10, "no events with mutual TLS")


PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>aura-proxy tls</title></head><body><script>
"use strict";
const got = [];
const es = new EventSource("/api/aura/endless?tenant_id=t1");
es.onmessage = (e) => {
  got.push(e.data);
  if (got.length === 5) {
    es.close();
    fetch("/page/collect", {method: "POST", body: JSON.stringify({events: got})});
  }
};
</script></body></html>
"""


class _Collect(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.reported: Deferred[Any] = Deferred()
        self.protocols: list[bytes] = []

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html")
        return PAGE

    def render_POST(self, request: Request) -> bytes:
        if not self.reported.called:
            self.reported.callback(json.loads(request.content.read()))  # type: ignore[union-attr]
        return b"{}"


class BrowserTlsTests(TestCase):
    """Headless chromium over TLS and HTTP/2."""

    timeout = 60

    async def test_event_source_over_http2(self) -> None:
        """
        Chromium, trusting the test server key by its SPKI hash, loads a page
        through the gateway's ssl: listener and its EventSource receives
        events over HTTP/2 (the gateway's access log says HTTP/2).
        """
        chromium = find_chromium()
        if chromium is None:
            raise SkipTest("chromium is not installed (apt-get install chromium; ./dev test does)")
        pki = make_pki(self.mktemp())
        upstream, _, _ = await start_upstream(self)
        root = Resource()
        page = Resource()
        collect = _Collect()
        root.putChild(b"page", page)
        page.putChild(b"index.html", collect)
        page.putChild(b"collect", collect)
        page_site = TrackingPlainSite(root, reactor=reactor)
        page_port = await _listen_endpoint(self, "tcp:0:interface=127.0.0.1", page_site)
        text = gateway_ini(upstream, routes=(
            f"[route:page]\npath = /page/**\nupstream = http://127.0.0.1:{page_port}\n")).replace(
            "public_paths = /api/public/**", "public_paths = /api/public/**, /page/**\n"
            "tenant_from = header, query:tenant_id")
        port, gateway = await start_tls_gateway(self, text, pki)
        seen: list[bytes] = []
        original = gateway.handle

        def handle(request: Any) -> Any:
            seen.append(request.clientproto)
            return original(request)

        gateway.handle = handle  # type: ignore[method-assign]
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        log_path = workdir / "chromium.log"
        log = open(log_path, "wb")
        self.addCleanup(log.close)
        browser = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'profile'}",
             f"--ignore-certificate-errors-spki-list={pki.server_spki}",
             f"https://127.0.0.1:{port}/page/index.html"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.addCleanup(_kill_group, browser)
        reported = collect.reported
        reported.addTimeout(40, reactor)
        try:
            report = await reported
        except Exception:
            log.flush()
            self.fail(f"the page never reported; chromium log:\n{log_path.read_text(errors='replace')[-3000:]}")
        self.assertEqual(report["events"], ["1", "2", "3", "4", "5"])
        self.assertTrue(seen and set(seen) == {b"HTTP/2"}, seen)
