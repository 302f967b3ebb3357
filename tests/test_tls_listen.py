"""
The reloadable TLS of C{ssl:} listeners (L{aura_proxy.tls_listen}): the
description parsed as Twisted does, the certificate swapped for new
connections only, bad files leaving the one in use, bytes given instead of files.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional
from unittest import mock

from OpenSSL import SSL
from twisted.application.internet import TCPServer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from aura_proxy.tls_listen import (
    ListenerCertificates,
    TlsFileError,
    certificate_options,
    parse_ssl_listen,
    read_pems,
    tls_factory,
    tls_server,
)
from tests.tls_certs import TestPki, make_pki


def ssl_description(pki: TestPki, chain: bool = False) -> str:
    """An ssl: description with C{pki}'s server key and certificate (and its CA as chain)."""
    return (f"ssl:0:interface=127.0.0.1:privateKey={pki.server_key}:certKey={pki.server_cert}"
            + (f":extraCertChain={pki.ca}" if chain else ""))


def serial_of(path: str) -> int:
    """The serial number of the PEM certificate in C{path}."""
    from OpenSSL.crypto import FILETYPE_PEM, load_certificate

    return load_certificate(FILETYPE_PEM, Path(path).read_bytes()).get_serial_number()  # type: ignore[no-any-return]


def renew(pki: TestPki, directory: str) -> TestPki:
    """
    A new key and certificate (same CA name, new serial) written over
    C{pki}'s server files, in place, as certbot renews them.
    """
    new = make_pki(directory)
    shutil.copyfile(new.server_cert, pki.server_cert)
    shutil.copyfile(new.server_key, pki.server_key)
    shutil.copyfile(new.ca, pki.ca)
    return new


class _TcpTransport(StringTransport):
    """A memory transport that, like TCP, takes setTcpNoDelay (the HTTP channel calls it)."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        """Nothing to set in memory."""


class _Handshake:
    """
    One TLS connection into C{factory} (a server TLSMemoryBIOFactory), over
    memory: connected when made, its handshake run by L{finish}.
    """

    def __init__(self, factory: TLSMemoryBIOFactory, ca: str) -> None:
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        assert self.protocol is not None
        self.transport = _TcpTransport()
        self.protocol.makeConnection(self.transport)
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.load_verify_locations(ca)
        context.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
        context.set_alpn_protos([b"h2", b"http/1.1"])
        self.client = SSL.Connection(context, None)
        self.client.set_tlsext_host_name(b"localhost")
        self.client.set_connect_state()

    def finish(self) -> tuple[int, Optional[bytes], int]:
        """Run the handshake: the server certificate's serial, the ALPN protocol, the chain's length."""
        for _ in range(20):
            try:
                self.client.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                self.protocol.dataReceived(self.client.bio_read(65536))
            except SSL.WantReadError:
                pass
            out = self.transport.value()
            self.transport.clear()
            if out:
                self.client.bio_write(out)
        peer = self.client.get_peer_certificate()
        assert peer is not None, "no handshake"
        chain = self.client.get_peer_cert_chain() or []
        return peer.get_serial_number(), self.client.get_alpn_proto_negotiated() or None, len(chain)


class ParseTests(SynchronousTestCase):
    """An ssl: description read as Twisted's ssl: endpoint reads it, without its files."""

    def test_named_and_positional(self) -> None:
        """Named, positional and escaped arguments give port, interface, backlog and files."""
        a = parse_ssl_listen("ssl:8443:privateKey=/k\\:1.pem:certKey=c.pem:interface=\\:\\:1:backlog=9"
                             ":extraCertChain=ch.pem:sslmethod=TLS_METHOD")
        self.assertEqual(
            (a.port, a.interface, a.backlog, a.private_key, a.cert_key, a.extra_cert_chain, a.method),
            (8443, "::1", 9, "/k:1.pem", "c.pem", "ch.pem", "TLS_METHOD"),
        )
        b = parse_ssl_listen("ssl:443:key.pem")
        self.assertEqual((b.port, b.interface, b.backlog, b.private_key, b.cert_key), (443, "", 50, "key.pem", "key.pem"))
        self.assertEqual(parse_ssl_listen("ssl:port=8443").private_key, "server.pem")

    def test_refused(self) -> None:
        """No port, an unknown argument, a bad method or a non-number are ValueErrors naming the description."""
        for description in ("ssl:privateKey=k.pem", "ssl:8443:colour=blue", "ssl:8443:sslmethod=NOPE",
                            "ssl:https", "ssl:8443:backlog=x"):
            with self.assertRaises(ValueError, msg=description) as raised:
                parse_ssl_listen(description)
            self.assertIn(description, str(raised.exception))


