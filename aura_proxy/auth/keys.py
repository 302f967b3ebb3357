"""
The keys a token may be signed with, and which key fits which algorithm.

An HS256 token is checked against the HS256 secret only, an RS256 token
against RSA public keys only, an ES256 one against P-256 keys only: a
public key is never used as an HMAC secret (the classic algorithm confusion).
"""

from __future__ import annotations

from typing import Optional, Protocol, Union

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from twisted.internet.defer import Deferred

from aura_proxy.config import AuthConfig

__all__ = ["Keys", "PublicKey", "PublicKeys", "StaticPublicKey", "fits"]

#: A public key a token's signature is checked with.
PublicKey = Union[rsa.RSAPublicKey, ec.EllipticCurvePublicKey]


def fits(algorithm: str, key: object) -> bool:
    """Whether C{key} is the kind of public key C{algorithm} (RS256, ES256) verifies with."""
    if algorithm == "RS256":
        return isinstance(key, rsa.RSAPublicKey)
    if algorithm == "ES256":
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    return False


class PublicKeys(Protocol):
    """Where public keys come from: a file, or a JWKS URL."""

    def key_for(self, algorithm: str, kid: Optional[str]) -> Optional[PublicKey]:
        """The key for a token's C{alg} and C{kid}, or None when there is none."""

    def refresh(self) -> Optional["Deferred[None]"]:
        """
        Look for keys again (an unknown C{kid}): a Deferred that fires when
        the set is refreshed, or None when no refresh may start now.
        """


class StaticPublicKey:
    """The one public key of C{public_key_file}; it has no C{kid} and is never refreshed."""

    def __init__(self, pem: bytes) -> None:
        key = load_pem_public_key(pem)
        assert isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)), "checked by config"
        self._key: PublicKey = key

    def key_for(self, algorithm: str, kid: Optional[str]) -> Optional[PublicKey]:
        """The file's key, when it fits C{algorithm} (whatever C{kid} the token names)."""
        return self._key if fits(algorithm, self._key) else None

    def refresh(self) -> Optional["Deferred[None]"]:
        """A file is read once: nothing to refresh."""
        return None


class Keys:
    """
    Every key of an C{[auth]} section, chosen by the token's algorithm.

    @param public: the public keys (RS256, ES256), or None without any.
    """

    def __init__(self, config: AuthConfig, public: Optional[PublicKeys]) -> None:
        self._secret = config.hs256_secret if "HS256" in config.algorithms else None
        self._public = public

    def key_for(self, algorithm: str, kid: Optional[str]) -> Union[bytes, PublicKey, None]:
        """The key a token signed with C{algorithm} is checked against, or None."""
        if algorithm == "HS256":
            return self._secret
        if self._public is None:
            return None
        return self._public.key_for(algorithm, kid)

    def refresh(self) -> Optional["Deferred[None]"]:
        """See L{PublicKeys.refresh}."""
        return self._public.refresh() if self._public is not None else None
