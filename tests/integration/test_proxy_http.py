"""
Plain HTTP through a real, in-process gateway in front of the FastAPI test
upstream (subprocess) or in-process Twisted upstreams: the header contract,
pass-through of bodies and cookies, the gateway's own JSON errors, CORS,
path rewriting and upstream connection reuse.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tests.integration.gateway import (
    ChunkCollector,
    client,
    connect_raw,
    gateway_ini,
    header_values,
    reactor,
    sleep,
    start_gateway,
    start_hang_server,
    start_site,
    wait_until,
)
from tests.integration.upstream_app import GZIP_PLAIN, JSON_DOC
from tests.integration.upstreams import free_port, start_fastapi_upstream

TENANT = {b"X-Tenant-ID": [b"t1"]}
ALLOWED = b"http://allowed.example"
EVIL = b"http://evil-origin.example"


def error_of(body: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(body)["error"]
    return error


class HttpTests(TestCase):
    """One FastAPI upstream and one in-process gateway per test."""

    timeout = 20

    def setUp(self) -> None:
        self.up_port = start_fastapi_upstream(self)

    def gateway(self, gateway: str = "", routes: str = "") -> tuple[str, Any]:
        port, gw = start_gateway(self, gateway_ini(self.up_port, gateway, routes))
        self.port = port
        return f"http://127.0.0.1:{port}", gw

    async def request(
        self, method: bytes, url: str, headers: dict[bytes, list[bytes]] | None = None,
        body: Any = None,
    ) -> tuple[Any, bytes]:
        """A bare-Agent request (no decoding, no cookie jar): response, body."""
        _, agent = client()
        response = await agent.request(method, url.encode(), Headers(headers or {}), body)
        return response, await readBody(response)

    async def test_headersForwarded(self) -> None:
        """
        End-to-end request headers reach the upstream unchanged and in
        order, duplicates kept; hop-by-hop headers (Connection, Keep-Alive,
        TE, Upgrade, Proxy-Authorization, Transfer-Encoding) and headers
        named in Connection do not; X-Forwarded-For gets the client appended
        to the existing value, X-Forwarded-Proto/-Host are set; the
        X-DWP-Source / X-DWP-Caller-Type the client sent are kept as they are.
        """
        self.gateway()
        end_to_end = [
            (b"authorization", b"Bearer abc.def"),
            (b"x-tenant-id", b"tenant-7"),
            (b"x-user-id", b"user-3"),
            (b"x-agent-id", b"agent-9"),
            (b"last-event-id", b"42"),
            (b"x-dwp-source", b"MOBILE"),
            (b"x-dwp-caller-type", b"SERVICE"),
            (b"traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            (b"x-custom-thing", b"Mixed Case Value"),
            (b"x-dup", b"first"),
            (b"x-dup", b"second"),
        ]
        hop = [
            (b"Connection", b"keep-alive, X-Secret-Hop"),
            (b"Keep-Alive", b"timeout=5"),
            (b"TE", b"trailers"),
            (b"Upgrade", b"websocket"),
            (b"Proxy-Authorization", b"Basic c2VjcmV0"),
            (b"X-Secret-Hop", b"drop me"),
            (b"X-Forwarded-For", b"203.0.113.7"),
        ]
        lines = b"".join(n + b": " + v + b"\r\n" for n, v in end_to_end + hop)
        raw = await connect_raw(
            self, self.port,
            b"POST /api/aura/echo HTTP/1.1\r\nHost: gw.example:8080\r\n" + lines
            + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        )
        await raw.wait_for(lambda d: b"\r\n\r\n" in d and d.rstrip().endswith(b"}"))
        status, _ = raw.head()
        self.assertEqual(status, 200, raw.data)
        echoed = json.loads(raw.body())
        self.assertEqual(echoed["body"], "hello")
        got = [(n.encode(), v.encode()) for n, v in echoed["headers"]]
        names = {n for n, _ in end_to_end}
        self.assertEqual([h for h in got if h[0] in names], end_to_end)
        got_names = {n for n, _ in got}
        for dropped in (b"connection", b"keep-alive", b"te", b"upgrade",
                        b"proxy-authorization", b"x-secret-hop", b"transfer-encoding"):
            self.assertNotIn(dropped, got_names, f"{dropped!r} reached the upstream")
        got_dict: dict[bytes, list[bytes]] = {}
        for n, v in got:
            got_dict.setdefault(n, []).append(v)
        self.assertEqual(got_dict[b"x-forwarded-for"], [b"203.0.113.7, 127.0.0.1"])
        self.assertEqual(got_dict[b"x-forwarded-proto"], [b"http"])
        self.assertEqual(got_dict[b"x-forwarded-host"], [b"gw.example:8080"])
        self.assertEqual(got_dict[b"content-length"], [b"5"])

    async def test_defaultHeadersOnlyWhenAbsent(self) -> None:
        """
        X-DWP-Source = FRONTEND and X-DWP-Caller-Type = USER are added when
        the client sent none, and X-Forwarded-For is the client alone when
        the client sent none.
        """
        base, _ = self.gateway()
        response, body = await self.request(b"GET", base + "/api/aura/echo", TENANT)
        headers = json.loads(body)["headers"]
        self.assertEqual([v for n, v in headers if n == "x-dwp-source"], ["FRONTEND"])
        self.assertEqual([v for n, v in headers if n == "x-dwp-caller-type"], ["USER"])
        self.assertEqual([v for n, v in headers if n == "x-forwarded-for"], ["127.0.0.1"])

    async def test_gzipPassedThrough(self) -> None:
        """
        A gzip body comes back undecoded with Content-Encoding: gzip, and
        the client's Accept-Encoding reaches the upstream exactly as sent;
        none is added when the client sent none.
        """
        base, _ = self.gateway()
        response, body = await self.request(
            b"GET", base + "/api/aura/gzip", {**TENANT, b"Accept-Encoding": [b"gzip"]}
        )
        self.assertEqual(response.headers.getRawHeaders(b"content-encoding"), [b"gzip"])
        self.assertEqual(body[:2], b"\x1f\x8b")
        self.assertEqual(gzip.decompress(body), GZIP_PLAIN)
        self.assertEqual(response.length, len(body))

        sent = b"br;q=1.0, gzip;q=0.5, identity;q=0.1"
        _, body = await self.request(
            b"GET", base + "/api/aura/echo", {**TENANT, b"Accept-Encoding": [sent]}
        )
        headers = json.loads(body)["headers"]
        self.assertEqual([v for n, v in headers if n == "accept-encoding"], [sent.decode()])
        _, body = await self.request(b"GET", base + "/api/aura/echo", TENANT)
        self.assertEqual([v for n, v in json.loads(body)["headers"] if n == "accept-encoding"], [])

    async def test_noSharedCookieJar(self) -> None:
        """
        User A's response carries the upstream's Set-Cookie headers; user
        B's later request carries no cookie upstream (the gateway keeps no
        cookie jar).
        """
        base, _ = self.gateway()
        response, body = await self.request(
            b"GET", base + "/api/aura/cookie", {b"X-Tenant-ID": [b"a"], b"X-User-ID": [b"A"]}
        )
        cookies = response.headers.getRawHeaders(b"set-cookie")
        self.assertEqual(len(cookies), 2, cookies)
        self.assertTrue(any(c.startswith(b"aura_session=s3ss10n") for c in cookies), cookies)
        response, body = await self.request(
            b"GET", base + "/api/aura/cookie", {b"X-Tenant-ID": [b"b"], b"X-User-ID": [b"B"]}
        )
        self.assertEqual(json.loads(body), {"cookie": None})
        _, body = await self.request(b"GET", base + "/api/aura/echo", {b"X-Tenant-ID": [b"b"]})
        self.assertNotIn("cookie", [n for n, _ in json.loads(body)["headers"]])

    async def test_unknownPath(self) -> None:
        """An unrouted path is 404 with JSON code no_route."""
        base, _ = self.gateway()
        response, body = await self.request(b"GET", base + "/nowhere/at/all", TENANT)
        self.assertEqual(response.code, 404)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        error = error_of(body)
        self.assertEqual((error["status"], error["code"]), (404, "no_route"))
        self.assertTrue(error["request_id"])

    async def test_missingTenant(self) -> None:
        """
        A missing or blank X-Tenant-ID is 400 missing_header naming the
        header; a public path needs none.
        """
        base, _ = self.gateway()
        for headers in ({}, {b"X-Tenant-ID": [b"   "]}):
            response, body = await self.request(b"GET", base + "/api/aura/json", headers)
            self.assertEqual(response.code, 400, headers)
            error = error_of(body)
            self.assertEqual(error["code"], "missing_header")
            self.assertIn("X-Tenant-ID", error["message"])
        response, body = await self.request(b"GET", base + "/api/public/json")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body), JSON_DOC)

    async def test_bodyTooLargeContentLength(self) -> None:
        """
        A body over max_request_body announced by Content-Length is 413
        body_too_large; a body exactly at the limit is forwarded whole.
        """
        base, _ = self.gateway("max_request_body = 1000")
        raw = await connect_raw(
            self, self.port,
            b"POST /api/aura/echo HTTP/1.1\r\nHost: gw\r\nX-Tenant-ID: t\r\n"
            b"Content-Length: 2000\r\n\r\n" + b"a" * 2000,
        )
        await raw.closed
        status, headers = raw.head()
        self.assertEqual(status, 413)
        self.assertEqual(error_of(raw.body())["code"], "body_too_large")
        from twisted.web.client import FileBodyProducer
        from io import BytesIO
        response, body = await self.request(
            b"POST", base + "/api/aura/echo", TENANT, FileBodyProducer(BytesIO(b"b" * 1000))
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["body"], "b" * 1000)

    async def test_bodyTooLargeChunked(self) -> None:
        """A chunked body that grows over max_request_body is 413 body_too_large."""
        self.gateway("max_request_body = 1000")
        chunk = b"320\r\n" + b"c" * 800 + b"\r\n"
        raw = await connect_raw(
            self, self.port,
            b"POST /api/aura/echo HTTP/1.1\r\nHost: gw\r\nX-Tenant-ID: t\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunk + chunk + b"0\r\n\r\n",
        )
        await raw.closed
        status, headers = raw.head()
        self.assertEqual(status, 413)
        self.assertEqual(header_values(headers, b"content-type"), [b"application/json"])
        self.assertEqual(error_of(raw.body())["code"], "body_too_large")

    async def test_upstreamRefused(self) -> None:
        """A route to a closed port is 502 upstream_unavailable."""
        closed = free_port()
        base, _ = self.gateway(
            routes=f"[route:closed]\npath = /api/closed/**\nupstream = http://127.0.0.1:{closed}\n"
        )
        response, body = await self.request(b"GET", base + "/api/closed/x", TENANT)
        self.assertEqual(response.code, 502)
        self.assertEqual(error_of(body)["code"], "upstream_unavailable")

    async def test_upstreamResponseTimeout(self) -> None:
        """
        An upstream that accepts but never answers, with response_timeout =
        1, is 504 upstream_timeout after about 1 s, and its connection is
        closed.
        """
        hang_port, hang = start_hang_server(self)
        base, _ = self.gateway(
            "response_timeout = 1",
            routes=f"[route:hang]\npath = /api/hang/**\nupstream = http://127.0.0.1:{hang_port}\n",
        )
        start = time.monotonic()
        response, body = await self.request(b"GET", base + "/api/hang/x", TENANT)
        elapsed = time.monotonic() - start
        self.assertEqual(response.code, 504)
        self.assertEqual(error_of(body)["code"], "upstream_timeout")
        self.assertGreater(elapsed, 0.8)
        self.assertLess(elapsed, 3.0)
        await wait_until(lambda: not hang.open, 1.0, "timed-out upstream connection left open")

    async def test_upstreamConnectTimeout(self) -> None:
        """
        An upstream whose accept queue is full (SYNs dropped), with
        connect_timeout = 1, is 504 upstream_timeout about accepting the
        connection, after about 1 s.
        """
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(4):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
            self.addCleanup(s.close)
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        probe.settimeout(0.5)
        try:
            probe.connect(("127.0.0.1", port))
        except (socket.timeout, OSError):
            pass
        else:
            raise SkipTest("cannot provoke a connect timeout on loopback here (accept queue overflow does not drop SYNs)")
        finally:
            probe.close()
        base, _ = self.gateway(
            "connect_timeout = 1\nresponse_timeout = 5",
            routes=f"[route:full]\npath = /api/full/**\nupstream = http://127.0.0.1:{port}\n",
        )
        start = time.monotonic()
        response, body = await self.request(b"GET", base + "/api/full/x", TENANT)
        elapsed = time.monotonic() - start
        self.assertEqual(response.code, 504)
        error = error_of(body)
        self.assertEqual(error["code"], "upstream_timeout")
        self.assertIn("accept the connection", error["message"])
        self.assertLess(elapsed, 3.0)

    async def test_dotDotSegment(self) -> None:
        """A path with a '..' segment (plain or percent-encoded) is 400 bad_request."""
        base, _ = self.gateway()
        for path in (b"/api/aura/../secret", b"/api/aura/%2e%2e/secret", b"/api/aura/./json"):
            raw = await connect_raw(
                self, self.port, b"GET " + path + b" HTTP/1.1\r\nHost: gw\r\nX-Tenant-ID: t\r\n"
                b"Connection: close\r\n\r\n"
            )
            await raw.closed
            status, _ = raw.head()
            self.assertEqual(status, 400, path)
            self.assertEqual(error_of(raw.body())["code"], "bad_request", path)

    async def test_upstreamErrorStatusPassedThrough(self) -> None:
        """An upstream 503 reaches the client as 503 with the upstream's body."""
        base, _ = self.gateway()
        response, body = await self.request(b"GET", base + "/api/aura/status/503", TENANT)
        self.assertEqual(response.code, 503)
        self.assertEqual(json.loads(body), {"status": 503})

    async def test_corsPreflight(self) -> None:
        """
        A preflight from an allowed origin is answered 204 by the gateway
        itself (no tenant needed, the upstream is never contacted); one from
        a disallowed origin is 403 and that origin appears in no response
        header.
        """
        hang_port, hang = start_hang_server(self)
        base, _ = self.gateway(
            routes=f"[route:hang]\npath = /api/hang/**\nupstream = http://127.0.0.1:{hang_port}\n"
        )
        response, body = await self.request(b"OPTIONS", base + "/api/hang/chat", {
            b"Origin": [ALLOWED],
            b"Access-Control-Request-Method": [b"POST"],
            b"Access-Control-Request-Headers": [b"X-Tenant-ID, Content-Type"],
        })
        self.assertEqual(response.code, 204)
        self.assertEqual(response.headers.getRawHeaders(b"access-control-allow-origin"), [ALLOWED])
        methods = response.headers.getRawHeaders(b"access-control-allow-methods")[0]
        self.assertIn(b"POST", methods)
        self.assertEqual(hang.connections_made, 0)

        raw = await connect_raw(
            self, self.port,
            b"OPTIONS /api/hang/chat HTTP/1.1\r\nHost: gw\r\nOrigin: " + EVIL + b"\r\n"
            b"Access-Control-Request-Method: POST\r\nConnection: close\r\n\r\n",
        )
        await raw.closed
        status, headers = raw.head()
        self.assertEqual(status, 403)
        self.assertEqual(error_of(raw.body())["code"], "cors_forbidden")
        self.assertNotIn(b"evil-origin", raw.data.split(b"\r\n\r\n")[0])
        self.assertEqual(header_values(headers, b"access-control-allow-origin"), [])
        self.assertEqual(hang.connections_made, 0)

    async def test_corsActualRequest(self) -> None:
        """
        An actual request from an allowed origin gets
        Access-Control-Allow-Origin = that origin; from a disallowed origin
        none, and the origin appears in no response header.
        """
        base, _ = self.gateway()
        response, _ = await self.request(
            b"GET", base + "/api/aura/json", {**TENANT, b"Origin": [ALLOWED]}
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"access-control-allow-origin"), [ALLOWED])
        self.assertEqual(response.headers.getRawHeaders(b"access-control-allow-credentials"), [b"true"])
        raw = await connect_raw(
            self, self.port,
            b"GET /api/aura/json HTTP/1.1\r\nHost: gw\r\nX-Tenant-ID: t\r\nOrigin: " + EVIL
            + b"\r\nConnection: close\r\n\r\n",
        )
        await raw.closed
        status, headers = raw.head()
        self.assertEqual(status, 200)
        self.assertEqual(header_values(headers, b"access-control-allow-origin"), [])
        self.assertNotIn(b"evil-origin", raw.data.split(b"\r\n\r\n")[0])

    async def test_stripPrefix(self) -> None:
        """
        strip_prefix = 2 removes two segments: /api/svc/x/y reaches the
        upstream as /x/y (query kept); with an upstream base path
        (http://H/api/aura, pattern /gw/aura/**) the base path is put in
        front: /gw/aura/echo/x reaches the upstream as /api/aura/echo/x.
        """
        base, _ = self.gateway(routes=(
            f"[route:svc]\npath = /api/svc/**\nupstream = http://127.0.0.1:{self.up_port}\n"
            f"strip_prefix = 2\n\n"
            f"[route:gw]\npath = /gw/aura/**\nupstream = http://127.0.0.1:{self.up_port}/api/aura\n"
            f"strip_prefix = 2\n"
        ))
        response, body = await self.request(
            b"GET", base + "/api/svc/api/aura/echo/x/y?q=1&q=2", TENANT
        )
        self.assertEqual(response.code, 200)
        echoed = json.loads(body)
        self.assertEqual((echoed["path"], echoed["query"]), ("/api/aura/echo/x/y", "q=1&q=2"))
        response, body = await self.request(b"GET", base + "/gw/aura/echo/x?z=9", TENANT)
        self.assertEqual(response.code, 200)
        echoed = json.loads(body)
        self.assertEqual((echoed["path"], echoed["query"]), ("/api/aura/echo/x", "z=9"))


