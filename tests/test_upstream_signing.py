"""
L{aura_proxy.upstream_signing}: the gateway signs what it forwards
(C{[upstream_trust]}), checked end to end in memory against the verifier an
upstream uses.
"""

from __future__ import annotations

import base64

from twisted.trial.unittest import TestCase

from aura_proxy.upstream_signing import request_target
from aura_proxy.upstream_trust import GatewaySignatureVerifier, InvalidSignature, TrustKey
from tests.test_proxy import CONFIG, Echo, Harness

KEY = TrustKey.of(b"g" * 32)
PREVIOUS = TrustKey.of(b"p" * 32)


def received(upstream: Echo) -> tuple[bytes, bytes, dict[bytes, list[bytes]]]:
    """Method, request target and headers (lower-case names) of the upstream's last request."""
    request = upstream.requests[-1]
    headers = {name.lower(): list(values) for name, values in request.requestHeaders.getAllRawHeaders()}
    return request.method, request.uri, headers


def verify(harness: Harness, upstream: Echo, *keys: TrustKey) -> None:
    """Verify the upstream's last request as L{GatewaySignatureMiddleware} would."""
    method, uri, headers = received(upstream)
    path, _, query = uri.partition(b"?")
    pairs = [(name, value) for name, values in headers.items() for value in values]
    GatewaySignatureVerifier(keys or (KEY,), clock=harness.clock.seconds).verify_headers(
        method, path, query, pairs)


class RequestTargetTests(TestCase):
    """L{request_target}."""

    def test_split(self) -> None:
        """Path and query after the authority, raw; an empty path is C{/}; no fragment."""
        self.assertEqual(request_target(b"http://h:1/a/%2F?x=1&y"), (b"/a/%2F", b"x=1&y"))
        self.assertEqual(request_target(b"http://h:1?x=1"), (b"/", b"x=1"))
        self.assertEqual(request_target(b"http://h/p#f"), (b"/p", b""))


class GatewaySignsTests(TestCase):
    """With C{[upstream_trust] key_file}, every forwarded request is signed."""

    def harness(self, upstream: Echo, keys: str = "") -> Harness:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(keys or base64.b64encode(KEY.secret).decode() + "\n")
        h = Harness(upstream, CONFIG + f"[upstream_trust]\nkey_file = {path}\n")
        h.clock.advance(1_700_000_000)
        return h

    def test_signed_as_sent(self) -> None:
        """The signature covers the path after strip_prefix, the query, tenant and user as forwarded."""
        upstream = Echo()
        h = self.harness(upstream)
        response = h.request("POST", "/api/svc/items/%41?x=1&y=%20",
                             headers={"X-Tenant-ID": "t1", "X-User-ID": "u1"}, data=b"{}")
        self.assertEqual(response.code, 200)
        method, uri, headers = received(upstream)
        self.assertEqual(uri, b"/base/items/%41?x=1&y=%20")
        [value] = headers[b"x-dwp-gateway-signature"]
        self.assertTrue(value.startswith(b"v1;t=1700000000;kid=" + KEY.kid + b";sig="), value)
        verify(h, upstream)

    def test_without_user(self) -> None:
        """A request without X-User-ID is signed with an empty user; adding one breaks it."""
        upstream = Echo()
        h = self.harness(upstream)
        h.request("GET", "/api/aura/chat", headers={"X-Tenant-ID": "t1"})
        verify(h, upstream)
        upstream.requests[-1].requestHeaders.addRawHeader(b"X-User-ID", b"someone")
        self.assertRaises(InvalidSignature, verify, h, upstream)

    def test_signs_with_current_key(self) -> None:
        """With two keys in the file, the gateway signs with the first (current) one."""
        upstream = Echo()
        keys = "\n".join(base64.b64encode(k.secret).decode() for k in (KEY, PREVIOUS))
        h = self.harness(upstream, keys)
        h.request("GET", "/api/aura/chat", headers={"X-Tenant-ID": "t1"})
        verify(h, upstream, KEY)
        self.assertRaises(InvalidSignature, verify, h, upstream, PREVIOUS)

    def test_client_signature_replaced(self) -> None:
        """A client's own X-DWP-Gateway-Signature never reaches the upstream: the gateway's replaces it."""
        upstream = Echo()
        h = self.harness(upstream)
        h.request("GET", "/api/aura/chat", headers={"X-Tenant-ID": "t1", "X-DWP-Gateway-Signature": "forged"})
        _, _, headers = received(upstream)
        self.assertNotIn(b"forged", headers[b"x-dwp-gateway-signature"])
        verify(h, upstream)

    def test_client_signature_dropped_when_off(self) -> None:
        """Without a key file nothing is signed, and a client's signature is dropped all the same."""
        upstream = Echo()
        h = Harness(upstream)
        response = h.request(
            "GET", "/api/aura/chat", headers={"X-Tenant-ID": "t1", "X-DWP-Gateway-Signature": "forged"})
        self.assertNotIn("x-dwp-gateway-signature", [k.lower() for k, _ in h.json(response)["headers"]])
        _, _, headers = received(upstream)
        self.assertNotIn(b"x-dwp-gateway-signature", headers)
