"""
The configuration of TLS: several C{[gateway] listen} endpoints (C{ssl:}
among them), and a route's C{ca_file}, C{client_cert} and C{client_key} for
an https:// upstream (L{aura_proxy.config}, L{aura_proxy.upstream_tls}).
"""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import TestCase

from aura_proxy.config import ConfigError, load_config, parse_config
from aura_proxy.upstream_tls import UpstreamTlsPolicy
from tests.tls_certs import TestPki, make_pki

ROUTE = "[route:aura]\npath = /api/aura/**\nupstream = {upstream}\n{extra}\n"


def problems(text: str) -> list[str]:
    try:
        parse_config(text, "gw.ini")
    except ConfigError as e:
        return e.problems
    raise AssertionError("configuration was accepted")


class ListenTests(TestCase):
    """C{[gateway] listen}: one or more endpoint descriptions, comma-separated."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())

    def listen(self, value: str, workers: str = "1") -> tuple[str, ...]:
        text = f"[gateway]\nlisten = {value}\nworkers = {workers}\n" + ROUTE.format(
            upstream="http://127.0.0.1:9000", extra="")
        return parse_config(text, "gw.ini").gateway.listen

    def test_several_endpoints(self) -> None:
        """A tcp: and an ssl: endpoint, comma-separated, are two listeners, tcp: with its backlog."""
        ssl = f"ssl:8443:privateKey={self.pki.server_key}:certKey={self.pki.server_cert}"
        self.assertEqual(self.listen(f"tcp:8080, {ssl}"), ("tcp:8080:backlog=4096", ssl))

    def test_ca_chain(self) -> None:
        """An ssl: endpoint may name its CA chain (extraCertChain)."""
        ssl = (f"ssl:8443:privateKey={self.pki.server_key}:certKey={self.pki.server_cert}"
               f":extraCertChain={self.pki.ca}")
        self.assertEqual(self.listen(ssl), (ssl,))

    def test_empty_item(self) -> None:
        """An empty item (two commas, a trailing comma) is refused, naming file, section and key."""
        for value in ("tcp:8080,,tcp:8081", "tcp:8080,"):
            found = problems(f"[gateway]\nlisten = {value}\n" + ROUTE.format(
                upstream="http://127.0.0.1:9000", extra=""))
            self.assertEqual(len(found), 1, found)
            self.assertTrue(found[0].startswith("gw.ini: [gateway] listen: an empty endpoint"), found)

    def test_duplicate(self) -> None:
        """The same endpoint twice is refused."""
        found = problems("[gateway]\nlisten = tcp:8080, tcp:8080\n" + ROUTE.format(
            upstream="http://127.0.0.1:9000", extra=""))
        self.assertIn("listed twice", found[0])

    def test_unreadable_key_file(self) -> None:
        """
        An ssl: endpoint whose key file cannot be read is refused at check
        time (load_config); the parse alone does not read it (a reload keeps
        the certificate in use instead, and a worker is handed the bytes).
        """
        text = ("[gateway]\nlisten = tcp:8080, ssl:8443:privateKey=/nonexistent/key.pem:certKey=/nonexistent/c.pem\n"
                + ROUTE.format(upstream="http://127.0.0.1:9000", extra=""))
        self.assertEqual(len(parse_config(text, "gw.ini").gateway.listen), 2)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        with self.assertRaises(ConfigError) as raised:
            load_config(path)
        found = raised.exception.problems
        self.assertEqual(len(found), 1, found)
        self.assertTrue(found[0].startswith(f"{path}: [gateway] listen: 'ssl:8443"), found)
        self.assertIn("/nonexistent/key.pem: cannot read", found[0])

    def test_bad_ssl_syntax(self) -> None:
        """An ssl: endpoint with an unknown argument or no port is refused by the parse itself."""
        for listen in ("ssl:8443:privateKey=k.pem:colour=blue", "ssl:privateKey=k.pem"):
            found = problems("[gateway]\nlisten = " + listen + "\n" + ROUTE.format(upstream="http://127.0.0.1:9000", extra=""))
            self.assertEqual(len(found), 1, found)
            self.assertTrue(found[0].startswith(f"gw.ini: [gateway] listen: {listen!r}"), found)

    def test_workers_take_tcp_and_ssl(self) -> None:
        """
        workers > 1 takes several listeners and ssl: (the parent binds each
        socket, every worker wraps the ssl: ones in TLS); unix: stays refused.
        """
        ssl = f"ssl:8443:privateKey={self.pki.server_key}:certKey={self.pki.server_cert}"
        for listen in (f"tcp:8080, {ssl}", ssl, "tcp:8080, tcp:8081"):
            config = parse_config(
                f"[gateway]\nlisten = {listen}\nworkers = 2\n[sse]\nresume = off\n"
                + ROUTE.format(upstream="http://127.0.0.1:9000", extra=""), "gw.ini")
            self.assertEqual(len(config.gateway.listen), len(listen.split(", ")))
        found = problems(
            f"[gateway]\nlisten = {ssl}, unix:/tmp/gw.sock\nworkers = 2\n[sse]\nresume = off\n"
            + ROUTE.format(upstream="http://127.0.0.1:9000", extra=""))
        self.assertEqual(len(found), 1, found)
        self.assertTrue(found[0].startswith("gw.ini: [gateway] listen: workers = 2 needs tcp: or ssl:"), found)
        self.assertIn("'unix:/tmp/gw.sock'", found[0])


class RouteTlsTests(TestCase):
    """A route's TLS to its https:// upstream."""

    def setUp(self) -> None:
        self.pki: TestPki = make_pki(self.mktemp())

    def route(self, upstream: str = "https://127.0.0.1:9443", **keys: str) -> str:
        extra = "".join(f"{k} = {v}\n" for k, v in keys.items())
        return ROUTE.format(upstream=upstream, extra=extra)

    def test_defaults(self) -> None:
        """Without keys, an https:// route verifies against the system's CAs and presents no certificate."""
        tls = parse_config(self.route(), "gw.ini").routes[0].tls
        self.assertEqual((tls.ca_pem, tls.client_pem), (None, None))

    def test_files_read(self) -> None:
        """ca_file, client_cert and client_key are read when the file is parsed; contents not in repr."""
        tls = parse_config(self.route(
            ca_file=self.pki.ca, client_cert=self.pki.client_cert, client_key=self.pki.client_key,
        ), "gw.ini").routes[0].tls
        self.assertEqual(tls.ca_pem, Path(self.pki.ca).read_bytes())
        assert tls.client_pem is not None
        self.assertIn(b"PRIVATE KEY", tls.client_pem)
        self.assertNotIn("PRIVATE", repr(tls))

    def test_unreadable(self) -> None:
        """Unreadable files are named with file, section and key."""
        found = problems(self.route(ca_file="/nonexistent/ca.pem", client_cert="/nonexistent/c.pem",
                                    client_key=self.pki.client_key))
        self.assertEqual(sorted(found), [
            "gw.ini: [route:aura] ca_file: cannot read '/nonexistent/ca.pem' (No such file or directory)",
            "gw.ini: [route:aura] client_cert: cannot read '/nonexistent/c.pem' (No such file or directory)",
        ])

    def test_not_pem(self) -> None:
        """A ca_file without a certificate, and a client key that is not the certificate's, are refused."""
        found = problems(self.route(ca_file=self.pki.client_key))
        self.assertEqual(found, [f"gw.ini: [route:aura] ca_file: {self.pki.client_key!r} holds no PEM certificate"])
        other = make_pki(self.mktemp())
        found = problems(self.route(client_cert=self.pki.client_cert, client_key=other.client_key))
        self.assertEqual(len(found), 1, found)
        self.assertTrue(found[0].startswith("gw.ini: [route:aura] client_key: "), found)

    def test_key_without_cert(self) -> None:
        """client_key alone is refused."""
        found = problems(self.route(client_key=self.pki.client_key))
        self.assertEqual(found, ["gw.ini: [route:aura] client_key: given without client_cert"])

    def test_only_for_https(self) -> None:
        """The TLS keys on an http:// route are refused."""
        found = problems(self.route(upstream="http://127.0.0.1:9000", ca_file=self.pki.ca))
        self.assertEqual(len(found), 1, found)
        self.assertTrue(found[0].startswith("gw.ini: [route:aura] ca_file: only for an https:// upstream"))

    def test_one_setting_per_origin(self) -> None:
        """Two routes to one https upstream with different TLS settings are refused (one pool)."""
        text = self.route(ca_file=self.pki.ca) + (
            "[route:b]\npath = /api/b/**\nupstream = https://127.0.0.1:9443/b\n")
        found = problems(text)
        self.assertEqual(len(found), 1, found)
        self.assertIn("is also the upstream of [route:aura]", found[0])

    def test_policy(self) -> None:
        """The policy builds the route's client options once per host and port."""
        config = parse_config(self.route(ca_file=self.pki.ca), "gw.ini")
        policy = UpstreamTlsPolicy(config.routes)
        creator = policy.creatorForNetloc(b"127.0.0.1", 9443)
        self.assertIs(policy.creatorForNetloc(b"127.0.0.1", 9443), creator)
        self.assertIsNot(policy.creatorForNetloc(b"example.com", 443), creator)
        self.assertNotIsInstance(creator, type(None))
