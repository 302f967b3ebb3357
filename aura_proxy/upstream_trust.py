"""
Upstreams that only trust the gateway: the C{X-DWP-Gateway-Signature} header.

The gateway signs every request it forwards with a secret it shares with its
upstreams; an upstream checks the signature and refuses anything else (a
frontend, or anyone on the network, calling it directly).  This module holds
both sides' common part and the upstream side, and imports no Twisted: a
FastAPI service imports it without the gateway's dependencies.

    - L{load_keys}: the key file (one or two keys: current, then previous).
    - L{canonical_string}, L{signature_header}: what is signed, and how.
    - L{GatewaySignatureVerifier}: checks a header against the request's parts.
    - L{GatewaySignatureMiddleware}: the verifier as a pure ASGI middleware::

        app.add_middleware(GatewaySignatureMiddleware, key_file="/etc/aura/gateway.keys")

The header value is C{v1;t=TIMESTAMP;kid=KEYID;sig=SIGNATURE}: C{TIMESTAMP} in
whole Unix seconds, C{KEYID} the first 16 hex digits of the SHA-256 of the key,
C{SIGNATURE} the unpadded base64url HMAC-SHA256, under that key, of
L{canonical_string}: the lines C{v1}, key id, timestamp, method, path (raw, as
sent upstream), query (raw, without C{?}), tenant (C{X-Tenant-ID}) and user
(C{X-User-ID}, empty when absent), joined by C{\\n}.  No field may hold a line
feed, so the string is unambiguous.  docs/identity.md has the whole contract.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, MutableMapping, Optional, Sequence

__all__ = [
    "DEFAULT_MAX_SKEW",
    "GatewaySigner",
    "GatewaySignatureMiddleware",
    "GatewaySignatureVerifier",
    "InvalidSignature",
    "KeyFileError",
    "MAX_KEYS",
    "MIN_KEY_BYTES",
    "SIGNATURE_HEADER",
    "TrustKey",
    "VERSION",
    "canonical_string",
    "key_id",
    "load_keys",
    "parse_keys",
    "refusal_body",
    "signature_header",
]

#: The header the gateway sets on every forwarded request (and drops from clients).
SIGNATURE_HEADER = "X-DWP-Gateway-Signature"

#: The version of the canonical string and of the header format.
VERSION = b"v1"

#: A key shorter than this many bytes is refused (HMAC-SHA256's own block of strength).
MIN_KEY_BYTES = 32

#: A key file holds the current key and, while rotating, the previous one.
MAX_KEYS = 2

#: Seconds a signature's timestamp may be off the verifier's clock, either way.
DEFAULT_MAX_SKEW = 30.0

_SIGNATURE_LENGTH = 32  # bytes of an HMAC-SHA256
_TENANT = b"x-tenant-id"
_USER = b"x-user-id"
_SIGNATURE = SIGNATURE_HEADER.lower().encode("ascii")


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file (never a key)."""


@dataclass(frozen=True)
class TrustKey:
    """
    One shared secret and its id.

    @ivar kid: L{key_id} of the secret: names the key in a signature.
    @ivar secret: the key itself (left out of C{repr}).
    """

    kid: bytes
    secret: bytes = field(repr=False)

    @classmethod
    def of(cls, secret: bytes) -> "TrustKey":
        """The key C{secret} with its id."""
        return cls(key_id(secret), secret)


