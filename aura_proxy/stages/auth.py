"""
JWT verification (C{[auth]}): the caller's identity comes from a verified
token, not from what the client says about itself.

It runs after the route is known (public paths skip it) and before the
header contract's check (L{RequiredHeaders}), so that a token's tenant
satisfies C{required = X-Tenant-ID} when the client sent no such header.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from aura_proxy import errors
from aura_proxy.auth.jwks import JwksKeys, http_fetch
from aura_proxy.auth.keys import Keys, PublicKeys, StaticPublicKey
from aura_proxy.auth.tokens import TokenSources
from aura_proxy.auth.verify import Identity, TokenRefused, UnknownKey, Verifier
from aura_proxy.config import AuthConfig, Config
from aura_proxy.contract import HeaderContract
from aura_proxy.errors import GatewayError
from aura_proxy.stages import GO_ON, Answer, Stage

if TYPE_CHECKING:
    from aura_proxy.call import Call

__all__ = ["Authenticate", "build_keys"]

_TENANT = b"x-tenant-id"
_USER = b"x-user-id"
_AGENT = b"x-agent-id"
_CHALLENGE = {
    "invalid_request": [b'Bearer error="invalid_request"'],
    "invalid_token": [b'Bearer error="invalid_token"'],
}


class Authenticate(Stage):
    """
    With C{[auth] jwt} on: a request's token is verified, and its claims
    become the request's identity headers (C{call.identity}).

      - no token: 401 C{missing_token} (C{jwt = required}), or anonymous
        (C{optional}); a malformed, expired, not-yet-valid or badly signed
        token, or one for another issuer or audience: 401 C{invalid_token};
        both with C{WWW-Authenticate: Bearer error=...}, never upstream;
      - the token's tenant must equal C{X-Tenant-ID} when both are there
        (403 C{tenant_mismatch}), and becomes it when the header is absent;
      - C{X-User-ID} (and C{X-Agent-ID} with C{agent_claim}) are the token's,
        or absent: a client's own value is always dropped, also on public
        paths and for anonymous requests, since upstreams may rely on them;
      - a token whose C{kid} is unknown waits for one JWKS refresh (at most
        one per C{jwks_min_refresh}); the request then goes on or is refused.

    @param keys: the keys (made from C{config} with L{build_keys} when None).
    """

    def __init__(self, config: Config, clock: IReactorTime, keys: Optional[Keys] = None) -> None:
        auth = config.auth
        self._off = auth.jwt == "off"
        if self._off:
            return
        self._required = auth.jwt == "required"
        self._contract = HeaderContract(config.headers)
        self._sources = TokenSources(auth.token_from)
        self._keys = keys if keys is not None else build_keys(auth, clock)
        self._verifier = Verifier(auth, clock, self._keys)
        self._maps_agent = auth.agent_claim is not None

    def run(self, request: Request, call: "Call") -> Answer:
        """Verify the request's token; set its identity headers, or refuse it."""
        if self._off:
            return GO_ON
        if self._contract.is_public(call.segments):
            self._anonymous(request)
            return GO_ON
        try:
            token = self._sources.find(request)
        except TokenRefused as refused:
            return _refusal(request, refused)
        if token is None:
            if self._required:
                return _refusal(request, _MISSING)
            self._anonymous(request)
            return GO_ON
        try:
            identity = self._verifier.verify(token)
        except TokenRefused as refused:
            return _refusal(request, refused)
        except UnknownKey:
            refreshing = self._keys.refresh()
            if refreshing is None:
                return _refusal(request, _UNKNOWN_KEY)
            finished = call.finished = Deferred(call.cancel)
            refreshing.addCallback(self._refreshed, request, call, token)
            return finished
        return self._identify(request, call, identity)

    def _refreshed(self, _: None, request: Request, call: "Call", token: bytes) -> None:
        """The key set was fetched again: verify once more, then go on or refuse."""
        if call.client_gone:
            call.status = 499
            call.pipeline.end(request, call)
            return
        try:
            answer = self._identify(request, call, self._verifier.verify(token))
        except TokenRefused as refused:
            answer = _refusal(request, refused)
        except UnknownKey:
            answer = _refusal(request, _UNKNOWN_KEY)
        if answer is None:
            call.pipeline.go_on(request, call, after=self)
        else:
            call.pipeline.refuse(request, call, answer)

    def _identify(self, request: Request, call: "Call", identity: Identity) -> Optional[GatewayError]:
        headers = request.requestHeaders
        if identity.tenant is not None:
            tenant = identity.tenant.encode("utf-8")
            sent = headers.getRawHeaders(_TENANT)
            if sent and any(value.strip() != tenant for value in sent):
                return errors.tenant_mismatch()
            headers.setRawHeaders(_TENANT, [tenant])
        headers.setRawHeaders(_USER, [identity.user.encode("utf-8")])
        if self._maps_agent:
            if identity.agent is None:
                headers.removeHeader(_AGENT)
            else:
                headers.setRawHeaders(_AGENT, [identity.agent.encode("utf-8")])
        call.identity = identity
        return None

    def _anonymous(self, request: Request) -> None:
        """No verified identity: the identity headers a token would set are not the client's to set."""
        headers = request.requestHeaders
        headers.removeHeader(_USER)
        if self._maps_agent:
            headers.removeHeader(_AGENT)


_MISSING = TokenRefused("invalid_request", "a bearer token is required")
_UNKNOWN_KEY = TokenRefused("invalid_token", "the token's signing key (kid) is unknown")


def _refusal(request: Request, refused: TokenRefused) -> GatewayError:
    """The 401 of a refused token, its C{WWW-Authenticate} challenge set on the response."""
    request.responseHeaders.setRawHeaders(b"www-authenticate", _CHALLENGE[refused.error])
    if refused.error == "invalid_request":
        return errors.missing_token(refused.reason)
    return errors.invalid_token(refused.reason)


def build_keys(config: AuthConfig, reactor: Any) -> Keys:
    """
    The keys of C{[auth]}: a JWKS URL's (fetched now, through C{reactor}),
    a public key file's, and the HS256 secret.
    """
    public: Optional[PublicKeys] = None
    if config.jwks_url:
        jwks = JwksKeys(config.jwks_url, reactor, config.jwks_min_refresh, http_fetch(reactor))
        jwks.start()
        public = jwks
    elif config.public_key_pem is not None:
        public = StaticPublicKey(config.public_key_pem)
    return Keys(config, public)