class CertificateTests(SynchronousTestCase):
    """Contexts made from the files or from their bytes."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())
        self.description = ssl_description(self.pki)
        self.clock = Clock()

    def factory(self, certificates: ListenerCertificates, description: Optional[str] = None) -> TLSMemoryBIOFactory:
        """A server TLS factory around a site (h2 and http/1.1), as the listeners make it."""
        return tls_factory(
            certificates[description or self.description], Site(Resource(), reactor=self.clock), clock=self.clock
        )

    def test_reload_swaps_for_new_connections(self) -> None:
        """
        After the files are renewed and reloaded, a new connection gets the
        new certificate (its serial), still by ALPN h2; a connection made
        before the reload, even one whose handshake ends after it, keeps the old one.
        """
        certificates = ListenerCertificates.load([self.description, "tcp:8080"])
        factory = self.factory(certificates)
        old = serial_of(self.pki.server_cert)
        self.assertEqual(_Handshake(factory, self.pki.ca).finish()[:2], (old, b"h2"))
        opened = _Handshake(factory, self.pki.ca)

        renew(self.pki, self.mktemp())
        new = serial_of(self.pki.server_cert)
        self.assertNotEqual(new, old)
        self.assertEqual(certificates.reload(), ())

        self.assertEqual(_Handshake(factory, self.pki.ca).finish()[:2], (new, b"h2"))
        self.assertEqual(opened.finish()[0], old)

    def test_unchanged_files_keep_the_context(self) -> None:
        """A reload with the same files keeps the very same context (sessions and all)."""
        certificates = ListenerCertificates.load([self.description])
        before = certificates[self.description].context.getContext()
        self.assertEqual(certificates.reload(), ())
        self.assertIs(certificates[self.description].context.getContext(), before)

    def test_bad_files_keep_the_old_certificate(self) -> None:
        """
        A missing key, a key of another certificate, a certificate that is
        not PEM: each reload keeps the certificate in use and returns a line
        naming the listener and the file.
        """
        certificates = ListenerCertificates.load([self.description])
        factory = self.factory(certificates)
        old = serial_of(self.pki.server_cert)
        other = make_pki(self.mktemp())
        key = Path(self.pki.server_key).read_bytes()

        os.remove(self.pki.server_key)
        [problem] = certificates.reload()
        self.assertIn(repr(self.description), problem)
        self.assertIn(f"{self.pki.server_key}: cannot read", problem)

        Path(self.pki.server_key).write_bytes(key)
        shutil.copyfile(other.server_cert, self.pki.server_cert)
        [problem] = certificates.reload()
        self.assertIn(f"{self.pki.server_key}: this key is not the one of the certificate in {self.pki.server_cert}",
                      problem)

        Path(self.pki.server_cert).write_bytes(b"not a certificate\n")
        [problem] = certificates.reload()
        self.assertIn(f"{self.pki.server_cert}: not a PEM certificate", problem)

        self.assertEqual(_Handshake(factory, self.pki.ca).finish()[0], old)

    def test_chain_is_sent(self) -> None:
        """extraCertChain's certificates follow the server's in the handshake, as Twisted's ssl: endpoint sends them."""
        description = ssl_description(self.pki, chain=True)
        certificates = ListenerCertificates.load([description])
        self.assertEqual(_Handshake(self.factory(certificates, description), self.pki.ca).finish()[2], 2)
        empty = Path(self.mktemp())
        empty.write_bytes(b"nothing\n")
        listen = parse_ssl_listen(description.replace(self.pki.ca, str(empty)))
        with self.assertRaises(TlsFileError) as raised:
            certificate_options(listen, read_pems(listen))
        self.assertEqual(raised.exception.path, str(empty))

    def test_one_pem_holds_key_and_certificate(self) -> None:
        """Without certKey, the key's file holds the certificate too (Twisted's default)."""
        both = Path(self.mktemp())
        both.write_bytes(self.pki.server_pem)
        description = f"ssl:0:privateKey={both}"
        certificates = ListenerCertificates.load([description])
        self.assertEqual(_Handshake(self.factory(certificates, description), self.pki.ca).finish()[0],
                         serial_of(self.pki.server_cert))

    def test_given_bytes_open_no_file(self) -> None:
        """
        Certificates built from the bytes a parent read, and swapped to new
        bytes, never open a file: a worker need not be able to read the key.
        """
        pems = {self.description: read_pems(parse_ssl_listen(self.description))}
        old = serial_of(self.pki.server_cert)
        new_pki = make_pki(self.mktemp())
        new_description_pems = read_pems(parse_ssl_listen(ssl_description(new_pki)))
        with mock.patch("builtins.open", side_effect=AssertionError("a file was opened")):
            certificates = ListenerCertificates.load([self.description], pems)
            factory = self.factory(certificates)
            self.assertEqual(_Handshake(factory, self.pki.ca).finish()[0], old)
            self.assertEqual(certificates.use({self.description: new_description_pems, "ssl:1:other": pems[self.description]}), ())
            self.assertEqual(_Handshake(factory, new_pki.ca).finish()[0], serial_of(new_pki.server_cert))
            self.assertEqual(certificates.pems(), {self.description: new_description_pems})

    def test_bad_bytes_keep_the_old_certificate(self) -> None:
        """Bytes that cannot be used (a key of another certificate) leave the certificate in use, reported."""
        certificates = ListenerCertificates.load([self.description])
        pems = certificates.pems()[self.description]
        other = read_pems(parse_ssl_listen(ssl_description(make_pki(self.mktemp()))))
        [problem] = certificates.use({self.description: type(pems)(other.key, pems.cert)})
        self.assertIn("this key is not the one of the certificate", problem)
        self.assertEqual(certificates.pems(), {self.description: pems})

    def test_tls_server(self) -> None:
        """An ssl: listener is a TCP port (port, backlog, interface of the description) serving the site through TLS."""
        description = f"ssl:8443:privateKey={self.pki.server_key}:certKey={self.pki.server_cert}:interface=127.0.0.2:backlog=7"
        certificates = ListenerCertificates.load([description])
        site = Site(Resource())
        reactor = MemoryReactorClock()
        service: Any = tls_server(certificates[description], site, reactor)
        self.assertIsInstance(service, TCPServer)
        service.privilegedStartService()
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, backlog, interface), (8443, 7, "127.0.0.2"))
        self.assertIsInstance(factory, TLSMemoryBIOFactory)
        self.assertIs(factory.wrappedFactory.site, site)
        service.stopService()
