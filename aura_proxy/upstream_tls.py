"""
TLS to https:// upstreams: whom to trust, what to present.

L{UpstreamTlsPolicy} is the L{IPolicyForHTTPS} of the proxy hop
(L{aura_proxy.fastclient.FastAgent} and the stock fallback agent): for each
upstream host and port it gives Twisted's client TLS options, built once,
from the route's C{ca_file}, C{client_cert} and C{client_key}
(L{aura_proxy.config.UpstreamTls}).  Certificates are always verified (the
upstream's chain and its name or IP address, with service_identity); the
host name goes out as SNI (Twisted sends none for an IP address).  An
upstream with no configured route (none in practice) gets the system's CAs.
"""

from __future__ import annotations

from typing import Iterable

from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    PrivateCertificate,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from aura_proxy.config import RouteConfig, UpstreamTls

__all__ = ["UpstreamTlsPolicy", "client_tls_options"]

#: The upstream hop speaks HTTP/1.1 (streamed, pooled): the one protocol offered by ALPN.
_ALPN = [b"http/1.1"]


def client_tls_options(hostname: str, tls: UpstreamTls) -> IOpenSSLClientConnectionCreator:
    """
    Twisted's client TLS options for the upstream C{hostname} (a name or an
    IP address) under the route setting C{tls}.
    """
    trust = platformTrust()
    if tls.ca_pem is not None:
        trust = trustRootFromCertificates(
            [Certificate.loadPEM(pem) for pem in _pem_certificates(tls.ca_pem)]
        )
    client = PrivateCertificate.loadPEM(tls.client_pem) if tls.client_pem is not None else None
    return optionsForClientTLS(
        hostname, trustRoot=trust, clientCertificate=client, acceptableProtocols=_ALPN
    )


def _pem_certificates(pem: bytes) -> Iterable[bytes]:
    end = b"-----END CERTIFICATE-----"
    for part in pem.split(end)[:-1]:
        start = part.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            yield part[start:] + end + b"\n"


@implementer(IPolicyForHTTPS)
class UpstreamTlsPolicy:
    """
    The client TLS options of every https:// upstream the routes name, built
    once per host and port; any other host gets Twisted's browser-like
    policy (the system's CAs).
    """

    def __init__(self, routes: Iterable[RouteConfig]) -> None:
        self._settings: dict[tuple[bytes, int], UpstreamTls] = {}
        for route in routes:
            url = route.upstream
            if url.scheme == "https":
                host = url.to_uri().host.encode("ascii")
                self._settings.setdefault((host, url.port or 443), route.tls)
        self._built: dict[tuple[bytes, int], IOpenSSLClientConnectionCreator] = {}
        self._default = BrowserLikePolicyForHTTPS()

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """The TLS connection creator for the upstream at C{hostname}:C{port}."""
        key = (hostname, port)
        built = self._built.get(key)
        if built is None:
            tls = self._settings.get(key)
            if tls is None:
                built = self._default.creatorForNetloc(hostname, port)
            else:
                built = client_tls_options(hostname.decode("ascii"), tls)
            self._built[key] = built
        return built
