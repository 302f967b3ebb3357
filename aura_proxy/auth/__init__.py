"""
JWT verification at the edge (C{[auth]}, docs/identity.md).

  - L{aura_proxy.auth.tokens}: where a request's token is (header, cookie);
  - L{aura_proxy.auth.keys}: the keys a token may be signed with (a file,
    an HS256 secret), and which key fits which algorithm;
  - L{aura_proxy.auth.jwks}: public keys fetched from a JWKS URL, cached,
    refreshed on an unknown C{kid} at most once per C{jwks_min_refresh};
  - L{aura_proxy.auth.verify}: a token in, an L{Identity} out (or why not),
    verified tokens cached until they expire.

The stage that uses them is L{aura_proxy.stages.auth.Authenticate}.  PyJWT
checks signatures and claims; nothing here hand-writes a signature check.
"""

from aura_proxy.auth.verify import Identity, TokenRefused, UnknownKey, Verifier

__all__ = ["Identity", "TokenRefused", "UnknownKey", "Verifier"]
