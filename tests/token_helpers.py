"""
Real signing keys and JWTs for the [auth] tests: RSA (RS256), P-256
(ES256) and an HS256 secret, generated once per test run.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from typing import Any, Optional

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

__all__ = [
    "EC_KEY", "HS_SECRET", "NOW", "OTHER_RSA_KEY", "RSA_KEY", "hs256_forged_with",
    "jwks_document", "public_pem", "make_token", "write_file",
]

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
# Random, but never ending in CR or LF, which the secret file loses as its line break.
HS_SECRET = b"s" * 16 + os.urandom(24) + b"s"

#: The time tokens are issued at (a MemoryReactorClock advanced to it).
NOW = 1_700_000_000.0


def make_token(
    key: Any = None, algorithm: str = "RS256", kid: Optional[str] = "k1", lifetime: float = 300.0,
    now: float = NOW, **claims: Any,
) -> bytes:
    """A signed JWT with C{sub}, C{tenant_id}, C{exp}, C{iat} (overridable) and C{claims}."""
    body: dict[str, Any] = {"sub": "u1", "tenant_id": "t1", "iat": int(now), "exp": int(now + lifetime)}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    if key is None:
        key = {"RS256": RSA_KEY, "ES256": EC_KEY, "HS256": HS_SECRET}[algorithm]
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(body, key, algorithm=algorithm, headers=headers).encode("ascii")


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def hs256_forged_with(secret: bytes, kid: Optional[str] = "k1", **claims: Any) -> bytes:
    """
    An HS256 token whose HMAC key is C{secret} (e.g. a public key's PEM),
    built by hand since PyJWT itself refuses a PEM as an HMAC key.
    """
    header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    body = {"sub": "attacker", "tenant_id": "t1", "exp": int(NOW + 300), **claims}
    signing = _b64(json.dumps(header).encode()) + b"." + _b64(json.dumps(body).encode())
    return signing + b"." + _b64(hmac.new(secret, signing, hashlib.sha256).digest())


def public_pem(key: Any) -> bytes:
    """The PEM of C{key}'s public half."""
    return key.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def jwks_document(*keys: tuple[str, Any]) -> bytes:
    """A JWKS document of C{(kid, private key)} pairs' public halves."""
    out = []
    for kid, key in keys:
        public = key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
            jwk["alg"] = "RS256"
        else:
            jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
            jwk["alg"] = "ES256"
        jwk.update(kid=kid, use="sig")
        out.append(jwk)
    return json.dumps({"keys": out}).encode("utf-8")


def write_file(directory: str, name: str, content: bytes) -> str:
    """Write C{content} to C{directory}/C{name}; its path."""
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(content)
    return path
