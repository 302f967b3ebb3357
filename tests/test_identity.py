"""
Tests for L{aura_proxy.stages.identity}: identity headers appear once, short
and clean, and no header value carries CR, LF or NUL.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from aura_proxy import header_store
from aura_proxy.call import Call
from aura_proxy.config import parse_config
from aura_proxy.errors import GatewayError
from aura_proxy.header_store import canonical, store
from aura_proxy.stages.identity import Identity
from aura_proxy.stages.tenant import Tenant
from tests.test_proxy import CONFIG, Echo, Harness
from tests.test_stages import make_call

C = parse_config(CONFIG.replace(
    "required = X-Tenant-ID", "required = X-Tenant-ID, X-Client-Key"), "test.ini")
STAGE = Identity(C.headers)


def run(*headers: tuple[str, str], stage: Identity = STAGE) -> tuple[Call, object]:
    """A call with C{headers} (in order, repeats kept) through the Identity stage."""
    call = make_call()
    raw = store(call.request.requestHeaders)  # as parsed: addRawHeader would replace CR and LF
    for name, value in headers:
        key = canonical(name.lower().encode("latin-1"))
        raw[key] = [*raw.get(key, ()), value.encode("latin-1")]
    return call, stage.run(call.request, call)


class IdentityTests(SynchronousTestCase):
    """L{Identity}."""

    def refused(self, answer: object) -> tuple[int, str, str]:
        assert isinstance(answer, GatewayError), answer
        assert answer.header is not None
        return answer.status, answer.code, answer.header

    def test_clean_identity_goes_on(self) -> None:
        """One of each identity header, short and printable (a tab allowed, UTF-8 too), goes on."""
        call, answer = run(("X-Tenant-ID", "t1"), ("X-User-ID", "u\t1"),
                           ("X-Agent-ID", "agent-\xe9"), ("X-Client-Key", "k"),
                           ("X-Dup", "a"), ("X-Dup", "b"))
        self.assertIsNone(answer)
        self.assertEqual(call.request.requestHeaders.getRawHeaders(b"x-tenant-id"), [b"t1"])

    def test_repeated_identity_header(self) -> None:
        """Each identity header and each required one repeated is 400 ambiguous_header naming it."""
        for name in ("X-Tenant-ID", "X-User-ID", "X-Agent-ID", "X-Client-Key"):
            _, answer = run((name, "a"), (name.lower(), "b"))
            self.assertEqual(self.refused(answer), (400, "ambiguous_header", name), name)
        _, answer = run(("X-Tenant-ID", "t1"), ("X-Tenant-ID", "t1"))
        self.assertEqual(self.refused(answer)[1], "ambiguous_header")

    def test_control_character(self) -> None:
        """An identity value with a control character (below 0x20 but tab, or DEL) is 400 invalid_header."""
        for value in ("a\x01b", "a\x1fb", "a\x7fb", "a\x0bb"):
            _, answer = run(("X-Tenant-ID", "t1"), ("X-Agent-ID", value))
            self.assertEqual(self.refused(answer), (400, "invalid_header", "X-Agent-ID"), repr(value))

    def test_too_long(self) -> None:
        """An identity value over max_identity_length bytes is refused; one at the limit is not."""
        stage = Identity(parse_config(CONFIG.replace(
            "required = X-Tenant-ID", "required = X-Tenant-ID\nmax_identity_length = 8"),
            "t.ini").headers)
        self.assertIsNone(run(("X-Tenant-ID", "a" * 8), stage=stage)[1])
        call, answer = run(("X-Tenant-ID", "a" * 9), stage=stage)
        self.assertEqual(self.refused(answer), (400, "invalid_header", "X-Tenant-ID"))
        assert isinstance(answer, GatewayError)
        self.assertIn("8 bytes", answer.message)
        self.assertEqual(C.headers.max_identity_length, 128)
        self.assertIsNotNone(run(("X-Tenant-ID", "a" * 129))[1])

    def test_line_breaking_other_header(self) -> None:
        """
        Any other header with CR, LF or NUL is 400 invalid_header naming it;
        other controls pass.  (Where this Twisted's Headers replace CR and LF
        on the way in, as 24.3's do when the gateway cannot use their own
        dict, such a value cannot reach the stage: what does is harmless.)
        """
        for value in ("a\x00b", "a\rb", "a\nb"):
            call, answer = run(("X-Tenant-ID", "t1"), ("X-Other", value))
            if answer is None:
                [held] = call.request.requestHeaders.getRawHeaders(b"x-other")
                self.assertFalse(header_store.DIRECT, repr(value))
                self.assertNotIn(b"\r", held)
                self.assertNotIn(b"\n", held)
                continue
            self.assertEqual(self.refused(answer), (400, "invalid_header", "X-Other"), repr(value))
        self.assertIsNone(run(("X-Tenant-ID", "t1"), ("X-Other", "a\x01b"))[1])

    def test_refused_request_loses_its_identity(self) -> None:
        """A refused request keeps no identity header: nothing can record it as that tenant."""
        call, answer = run(("X-Tenant-ID", "t1"), ("X-Tenant-ID", "t2"), ("X-User-ID", "u"),
                           ("X-Agent-ID", "a"), ("User-Agent", "ua"))
        self.assertIsNotNone(answer)
        headers = store(call.request.requestHeaders)
        for name in (b"X-Tenant-Id", b"X-User-Id", b"X-Agent-Id"):
            self.assertNotIn(name, headers)
        self.assertEqual(call.request.requestHeaders.getRawHeaders(b"user-agent"), [b"ua"])

    def test_tenant_from_query_checked(self) -> None:
        """A tenant from a query parameter is checked like the header: repeated, it is ambiguous."""
        headers = parse_config(CONFIG.replace(
            "required = X-Tenant-ID", "required = X-Tenant-ID\ntenant_from = header, query:tenant"),
            "t.ini").headers
        for uri, code in ((b"/api/aura/x?tenant=a&tenant=b", "ambiguous_header"),
                          (b"/api/aura/x?tenant=a%01b", "invalid_header"),
                          (b"/api/aura/x?tenant=" + b"a" * 200, "invalid_header")):
            call = make_call(uri)
            self.assertIsNone(Tenant(headers).run(call.request, call))
            answer = Identity(headers).run(call.request, call)
            self.assertEqual(self.refused(answer)[1:], (code, "X-Tenant-ID"), uri)

    def test_repeated_header_not_collapsed_by_tenant_sources(self) -> None:
        """With tenant_from naming a query too, a repeated X-Tenant-ID header stays repeated and is refused."""
        headers = parse_config(CONFIG.replace(
            "required = X-Tenant-ID", "required = X-Tenant-ID\ntenant_from = header, query:tenant"),
            "t.ini").headers
        call = make_call(b"/api/aura/x", X_Tenant_ID="t1")
        call.request.requestHeaders.addRawHeader(b"X-Tenant-ID", b"t2")
        Tenant(headers).run(call.request, call)
        self.assertEqual(self.refused(Identity(headers).run(call.request, call))[1], "ambiguous_header")


class IdentityInPipelineTests(SynchronousTestCase):
    """The Identity stage in the gateway's request path."""

    def test_refused_before_the_upstream_and_recorded_without_tenant(self) -> None:
        """
        Two X-Tenant-ID headers: 400 ambiguous_header with the header named
        in the JSON body, the upstream never asked, and the history row has
        no tenant.
        """
        upstream = Echo()
        h = Harness(upstream)
        response = h.request("GET", "/api/aura/x", headers={"X-Tenant-ID": ["t1", "t2"]})
        self.assertEqual(response.code, 400)
        error = h.json(response)["error"]
        self.assertEqual((error["code"], error["header"]), ("ambiguous_header", "X-Tenant-ID"))
        self.assertEqual(upstream.requests, [])
        [row] = h.history.records
        self.assertEqual((row.status_code, row.tenant_id, row.route), (400, None, None))

    def test_runs_before_the_route_and_the_header_contract(self) -> None:
        """The Identity stage comes right after Tenant, before Route and RequiredHeaders."""
        names = [type(s).__name__ for s in Harness(Echo()).gateway.pipeline.stages]
        self.assertEqual(names[:2], ["Tenant", "Identity"])
        self.assertLess(names.index("Identity"), names.index("Route"))
