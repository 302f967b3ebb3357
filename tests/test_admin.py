"""
Tests for L{aura_proxy.admin}, L{aura_proxy.readiness} and L{aura_proxy.admin_token}: /healthz and /readyz with fake reports and
checks, the readiness checks of a gateway process, the Redis probe, and the
admin token (L{TokenGuard}).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from klein import Klein
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from aura_proxy import admin_token, readiness
from aura_proxy.admin import admin_site
from aura_proxy.admin_token import TokenGuard
from aura_proxy.readiness import Readiness, _Ping, gateway_readiness
from aura_proxy.config import parse_config
from tests.test_assembly import ini

TOKEN = b"s3cret-admin-token-0123456789"


def ok_report() -> dict[str, object]:
    """A health report that says the process serves."""
    return {"status": "ok"}


class FakeSite:
    """The part of the gateway's site a readiness check reads: its listening ports."""

    numPorts = 1


class FakeHistory:
    """Call history as readiness sees it: its stats()."""

    def __init__(self, db_up: int) -> None:
        self.db_up = db_up

    def stats(self) -> dict[str, int]:
        return {"db_up": self.db_up, "queue_length": 3, "spool_pending": 7}


class ReadyzTests(TestCase):
    """C{GET /readyz}: every check named, 200 when all pass, 503 when one fails."""

    def http(self, checks: dict[str, Any], token: Optional[bytes] = None) -> StubTreq:
        """A client of an admin site with these readiness checks."""
        site = admin_site(ok_report, MemoryReactorClock(), readiness=Readiness(checks), token=token)
        return StubTreq(site.resource)

    async def test_all_pass(self) -> None:
        """Every check passing: 200, status ready, each check's own body under its name, in order."""
        response = await self.http({
            "config": lambda: {"ok": True, "source": "x.ini"},
            "later": lambda: succeed({"ok": True, "n": 1}),
        }).get("http://admin/readyz")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"])
        body = json.loads(await response.text())
        self.assertEqual(body, {
            "status": "ready", "failing": [],
            "checks": {"config": {"ok": True, "source": "x.ini"}, "later": {"ok": True, "n": 1}},
        })
        self.assertEqual(list(body["checks"]), ["config", "later"])

    async def test_one_fails(self) -> None:
        """One failing check: 503, status not_ready, the failing check named."""
        response = await self.http({
            "config": lambda: {"ok": True},
            "resume": lambda: {"ok": False, "error": "no answer within 1 s"},
        }).get("http://admin/readyz")
        self.assertEqual(response.code, 503)
        body = json.loads(await response.text())
        self.assertEqual((body["status"], body["failing"]), ("not_ready", ["resume"]))
        self.assertEqual(body["checks"]["resume"]["error"], "no answer within 1 s")

    async def test_check_that_raises(self) -> None:
        """A check that raises (or whose Deferred fails) fails, its error named; the others still answer."""
        def broken() -> dict[str, object]:
            raise RuntimeError("boom")

        def failing() -> "Deferred[dict[str, object]]":
            d: Deferred[dict[str, object]] = Deferred()
            d.errback(Failure(ValueError("bad")))
            return d

        response = await self.http({"a": broken, "b": failing, "c": lambda: {"ok": True}}).get(
            "http://admin/readyz")
        self.assertEqual(response.code, 503)
        body = json.loads(await response.text())
        self.assertEqual(body["failing"], ["a", "b"])
        self.assertEqual(body["checks"]["a"], {"ok": False, "error": "RuntimeError: boom"})
        self.assertEqual(body["checks"]["b"], {"ok": False, "error": "ValueError: bad"})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError, ValueError)), 2)

    async def test_healthz_is_liveness_only(self) -> None:
        """/healthz answers 200 while the process serves, even with a readiness check failing."""
        response = await self.http({"resume": lambda: {"ok": False}}).get("http://admin/healthz")
        self.assertEqual(response.code, 200)


