"""
The test upstream (L{tests.integration.upstream_app}) behind
L{GatewaySignatureMiddleware}, as a FastAPI service like Aura adds it: it
answers only what the gateway signed.

Its key file and allowed clock skew come from the environment
(C{AURA_TEST_KEY_FILE}, C{AURA_TEST_MAX_SKEW}); C{/api/aura/json} is exempt, so
that readiness polling and health checks need no signature.
"""

from __future__ import annotations

import os

from aura_proxy.upstream_trust import GatewaySignatureMiddleware
from tests.integration.upstream_app import app

__all__ = ["app"]

# The two lines a service adds (exempt_paths and max_skew are optional).
app.add_middleware(
    GatewaySignatureMiddleware,
    key_file=os.environ["AURA_TEST_KEY_FILE"],
    max_skew=float(os.environ.get("AURA_TEST_MAX_SKEW", "30")),
    exempt_paths=["/api/aura/json"],
)
