"""
Health, readiness, the admin token and the access log of a gateway run as
operators run it: C{twistd -n aura-proxy --config FILE}, a subprocess on
free ports, with the FastAPI upstream.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone

from tests.integration.gateway import ChunkCollector, client, parse_events, sleep, twistd_ini, wait_until
from tests.integration.upstreams import free_port, start_fastapi_upstream, start_process, tail

TWISTD = str(Path(sys.executable).with_name("twistd"))
TENANT = {b"X-Tenant-ID": [b"t1"]}
TOKEN = "integration-admin-token-0123456789"


def get(url: str, headers: Optional[dict[str, str]] = None, timeout: float = 10.0) -> tuple[int, Any, dict[str, str]]:
    """A blocking GET: status, body (JSON decoded when it is JSON) and headers."""
    host, _, rest = url.partition("//")[2].partition("/")
    name, _, port = host.partition(":")
    conn = http.client.HTTPConnection(name, int(port), timeout=timeout)
    try:
        conn.request("GET", "/" + rest, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
        kind = response.getheader("content-type") or ""
        body = json.loads(raw) if kind.startswith("application/json") else raw
        return response.status, body, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


class TwistdHealthAccessTests(TestCase):
    """Each test runs its own twistd and FastAPI upstream."""

    timeout = 60

    def setUp(self) -> None:
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir(parents=True)
        self.listen, self.admin = free_port(), free_port()

    def start(self, sections: str, gateway: str = "", ready: str = "/healthz",
              headers: Optional[dict[str, str]] = None) -> subprocess.Popen[bytes]:
        """twistd with the test configuration plus C{sections}; returns once the admin site answers."""
        self.up = start_fastapi_upstream(self)
        path = self.workdir / "gateway.ini"
        path.write_text(twistd_ini(self.listen, self.admin, self.up, gateway=gateway, sections=sections))
        return start_process(
            self, [TWISTD, "-n", "--pidfile=", "aura-proxy", "--config", str(path)],
            f"http://127.0.0.1:{self.admin}{ready}", cwd=self.workdir, timeout=30,
        )

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin}{path}"

    async def stream(self, path: str) -> list[dict[str, str]]:
        """The events of an SSE stream through the gateway, read to its end."""
        http_client, _ = client()
        response = await http_client.get(f"http://127.0.0.1:{self.listen}{path}", headers=TENANT, unbuffered=True)
        self.assertEqual(response.code, 200)
        collector = ChunkCollector()
        response.deliverBody(collector)
        await collector.done
        self.assertTrue(collector.reason.check(ResponseDone), collector.reason)
        return parse_events(collector.body)

    def call(self, path: str) -> str:
        """A plain GET through the gateway; its X-Request-ID."""
        status, _, headers = get(f"http://127.0.0.1:{self.listen}{path}", {"X-Tenant-ID": "t1"})
        self.assertEqual(status, 200)
        return headers["x-request-id"]

    @staticmethod
    def lines(path: Path) -> list[dict[str, Any]]:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines()]

    # -- health ----------------------------------------------------------------

    async def test_ready(self) -> None:
        """
        /healthz answers 200; /readyz answers 200 once config, listening,
        history and resume (memory) pass, each named in the JSON body.
        """
        self.start("[history]\nenabled = true\n[sse]\nresume = memory\n[log]\naccess = off\n")
        self.assertEqual(get(self.admin_url("/healthz"))[0], 200)

        def ready() -> Any:
            status, body, _ = get(self.admin_url("/readyz"))
            return body if status == 200 else None

        body = await wait_until(ready, 20, "/readyz did not answer 200")
        self.assertEqual(body["status"], "ready")
        self.assertEqual(list(body["checks"]), ["config", "listening", "history", "resume"])
        self.assertTrue(all(check["ok"] for check in body["checks"].values()))

    async def test_redis_unreachable(self) -> None:
        """resume = redis:// with nothing listening: /readyz is 503 and names the resume check; /healthz stays 200."""
        dead = free_port()
        self.start(f"[history]\nenabled = false\n[sse]\nresume = redis://127.0.0.1:{dead}/0\n[log]\naccess = off\n")
        status, body, _ = get(self.admin_url("/readyz"))
        self.assertEqual(status, 503, body)
        self.assertEqual(body["failing"], ["resume"])
        self.assertEqual(body["checks"]["resume"]["store"], f"redis 127.0.0.1:{dead}")
        self.assertFalse(body["checks"]["resume"]["ok"])
        self.assertEqual(get(self.admin_url("/healthz"))[0], 200)

    async def test_redis_reachable(self) -> None:
        """resume = redis:// with the shared Redis up: the resume check passes."""
        self.start("[history]\nenabled = false\n[sse]\nresume = redis://127.0.0.1:6379/0\n[log]\naccess = off\n")
        status, body, _ = get(self.admin_url("/readyz"))
        self.assertEqual(body["checks"]["resume"], {"ok": True, "store": "redis 127.0.0.1:6379"})
        self.assertEqual(status, 200, body)

    async def test_history_failing(self) -> None:
        """A history database that cannot be reached: /readyz is 503 naming the history check (rows spool)."""
        dead = free_port()
        self.start(
            f"[history]\nenabled = true\ndsn = postgresql://aura@127.0.0.1:{dead}/nothing\n"
            "[sse]\nresume = off\n[log]\naccess = off\n"
        )

        def failing() -> Any:
            status, body, _ = get(self.admin_url("/readyz"))
            return body if status == 503 else None

        body = await wait_until(failing, 20, "/readyz did not answer 503")
        self.assertEqual(body["failing"], ["history"])
        self.assertFalse(body["checks"]["history"]["db_up"])

    async def test_admin_token(self) -> None:
        """
        With [admin] token_file, every admin path answers 401 JSON without
        the token, and serves with it.
        """
        token_file = self.workdir / "admin.token"
        token_file.write_text(TOKEN + "\n")
        self.start(f"[history]\nenabled = false\n[log]\naccess = off\n[admin]\ntoken_file = {token_file}\n")
        for path in ("/healthz", "/readyz", "/metrics", "/"):
            status, body, headers = get(self.admin_url(path))
            self.assertEqual(status, 401, path)
            self.assertEqual(body["error"]["code"], "admin_token_required")
            self.assertEqual(headers["www-authenticate"], 'Bearer realm="aura-proxy admin"')
            self.assertEqual(get(self.admin_url(path), {"Authorization": "Bearer nope"})[0], 401)
        status, body, _ = get(self.admin_url("/healthz"), {"Authorization": f"Bearer {TOKEN}"})
        self.assertEqual((status, body["status"]), (200, "ok"))

    # -- access log ------------------------------------------------------------

    async def test_access_log_file_and_logrotate(self) -> None:
        """
        access = PATH, format = json: one line per call with its request id
        (the X-Request-ID the client got), and one per stream at its end with
        its events; after the file is moved and SIGUSR1 sent, new lines go to
        a new file at the path, none to the moved one.
        """
        log = self.workdir / "access.log"
        process = self.start(f"[history]\nenabled = false\n[sse]\nresume = off\n[log]\naccess = {log}\nformat = json\n")
        first = self.call("/api/aura/json")
        events = await self.stream("/api/aura/stream?count=3&interval=0.01")
        lines = await wait_until(lambda: len(self.lines(log)) >= 2 and self.lines(log), 15, "no access lines")
        self.assertEqual(len(lines), 2, lines)
        plain, stream = lines
        self.assertEqual((plain["request_id"], plain["path"], plain["status_code"], plain["is_stream"]),
                         (first, "/api/aura/json", 200, False))
        self.assertEqual(plain["tenant_id"], "t1")
        self.assertEqual((stream["is_stream"], stream["event_count"], stream["end_reason"]),
                         (True, len(events), "completed"))

        rotated = self.workdir / "access.log.1"
        os.rename(log, rotated)
        os.kill(process.pid, signal.SIGUSR1)
        await wait_until(log.exists, 15, "the access log was not reopened")
        second = self.call("/api/aura/json")
        [line] = await wait_until(lambda: self.lines(log), 15, "no line in the new file")
        self.assertEqual(line["request_id"], second)
        self.assertEqual(len(self.lines(rotated)), 2)
        self.assertIn("access log: reopened", tail(process.log_path))  # type: ignore[attr-defined]

    async def test_stream_line_at_its_end(self) -> None:
        """
        A stream writes nothing to the access log while it runs (not per
        event, not per flush), and one line when it ends: here when the
        client leaves, with the events it got so far.
        """
        log = self.workdir / "access.log"
        self.start(
            "[history]\nenabled = false\n[sse]\ninject_ids = true\nresume = off\n"
            f"on_client_disconnect = cancel\n[log]\naccess = {log}\nformat = json\n"
        )
        http_client, _ = client()
        response = await http_client.get(
            f"http://127.0.0.1:{self.listen}/api/aura/endless?interval=0.05", headers=TENANT, unbuffered=True)
        self.assertEqual(response.code, 200)
        collector = ChunkCollector()
        response.deliverBody(collector)
        await collector.wait_for(lambda body: body.count(b"event: tick") >= 5)
        # Several flushes of the writer pass while the stream runs.
        await sleep(2.5)
        self.assertEqual(self.lines(log), [])
        collector.abort()
        await collector.done
        [line] = await wait_until(lambda: self.lines(log), 15, "no line after the stream ended")
        self.assertEqual((line["is_stream"], line["path"], line["end_reason"]),
                         (True, "/api/aura/endless", "client_disconnect"))
        self.assertGreaterEqual(line["event_count"], 5)

    async def test_access_log_text_on_stdout(self) -> None:
        """The shipped default (access = stdout, format = text): one text line per call in the process output."""
        process = self.start("[history]\nenabled = false\n")
        request_id = self.call("/api/aura/json?x=1")

        def logged() -> Any:
            return [line for line in tail(process.log_path, 100000).splitlines()  # type: ignore[attr-defined]
                    if f"id={request_id} " in line]

        [line] = await wait_until(logged, 15, "no access line on stdout")
        self.assertIn(' "GET /api/aura/json?x=1" 200 ', line)
        self.assertIn(' tenant="t1" ', line)
        # twisted.web's combined log line is gone.
        self.assertNotIn('"GET /api/aura/json?x=1 HTTP/1.1"', tail(process.log_path, 100000))  # type: ignore[attr-defined]

    async def test_workers_reopen(self) -> None:
        """
        workers = 2, access = PATH: both workers append to the file; SIGUSR1
        to the parent reaches every worker, and after it every line goes to
        the new file.
        """
        log = self.workdir / "access.log"
        process = self.start(
            f"[history]\nenabled = false\n[sse]\nresume = off\n[log]\naccess = {log}\nformat = json\n",
            gateway="workers = 2",
        )

        def workers_ready() -> Any:
            status, body, _ = get(self.admin_url("/readyz"))
            return status == 200 and body["checks"]["workers"]["alive"] == 2

        await wait_until(workers_ready, 30, "the workers did not start")
        # Both workers serve (new connections spread over them); a call may
        # reach a worker still starting, so wait until the calls went through.
        before = [self.call("/api/aura/json") for _ in range(20)]
        await wait_until(lambda: len(self.lines(log)) >= 20, 15, "lines missing before rotation")
        os.rename(log, self.workdir / "access.log.1")
        os.kill(process.pid, signal.SIGUSR1)
        await wait_until(log.exists, 15, "the access log was not reopened")
        await wait_until(
            lambda: tail(process.log_path, 100000).count("access log: reopened") >= 2,  # type: ignore[attr-defined]
            15, "not every worker reopened the access log",
        )
        after = [self.call("/api/aura/json") for _ in range(20)]
        lines = await wait_until(lambda: len(self.lines(log)) >= 20 and self.lines(log), 15, "lines missing after rotation")
        self.assertEqual(sorted(line["request_id"] for line in lines), sorted(after))
        self.assertEqual(sorted(line["request_id"] for line in self.lines(self.workdir / "access.log.1")),
                         sorted(before))
