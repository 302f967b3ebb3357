"""
The gateway's side of C{[upstream_trust]}: every forwarded request is signed.

L{UpstreamSigner} adds C{X-DWP-Gateway-Signature} (L{aura_proxy.upstream_trust})
to the headers the forwarding stage built, over the method, the request
target exactly as it goes upstream, and the tenant and user headers that go
with it.  A client-sent signature never reaches an upstream: the header
contract drops it (L{aura_proxy.contract}).
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers

from aura_proxy.config import UpstreamTrustConfig
from aura_proxy.header_store import canonical, store
from aura_proxy.upstream_trust import SIGNATURE_HEADER, GatewaySigner

__all__ = ["UpstreamSigner", "request_target"]

_SIGNATURE = canonical(SIGNATURE_HEADER.lower().encode("ascii"))
_TENANT = canonical(b"x-tenant-id")
_USER = canonical(b"x-user-id")


def request_target(url: bytes) -> tuple[bytes, bytes]:
    """
    The raw path and query (without C{?}) that the upstream client sends
    for absolute URL C{url}: what follows the authority, C{/} when empty,
    fragment left out (as L{aura_proxy.fastclient} and twisted.web do).
    """
    rest = url.partition(b"://")[2]
    end = len(rest)
    for c in (b"/", b"?", b"#"):
        i = rest.find(c)
        if 0 <= i < end:
            end = i
    path, _, query = rest[end:].partition(b"#")[0].partition(b"?")
    return path or b"/", query


class UpstreamSigner:
    """Signs the requests of one pipeline with the configured current key."""

    def __init__(self, signer: GatewaySigner, clock: IReactorTime) -> None:
        self._sign = signer.sign
        self._seconds = clock.seconds

    @classmethod
    def from_config(cls, config: UpstreamTrustConfig, clock: IReactorTime) -> Optional["UpstreamSigner"]:
        """The signer of C{config}, or None when no key file is configured."""
        if not config.keys:
            return None
        return cls(GatewaySigner(config.keys[0]), clock)

    def sign(self, method: bytes, url: bytes, headers: Headers) -> None:
        """Set C{X-DWP-Gateway-Signature} on C{headers}, going upstream to C{url}."""
        raw = store(headers)
        path, query = request_target(url)
        # A repeated identity header is signed as one comma-joined value, which a
        # verifier (that refuses repeats) never accepts.
        tenant = b",".join(raw.get(_TENANT, ()))
        user = b",".join(raw.get(_USER, ()))
        raw[_SIGNATURE] = [self._sign(int(self._seconds()), method, path, query, tenant, user)]
