"""
Upstreams that only trust the gateway, end to end: a FastAPI service with
L{GatewaySignatureMiddleware} (L{tests.integration.trusted_app}) behind a
real gateway with C{[upstream_trust] key_file}.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from typing import Any

from twisted.trial.unittest import TestCase

from tests.integration.gateway import client, gateway_ini, parse_events, sleep, start_gateway
from tests.integration.upstreams import start_fastapi_upstream

TENANT = {"X-Tenant-ID": "t1"}


def new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode("ascii")


class TrustedUpstreamTests(TestCase):
    """The service answers through the gateway and refuses everyone else."""

    def key_file(self, *keys: str) -> str:
        path = os.path.abspath(self.mktemp())  # the service runs in another directory
        with open(path, "w") as f:
            f.write("# current, then previous\n" + "\n".join(keys) + "\n")
        return path

    def start(self, upstream_keys: str, max_skew: str = "30") -> int:
        """The trusted service holding the keys of file C{upstream_keys}; its port."""
        return start_fastapi_upstream(
            self,
            app="tests.integration.trusted_app:app",
            env={"AURA_TEST_KEY_FILE": upstream_keys, "AURA_TEST_MAX_SKEW": max_skew},
        )

    def gateway(self, upstream_port: int, gateway_keys: str) -> str:
        """A gateway signing with the keys of file C{gateway_keys}; its base URL."""
        port, _ = start_gateway(
            self, gateway_ini(upstream_port, extra=f"\n[upstream_trust]\nkey_file = {gateway_keys}\n"))
        return f"http://127.0.0.1:{port}"

    async def get(self, url: str, headers: Any = None) -> tuple[int, bytes]:
        http, _ = client()
        response = await http.get(url, headers=headers)
        return response.code, await response.content()

    async def test_through_the_gateway_only(self) -> None:
        """Through the gateway JSON and an SSE stream answer; called directly, 401 with a JSON body."""
        keys = self.key_file(new_key())
        upstream = self.start(keys)
        gateway = self.gateway(upstream, keys)

        code, body = await self.get(f"{gateway}/api/aura/echo/a%20b?x=1&y=2", TENANT)
        self.assertEqual(code, 200, body)
        code, body = await self.get(f"{gateway}/api/aura/stream?count=3&interval=0.01", TENANT)
        self.assertEqual(code, 200, body)
        self.assertEqual([json.loads(e["data"])["token"] for e in parse_events(body) if e.get("event") == "token"],
                         ["tok1", "tok2", "tok3"])

        for path in ("/api/aura/echo/a%20b?x=1&y=2", "/api/aura/stream?count=3&interval=0.01"):
            code, body = await self.get(f"http://127.0.0.1:{upstream}{path}", TENANT)
            self.assertEqual(code, 401, body)
            self.assertEqual(json.loads(body)["error"]["code"], "invalid_gateway_signature")

    async def test_replayed_signature_refused(self) -> None:
        """A signature taken off a forwarded request is refused on another path, and once it is old."""
        keys = self.key_file(new_key())
        upstream = self.start(keys, max_skew="1")
        gateway = self.gateway(upstream, keys)
        code, body = await self.get(f"{gateway}/api/aura/echo/one", TENANT)
        self.assertEqual(code, 200, body)
        [signature] = [v for k, v in json.loads(body)["headers"] if k == "x-dwp-gateway-signature"]
        stolen = dict(TENANT, **{"X-DWP-Gateway-Signature": signature})

        code, body = await self.get(f"http://127.0.0.1:{upstream}/api/aura/echo/two", stolen)
        self.assertEqual(code, 401, body)
        await sleep(2.2)  # past max_skew = 1
        code, body = await self.get(f"http://127.0.0.1:{upstream}/api/aura/echo/one", stolen)
        self.assertEqual(code, 401, body)
        self.assertIn("too old", json.loads(body)["error"]["message"])

    async def test_rotation(self) -> None:
        """The service holding new and old keys answers a gateway on the old key and one on the new."""
        old, new = new_key(), new_key()
        upstream = self.start(self.key_file(new, old))
        for gateway_keys in (self.key_file(old), self.key_file(new, old)):
            gateway = self.gateway(upstream, gateway_keys)
            code, body = await self.get(f"{gateway}/api/aura/stream?count=2&interval=0.01", TENANT)
            self.assertEqual(code, 200, body)
        # A gateway on a key the service does not hold (yet) is refused.
        gateway = self.gateway(upstream, self.key_file(new_key()))
        code, body = await self.get(f"{gateway}/api/aura/echo", TENANT)
        self.assertEqual(code, 401, body)
