"""
Tests for JWT verification at the edge: the C{[auth]} section, the key
sources (L{JwksKeys}), the L{Verifier} and the L{Authenticate} stage, with
real RS256, ES256 and HS256 tokens and a driven clock.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from aura_proxy.auth.jwks import JwksKeys, parse_jwks
from aura_proxy.auth.keys import Keys
from aura_proxy.auth.verify import Identity, TokenRefused, UnknownKey, Verifier
from aura_proxy.config import AuthConfig, Config, ConfigError, parse_config
from aura_proxy.stages.auth import Authenticate
from aura_proxy.stages.recording import Record
from tests.test_proxy import CONFIG
from tests.test_stages import asked, make_call
from tests.token_helpers import (
    EC_KEY, HS_SECRET, NOW, OTHER_RSA_KEY, RSA_KEY, hs256_forged_with, jwks_document,
    make_token, public_pem, write_file,
)


def clock_at(now: float = NOW) -> MemoryReactorClock:
    """A clock at C{now}."""
    clock = MemoryReactorClock()
    clock.advance(now)
    return clock


class KeyFiles:
    """Writes the test keys where an [auth] section can name them."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.rsa = write_file(directory, "rsa.pem", public_pem(RSA_KEY))
        self.ec = write_file(directory, "ec.pem", public_pem(EC_KEY))
        self.secret = write_file(directory, "hs.key", HS_SECRET + b"\n")
        self.short = write_file(directory, "short.key", b"too short\n")


def config_with(auth: str) -> Config:
    """The unit tests' gateway configuration with C{auth} as its [auth] section."""
    return parse_config(CONFIG + "[auth]\n" + auth, "test.ini")


class FakeJwks:
    """A fetch whose answers the test gives: each call returns the next Deferred."""

    def __init__(self) -> None:
        self.calls: list[Deferred[bytes]] = []

    def __call__(self, url: str) -> "Deferred[bytes]":
        d: Deferred[bytes] = Deferred()
        self.calls.append(d)
        return d


class AuthConfigTests(SynchronousTestCase):
    """C{[auth]} in the configuration file."""

    def setUp(self) -> None:
        self.files = KeyFiles(self.mktemp())

    def problems(self, auth: str) -> str:
        with self.assertRaises(ConfigError) as e:
            config_with(auth)
        return "\n".join(e.exception.problems)

    def test_off_by_default(self) -> None:
        """Without an [auth] section JWT is off."""
        self.assertEqual(parse_config(CONFIG, "t.ini").auth, AuthConfig())
        self.assertEqual(AuthConfig().jwt, "off")

    def test_keys_read_when_parsed(self) -> None:
        """A valid section carries the key file and secret it names (not in its repr)."""
        auth = config_with(
            f"jwt = required\npublic_key_file = {self.files.rsa}\n"
            f"hs256_secret_file = {self.files.secret}\nalgorithms = RS256, HS256\n"
            "audience = a1, a2\nissuer = https://idp\ntoken_from = header, cookie:tok\n"
        ).auth
        self.assertEqual(auth.public_key_pem, public_pem(RSA_KEY))
        self.assertEqual(auth.hs256_secret, HS_SECRET)
        self.assertEqual(auth.audience, ("a1", "a2"))
        self.assertEqual(auth.token_from, ("header", "cookie:tok"))
        self.assertNotIn(repr(HS_SECRET)[2:-1], repr(auth))

    def test_no_key_source(self) -> None:
        """JWT on without any key source is refused, naming file, section and key."""
        self.assertIn("test.ini: [auth] jwt: jwt = required needs a key source", self.problems("jwt = required\n"))

    def test_hs256_with_a_public_key_only(self) -> None:
        """HS256 with only a public key is refused: it is never checked against one."""
        text = self.problems(f"jwt = optional\npublic_key_file = {self.files.rsa}\nalgorithms = RS256, HS256\n")
        self.assertIn("[auth] algorithms: HS256 needs hs256_secret_file", text)

    def test_none_never_accepted(self) -> None:
        """C{algorithms = none} is refused, as is any algorithm but RS256, ES256, HS256."""
        self.assertIn("[auth] algorithms: none is never accepted", self.problems("algorithms = none\n"))
        self.assertIn("[auth] algorithms: expected some of", self.problems("algorithms = RS512\n"))

    def test_token_never_from_the_query(self) -> None:
        """C{token_from = query:...} is refused."""
        self.assertIn("never taken from a query parameter", self.problems("token_from = query:t\n"))

    def test_public_key_must_fit_the_algorithms(self) -> None:
        """An EC key file with only RS256 listed, or RS256 beside an EC file, is refused."""
        self.assertIn("holds an ES256 key but algorithms does not list ES256", self.problems(
            f"jwt = required\npublic_key_file = {self.files.ec}\nalgorithms = RS256\n"))
        self.assertIn("lists RS256, but public_key_file holds an ES256 key", self.problems(
            f"jwt = required\npublic_key_file = {self.files.ec}\nalgorithms = ES256, RS256\n"))

    def test_unreadable_and_short_keys(self) -> None:
        """A key file that cannot be read, is not a key, or an HS256 secret under 32 bytes is refused."""
        self.assertIn("[auth] public_key_file: cannot read", self.problems(
            "jwt = required\npublic_key_file = /nonexistent/key.pem\n"))
        self.assertIn("is not a PEM public key", self.problems(
            f"jwt = required\npublic_key_file = {self.files.secret}\n"))
        self.assertIn("HS256 needs at least 32", self.problems(
            f"jwt = required\nhs256_secret_file = {self.files.short}\nalgorithms = HS256\n"))

    def test_two_public_key_sources(self) -> None:
        """jwks_url and public_key_file together are refused."""
        self.assertIn("not both", self.problems(
            f"jwt = required\njwks_url = http://idp/jwks\npublic_key_file = {self.files.rsa}\n"))


