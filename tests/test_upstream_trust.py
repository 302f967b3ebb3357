"""
L{aura_proxy.upstream_trust}: the key file, the canonical string, signing,
verification and the ASGI middleware.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import subprocess
import sys
from typing import Any, MutableMapping

from twisted.trial.unittest import SynchronousTestCase

from aura_proxy.upstream_trust import (
    GatewaySignatureMiddleware,
    GatewaySignatureVerifier,
    GatewaySigner,
    InvalidSignature,
    KeyFileError,
    TrustKey,
    canonical_string,
    key_id,
    load_keys,
    parse_keys,
    signature_header,
)

KEY = TrustKey.of(b"k" * 32)
OLD_KEY = TrustKey.of(b"o" * 40)
OTHER_KEY = TrustKey.of(b"x" * 32)
NOW = 1_700_000_000

#: One request's signed parts: method, path, query, tenant, user.
PARTS = (b"GET", b"/api/aura/chat/stream", b"q=hi&a=%20", b"t1", b"u1")


def b64(secret: bytes) -> str:
    return base64.b64encode(secret).decode("ascii")


def verifier(*keys: TrustKey, now: float = NOW, max_skew: float = 30) -> GatewaySignatureVerifier:
    return GatewaySignatureVerifier(keys or (KEY,), max_skew, clock=lambda: now)


class KeyFileTests(SynchronousTestCase):
    """L{parse_keys} and L{load_keys}."""

    def test_current_then_previous(self) -> None:
        """Keys are read in order, comments and blank lines skipped; padding and alphabet do not matter."""
        urlsafe = base64.urlsafe_b64encode(b"\xfb" * 33).decode().rstrip("=")
        text = f"# current\n{b64(KEY.secret)}\n\n  # previous\n  {urlsafe}  \n"
        self.assertEqual(parse_keys(text, "k.keys"), (KEY, TrustKey.of(b"\xfb" * 33)))

    def test_key_id(self) -> None:
        """A key's id is the first 16 hex digits of its SHA-256: public, stable, not the key."""
        self.assertEqual(key_id(KEY.secret), hashlib.sha256(KEY.secret).hexdigest()[:16].encode())
        self.assertNotIn(KEY.secret, repr(KEY).encode())

    def test_too_short(self) -> None:
        """A key under 32 bytes is refused, naming the file and line."""
        with self.assertRaises(KeyFileError) as e:
            parse_keys(f"# c\n{b64(b'k' * 31)}\n", "k.keys")
        self.assertEqual(str(e.exception), "k.keys: line 2: a key of 31 bytes, at least 32 are needed")

    def test_not_base64(self) -> None:
        """A line that is not base64 is refused without echoing it."""
        with self.assertRaises(KeyFileError) as e:
            parse_keys("not*base64!" * 5, "k.keys")
        self.assertEqual(str(e.exception), "k.keys: line 1: not a base64 key")

    def test_no_key_or_too_many(self) -> None:
        """A file with no key, or more than two, is refused."""
        with self.assertRaises(KeyFileError) as e:
            parse_keys("# nothing\n", "k.keys")
        self.assertIn("k.keys: holds no key", str(e.exception))
        with self.assertRaises(KeyFileError) as e:
            parse_keys("\n".join([b64(KEY.secret)] * 3), "k.keys")
        self.assertIn("k.keys: holds 3 keys, at most 2", str(e.exception))

    def test_missing_file(self) -> None:
        """A file that cannot be read is refused, naming it."""
        path = self.mktemp()
        with self.assertRaises(KeyFileError) as e:
            load_keys(path)
        self.assertTrue(str(e.exception).startswith(f"{path}: cannot read"))

    def test_load(self) -> None:
        """L{load_keys} reads a file."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(b64(KEY.secret) + "\n")
        self.assertEqual(load_keys(path), (KEY,))


class CanonicalStringTests(SynchronousTestCase):
    """L{canonical_string} and L{signature_header}."""

    def test_layout(self) -> None:
        """Version, key id, timestamp, method, path, query, tenant, user: one per line."""
        self.assertEqual(
            canonical_string(b"abcd", NOW, *PARTS),
            b"v1\nabcd\n1700000000\nGET\n/api/aura/chat/stream\nq=hi&a=%20\nt1\nu1",
        )

    def test_line_feed_refused(self) -> None:
        """A field with a line feed could shift the others: refused."""
        self.assertRaises(ValueError, canonical_string, b"k", NOW, b"GET", b"/a\nb", b"", b"t", b"")

    def test_header(self) -> None:
        """The header holds version, timestamp, key id and the unpadded base64url HMAC-SHA256."""
        message = canonical_string(KEY.kid, NOW, *PARTS)
        digest = hmac.new(KEY.secret, message, hashlib.sha256).digest()
        expected = b"v1;t=1700000000;kid=" + KEY.kid + b";sig=" + base64.urlsafe_b64encode(digest).rstrip(b"=")
        self.assertEqual(signature_header(KEY, NOW, *PARTS), expected)
        self.assertEqual(GatewaySigner(KEY).sign(NOW, *PARTS), expected)


class VerifierTests(SynchronousTestCase):
    """L{GatewaySignatureVerifier.verify}."""

    def refused(self, v: GatewaySignatureVerifier, header: Any, *parts: bytes) -> str:
        with self.assertRaises(InvalidSignature) as e:
            v.verify(header, *(parts or PARTS))
        return e.exception.reason

    def test_good(self) -> None:
        """A signature of the same request, within the skew, is accepted."""
        verifier().verify(signature_header(KEY, NOW - 30, *PARTS), *PARTS)
        verifier().verify(signature_header(KEY, NOW + 30, *PARTS), *PARTS)

    def test_tampered(self) -> None:
        """Changing the method, path, query, tenant or user breaks the signature."""
        header = signature_header(KEY, NOW, *PARTS)
        for i, changed in enumerate((b"POST", b"/api/aura/other", b"q=hi", b"t2", b"u2")):
            parts = list(PARTS)
            parts[i] = changed
            self.assertIn("does not match", self.refused(verifier(), header, *parts))
        # A user dropped is a change too.
        self.assertIn("does not match", self.refused(verifier(), header, *PARTS[:4], b""))

    def test_tampered_timestamp(self) -> None:
        """A timestamp moved in the header (to outlive the skew) breaks the signature."""
        header = signature_header(KEY, NOW - 10, *PARTS).replace(b"t=1699999990", b"t=1700000000")
        self.assertIn("does not match", self.refused(verifier(), header))

    def test_wrong_key(self) -> None:
        """A signature with a key the verifier does not hold is refused."""
        self.assertIn("unknown key", self.refused(verifier(), signature_header(OTHER_KEY, NOW, *PARTS)))
        forged = signature_header(OTHER_KEY, NOW, *PARTS).replace(OTHER_KEY.kid, KEY.kid)
        self.assertIn("does not match", self.refused(verifier(), forged))

    def test_previous_key(self) -> None:
        """While rotating, both keys of the file are accepted."""
        v = verifier(KEY, OLD_KEY)
        v.verify(signature_header(KEY, NOW, *PARTS), *PARTS)
        v.verify(signature_header(OLD_KEY, NOW, *PARTS), *PARTS)

    def test_skew(self) -> None:
        """A signature more than max_skew seconds old, or ahead, is refused."""
        self.assertIn("too old", self.refused(verifier(), signature_header(KEY, NOW - 31, *PARTS)))
        self.assertIn("ahead", self.refused(verifier(), signature_header(KEY, NOW + 31, *PARTS)))
        self.assertIn("too old", self.refused(verifier(max_skew=5), signature_header(KEY, NOW - 6, *PARTS)))

    def test_missing_and_malformed(self) -> None:
        """No header, or one that does not parse, is refused."""
        self.assertIn("missing", self.refused(verifier(), None))
        good = signature_header(KEY, NOW, *PARTS)
        for header in (
            b"",
            b"v2" + good[2:],
            good + b";x=1",
            good.replace(b"t=", b"T="),
            good.replace(b";t=1700000000", b";t=-1700000000"),
            good[:-2],
            good + b"AA",
            good.replace(b";sig=", b";sig=*"),
        ):
            self.assertIn("malformed", self.refused(verifier(), header), header)

    def test_repeated_headers(self) -> None:
        """L{verify_headers} refuses a repeated tenant, user or signature header."""
        v = verifier()
        good = signature_header(KEY, NOW, *PARTS)
        pairs = [(b"x-dwp-gateway-signature", good), (b"x-tenant-id", b"t1"), (b"x-user-id", b"u1")]
        v.verify_headers(*PARTS[:3], pairs)
        for repeated in pairs:
            with self.assertRaises(InvalidSignature) as e:
                v.verify_headers(*PARTS[:3], pairs + [repeated])
            self.assertIn("more than once", e.exception.reason)


Message = MutableMapping[str, Any]


def run_asgi(app: Any, path: str = "/api/aura/chat/stream", query: bytes = b"q=hi&a=%20",
             headers: Any = (), raw_path: Any = None) -> list[Message]:
    """Run one HTTP request through an ASGI app; what it sent."""
    scope = {
        "type": "http", "method": "GET", "path": path, "query_string": query,
        "raw_path": raw_path if raw_path is not None else path.encode(), "root_path": "",
        "headers": list(headers),
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


class StreamingApp:
    """An ASGI app that streams three body parts, noting each send."""

    def __init__(self) -> None:
        self.calls = 0
        self.log: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for part in (b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"):
            self.log.append(f"sending {part!r}")
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def signed(key: TrustKey = KEY, at: int = NOW) -> list[tuple[bytes, bytes]]:
    return [(b"x-tenant-id", b"t1"), (b"x-user-id", b"u1"),
            (b"x-dwp-gateway-signature", signature_header(key, at, *PARTS))]


class MiddlewareTests(SynchronousTestCase):
    """L{GatewaySignatureMiddleware}."""

    def middleware(self, app: Any, **kw: Any) -> GatewaySignatureMiddleware:
        return GatewaySignatureMiddleware(app, keys=(KEY, OLD_KEY), clock=lambda: NOW, **kw)

    def test_signed_request_streams_through(self) -> None:
        """A signed request reaches the app; its streamed body passes message by message."""
        app = StreamingApp()
        sent = run_asgi(self.middleware(app), headers=signed())
        self.assertEqual(app.calls, 1)
        self.assertEqual([m.get("body") for m in sent[1:]], [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n", b""])
        self.assertEqual(sent[0]["status"], 200)

    def test_previous_key(self) -> None:
        """A request signed with the file's previous key is let through."""
        app = StreamingApp()
        run_asgi(self.middleware(app), headers=signed(OLD_KEY))
        self.assertEqual(app.calls, 1)

    def test_unsigned_refused(self) -> None:
        """Without a valid signature: 401 with a JSON body, and the app never runs."""
        app = StreamingApp()
        for headers in ([(b"x-tenant-id", b"t1")], signed(at=NOW - 31), signed(OTHER_KEY)):
            sent = run_asgi(self.middleware(app), headers=headers)
            self.assertEqual(sent[0]["status"], 401)
            self.assertIn((b"content-type", b"application/json"), sent[0]["headers"])
            body = json.loads(sent[1]["body"])
            self.assertEqual(body["error"]["code"], "invalid_gateway_signature")
        self.assertEqual(app.calls, 0)

    def test_raw_path_is_signed(self) -> None:
        """The raw path is what is checked: another encoding of the same path is refused."""
        app = StreamingApp()
        sent = run_asgi(self.middleware(app), headers=signed(), raw_path=b"/api/aura/chat/%73tream")
        self.assertEqual(sent[0]["status"], 401)
        self.assertEqual(app.calls, 0)

    def test_exempt_path(self) -> None:
        """An exempt path (a health check) needs no signature."""
        app = StreamingApp()
        run_asgi(self.middleware(app, exempt_paths=["/healthz"]), path="/healthz")
        self.assertEqual(app.calls, 1)

    def test_lifespan_passes(self) -> None:
        """Lifespan events are not requests: they reach the app."""
        seen: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            seen.append(scope["type"])

        async def nothing() -> Message:
            return {}

        async def ignore(message: Message) -> None:
            pass

        asyncio.run(self.middleware(app)({"type": "lifespan"}, nothing, ignore))
        self.assertEqual(seen, ["lifespan"])

    def test_key_file(self) -> None:
        """The middleware reads its keys from key_file at construction."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f"{b64(KEY.secret)}\n")
        app = StreamingApp()
        run_asgi(GatewaySignatureMiddleware(app, key_file=path, clock=lambda: NOW), headers=signed())
        self.assertEqual(app.calls, 1)
        self.assertRaises(KeyFileError, GatewaySignatureMiddleware, app, key_file=self.mktemp())

    def test_imports_no_twisted(self) -> None:
        """An upstream service imports the module without Twisted."""
        code = "import sys, aura_proxy.upstream_trust; print(any(m.startswith('twisted') for m in sys.modules))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True)
        self.assertEqual(out.stdout.strip(), "False")
