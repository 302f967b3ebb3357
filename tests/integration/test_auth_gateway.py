"""
JWT verification through the gateway over real sockets: a JWKS endpoint
served by the test, the FastAPI upstream, real RS256 tokens.
"""

from __future__ import annotations

import json
import time
from typing import Any, Optional

import treq
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from aura_proxy.sse import parse_gateway_id
from tests.integration.gateway import client, gateway_ini, parse_events, start_gateway, start_site
from tests.integration.upstreams import start_fastapi_upstream
from tests.token_helpers import EC_KEY, OTHER_RSA_KEY, RSA_KEY, jwks_document, make_token


class JwksResource(Resource):
    """A JWKS endpoint whose document (or outage) the test sets; counts its fetches."""

    isLeaf = True

    def __init__(self, document: bytes) -> None:
        super().__init__()
        self.document = document
        self.down = False
        self.fetches = 0

    def render_GET(self, request: Request) -> bytes:
        self.fetches += 1
        if self.down:
            request.setResponseCode(503)
            return b"down"
        request.setHeader(b"content-type", b"application/json")
        return self.document


def token(key: Any = RSA_KEY, kid: str = "k1", **claims: Any) -> str:
    """A token valid now (the gateway runs on the real clock)."""
    return make_token(key, kid=kid, now=time.time(), **claims).decode("ascii")


class AuthGatewayTests(TestCase):
    """[auth] jwt = required with keys from a JWKS URL."""

    timeout = 20

    def setUp(self) -> None:
        self.jwks = JwksResource(jwks_document(("k1", RSA_KEY)))
        jwks_port, _ = start_site(self, self.jwks)
        upstream = start_fastapi_upstream(self)
        ini = gateway_ini(upstream, extra=(
            "\n[auth]\njwt = required\n"
            f"jwks_url = http://127.0.0.1:{jwks_port}/jwks\njwks_min_refresh = 0\n"
            "token_from = header, cookie:dwp_token\n"
        )).replace(
            "inject_ids = false\nresume = off\non_client_disconnect = cancel",
            "inject_ids = true\nresume = memory\non_client_disconnect = detach",
        )
        port, _ = start_gateway(self, ini)
        self.base = f"http://127.0.0.1:{port}"
        self.http, _ = client()

    async def get(self, path: str, bearer: Optional[str] = None, method: str = "GET",
                  **headers: str) -> tuple[Any, bytes]:
        sent = {name.replace("_", "-"): [value] for name, value in headers.items()}
        if bearer is not None:
            sent["Authorization"] = [f"Bearer {bearer}"]
        response = await self.http.request(method, self.base + path, headers=sent)
        return response, await treq.content(response)

    async def test_tokenIdentityReachesUpstream(self) -> None:
        """The token's user replaces a spoofed X-User-ID, and its tenant is X-Tenant-ID upstream."""
        response, body = await self.get("/api/aura/echo", token(sub="alice"), X_User_ID="admin")
        self.assertEqual(response.code, 200, body)
        headers = json.loads(body)["headers"]
        self.assertEqual([v for n, v in headers if n == "x-user-id"], ["alice"])
        self.assertEqual([v for n, v in headers if n == "x-tenant-id"], ["t1"])

    async def test_refusedTokens(self) -> None:
        """No token, an expired or badly signed one: 401 JSON with the Bearer challenge."""
        cases = [
            (None, "missing_token", b'Bearer error="invalid_request"'),
            (token(exp=int(time.time() - 3600)), "invalid_token", b'Bearer error="invalid_token"'),
            (token(OTHER_RSA_KEY), "invalid_token", b'Bearer error="invalid_token"'),
        ]
        for bearer, code, challenge in cases:
            response, body = await self.get("/api/aura/echo", bearer, X_Tenant_ID="t1")
            self.assertEqual(response.code, 401, body)
            self.assertEqual(json.loads(body)["error"]["code"], code)
            self.assertEqual(response.headers.getRawHeaders(b"www-authenticate"), [challenge])

    async def test_tenantMismatch(self) -> None:
        """An X-Tenant-ID other than the token's tenant is 403."""
        response, body = await self.get("/api/aura/echo", token(), X_Tenant_ID="t2")
        self.assertEqual((response.code, json.loads(body)["error"]["code"]), (403, "tenant_mismatch"))

    async def test_cookieToken(self) -> None:
        """A token in the dwp_token cookie (what an EventSource sends) is verified."""
        response, body = await self.get("/api/aura/echo", Cookie=f"dwp_token={token(sub='bob')}")
        self.assertEqual(response.code, 200, body)
        self.assertIn(["x-user-id", "bob"], json.loads(body)["headers"])

    async def test_keyRotation(self) -> None:
        """A new kid is fetched from the JWKS; while the endpoint is down the cached set still works."""
        self.jwks.document = jwks_document(("k1", RSA_KEY), ("k2", EC_KEY), ("k3", OTHER_RSA_KEY))
        response, body = await self.get("/api/aura/echo", token(OTHER_RSA_KEY, kid="k3"))
        self.assertEqual(response.code, 200, body)
        self.jwks.down = True
        for bearer in (token(sub="u5"), token(OTHER_RSA_KEY, kid="k3", sub="u6")):
            response, body = await self.get("/api/aura/echo", bearer)
            self.assertEqual(response.code, 200, body)
        response, body = await self.get("/api/aura/echo", token(OTHER_RSA_KEY, kid="k4"))
        self.assertEqual(response.code, 401, body)
        self.flushLoggedErrors()

    async def stream(self, bearer: str, path: str = "/api/aura/stream?count=3&interval=0.01",
                     method: str = "GET", last: Optional[str] = None, **headers: str
                     ) -> list[dict[str, str]]:
        if last is not None:
            headers["Last_Event_ID"] = last
        response, body = await self.get(path, bearer, method, **headers)
        self.assertEqual(response.code, 200, body)
        return parse_events(body)

    @staticmethod
    def stream_of(events: list[dict[str, str]]) -> str:
        parsed = parse_gateway_id(events[0]["id"])
        assert parsed is not None
        return parsed[0]

    async def test_resumeNeedsTheSameUser(self) -> None:
        """Another user of the same tenant gets a fresh stream; the owner gets the replay."""
        first = await self.stream(token(sub="u1"))
        original = self.stream_of(first)
        other = await self.stream(token(sub="u2"), last=first[0]["id"])
        self.assertNotEqual(self.stream_of(other), original)
        self.assertEqual(len(other), len(first))  # from the start: nothing of u1's stream
        again = await self.stream(token(sub="u1"), last=first[0]["id"])
        self.assertEqual(self.stream_of(again), original)
        self.assertEqual(len(again), len(first) - 1)

    async def test_resumeNeedsTheSameRouteAndMethod(self) -> None:
        """A stream's id sent to another route, or with another method, replays nothing."""
        first = await self.stream(token())
        original = self.stream_of(first)
        other_route = await self.stream(token(), "/api/public/stream?count=3&interval=0.01",
                                        last=first[0]["id"], X_Tenant_ID="t1")
        self.assertNotEqual(self.stream_of(other_route), original)
        other_method = await self.stream(token(), "/api/aura/stream", "POST", last=first[0]["id"])
        self.assertNotEqual(self.stream_of(other_method), original)
