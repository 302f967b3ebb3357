"""
Tests for L{aura_proxy.trusted_proxies} and its use: whose X-Forwarded-*
headers the gateway believes (C{[gateway] trusted_proxies}).
"""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from aura_proxy.call import Call
from aura_proxy.config import parse_config
from aura_proxy.contract import HeaderContract
from aura_proxy.trusted_proxies import TrustedProxies
from tests.test_proxy import CONFIG
from tests.test_stages import make_call

TRUSTED = TrustedProxies([ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.1")])


def xff(*values: bytes) -> Headers:
    return Headers({b"X-Forwarded-For": list(values)})


class TrustedProxiesTests(SynchronousTestCase):
    """L{TrustedProxies}."""

    def test_none_when_empty(self) -> None:
        """No trusted proxies: no object, so a request pays nothing for the feature."""
        self.assertIsNone(TrustedProxies.of(()))

    def test_trusts(self) -> None:
        """Addresses inside a listed block or equal to a listed address are trusted; others and garbage not."""
        self.assertTrue(TRUSTED.trusts("10.1.2.3"))
        self.assertTrue(TRUSTED.trusts("192.0.2.1"))
        self.assertTrue(TRUSTED.trusts("::ffff:10.0.0.1"))
        self.assertFalse(TRUSTED.trusts("192.0.2.2"))
        self.assertFalse(TRUSTED.trusts("not-an-ip"))

    def test_right_most_untrusted_address(self) -> None:
        """The client is the right-most X-Forwarded-For address that is not a trusted proxy."""
        self.assertEqual(TRUSTED.client_ip(xff(b"198.51.100.9, 203.0.113.7, 10.0.0.2"), "10.0.0.1"),
                         "203.0.113.7")
        self.assertEqual(TRUSTED.client_ip(xff(b"198.51.100.9", b"203.0.113.7,10.0.0.2"), "10.0.0.1"),
                         "203.0.113.7")

    def test_fallbacks(self) -> None:
        """No X-Forwarded-For, or a right-most untrusted entry that is no address: the peer."""
        self.assertEqual(TRUSTED.client_ip(Headers(), "10.0.0.1"), "10.0.0.1")
        self.assertEqual(TRUSTED.client_ip(xff(b"1.2.3.4, garbage"), "10.0.0.1"), "10.0.0.1")
        self.assertEqual(TRUSTED.client_ip(xff(b"10.0.0.7, 10.0.0.8"), "10.0.0.1"), "10.0.0.7")


def call_from(peer: str, config: str, **headers: str) -> Call:
    """A call from TCP peer C{peer} on a pipeline with C{config}'s trusted proxies."""
    call = make_call(**headers)
    call.request.client = IPv4Address("TCP", peer, 40000)
    call.pipeline.trusted_proxies = TrustedProxies.of(  # type: ignore[attr-defined]
        parse_config(config, "t.ini").gateway.trusted_proxies)
    return Call(call.pipeline, call.request, 100.0)


TRUSTING = CONFIG.replace("[gateway]\n", "[gateway]\ntrusted_proxies = 10.0.0.0/8, 192.0.2.1\n")


class ForwardedByTrustedProxyTests(SynchronousTestCase):
    """A call's client address and the X-Forwarded-* headers that go upstream."""

    contract = HeaderContract(parse_config(CONFIG, "t.ini").headers)

    def upstream(self, call: Call) -> Headers:
        """The headers Forward would send for C{call} (its X-Forwarded-* arguments)."""
        return self.contract.upstream_headers(
            call.request.requestHeaders, call.via or call.client_ip, b"http", b"gw:8080",
            trusted=call.via is not None)

    def test_trusted_peer_believed(self) -> None:
        """
        From a trusted proxy: the client is the forwarded one, the chain gets
        the proxy appended, X-Forwarded-Proto and -Host are kept.
        """
        call = call_from("10.0.0.1", TRUSTING, X_Forwarded_For="203.0.113.7",
                         X_Forwarded_Proto="https", X_Forwarded_Host="app.example")
        self.assertEqual((call.client_ip, call.via), ("203.0.113.7", "10.0.0.1"))
        out = self.upstream(call)
        self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [b"203.0.113.7, 10.0.0.1"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-host"), [b"app.example"])

    def test_trusted_peer_without_forwarded_headers(self) -> None:
        """A trusted proxy that sent no X-Forwarded-Proto/-Host gets the gateway's own view."""
        call = call_from("10.0.0.1", TRUSTING)
        self.assertEqual(call.client_ip, "10.0.0.1")
        out = self.upstream(call)
        self.assertEqual(out.getRawHeaders(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-host"), [b"gw:8080"])

    def test_untrusted_peer_not_believed(self) -> None:
        """
        From anyone else (or with no trusted proxies at all): the client is
        the peer and X-Forwarded-Proto/-Host are replaced.
        """
        for peer, config in (("198.51.100.4", TRUSTING), ("10.0.0.1", CONFIG)):
            call = call_from(peer, config, X_Forwarded_For="203.0.113.7",
                             X_Forwarded_Proto="https", X_Forwarded_Host="app.example")
            self.assertEqual((call.client_ip, call.via), (peer, None))
            out = self.upstream(call)
            self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [b"203.0.113.7, " + peer.encode()])
            self.assertEqual(out.getRawHeaders(b"x-forwarded-proto"), [b"http"])
            self.assertEqual(out.getRawHeaders(b"x-forwarded-host"), [b"gw:8080"])