class GatewayReadinessTests(TestCase):
    """L{gateway_readiness}: the checks of one gateway process."""

    def config(self, **sections: str) -> Any:
        return parse_config(ini(**sections), "gw.ini")

    async def test_checks(self) -> None:
        """config, listening, history (its database up) and resume (memory): all named, all passing."""
        config = self.config(history="enabled = true", sse="resume = memory")
        body = await gateway_readiness(config, FakeSite(), FakeHistory(1), None).report()  # type: ignore[arg-type]
        self.assertEqual(body["status"], "ready")
        self.assertEqual(body["checks"], {
            "config": {"ok": True, "source": "gw.ini"},
            "listening": {"ok": True, "listen": config.gateway.listen},
            "history": {"ok": True, "db_up": True, "queue_length": 3, "spool_pending": 7},
            "resume": {"ok": True, "store": "memory"},
        })

    async def test_not_listening(self) -> None:
        """A site without a listening port (not yet, or no more) is not ready."""
        site = FakeSite()
        site.numPorts = 0
        body = await gateway_readiness(self.config(), site, None, None).report()  # type: ignore[arg-type]
        self.assertEqual(body["failing"], ["listening"])

    async def test_history_down(self) -> None:
        """History whose database is down (rows go to the spool) is not ready, and says so."""
        body = await gateway_readiness(self.config(), FakeSite(), FakeHistory(0), None).report()  # type: ignore[arg-type]
        self.assertEqual(body["failing"], ["history"])
        self.assertIn("spool", body["checks"]["history"]["error"])  # type: ignore[index]

    async def test_without_history_and_resume(self) -> None:
        """History off and resume off: neither is checked."""
        body = await gateway_readiness(self.config(), FakeSite(), None, None).report()  # type: ignore[arg-type]
        self.assertEqual(list(body["checks"]), ["config", "listening"])  # type: ignore[arg-type]

    async def test_redis(self) -> None:
        """resume = redis://: Redis is pinged; no PONG is a failing check naming host and port, not the password."""
        config = self.config(sse="resume = redis://:pw@10.1.2.3:6390/2")
        pinged: list[tuple[Any, ...]] = []

        def ping(reactor: Any, url: str, timeout: float) -> "Deferred[None]":
            pinged.append((url, timeout))
            d: Deferred[None] = Deferred()
            d.errback(Failure(ConnectionRefusedError("Connection refused")))
            return d

        self.patch(readiness, "redis_ping", ping)
        body = await gateway_readiness(config, FakeSite(), None, None).report()  # type: ignore[arg-type]
        self.assertEqual(pinged, [("redis://:pw@10.1.2.3:6390/2", readiness.REDIS_PING_TIMEOUT)])
        self.assertEqual(body["failing"], ["resume"])
        self.assertEqual(body["checks"]["resume"],  # type: ignore[index]
                         {"ok": False, "store": "redis 10.1.2.3:6390", "error": "Connection refused"})
        self.assertNotIn("pw", json.dumps(body))
        self.patch(readiness, "redis_ping", lambda reactor, url, timeout: succeed(None))
        body = await gateway_readiness(config, FakeSite(), None, None).report()  # type: ignore[arg-type]
        self.assertEqual(body["status"], "ready")