class _Plain(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"ok"


class _Endless(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        state = {"call": None}

        def tick() -> None:
            request.write(b"data: tick\n\n")
            state["call"] = reactor.callLater(0.05, tick)

        def gone(_: Any) -> None:
            if state["call"] is not None and state["call"].active():
                state["call"].cancel()

        request.notifyFinish().addBoth(gone)
        tick()
        return NOT_DONE_YET


class ConnectionReuseTests(TestCase):
    """Upstream connections are pooled, except after an abandoned stream."""

    timeout = 20

    async def test_reuseAndNoReuseAfterDisconnect(self) -> None:
        """
        Two sequential requests use the same upstream connection; a stream
        the client disconnects from has its upstream connection closed (not
        returned to the pool), so the next request opens a new one.
        """
        root = Resource()
        root.putChild(b"plain", _Plain())
        root.putChild(b"endless", _Endless())
        up_port, site = start_site(self, root)
        port, gw = start_gateway(self, gateway_ini(
            1, routes=f"[route:pool]\npath = /pool/**\nupstream = http://127.0.0.1:{up_port}\n"
            "strip_prefix = 1\n"))
        base = f"http://127.0.0.1:{port}"
        http, agent = client()
        for _ in range(2):
            response = await agent.request(b"GET", (base + "/pool/plain").encode(),
                                           Headers(TENANT))
            self.assertEqual(await readBody(response), b"ok")
        self.assertEqual(site.connections_made, 1)

        response = await http.get(base + "/pool/endless", headers=TENANT, unbuffered=True)
        collector = ChunkCollector(abort_after=30)
        response.deliverBody(collector)
        await collector.done
        self.assertEqual(site.connections_made, 1)
        await wait_until(lambda: not site.open, 1.0, "abandoned stream's upstream connection still open")
        await wait_until(lambda: gw.active_streams() == 0, 1.0, "stream still counted")

        response = await agent.request(b"GET", (base + "/pool/plain").encode(), Headers(TENANT))
        self.assertEqual(await readBody(response), b"ok")
        self.assertEqual(site.connections_made, 2)