class JwksKeysTests(SynchronousTestCase):
    """L{JwksKeys}: fetched, cached, refreshed at most once per jwks_min_refresh."""

    def setUp(self) -> None:
        self.clock = clock_at()
        self.fetch = FakeJwks()
        self.keys = JwksKeys("http://idp/jwks", self.clock, 60.0, self.fetch)
        self.keys.start()
        self.fetch.calls[0].callback(jwks_document(("k1", RSA_KEY), ("e1", EC_KEY)))

    def test_keys_by_kid_and_algorithm(self) -> None:
        """A kid's key is found for its own algorithm only."""
        self.assertIsNotNone(self.keys.key_for("RS256", "k1"))
        self.assertIsNotNone(self.keys.key_for("ES256", "e1"))
        self.assertIsNone(self.keys.key_for("ES256", "k1"))
        self.assertIsNone(self.keys.key_for("RS256", "nope"))

    def test_new_kid_fetched_after_min_refresh(self) -> None:
        """Within jwks_min_refresh no refresh starts; after it, a new kid is fetched."""
        self.assertIsNone(self.keys.refresh())
        self.assertEqual(len(self.fetch.calls), 1)
        self.clock.advance(60)
        done = self.keys.refresh()
        assert done is not None
        self.assertEqual(len(self.fetch.calls), 2)
        self.fetch.calls[1].callback(jwks_document(("k1", RSA_KEY), ("k2", OTHER_RSA_KEY)))
        self.assertIsNone(self.successResultOf(done))
        self.assertIsNotNone(self.keys.key_for("RS256", "k2"))
        self.assertIsNone(self.keys.key_for("ES256", "e1"))  # rotated out

    def test_failed_fetch_keeps_the_last_good_set(self) -> None:
        """A JWKS endpoint that fails (or sends garbage) leaves the known keys in place."""
        for answer in (fail(ConnectionError("down")), succeed(b"<html>")):
            self.clock.advance(60)
            done = self.keys.refresh()
            assert done is not None
            answer.addBoth(self.fetch.calls[-1].callback)
            self.successResultOf(done)
            self.assertIsNotNone(self.keys.key_for("RS256", "k1"))
        self.flushLoggedErrors()

    def test_waiting_requests_share_one_fetch(self) -> None:
        """Refreshes asked for while a fetch is in flight wait for that fetch."""
        self.clock.advance(60)
        first, second = self.keys.refresh(), self.keys.refresh()
        assert first is not None and second is not None
        self.assertEqual(len(self.fetch.calls), 2)
        self.fetch.calls[1].callback(jwks_document(("k1", RSA_KEY)))
        self.successResultOf(first)
        self.successResultOf(second)

    def test_encryption_and_unusable_keys_left_out(self) -> None:
        """Keys with use=enc, of other kinds, or that do not load are not signing keys."""
        import json

        encryption = json.loads(jwks_document(("enc", RSA_KEY)))["keys"][0]
        encryption["use"] = "enc"
        keys = parse_jwks(json.dumps({"keys": [
            {"kty": "oct", "k": "c2VjcmV0", "kid": "o"}, {"kty": "RSA", "kid": "bad"}, encryption,
        ]}).encode())
        self.assertEqual(keys, {})