class PingTests(SynchronousTestCase):
    """L{_Ping}: the Redis probe's protocol."""

    def connect(self, password: Optional[str] = None) -> tuple[_Ping, StringTransport]:
        ping = _Ping(password)
        transport = StringTransport()
        ping.makeConnection(transport)
        return ping, transport

    def test_pong(self) -> None:
        """PING is sent; +PONG fires done and closes the connection."""
        ping, transport = self.connect()
        self.assertEqual(transport.value(), b"*1\r\n$4\r\nPING\r\n")
        ping.dataReceived(b"+PO")
        self.assertNoResult(ping.done)
        ping.dataReceived(b"NG\r\n")
        self.successResultOf(ping.done)
        self.assertTrue(transport.disconnecting)

    def test_auth(self) -> None:
        """With a password, AUTH goes first; an error reply fails done with Redis's words."""
        ping, transport = self.connect("p w")
        self.assertEqual(transport.value(), b"*2\r\n$4\r\nAUTH\r\n$3\r\np w\r\n*1\r\n$4\r\nPING\r\n")
        ping.dataReceived(b"-WRONGPASS invalid password\r\n")
        failure = self.failureResultOf(ping.done, ConnectionError)
        self.assertIn("WRONGPASS", str(failure.value))

    def test_lost(self) -> None:
        """A connection lost before PONG fails done."""
        ping, transport = self.connect()
        ping.connectionLost(Failure(ConnectionError("gone")))
        self.failureResultOf(ping.done, ConnectionError)

    def test_cancel_aborts(self) -> None:
        """Cancelling done (the probe's timeout) aborts the connection."""
        ping, transport = self.connect()
        aborted: list[bool] = []
        transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        ping.done.cancel()
        self.assertEqual(aborted, [True])
        self.failureResultOf(ping.done, CancelledError)


class TokenGuardTests(TestCase):
    """C{[admin] token_file}: the whole admin site behind a bearer token."""

    def http(self) -> StubTreq:
        site = admin_site(ok_report, MemoryReactorClock(), readiness=Readiness({}), token=TOKEN)
        return StubTreq(site.resource)

    async def assertRefused(self, http: StubTreq, url: str, **headers: str) -> None:
        response = await http.get(url, headers={k.replace("_", "-"): v for k, v in headers.items()})
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders("www-authenticate"), ['Bearer realm="aura-proxy admin"'])
        body = json.loads(await response.text())
        self.assertEqual(body["error"]["code"], "admin_token_required")
        self.assertEqual(body["error"]["status"], 401)

    async def test_every_route_wants_the_token(self) -> None:
        """Without the token, /healthz, /readyz and any other path answer 401 JSON, never the page."""
        http = self.http()
        for path in ("/healthz", "/readyz", "/metrics", "/", "/nothing/here"):
            await self.assertRefused(http, "http://admin" + path)

    async def test_wrong_tokens(self) -> None:
        """Another token, a prefix of it, another scheme or two Authorization headers: 401."""
        http = self.http()
        await self.assertRefused(http, "http://admin/healthz", Authorization="Bearer wrong")
        await self.assertRefused(http, "http://admin/healthz", Authorization="Bearer " + TOKEN[:-1].decode())
        await self.assertRefused(http, "http://admin/healthz", Authorization="Basic " + TOKEN.decode())
        await self.assertRefused(http, "http://admin/healthz", Authorization="Bearer")
        response = await http.get("http://admin/healthz", headers={
            "Authorization": ["Bearer " + TOKEN.decode(), "Bearer " + TOKEN.decode()]})
        self.assertEqual(response.code, 401)

    async def test_right_token(self) -> None:
        """With the token (scheme in any case) every route serves as without a guard."""
        http = self.http()
        for scheme in ("Bearer", "bearer", "BEARER"):
            response = await http.get("http://admin/healthz", headers={"Authorization": f"{scheme} {TOKEN.decode()}"})
            self.assertEqual(response.code, 200)
            self.assertEqual(json.loads(await response.text()), {"status": "ok"})
        response = await http.get("http://admin/readyz", headers={"Authorization": "Bearer " + TOKEN.decode()})
        self.assertEqual(response.code, 200)
        response = await http.get("http://admin/nothing", headers={"Authorization": "Bearer " + TOKEN.decode()})
        self.assertEqual(response.code, 404)

    def test_constant_time(self) -> None:
        """The token is compared with hmac.compare_digest (time independent of where it differs)."""
        compared: list[tuple[bytes, bytes]] = []
        self.patch(admin_token.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or False)
        guard = TokenGuard(Resource(), TOKEN)
        request = Request(DummyChannel())
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer x"])
        self.assertFalse(guard.allowed(request))
        self.assertEqual(compared, [(b"bearer x", b"bearer " + TOKEN)])

    async def test_other_resources_are_covered(self) -> None:
        """
        Whatever else serves the admin site (a Klein app or a twisted.web
        tree of children, as a later feature may add) is behind the token too.
        """
        app = Klein()

        @app.route("/metrics")
        def metrics(request: Request) -> bytes:
            return b"figures"

        tree = Resource()
        tree.putChild(b"dashboard", _Leaf(b"page"))
        for root, path, expected in ((app.resource(), "/metrics", b"figures"), (tree, "/dashboard", b"page")):
            http = StubTreq(TokenGuard(root, TOKEN))
            self.assertEqual((await http.get("http://admin" + path)).code, 401)
            response = await http.get("http://admin" + path, headers={"Authorization": "Bearer " + TOKEN.decode()})
            self.assertEqual(response.code, 200)
            self.assertEqual(await response.content(), expected)


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self._body = body

    def render_GET(self, request: Request) -> bytes:
        return self._body





