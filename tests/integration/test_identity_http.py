"""
The header contract tried as an attacker would, over real sockets, against
the FastAPI test upstream: ambiguous or malformed identity headers, header
values and paths with control characters, hop-by-hop response headers.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import TestCase

from tests.integration.gateway import connect_raw, gateway_ini, header_values, start_gateway
from tests.integration.upstreams import start_fastapi_upstream


def error_of(body: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(body)["error"]
    return error


class IdentityHeaderTests(TestCase):
    """One FastAPI upstream and one in-process gateway per test."""

    timeout = 20

    def setUp(self) -> None:
        self.up_port = start_fastapi_upstream(self)
        self.port, _ = start_gateway(self, gateway_ini(self.up_port))

    async def exchange(self, head: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Send one raw request (C{head}: request line and header lines), closing after it."""
        raw = await connect_raw(self, self.port, head + b"Host: gw\r\nConnection: close\r\n\r\n")
        await raw.closed
        status, headers = raw.head()
        return status, headers, raw.body()

    async def test_refused_identity(self) -> None:
        """
        Two X-Tenant-ID headers, an X-Agent-ID with a control byte, a
        5,000-character X-Tenant-ID: 400 with a JSON error naming the header
        (each was forwarded with 200 before).
        """
        cases = [
            (b"X-Tenant-ID: t1\r\nX-Tenant-ID: t2\r\n", "ambiguous_header", "X-Tenant-ID"),
            (b"X-Tenant-ID: t1\r\nx-user-id: a\r\nX-User-ID: b\r\n", "ambiguous_header", "X-User-ID"),
            (b"X-Tenant-ID: t1\r\nX-Agent-ID: a\x01b\r\n", "invalid_header", "X-Agent-ID"),
            (b"X-Tenant-ID: " + b"t" * 5000 + b"\r\n", "invalid_header", "X-Tenant-ID"),
        ]
        for lines, code, name in cases:
            status, headers, body = await self.exchange(b"GET /api/aura/echo HTTP/1.1\r\n" + lines)
            self.assertEqual(status, 400, body)
            self.assertEqual(header_values(headers, b"content-type"), [b"application/json"])
            error = error_of(body)
            self.assertEqual((error["code"], error["header"]), (code, name))
            self.assertIn(name, error["message"])

    async def test_control_characters_in_other_headers(self) -> None:
        """
        A NUL or a bare CR inside another header's value never reaches the
        upstream: a JSON 400, from twisted.web's parser (recent releases
        refuse them before the gateway sees the request: C{bad_request}) or
        from the Identity stage (C{invalid_header}). A tab or another control character passes.
        """
        for value in (b"a\x00b", b"a\rb"):
            status, _, body = await self.exchange(
                b"GET /api/aura/echo HTTP/1.1\r\nX-Tenant-ID: t1\r\nX-Note: " + value + b"\r\n")
            self.assertEqual(status, 400, (value, body))
            # The parser's refusal is the gateway's JSON bad_request (with a
            # request id); the Identity stage's names the header.
            self.assertIn(error_of(body)["code"], ("bad_request", "invalid_header"), value)
        status, _, body = await self.exchange(
            b"GET /api/aura/echo HTTP/1.1\r\nX-Tenant-ID: t1\r\nX-Note: a\tb\x01c\r\n")
        self.assertEqual(status, 200, body)
        self.assertIn(["x-note", "a\tb\x01c"], json.loads(body)["headers"])

    async def test_control_character_in_path(self) -> None:
        """/api/aura/a%01b (and %7F) is 400 bad_request: it was forwarded upstream before."""
        for path in (b"/api/aura/echo/a%01b", b"/api/aura/echo/a%7Fb"):
            status, _, body = await self.exchange(
                b"GET " + path + b" HTTP/1.1\r\nX-Tenant-ID: t1\r\n")
            self.assertEqual(status, 400, body)
            self.assertEqual(error_of(body)["code"], "bad_request")
        status, _, _ = await self.exchange(b"GET /api/aura/echo/a%20b HTTP/1.1\r\nX-Tenant-ID: t1\r\n")
        self.assertEqual(status, 200)

    async def test_response_hop_by_hop(self) -> None:
        """
        A header the upstream names in its response's Connection header
        (X-Secret) does not reach the client, neither on a JSON response nor
        on an SSE one; the upstream's other headers do.
        """
        for query in (b"", b"?sse=1"):
            status, headers, body = await self.exchange(
                b"GET /api/aura/hop" + query + b" HTTP/1.1\r\nX-Tenant-ID: t1\r\n")
            self.assertEqual(status, 200, body)
            self.assertEqual(header_values(headers, b"x-secret"), [], query)
            self.assertEqual(header_values(headers, b"x-kept"), [b"2"], query)

    async def test_refused_preflight_says_what(self) -> None:
        """A refused preflight's 403 body says which header (or that the method) was refused."""
        status, _, body = await self.exchange(
            b"OPTIONS /api/aura/echo HTTP/1.1\r\nOrigin: http://allowed.example\r\n"
            b"Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: X-Tenant-ID, X-Evil\r\n")
        self.assertEqual(status, 403)
        self.assertIn("header 'x-evil'", error_of(body)["message"])
        status, _, body = await self.exchange(
            b"OPTIONS /api/aura/echo HTTP/1.1\r\nOrigin: http://allowed.example\r\n"
            b"Access-Control-Request-Method: PATCH\r\n")
        self.assertEqual(status, 403)
        self.assertIn("method 'PATCH'", error_of(body)["message"])


class TrustedProxyTests(TestCase):
    """[gateway] trusted_proxies over a real socket (the test client's address is 127.0.0.1)."""

    timeout = 20

    def setUp(self) -> None:
        self.up_port = start_fastapi_upstream(self)

    async def forwarded(self, trusted: str) -> dict[str, list[str]]:
        """The X-Forwarded-* headers the upstream gets for a request that sent its own."""
        port, _ = start_gateway(self, gateway_ini(self.up_port, f"trusted_proxies = {trusted}"))
        raw = await connect_raw(
            self, port,
            b"GET /api/aura/echo HTTP/1.1\r\nHost: gw.example\r\nX-Tenant-ID: t1\r\n"
            b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n"
            b"X-Forwarded-Host: app.example\r\nConnection: close\r\n\r\n")
        await raw.closed
        status, _ = raw.head()
        self.assertEqual(status, 200, raw.data)
        got: dict[str, list[str]] = {}
        for name, value in json.loads(raw.body())["headers"]:
            if name.startswith("x-forwarded-"):
                got.setdefault(name, []).append(value)
        return got

    async def test_trusted_peer(self) -> None:
        """From a trusted proxy, X-Forwarded-Proto and -Host are kept and the chain extended."""
        self.assertEqual(await self.forwarded("127.0.0.0/8"), {
            "x-forwarded-for": ["203.0.113.7, 127.0.0.1"],
            "x-forwarded-proto": ["https"],
            "x-forwarded-host": ["app.example"],
        })

    async def test_untrusted_peer(self) -> None:
        """From a peer not listed, X-Forwarded-Proto and -Host are the gateway's own view."""
        self.assertEqual(await self.forwarded("10.0.0.0/8"), {
            "x-forwarded-for": ["203.0.113.7, 127.0.0.1"],
            "x-forwarded-proto": ["http"],
            "x-forwarded-host": ["gw.example"],
        })
