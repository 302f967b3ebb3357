"""
A token in, an L{Identity} out, or the reason it is refused.

PyJWT checks the signature (with the one key the token's algorithm and
C{kid} select: L{aura_proxy.auth.keys}), the issuer, the audience and that
C{exp} is there.  The times (C{exp}, C{nbf}) are compared here, against the
gateway's injected clock, which the cache of verified tokens also runs on:
a token is served from the cache exactly as long as it would verify.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import jwt
from twisted.internet.interfaces import IReactorTime

from aura_proxy.auth.keys import Keys
from aura_proxy.config import AuthConfig

__all__ = ["CACHE_SIZE", "Identity", "TokenRefused", "UnknownKey", "Verifier"]

#: Verified tokens remembered at most (least recently used ones go first):
#: a few MB at most, and every active user's token stays a dict lookup.
CACHE_SIZE = 10000


@dataclass(frozen=True)
class Identity:
    """
    Who a verified token says the caller is.

    @ivar tenant: the tenant claim, or None when the token has none.
    @ivar user: the user claim.
    @ivar agent: the agent claim, or None (none configured, or none in the token).
    @ivar expires: the token's C{exp} (seconds since the epoch).
    """

    tenant: Optional[str]
    user: str
    agent: Optional[str]
    expires: float


class TokenRefused(Exception):
    """
    A token that does not prove anything.

    @ivar error: the RFC 6750 error code for C{WWW-Authenticate}:
        C{invalid_request} (no token, or not a JWT at all) or C{invalid_token}.
    @ivar reason: what is wrong, for the client and the log (never the token).
    """

    def __init__(self, error: str, reason: str) -> None:
        super().__init__(reason)
        self.error = error
        self.reason = reason


class UnknownKey(Exception):
    """The token names a key (C{kid}) the gateway does not know (yet)."""


class Verifier:
    """
    Verifies tokens against the C{[auth]} rules and C{keys}; remembers the
    verified ones (by SHA-256, never the token itself) until they expire.
    """

    def __init__(
        self, config: AuthConfig, clock: IReactorTime, keys: Keys, cache_size: int = CACHE_SIZE
    ) -> None:
        self._seconds = clock.seconds
        self._keys = keys
        self._algorithms = frozenset(config.algorithms)
        self._issuer = config.issuer
        self._audience = list(config.audience) or None
        self._leeway = config.leeway
        self._claims = (config.tenant_claim, config.user_claim, config.agent_claim)
        self._options: Any = {
            "require": ["exp"],
            "verify_aud": bool(config.audience),
            "verify_iss": config.issuer is not None,
            # Times are checked against the injected clock (module docstring).
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
        }
        self._cache: OrderedDict[bytes, Identity] = OrderedDict()
        self._cache_size = cache_size

    def verify(self, token: bytes) -> Identity:
        """
        The identity C{token} proves.

        @raise TokenRefused: the token is malformed, expired, not yet valid,
            badly signed, for another issuer or audience, or lacks a claim.
        @raise UnknownKey: its C{kid} is unknown (a refresh may find it).
        """
        digest = hashlib.sha256(token).digest()
        cache = self._cache
        identity = cache.get(digest)
        now = self._seconds()
        if identity is not None:
            if now <= identity.expires + self._leeway:
                cache.move_to_end(digest)
                return identity
            del cache[digest]
        identity = self._verify(token, now)
        cache[digest] = identity
        if len(cache) > self._cache_size:
            cache.popitem(last=False)
        return identity

    def _verify(self, token: bytes, now: float) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise TokenRefused("invalid_request", "the token is not a JWT")
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise TokenRefused("invalid_token", f"tokens signed with {algorithm!r} are not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenRefused("invalid_token", "the token's kid is not a string")
        key = self._keys.key_for(algorithm, kid)
        if key is None:
            if algorithm == "HS256":
                raise TokenRefused("invalid_token", "no HS256 secret is configured")
            raise UnknownKey(kid)
        try:
            claims = jwt.decode(
                token, key, algorithms=[algorithm], audience=self._audience,
                issuer=self._issuer, options=self._options,
            )
        except jwt.InvalidSignatureError:
            raise TokenRefused("invalid_token", "the token's signature does not verify")
        except jwt.InvalidAudienceError:
            raise TokenRefused("invalid_token", "the token is for another audience")
        except jwt.InvalidIssuerError:
            raise TokenRefused("invalid_token", "the token is from another issuer")
        except jwt.MissingRequiredClaimError as e:
            raise TokenRefused("invalid_token", f"the token has no {e.claim} claim")
        except jwt.InvalidTokenError as e:
            raise TokenRefused("invalid_token", f"the token is invalid ({e})")
        return self._identity(claims, now)

    def _identity(self, claims: dict[str, Any], now: float) -> Identity:
        leeway = self._leeway
        expires = _time(claims, "exp")
        assert expires is not None  # required above
        if now > expires + leeway:
            raise TokenRefused("invalid_token", "the token has expired")
        not_before = _time(claims, "nbf")
        if not_before is not None and now < not_before - leeway:
            raise TokenRefused("invalid_token", "the token is not valid yet")
        tenant_claim, user_claim, agent_claim = self._claims
        user = _text(claims, user_claim)
        if user is None:
            raise TokenRefused("invalid_token", f"the token has no {user_claim} claim")
        return Identity(
            _text(claims, tenant_claim),
            user,
            _text(claims, agent_claim) if agent_claim is not None else None,
            expires,
        )


def _time(claims: dict[str, Any], name: str) -> Optional[float]:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TokenRefused("invalid_token", f"the token's {name} claim is not a number")
    return float(value)


def _text(claims: dict[str, Any], name: str) -> Optional[str]:
    """A claim that becomes a header: a string (or whole number), without control characters."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise TokenRefused("invalid_token", f"the token's {name} claim is not a non-empty string")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise TokenRefused("invalid_token", f"the token's {name} claim has a control character")
    return value