class VerifierTests(SynchronousTestCase):
    """L{Verifier}, with real tokens of each algorithm."""

    def setUp(self) -> None:
        files = KeyFiles(self.mktemp())
        self.clock = clock_at()
        self.auth = config_with(
            f"jwt = required\njwks_url = http://idp/jwks\nhs256_secret_file = {files.secret}\n"
            "algorithms = RS256, ES256, HS256\nissuer = https://idp\naudience = gateway\nleeway = 10\n"
            "agent_claim = agent\n"
        ).auth
        self.fetch = FakeJwks()
        self.jwks = JwksKeys("http://idp/jwks", self.clock, 60.0, self.fetch)
        self.jwks.start()
        self.fetch.calls[0].callback(jwks_document(("k1", RSA_KEY), ("e1", EC_KEY)))
        self.lookups = 0
        keys = Keys(self.auth, self.jwks)
        real = keys.key_for

        def counting(algorithm: str, kid: Optional[str]) -> Any:
            self.lookups += 1
            return real(algorithm, kid)

        keys.key_for = counting  # type: ignore[method-assign]
        self.verifier = Verifier(self.auth, self.clock, keys)

    def token(self, algorithm: str = "RS256", **claims: Any) -> bytes:
        claims.setdefault("iss", "https://idp")
        claims.setdefault("aud", "gateway")
        kid = {"RS256": "k1", "ES256": "e1", "HS256": None}[algorithm]
        return make_token(algorithm=algorithm, kid=claims.pop("kid", kid), **claims)

    def refused(self, token: bytes) -> TokenRefused:
        with self.assertRaises(TokenRefused) as e:
            self.verifier.verify(token)
        return e.exception

    def test_each_algorithm(self) -> None:
        """RS256, ES256 and HS256 tokens verify, and their claims are the identity."""
        for algorithm in ("RS256", "ES256", "HS256"):
            self.assertEqual(
                self.verifier.verify(self.token(algorithm, agent="a1")),
                Identity("t1", "u1", "a1", NOW + 300),
            )

    def test_expired_and_leeway(self) -> None:
        """A token expired by more than the leeway is refused; within it, accepted."""
        self.assertEqual(self.verifier.verify(self.token(exp=int(NOW - 5))).user, "u1")
        self.assertEqual(self.refused(self.token(exp=int(NOW - 11))).reason, "the token has expired")

    def test_not_yet_valid_and_leeway(self) -> None:
        """A token whose nbf is beyond the leeway is refused; within it, accepted."""
        self.assertEqual(self.verifier.verify(self.token(nbf=int(NOW + 5))).user, "u1")
        self.assertEqual(self.refused(self.token(nbf=int(NOW + 11))).reason, "the token is not valid yet")

    def test_wrong_audience_and_issuer(self) -> None:
        """Another audience or another issuer is refused."""
        self.assertEqual(self.refused(self.token(aud="other")).reason, "the token is for another audience")
        self.assertEqual(self.refused(self.token(iss="https://evil")).reason, "the token is from another issuer")

    def test_alg_none(self) -> None:
        """An unsigned token (alg: none) is refused."""
        import jwt

        unsigned = jwt.encode({"sub": "u1", "exp": int(NOW + 60)}, None, algorithm="none").encode()
        self.assertEqual(self.refused(unsigned).error, "invalid_token")
        self.assertIn("'none'", self.refused(unsigned).reason)

    def test_hs256_signed_with_the_public_key(self) -> None:
        """An HS256 token whose secret is the RS256 public key's PEM does not verify."""
        forged = hs256_forged_with(public_pem(RSA_KEY), iss="https://idp", aud="gateway")
        self.assertEqual(self.refused(forged).reason, "the token's signature does not verify")

    def test_hs256_never_checked_against_a_public_key(self) -> None:
        """Without an HS256 secret, an HS256 token is refused before any key is tried."""
        auth = config_with("jwt = required\njwks_url = http://idp/jwks\nalgorithms = RS256\n").auth
        verifier = Verifier(auth, self.clock, Keys(auth, self.jwks))
        with self.assertRaises(TokenRefused) as e:
            verifier.verify(hs256_forged_with(public_pem(RSA_KEY)))
        self.assertEqual(e.exception.reason, "tokens signed with 'HS256' are not accepted")

    def test_bad_signature(self) -> None:
        """A token signed by another key under a known kid is refused."""
        forged = make_token(OTHER_RSA_KEY, iss="https://idp", aud="gateway")
        self.assertEqual(self.refused(forged).reason, "the token's signature does not verify")

    def test_malformed_and_missing_claims(self) -> None:
        """Not a JWT: invalid_request; no exp or no user: invalid_token."""
        self.assertEqual(self.refused(b"not.a.jwt").error, "invalid_request")
        self.assertEqual(self.refused(self.token(exp=None)).reason, "the token has no exp claim")
        self.assertEqual(self.refused(self.token(sub=None)).reason, "the token has no sub claim")
        self.assertIn("control character", self.refused(self.token(sub="u\r\nX-Evil: 1")).reason)

    def test_unknown_kid(self) -> None:
        """A kid the key set does not know is L{UnknownKey} (a refresh may find it)."""
        self.assertRaises(UnknownKey, self.verifier.verify, self.token(kid="k9"))

    def test_cached_until_expiry(self) -> None:
        """A verified token is a cache hit (no key lookup) until it expires; then it is refused."""
        token = self.token(exp=int(NOW + 100))
        self.verifier.verify(token)
        self.verifier.verify(token)
        self.assertEqual(self.lookups, 1)
        self.clock.advance(109)
        self.verifier.verify(token)
        self.assertEqual(self.lookups, 1)
        self.clock.advance(2)
        self.assertEqual(self.refused(token).reason, "the token has expired")

    def test_cache_is_bounded(self) -> None:
        """Beyond its size the least recently used token is forgotten (verified again)."""
        verifier = Verifier(self.auth, self.clock, Keys(self.auth, self.jwks), cache_size=2)
        a, b, c = (self.token(sub=user) for user in ("a", "b", "c"))
        for token in (a, b, a, c):  # b is the least recently used when c comes
            verifier.verify(token)
        self.assertEqual(len(verifier._cache), 2)
        self.lookups = 0
        verifier._keys = self.verifier._keys  # the counting keys
        verifier.verify(a)
        verifier.verify(c)
        self.assertEqual(self.lookups, 0)
        verifier.verify(b)
        self.assertEqual(self.lookups, 1)