def key_id(secret: bytes) -> bytes:
    """The public id of C{secret}: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(secret).hexdigest()[:16].encode("ascii")


def parse_keys(text: str, source: str) -> tuple[TrustKey, ...]:
    """
    The keys of a key file's C{text}: one base64 (standard or URL-safe
    alphabet, padding optional) secret of at least L{MIN_KEY_BYTES} bytes per
    line, the current key first, then at most one previous key; blank lines
    and lines starting with C{#} are ignored.

    @param source: the file name to put in error messages.
    @raise KeyFileError: naming C{source} and the line at fault.
    """
    keys: list[TrustKey] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            compact = line.replace("-", "+").replace("_", "/").rstrip("=")
            secret = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise KeyFileError(f"{source}: line {number}: not a base64 key")
        if len(secret) < MIN_KEY_BYTES:
            raise KeyFileError(
                f"{source}: line {number}: a key of {len(secret)} bytes, "
                f"at least {MIN_KEY_BYTES} are needed"
            )
        keys.append(TrustKey.of(secret))
    if not keys:
        raise KeyFileError(f"{source}: holds no key (one base64 key per line)")
    if len(keys) > MAX_KEYS:
        raise KeyFileError(
            f"{source}: holds {len(keys)} keys, at most {MAX_KEYS} (current, then previous)"
        )
    return tuple(keys)


def load_keys(path: str | os.PathLike[str]) -> tuple[TrustKey, ...]:
    """
    The keys in file C{path} (see L{parse_keys}).

    @raise KeyFileError: when it cannot be read or holds no usable key.
    """
    name = os.fspath(path)
    try:
        with open(name, encoding="ascii") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"{name}: cannot read ({e})")
    return parse_keys(text, name)


def canonical_string(
    kid: bytes, timestamp: int, method: bytes, path: bytes, query: bytes, tenant: bytes, user: bytes
) -> bytes:
    """
    What a signature covers: version, key id, timestamp, method, raw path,
    raw query, tenant and user, one per line.

    @raise ValueError: when a field holds a line feed (HTTP never sends one).
    """
    fields = (VERSION, kid, b"%d" % timestamp, method, path, query, tenant, user)
    for value in fields:
        if b"\n" in value:
            raise ValueError("a signed field holds a line feed")
    return b"\n".join(fields)


def _digest(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _b64url(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def signature_header(
    key: TrustKey, timestamp: int, method: bytes, path: bytes, query: bytes, tenant: bytes, user: bytes
) -> bytes:
    """The C{X-DWP-Gateway-Signature} value of a request, signed with C{key} at C{timestamp}."""
    return GatewaySigner(key).sign(timestamp, method, path, query, tenant, user)


class GatewaySigner:
    """
    Signs requests with one key (the gateway's current key): one HMAC per
    request, from a keyed state computed once.
    """

    def __init__(self, key: TrustKey) -> None:
        self.key = key
        self._keyed = hmac.new(key.secret, digestmod=hashlib.sha256)
        self._prefix = VERSION + b";t="
        self._kid = b";kid=" + key.kid + b";sig="

    def sign(
        self, timestamp: int, method: bytes, path: bytes, query: bytes, tenant: bytes, user: bytes
    ) -> bytes:
        """The header value for these request parts at C{timestamp} (Unix seconds)."""
        mac = self._keyed.copy()
        mac.update(canonical_string(self.key.kid, timestamp, method, path, query, tenant, user))
        return b"%s%d%s%s" % (self._prefix, timestamp, self._kid, _b64url(mac.digest()))


class InvalidSignature(Exception):
    """
    A request whose signature does not hold.

    @ivar reason: why, for the 401 body and the log (never a key or a digest).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _parse_header(value: bytes) -> tuple[int, bytes, bytes]:
    """Timestamp, key id and digest of a header value, or L{InvalidSignature}."""
    parts = value.strip().split(b";")
    if len(parts) != 4 or parts[0] != VERSION:
        raise InvalidSignature(f"malformed {SIGNATURE_HEADER} (expected v1;t=...;kid=...;sig=...)")
    fields: dict[bytes, bytes] = {}
    for part in parts[1:]:
        name, sep, field_value = part.partition(b"=")
        if not sep:
            raise InvalidSignature(f"malformed {SIGNATURE_HEADER}")
        fields[name] = field_value
    t, kid, sig = fields.get(b"t"), fields.get(b"kid"), fields.get(b"sig")
    if t is None or kid is None or sig is None or not t.isdigit() or len(t) > 12:
        raise InvalidSignature(f"malformed {SIGNATURE_HEADER}")
    try:
        digest = base64.urlsafe_b64decode(sig + b"=" * (-len(sig) % 4))
    except (binascii.Error, ValueError):
        raise InvalidSignature(f"malformed {SIGNATURE_HEADER}: sig is not base64url")
    if len(digest) != _SIGNATURE_LENGTH:
        raise InvalidSignature(f"malformed {SIGNATURE_HEADER}: sig is not an HMAC-SHA256")
    return int(t), kid, digest


class GatewaySignatureVerifier:
    """
    Checks C{X-DWP-Gateway-Signature} values against the request they came
    with: every key of the key file is accepted (rotation), and a timestamp
    more than C{max_skew} seconds off the clock, either way, is refused.
    """

    def __init__(
        self,
        keys: Sequence[TrustKey],
        max_skew: float = DEFAULT_MAX_SKEW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not keys:
            raise ValueError("a verifier needs at least one key")
        if max_skew < 0:
            raise ValueError("max_skew must be >= 0")
        self._keys = {key.kid: key for key in keys}
        self._max_skew = max_skew
        self._clock = clock

    @classmethod
    def from_key_file(
        cls,
        path: str | os.PathLike[str],
        max_skew: float = DEFAULT_MAX_SKEW,
        clock: Callable[[], float] = time.time,
    ) -> "GatewaySignatureVerifier":
        """A verifier for the keys in C{path} (L{load_keys}; L{KeyFileError} if unusable)."""
        return cls(load_keys(path), max_skew, clock)

    def verify(
        self,
        header: Optional[bytes],
        method: bytes,
        path: bytes,
        query: bytes,
        tenant: bytes,
        user: bytes,
    ) -> None:
        """
        Accept the request, or raise L{InvalidSignature} saying why not.

        @param header: the C{X-DWP-Gateway-Signature} value, None when absent.
        @param path: the raw (percent-encoded) path as received.
        @param query: the raw query string, without C{?}.
        @param tenant: the C{X-Tenant-ID} value, empty when absent.
        @param user: the C{X-User-ID} value, empty when absent.
        """
        if header is None:
            raise InvalidSignature(f"missing {SIGNATURE_HEADER}: only the gateway may call this service")
        timestamp, kid, digest = _parse_header(header)
        key = self._keys.get(kid)
        if key is None:
            raise InvalidSignature(f"{SIGNATURE_HEADER} is signed with an unknown key")
        skew = timestamp - self._clock()
        if skew < -self._max_skew:
            raise InvalidSignature(
                f"{SIGNATURE_HEADER} is too old ({-skew:.0f} s, at most {self._max_skew:g} s)"
            )
        if skew > self._max_skew:
            raise InvalidSignature(
                f"{SIGNATURE_HEADER} is dated {skew:.0f} s ahead (at most {self._max_skew:g} s)"
            )
        try:
            message = canonical_string(kid, timestamp, method, path, query, tenant, user)
        except ValueError:
            raise InvalidSignature("a signed field holds a line feed")
        if not hmac.compare_digest(_digest(key.secret, message), digest):
            raise InvalidSignature(f"{SIGNATURE_HEADER} does not match the request")

    def verify_headers(
        self, method: bytes, path: bytes, query: bytes, headers: Iterable[tuple[bytes, bytes]]
    ) -> None:
        """
        L{verify} a request given its header pairs (lower-case names, as
        ASGI has them): a repeated signature, tenant or user header is refused.
        """
        found: dict[bytes, bytes] = {}
        for name, value in headers:
            if name in (_SIGNATURE, _TENANT, _USER):
                if name in found:
                    raise InvalidSignature(f"{name.decode('ascii')} sent more than once")
                found[name] = value
        self.verify(
            found.get(_SIGNATURE), method, path, query, found.get(_TENANT, b""), found.get(_USER, b"")
        )


# -- ASGI ---------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def _raw_path(scope: Scope) -> bytes:
    raw = scope.get("raw_path")
    if raw is not None:
        # Some servers leave the query on raw_path; the signature covers it separately.
        return bytes(raw).partition(b"?")[0]
    from urllib.parse import quote  # a server without raw_path: its path, re-encoded

    return quote(scope.get("root_path", "") + scope["path"], safe="/:@!$&'()*+,;=~").encode("ascii")


def refusal_body(reason: str) -> bytes:
    """The JSON body of a 401: the gateway's own error shape, code C{invalid_gateway_signature}."""
    error = {"status": 401, "code": "invalid_gateway_signature", "message": reason}
    return json.dumps({"error": error}, separators=(",", ":")).encode("utf-8")


class GatewaySignatureMiddleware:
    """
    A pure ASGI middleware that lets through only requests the gateway signed.

    A request without a valid C{X-DWP-Gateway-Signature} is answered 401
    with a JSON body (a WebSocket is closed with code 1008) and never reaches
    the app; C{exempt_paths} (exact paths, e.g. C{/healthz}) skip the check.
    Responses, streams included, pass through untouched.

    @param key_file: the key file (L{load_keys}), read once, here.
    @param keys: the keys themselves, instead of C{key_file}.
    @param max_skew: seconds a signature's timestamp may be off this clock.
    """

    def __init__(
        self,
        app: ASGIApp,
        key_file: Optional[str | os.PathLike[str]] = None,
        *,
        keys: Sequence[TrustKey] = (),
        max_skew: float = DEFAULT_MAX_SKEW,
        exempt_paths: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (key_file is None) == (not keys):
            raise ValueError("give exactly one of key_file and keys")
        loaded = load_keys(key_file) if key_file is not None else tuple(keys)
        self.app = app
        self.verifier = GatewaySignatureVerifier(loaded, max_skew, clock)
        self.exempt_paths = frozenset(exempt_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or scope["path"] in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET").encode("ascii")
        try:
            self.verifier.verify_headers(
                method, _raw_path(scope), bytes(scope.get("query_string", b"")), scope["headers"]
            )
        except InvalidSignature as e:
            if kind == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            body = refusal_body(e.reason)
            await send({
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body)),
                    (b"cache-control", b"no-store"),
                ],
            })
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
