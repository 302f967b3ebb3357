"""Tests for L{aura_proxy.contract}: the header contract and CORS."""

from __future__ import annotations

from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from aura_proxy.config import CorsConfig, HeadersConfig, parse_config
from aura_proxy import header_store
from aura_proxy.contract import Cors, HeaderContract, copy_end_to_end, dropping
from aura_proxy.routes import PathPattern, split_path

CONTRACT = HeaderContract(
    HeadersConfig(
        required=("X-Tenant-ID",),
        public_paths=(PathPattern.parse("/api/auth/login"), PathPattern.parse("/api/monitoring/**")),
        defaults=(("X-DWP-Source", "FRONTEND"), ("X-DWP-Caller-Type", "USER")),
    )
)
CORS = Cors(
    CorsConfig(
        allowed_origins=("http://localhost:3000",),
        allowed_headers=("Authorization", "Content-Type", "Last-Event-ID", "X-Tenant-ID"),
        exposed_headers=("X-Request-ID",),
    )
)


def headers(*pairs: tuple[bytes, bytes]) -> Headers:
    h = Headers()
    for name, value in pairs:
        h.addRawHeader(name, value)
    return h


class RequiredHeaderTests(TestCase):
    """C{required} and C{public_paths}."""

    def test_missing_tenant(self) -> None:
        """A request without X-Tenant-ID is missing it."""
        self.assertEqual(CONTRACT.missing(headers(), split_path(b"/api/aura/x")), "X-Tenant-ID")

    def test_blank_tenant(self) -> None:
        """A blank X-Tenant-ID counts as missing."""
        self.assertEqual(
            CONTRACT.missing(headers((b"X-Tenant-ID", b"  ")), split_path(b"/api/aura/x")), "X-Tenant-ID"
        )

    def test_present_tenant(self) -> None:
        """A non-blank X-Tenant-ID satisfies the contract."""
        self.assertIsNone(CONTRACT.missing(headers((b"x-tenant-id", b"t1")), split_path(b"/api/aura/x")))

    def test_public_paths(self) -> None:
        """Public paths need no tenant; their neighbours do."""
        self.assertIsNone(CONTRACT.missing(headers(), split_path(b"/api/auth/login")))
        self.assertIsNone(CONTRACT.missing(headers(), split_path(b"/api/monitoring/health/x")))
        self.assertEqual(CONTRACT.missing(headers(), split_path(b"/api/auth/logout")), "X-Tenant-ID")