class AuthenticateTests(SynchronousTestCase):
    """L{Authenticate}, the stage."""

    def setUp(self) -> None:
        self.files = KeyFiles(self.mktemp())
        self.clock = clock_at()

    def stage(self, extra: str = "", mode: str = "required") -> Authenticate:
        config = config_with(f"jwt = {mode}\npublic_key_file = {self.files.rsa}\n{extra}")
        self.config = config
        return Authenticate(config, self.clock)

    def run_stage(self, stage: Authenticate, uri: bytes = b"/api/aura/x", **headers: str) -> Any:
        call = make_call(uri, **headers)
        call.segments = uri.split(b"?")[0].decode().split("/")[1:]
        return call, stage.run(call.request, call)

    def assertRefused(self, call: Any, answer: Any, status: int, code: str, challenge: Optional[str]) -> None:
        self.assertEqual((answer.status, answer.code), (status, code))
        self.assertEqual(
            call.request.responseHeaders.getRawHeaders(b"www-authenticate"),
            None if challenge is None else [f'Bearer error="{challenge}"'.encode()],
        )

    def test_off_does_nothing(self) -> None:
        """With jwt = off the request goes on untouched, spoofed headers and all."""
        call = make_call(X_User_ID="spoof")
        self.assertIsNone(Authenticate(parse_config(CONFIG, "t.ini"), self.clock).run(call.request, call))
        self.assertEqual(call.request.requestHeaders.getRawHeaders(b"x-user-id"), [b"spoof"])

    def test_missing_token(self) -> None:
        """jwt = required without a token: 401 missing_token, invalid_request challenge."""
        call, answer = self.run_stage(self.stage(), X_Tenant_ID="t1")
        self.assertRefused(call, answer, 401, "missing_token", "invalid_request")

    def test_bad_token(self) -> None:
        """A badly signed token: 401 invalid_token, invalid_token challenge (optional mode too)."""
        for mode in ("required", "optional"):
            call, answer = self.run_stage(
                self.stage(mode=mode), Authorization="Bearer " + make_token(OTHER_RSA_KEY).decode())
            self.assertRefused(call, answer, 401, "invalid_token", "invalid_token")

    def test_optional_without_token_is_anonymous(self) -> None:
        """jwt = optional without a token goes on, with the client's X-User-ID dropped."""
        call, answer = self.run_stage(self.stage(mode="optional"), X_Tenant_ID="t1", X_User_ID="spoof")
        self.assertIsNone(answer)
        self.assertIsNone(call.request.requestHeaders.getRawHeaders(b"x-user-id"))
        self.assertIsNone(call.identity)

    def test_identity_from_the_token(self) -> None:
        """The token's user replaces a spoofed X-User-ID, its tenant fills X-Tenant-ID, its agent X-Agent-ID."""
        token = make_token(agent="a7").decode()
        call, answer = self.run_stage(
            self.stage("agent_claim = agent\n"), Authorization=f"Bearer {token}",
            X_User_ID="admin", X_Agent_ID="spoofed",
        )
        self.assertIsNone(answer)
        headers = call.request.requestHeaders
        self.assertEqual(headers.getRawHeaders(b"x-user-id"), [b"u1"])
        self.assertEqual(headers.getRawHeaders(b"x-tenant-id"), [b"t1"])
        self.assertEqual(headers.getRawHeaders(b"x-agent-id"), [b"a7"])
        self.assertEqual(call.identity, Identity("t1", "u1", "a7", NOW + 300))

    def test_tenant_mismatch(self) -> None:
        """X-Tenant-ID other than the token's tenant: 403 tenant_mismatch, no challenge."""
        call, answer = self.run_stage(
            self.stage(), Authorization="Bearer " + make_token().decode(), X_Tenant_ID="t2")
        self.assertRefused(call, answer, 403, "tenant_mismatch", None)
        call, answer = self.run_stage(
            self.stage(), Authorization="Bearer " + make_token().decode(), X_Tenant_ID="t1")
        self.assertIsNone(answer)

    def test_cookie_token(self) -> None:
        """With token_from = cookie:NAME the token is read from that cookie."""
        call = make_call()
        call.segments = ["api", "aura", "x"]
        call.request.received_cookies = {b"dwp_token": make_token()}
        self.assertIsNone(self.stage("token_from = header, cookie:dwp_token\n").run(call.request, call))
        self.assertEqual(call.request.requestHeaders.getRawHeaders(b"x-user-id"), [b"u1"])

    def test_public_path_skips_verification(self) -> None:
        """A public path needs no token (a bad one is not even looked at), and X-User-ID is dropped."""
        call, answer = self.run_stage(
            self.stage(), b"/api/aura/public/x", Authorization="Bearer junk", X_User_ID="spoof")
        self.assertIsNone(answer)
        self.assertIsNone(call.request.requestHeaders.getRawHeaders(b"x-user-id"))

    def test_two_authorization_headers(self) -> None:
        """Two Authorization headers are a malformed request."""
        call = make_call(Authorization="Bearer a")
        call.request.requestHeaders.addRawHeader(b"authorization", b"Bearer b")
        answer = self.stage().run(call.request, call)
        self.assertRefused(call, answer, 401, "missing_token", "invalid_request")

    def test_unknown_kid_waits_for_the_refresh(self) -> None:
        """A new kid waits for one JWKS fetch, then goes on; a kid still unknown is refused."""
        fetch = FakeJwks()
        config = config_with("jwt = required\njwks_url = http://idp/jwks\njwks_min_refresh = 30\n")
        jwks = JwksKeys("http://idp/jwks", self.clock, 30.0, fetch)
        jwks.start()
        fetch.calls[0].callback(jwks_document(("k1", RSA_KEY)))
        stage = Authenticate(config, self.clock, Keys(config.auth, jwks))
        self.clock.advance(30)
        call = make_call(Authorization="Bearer " + make_token(OTHER_RSA_KEY, kid="k2").decode())
        answer = stage.run(call.request, call)
        self.assertIsInstance(answer, Deferred)
        self.assertIs(answer, call.finished)
        fetch.calls[1].callback(jwks_document(("k1", RSA_KEY), ("k2", OTHER_RSA_KEY)))
        self.assertEqual(asked(call), [("go_on", "Authenticate")])
        self.assertEqual(call.request.requestHeaders.getRawHeaders(b"x-user-id"), [b"u1"])
        # Within jwks_min_refresh another unknown kid is refused at once.
        call = make_call(Authorization="Bearer " + make_token(EC_KEY, "ES256", kid="k3").decode())
        stage = Authenticate(config_with(
            "jwt = required\njwks_url = http://idp/jwks\nalgorithms = RS256, ES256\n"),
            self.clock, Keys(config.auth, jwks))
        answer = stage.run(call.request, call)
        self.assertRefused(call, answer, 401, "invalid_token", "invalid_token")
        self.assertEqual(len(fetch.calls), 2)

    def test_refresh_that_finds_nothing_refuses(self) -> None:
        """A kid still unknown after the refresh is refused through the pipeline."""
        fetch = FakeJwks()
        config = config_with("jwt = required\njwks_url = http://idp/jwks\n")
        jwks = JwksKeys("http://idp/jwks", self.clock, 30.0, fetch)
        stage = Authenticate(config, self.clock, Keys(config.auth, jwks))
        call = make_call(Authorization="Bearer " + make_token().decode())
        stage.run(call.request, call)
        fetch.calls[0].errback(ConnectionError("down"))
        self.assertEqual(asked(call), [("refuse", "invalid_token", True)])
        self.flushLoggedErrors()

    def test_history_records_the_token_identity(self) -> None:
        """The history row's tenant and user are the verified token's."""
        call, answer = self.run_stage(
            self.stage(), Authorization="Bearer " + make_token(sub="u9").decode(), X_User_ID="spoof")
        call.request.requestHeaders.setRawHeaders(b"x-user-id", [b"changed-later"])
        row = Record(self.config.headers, self.clock, None).row(call.request, call)
        self.assertEqual((row.tenant_id, row.user_id), ("t1", "u9"))
