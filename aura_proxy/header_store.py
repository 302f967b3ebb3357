"""
Direct access to the values a L{Headers} holds, for headers the gateway copies
or builds on every request.

C{Headers.setRawHeaders} re-encodes the name and re-sanitizes every value on
each call, and a proxied request sets a dozen headers: about a tenth of the
gateway's own work per plain request.  Values copied from a message twisted.web
or FastAgent already parsed, and values the gateway builds, need neither.
twisted.web keeps the values in a private dict keyed by the canonical name
(C{X-Request-Id}); L{store} hands out that dict when
L{aura_proxy.twisted_internals} has seen (once, at import) this Twisted lay
headers out that way, and otherwise a mapping over the public methods, with
the same results, only slower.

Names given to the store must be canonical (L{canonical}); names taken from
another L{Headers} already are.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator, MutableMapping, Sequence

from twisted.web.http_headers import Headers

from aura_proxy.twisted_internals import raw_headers

__all__ = ["canonical", "store", "DIRECT"]


@lru_cache(maxsize=256)
def canonical(name: bytes) -> bytes:
    """The name under which L{Headers} stores header C{name} (e.g. C{X-Request-Id})."""
    probe = Headers()
    probe.addRawHeader(name, b"")
    [(stored, _)] = probe.getAllRawHeaders()
    return stored


class _Public(MutableMapping[bytes, Sequence[bytes]]):
    """The store of a L{Headers} whose layout is not the expected one: its public methods."""

    __slots__ = ("_headers",)

    def __init__(self, headers: Headers) -> None:
        self._headers = headers

    def __getitem__(self, name: bytes) -> Sequence[bytes]:
        values = self._headers.getRawHeaders(name)
        if values is None:
            raise KeyError(name)
        return values

    def __setitem__(self, name: bytes, values: Sequence[bytes]) -> None:
        self._headers.setRawHeaders(name, values)

    def __delitem__(self, name: bytes) -> None:
        if not self._headers.hasHeader(name):
            raise KeyError(name)
        self._headers.removeHeader(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, bytes) and self._headers.hasHeader(name)

    def __iter__(self) -> Iterator[bytes]:
        return (name for name, _ in self._headers.getAllRawHeaders())

    def __len__(self) -> int:
        return sum(1 for _ in self._headers.getAllRawHeaders())


#: Whether L{store} gives the L{Headers}' own dict (this Twisted lays headers
#: out as expected: L{aura_proxy.twisted_internals}).
DIRECT = raw_headers is not None


def store(headers: Headers) -> MutableMapping[bytes, Sequence[bytes]]:
    """
    The header values of C{headers}, by canonical name, to read and write
    without re-encoding or re-sanitizing.  Values written must be lists of
    bytes without CR or LF.
    """
    if DIRECT:
        return _raw(headers)
    return _Public(headers)


_raw = raw_headers or _Public
