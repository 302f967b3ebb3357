"""
C{[gateway] trusted_proxies}: the peers (load balancers) whose
C{X-Forwarded-For}, C{X-Forwarded-Proto} and C{X-Forwarded-Host} the gateway
believes.  Anyone else's are not believed: their client address is the TCP
peer, and the other two are replaced by the gateway's own view.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Optional, Sequence

from twisted.web.http_headers import Headers

from aura_proxy.config import Network
from aura_proxy.header_store import canonical, store

__all__ = ["TrustedProxies"]

_XFF = canonical(b"x-forwarded-for")


class TrustedProxies:
    """The trusted peers; L{of} gives None when there are none (the common case costs nothing)."""

    def __init__(self, networks: Sequence[Network]) -> None:
        self._networks = tuple(networks)
        # A gateway sees few distinct balancer addresses: parse each once.
        self.trusts = lru_cache(maxsize=1024)(self._trusts)

    @classmethod
    def of(cls, networks: Sequence[Network]) -> Optional["TrustedProxies"]:
        """The trusted proxies of C{networks}, or None when it is empty."""
        return cls(networks) if networks else None

    def _trusts(self, address: str) -> bool:
        """Whether C{address} (an IP address as text) is a trusted proxy."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self._networks)

    def client_ip(self, headers: Headers, peer: str) -> str:
        """
        The client of a request from trusted peer C{peer}: the right-most
        C{X-Forwarded-For} address that is not a trusted proxy (the first one
        a trusted proxy saw), or C{peer} when there is none or it is not an
        IP address.
        """
        values = store(headers).get(_XFF)
        if not values:
            return peer
        chain = [a.strip() for value in values for a in value.split(b",")]
        for raw in reversed(chain):
            address = raw.decode("latin-1")
            if not self.trusts(address):
                try:
                    return str(ipaddress.ip_address(address))
                except ValueError:
                    return peer
        # Every hop is trusted: the left-most is the closest to the client.
        return chain[0].decode("latin-1") if chain and chain[0] else peer