class SessionCookieTests(TestCase):
    """
    A browser's EventSource cannot send Authorization: a person opening the
    dashboard logs in with the token once and the page and its feed carry a
    session cookie instead.
    """

    def http(self) -> StubTreq:
        site = admin_site(ok_report, MemoryReactorClock(), readiness=Readiness({}), token=TOKEN)
        return StubTreq(site.resource)

    async def login(self, http: StubTreq, token: bytes) -> Any:
        return await http.post(
            "http://admin/login", data={"token": token.decode()},
            headers={"Content-Type": "application/x-www-form-urlencoded"}, allow_redirects=False,
        )

    async def test_browser_gets_the_form(self) -> None:
        """GET / from a browser (Accept: text/html) without the token: 401 with a login form, not the page."""
        response = await self.http().get("http://admin/", headers={"Accept": "text/html,*/*"})
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"])
        body = await response.text()
        self.assertIn('action="/login"', body)
        self.assertNotIn("dashboard.js", body)

    async def test_login_sets_a_session_cookie(self) -> None:
        """The right token: 303 to /, an HttpOnly SameSite=Strict cookie that is not the token, which then lets requests in."""
        http = self.http()
        response = await self.login(http, TOKEN)
        self.assertEqual(response.code, 303)
        self.assertEqual(response.headers.getRawHeaders("location"), ["/"])
        [cookie] = response.headers.getRawHeaders("set-cookie")
        self.assertIn("HttpOnly", cookie)
        self.assertIn("SameSite=strict", cookie)
        self.assertNotIn(TOKEN.decode(), cookie)
        value = cookie.split(";")[0].split("=", 1)[1]
        ok = await http.get("http://admin/healthz", cookies={"aura_proxy_admin": value})
        self.assertEqual(ok.code, 200)
        refused = await http.get("http://admin/healthz", cookies={"aura_proxy_admin": value[:-1] + "0"})
        self.assertEqual(refused.code, 401)

    async def test_wrong_token_no_cookie(self) -> None:
        """A wrong token at /login: the form again (401) with a note, and no cookie."""
        response = await self.login(self.http(), b"not-the-token-at-all")
        self.assertEqual(response.code, 401)
        self.assertIsNone(response.headers.getRawHeaders("set-cookie"))
        self.assertIn("not the admin token", await response.text())

    async def test_cookie_differs_per_token(self) -> None:
        """The session cookie is derived from the token: another token's cookie does not let a request in."""
        other = TokenGuard(Resource(), b"another-admin-token-000000")
        http = self.http()
        refused = await http.get("http://admin/healthz", cookies={"aura_proxy_admin": other._session.decode()})
        self.assertEqual(refused.code, 401)
