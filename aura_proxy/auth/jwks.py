"""
Public keys from a JWKS URL (RFC 7517): fetched at start, cached, fetched
again when a token names an unknown C{kid}, at most once per
C{jwks_min_refresh} seconds (a stream of tokens with made-up key ids must
not become a stream of fetches); when a fetch fails the last good set stays.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

import jwt
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from aura_proxy.auth.keys import PublicKey, fits

__all__ = ["FETCH_TIMEOUT", "Fetch", "JwksKeys", "http_fetch", "parse_jwks"]

log = Logger()

#: Seconds a JWKS fetch may take, connection included (the key set is small;
#: a slower endpoint keeps the last good set).
FETCH_TIMEOUT = 10.0

#: Gets a URL's body (fails on anything but 200).
Fetch = Callable[[str], "Deferred[bytes]"]

# A key as the set holds it: the algorithm its JWK declares (or None), the key.
_Entry = tuple[Optional[str], PublicKey]


def parse_jwks(body: bytes) -> dict[Optional[str], list[_Entry]]:
    """
    The signing keys of a JWKS document by C{kid}; keys PyJWT cannot load,
    encryption keys and keys of other kinds are left out.

    @raise ValueError: the document is not a JWKS.
    """
    document = json.loads(body)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no keys list)")
    keys: dict[Optional[str], list[_Entry]] = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(jwk).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            continue
        if not (fits("RS256", key) or fits("ES256", key)):
            continue
        kid = jwk.get("kid")
        declared = jwk.get("alg")
        keys.setdefault(kid if isinstance(kid, str) else None, []).append(
            (declared if isinstance(declared, str) else None, key)
        )
    return keys


class JwksKeys:
    """
    The key set of one JWKS URL (a L{aura_proxy.auth.keys.PublicKeys}).

    @param fetch: gets the URL's body (L{http_fetch} for real).
    """

    def __init__(self, url: str, clock: IReactorTime, min_refresh: float, fetch: Fetch) -> None:
        self._url = url
        self._clock = clock
        self._min_refresh = min_refresh
        self._fetch = fetch
        self._keys: dict[Optional[str], list[_Entry]] = {}
        self._last_fetch: Optional[float] = None
        self._waiting: Optional[list[Deferred[None]]] = None

    def start(self) -> "Deferred[None]":
        """Fetch the set now (at start): fires when the fetch is over, whatever its result."""
        return self._fetch_now()

    def key_for(self, algorithm: str, kid: Optional[str]) -> Optional[PublicKey]:
        """
        The key named C{kid} that fits C{algorithm} (and whose JWK, if it
        names an algorithm, names that one); a token without C{kid} may use
        the set's only fitting key.
        """
        entries = self._keys.get(kid)
        if entries is None and kid is None:
            entries = [e for es in self._keys.values() for e in es]
            entries = [e for e in entries if fits(algorithm, e[1])]
            if len(entries) != 1:
                return None
        for declared, key in entries or ():
            if (declared is None or declared == algorithm) and fits(algorithm, key):
                return key
        return None

    def refresh(self) -> Optional["Deferred[None]"]:
        """Fetch again, unless a fetch started less than C{jwks_min_refresh} ago (None then)."""
        if self._waiting is not None:
            # One fetch in flight serves every request waiting for it.
            waiter: Deferred[None] = Deferred()
            self._waiting.append(waiter)
            return waiter
        last = self._last_fetch
        if last is not None and self._clock.seconds() - last < self._min_refresh:
            return None
        return self._fetch_now()

    def _fetch_now(self) -> "Deferred[None]":
        self._last_fetch = self._clock.seconds()
        waiter: Deferred[None] = Deferred()
        self._waiting = [waiter]
        try:
            fetched = self._fetch(self._url)
        except Exception:
            fetched = Deferred()
            fetched.errback(Failure())
        fetched.addCallback(parse_jwks).addCallbacks(self._fetched, self._failed)
        return waiter

    def _fetched(self, keys: dict[Optional[str], list[_Entry]]) -> None:
        self._keys = keys
        self._wake()

    def _failed(self, failure: Failure) -> None:
        # The last good set stays: an endpoint that is down must not lock
        # everyone out while the keys they were signed with are still known.
        log.warn(
            "JWKS {url} could not be fetched, keeping {count} known key(s): {error}",
            url=self._url, count=sum(len(e) for e in self._keys.values()),
            error=failure.getErrorMessage(),
        )
        self._wake()

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting or [], None
        for waiter in waiting:
            waiter.callback(None)


def http_fetch(reactor: Any) -> Fetch:
    """
    A L{Fetch} through treq over a plain L{Agent} (not the upstream pool: a
    JWKS endpoint is no route's upstream), without persistent connections.
    """
    import treq
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.http_headers import Headers

    client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

    def fetch(url: str) -> "Deferred[bytes]":
        def body(response: Any) -> "Deferred[bytes]":
            content: Deferred[bytes] = treq.content(response)
            if response.code != 200:
                def refuse(_: bytes) -> bytes:
                    raise ValueError(f"HTTP {response.code}")
                content.addCallback(refuse)
            return content

        requested: Deferred[Any] = client.get(
            url, headers=Headers({b"accept": [b"application/json"]}), timeout=FETCH_TIMEOUT
        )
        return requested.addCallback(body)

    return fetch