class UpstreamHeaderTests(TestCase):
    """What goes upstream."""

    def test_end_to_end_headers_unchanged(self) -> None:
        """Identity, resume and tracing headers pass unchanged, duplicates and order kept."""
        incoming = headers(
            (b"Authorization", b"Bearer abc"), (b"X-Tenant-ID", b"t1"), (b"X-User-ID", b"u1"),
            (b"X-Agent-ID", b"a1"), (b"Last-Event-ID", b"41"), (b"traceparent", b"00-aa-bb-01"),
            (b"X-Custom", b"1"), (b"X-Custom", b"2"),
        )
        out = CONTRACT.upstream_headers(incoming, "10.0.0.1", b"http", b"gw:8080")
        for name, values in incoming.getAllRawHeaders():
            self.assertEqual(out.getRawHeaders(name), values, name)

    def test_hop_by_hop_removed(self) -> None:
        """Hop-by-hop headers and headers named in Connection do not go upstream."""
        incoming = headers(
            (b"Connection", b"keep-alive, X-Private"), (b"X-Private", b"secret"),
            (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"), (b"Upgrade", b"h2c"),
            (b"Proxy-Authorization", b"Basic x"), (b"Transfer-Encoding", b"chunked"),
            (b"Host", b"gw"), (b"Content-Length", b"5"), (b"X-Tenant-ID", b"t"),
        )
        out = CONTRACT.upstream_headers(incoming, None, b"http", None)
        names = {name.lower() for name, _ in out.getAllRawHeaders()}
        for gone in (b"connection", b"x-private", b"keep-alive", b"te", b"upgrade",
                     b"proxy-authorization", b"transfer-encoding", b"host", b"content-length"):
            self.assertNotIn(gone, names)
        self.assertIn(b"x-tenant-id", names)

    def test_defaults_only_when_absent(self) -> None:
        """Defaults fill in missing headers and never override the client's."""
        out = CONTRACT.upstream_headers(headers((b"X-DWP-Source", b"MOBILE")), None, b"http", None)
        self.assertEqual(out.getRawHeaders(b"x-dwp-source"), [b"MOBILE"])
        self.assertEqual(out.getRawHeaders(b"x-dwp-caller-type"), [b"USER"])

    def test_forwarded_headers(self) -> None:
        """X-Forwarded-For is appended to; -Proto and -Host describe the client hop."""
        out = CONTRACT.upstream_headers(
            headers((b"X-Forwarded-For", b"1.2.3.4")), "10.0.0.9", b"https", b"api.example.com"
        )
        self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [b"1.2.3.4, 10.0.0.9"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-host"), [b"api.example.com"])

    def test_end_to_end_response(self) -> None:
        """
        Response hop-by-hop headers, headers named in Connection and the extra
        names given are not copied; the rest replace the target's, in order.
        """
        target = headers((b"Content-Type", b"text/html"), (b"Server", b"gw"))
        copy_end_to_end(
            headers((b"Connection", b"close, X-Hop"), (b"X-Hop", b"1"),
                    (b"Transfer-Encoding", b"chunked"), (b"Content-Type", b"text/plain"),
                    (b"Access-Control-Allow-Origin", b"*"), (b"X-A", b"1"), (b"X-A", b"2")),
            target,
            dropping((b"Access-Control-Allow-Origin",)),
        )
        self.assertEqual(list(target.getAllRawHeaders()), [
            (b"Content-Type", [b"text/plain"]), (b"Server", [b"gw"]), (b"X-A", [b"1", b"2"]),
        ])

    def test_copies_are_separate(self) -> None:
        """A header added to the copy is not added to the message it was copied from."""
        source = headers((b"Vary", b"Accept"))
        target = Headers()
        copy_end_to_end(source, target, dropping(()))
        target.addRawHeader(b"vary", b"Origin")
        self.assertEqual(source.getRawHeaders(b"vary"), [b"Accept"])
        self.assertEqual(target.getRawHeaders(b"vary"), [b"Accept", b"Origin"])

    def test_default_on_two_lines(self) -> None:
        """A default value continued on a second INI line goes upstream on one line."""
        contract = HeaderContract(HeadersConfig(defaults=(("X-DWP-Source", "A\nB"),)))
        out = contract.upstream_headers(Headers(), None, b"http", None)
        self.assertEqual(out.getRawHeaders(b"x-dwp-source"), [b"A B"])

    def test_extra_any_case(self) -> None:
        """Extra headers are stored under their canonical name, whatever case they are given in."""
        out = CONTRACT.upstream_headers(
            Headers(), None, b"http", None, extra=((b"x-request-id", b"r1"),))
        self.assertEqual(list(out.getAllRawHeaders())[-1], (b"X-Request-Id", [b"r1"]))


class UpstreamHeaderPublicStoreTests(UpstreamHeaderTests):
    """
    The same, where L{header_store} cannot use the L{Headers}' own dict (a
    Twisted that lays headers out differently): same headers, public methods.
    """

    def setUp(self) -> None:
        self.patch(header_store, "DIRECT", False)


class HeaderStoreTests(TestCase):
    """L{header_store}: reading and writing a L{Headers}' values by canonical name."""

    def test_direct_on_this_twisted(self) -> None:
        """The Twisted this project installs lays headers out as the store expects (where not known otherwise)."""
        from tests.test_twisted_internals import _UNAVAILABLE_HERE

        self.assertEqual(header_store.DIRECT, "raw_headers" not in _UNAVAILABLE_HERE)

    def test_canonical(self) -> None:
        """Names are stored the way twisted.web stores them."""
        self.assertEqual(header_store.canonical(b"x-request-id"), b"X-Request-Id")
        self.assertEqual(header_store.canonical(b"etag"), b"ETag")

    def check_store(self) -> None:
        h = headers((b"X-A", b"1"))
        raw = header_store.store(h)
        self.assertIn(b"X-A", raw)
        self.assertNotIn(b"X-B", raw)
        self.assertEqual(list(raw[b"X-A"]), [b"1"])
        raw[b"X-B"] = [b"2", b"3"]
        self.assertEqual(h.getRawHeaders(b"x-b"), [b"2", b"3"])
        self.assertEqual(sorted(raw), [b"X-A", b"X-B"])
        self.assertEqual(len(raw), 2)
        del raw[b"X-A"]
        self.assertFalse(h.hasHeader(b"x-a"))
        self.assertIsNone(raw.get(b"X-A"))
        self.assertRaises(KeyError, raw.__getitem__, b"X-A")
        self.assertRaises(KeyError, raw.__delitem__, b"X-A")

    def test_direct_store(self) -> None:
        """The direct store reads and writes what the Headers' methods see."""
        self.check_store()

    def test_public_store(self) -> None:
        """The fallback store does the same through the public methods."""
        self.patch(header_store, "DIRECT", False)
        self.check_store()


class CorsTests(TestCase):
    """The gateway answers preflights and owns Access-Control-* headers."""

    def test_is_preflight(self) -> None:
        """Only OPTIONS with Origin and Access-Control-Request-Method is a preflight."""
        h = headers((b"Origin", b"http://localhost:3000"), (b"Access-Control-Request-Method", b"POST"))
        self.assertTrue(Cors.is_preflight(b"OPTIONS", h))
        self.assertFalse(Cors.is_preflight(b"GET", h))
        self.assertFalse(Cors.is_preflight(b"OPTIONS", headers((b"Origin", b"x"))))

    def test_allowed_preflight(self) -> None:
        """An allowed origin gets its own origin, the methods, headers, credentials and max age."""
        allowed = CORS.preflight(headers(
            (b"Origin", b"http://localhost:3000"), (b"Access-Control-Request-Method", b"POST"),
            (b"Access-Control-Request-Headers", b"x-tenant-id, last-event-id, content-type"),
        ))
        assert not isinstance(allowed, str), allowed
        answer = dict(allowed)
        self.assertEqual(answer[b"Access-Control-Allow-Origin"], b"http://localhost:3000")
        self.assertEqual(answer[b"Access-Control-Allow-Credentials"], b"true")
        self.assertEqual(answer[b"Access-Control-Max-Age"], b"3600")
        self.assertIn(b"X-Tenant-ID", answer[b"Access-Control-Allow-Headers"])
        self.assertIn(b"POST", answer[b"Access-Control-Allow-Methods"])

    def test_disallowed_origin_never_reflected(self) -> None:
        """An origin not listed gets no preflight answer (the refusal names the origin's part, not the origin) and no Allow-Origin."""
        self.assertEqual(CORS.preflight(headers(
            (b"Origin", b"http://evil.example"), (b"Access-Control-Request-Method", b"GET"))),
            "the origin is not allowed")
        for name, value in CORS.response_headers(b"http://evil.example"):
            self.assertNotIn(b"evil", value)

    def test_disallowed_method_or_header(self) -> None:
        """A preflight asking for a method or header not allowed is refused, saying which."""
        self.assertEqual(CORS.preflight(headers(
            (b"Origin", b"http://localhost:3000"), (b"Access-Control-Request-Method", b"TRACE"))),
            "the method 'TRACE' is not allowed")
        self.assertEqual(CORS.preflight(headers(
            (b"Origin", b"http://localhost:3000"), (b"Access-Control-Request-Method", b"GET"),
            (b"Access-Control-Request-Headers", b"X-Tenant-ID, X-Evil"))),
            "the header 'x-evil' is not allowed")

    def test_contract_headers_allowed_by_default(self) -> None:
        """
        With allowed_headers left out, a preflight may ask for the headers
        the contract needs: Authorization, Content-Type, Last-Event-ID, the
        identity headers, the required ones and the default.* names.
        """
        config = parse_config(
            "[route:a]\npath = /**\nupstream = http://a\n[headers]\nrequired = X-Tenant-ID, X-Org\n"
            "default.X-DWP-Source = FRONTEND\n[cors]\nallowed_origins = http://app.example\n",
            "t.ini")
        cors = Cors(config.cors)
        allowed = cors.preflight(headers(
            (b"Origin", b"http://app.example"), (b"Access-Control-Request-Method", b"POST"),
            (b"Access-Control-Request-Headers",
             b"authorization, content-type, last-event-id, x-tenant-id, x-user-id, x-agent-id, "
             b"x-org, x-dwp-source"),
        ))
        self.assertNotIsInstance(allowed, str)
        self.assertEqual(config.cors.allowed_headers, (
            "Authorization", "Content-Type", "Last-Event-ID", "X-Tenant-ID", "X-User-ID",
            "X-Agent-ID", "X-Org", "X-DWP-Source"))

    def test_actual_response(self) -> None:
        """An actual response to an allowed origin carries the CORS headers and Vary: Origin."""
        out = dict(CORS.response_headers(b"http://localhost:3000"))
        self.assertEqual(out[b"Access-Control-Allow-Origin"], b"http://localhost:3000")
        self.assertEqual(out[b"Access-Control-Expose-Headers"], b"X-Request-ID")
        self.assertEqual(out[b"Vary"], b"Origin")

    def test_wildcard(self) -> None:
        """With C{*} any origin is allowed, never with credentials (even if a Config built in code asks)."""
        cors = Cors(CorsConfig(allowed_origins=("*",)))
        self.assertTrue(cors.allows(b"https://anything.example"))
        out = dict(cors.response_headers(b"https://anything.example"))
        self.assertNotIn(b"Access-Control-Allow-Credentials", out)

    def test_apply(self) -> None:
        """apply adds the response's CORS headers for the request's Origin, after the ones there."""
        response = headers((b"Vary", b"Accept"))
        CORS.apply(headers((b"Origin", b"http://localhost:3000")), response)
        self.assertEqual(response.getRawHeaders(b"access-control-allow-origin"), [b"http://localhost:3000"])
        self.assertEqual(response.getRawHeaders(b"vary"), [b"Accept", b"Origin"])

    def test_apply_without_origin(self) -> None:
        """A request without Origin gets Vary: Origin only."""
        response = Headers()
        CORS.apply(Headers(), response)
        self.assertEqual(list(response.getAllRawHeaders()), [(b"Vary", [b"Origin"])])
