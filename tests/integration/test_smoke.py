"""
The end-to-end smoke: a real C{twistd aura-proxy} in front of a real FastAPI +
sse-starlette upstream, one JSON call and one SSE stream.

C{.ci/run} runs this module against the floor of the Twisted range in
setup.py too (and every integration test with C{AURA_PROXY_FAST_PATH=off}),
so the gateway is seen to start and serve on every Twisted it claims.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import twisted
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone

from tests.integration.gateway import ChunkCollector, client, parse_events, twistd_ini
from tests.integration.test_twistd import TWISTD
from tests.integration.upstream_app import JSON_DOC
from tests.integration.upstreams import free_port, get_json, start_fastapi_upstream, start_process

TENANT = {b"X-Tenant-ID": [b"t1"]}


class SmokeTests(TestCase):
    """One gateway process, as operators start it, serving what Aura serves."""

    timeout = 60

    async def test_jsonAndStream(self) -> None:
        """
        Under twistd, on this Twisted: a JSON call comes back whole with its
        request id; an SSE stream comes back event by event with the
        gateway's own ids, to its end; /healthz answers; the start-up line
        says which fast paths are on.
        """
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        listen, admin = free_port(), free_port()
        up = start_fastapi_upstream(self)
        config = workdir / "gateway.ini"
        config.write_text(twistd_ini(listen, admin, up, sections=f"[history]\ndsn = sqlite:///{workdir}/h.db\n"))
        process = start_process(
            self, [TWISTD, "-n", "--pidfile=", "aura-proxy", "--config", str(config)],
            f"http://127.0.0.1:{admin}/healthz", cwd=workdir,
        )
        self.assertEqual(get_json(f"http://127.0.0.1:{admin}/healthz")["status"], "ok")

        http, _ = client()
        response = await http.get(f"http://127.0.0.1:{listen}/api/aura/json", headers=TENANT)
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(await response.content()), JSON_DOC)
        self.assertTrue(response.headers.getRawHeaders(b"x-request-id"))

        response = await http.get(
            f"http://127.0.0.1:{listen}/api/aura/stream?count=5&interval=0.01",
            headers=TENANT, unbuffered=True,
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream; charset=utf-8"])
        collector = ChunkCollector()
        response.deliverBody(collector)
        await collector.done
        self.assertTrue(collector.reason.check(ResponseDone), collector.reason)
        events = parse_events(collector.body)
        tokens = [e for e in events if e.get("event") == "token"]
        self.assertEqual(len(tokens), 5)
        # The gateway's ids: STREAM.SEQ, the upstream's id carried after it.
        self.assertEqual([e["id"].split(".")[1] for e in tokens], ["1", "2", "3", "4", "5"])
        self.assertEqual(events[-1]["event"], "done")

        log = Path(process.log_path).read_text()
        self.assertRegex(log, re.compile(r"hot path: fast_path = (on|off)"), f"Twisted {twisted.__version__}")
