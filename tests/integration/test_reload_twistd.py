"""
Reload as operators do it: C{twistd -n aura-proxy --config FILE} in front of
the FastAPI upstream, many SSE streams open, the file changed, and SIGHUP
(C{python -m aura_proxy reload PIDFILE}) or C{POST /reload} on the admin port;
then the same with C{workers = 2}.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from twisted.trial.unittest import TestCase

from tests.integration.gateway import twistd_ini
from tests.integration.sse_threads import SseClient, post_json, request
from tests.integration.upstreams import free_port, start_fastapi_upstream, start_process

TWISTD = str(Path(sys.executable).with_name("twistd"))

#: Open streams during the reload (the issue asks 200; CI machines are small).
STREAMS = int(os.environ.get("AURA_PROXY_RELOAD_STREAMS", "50"))
#: Events per stream, one every INTERVAL seconds: the streams outlive the reloads.
EVENTS, INTERVAL = 80, 0.05

NEW_ROUTE = "[route:new]\npath = /api/new/**\nupstream = http://127.0.0.1:{upstream}/api/aura\nstrip_prefix = 2\n\n"


class ReloadBase(TestCase):
    """One twistd gateway per test, with a pid file."""

    timeout = 120
    workers = 1

    def sections(self) -> str:
        return "[history]\nenabled = false\n\n[sse]\nresume = off\n\n"

    def setUp(self) -> None:
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir(parents=True)
        self.listen, self.admin = free_port(), free_port()
        self.upstream = start_fastapi_upstream(self)
        self.path = self.workdir / "gateway.ini"
        self.pidfile = self.workdir / "twistd.pid"
        self.path.write_text(self.text())
        self.gateway = start_process(
            self,
            [TWISTD, "-n", f"--pidfile={self.pidfile}", "aura-proxy", "--config", str(self.path)],
            f"http://127.0.0.1:{self.admin}/healthz",
            cwd=self.workdir,
        )
        if self.workers > 1:
            from tests.integration.upstreams import get_json

            self.wait_for(lambda: sum(w["alive"] for w in get_json(
                f"http://127.0.0.1:{self.admin}/healthz")["workers"]) == self.workers, "the workers up")

    def text(self, extra: str = "") -> str:
        gateway = "drain_timeout = 0\n" + (f"workers = {self.workers}\n" if self.workers > 1 else "")
        return twistd_ini(self.listen, self.admin, self.upstream, gateway=gateway,
                          sections=extra + self.sections())

    def log(self) -> str:
        return Path(self.gateway.log_path).read_text()  # type: ignore[attr-defined]

    def wait_for(self, condition: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}; log:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def status(self, path: str) -> int:
        return request(self.listen, "GET", path, {"X-Tenant-ID": "t1"})[0]


class SingleProcessTests(ReloadBase):
    """One gateway process."""

    def test_reload_under_open_streams(self) -> None:
        """
        With STREAMS streams open, a reload by SIGHUP (the reload command)
        adds a route that answers at once, and every stream goes on to its
        end with all its events in order; an invalid file then changes
        nothing (the new route still answers) and the log names the problem;
        POST /reload answers 200 or 400 with the result.
        """
        self.assertEqual(self.status("/api/new/json"), 404)
        clients = [
            SseClient(self.listen, f"/api/aura/stream?count={EVENTS}&interval={INTERVAL}",
                      {"X-Tenant-ID": "t1", "Accept": "text/event-stream"})
            for _ in range(STREAMS)
        ]
        for client in clients:
            client.start()
        self.wait_for(lambda: all(c.indexes for c in clients), "every stream's first event")

        self.path.write_text(self.text(NEW_ROUTE.format(upstream=self.upstream)))
        reloaded = subprocess.run(
            [sys.executable, "-m", "aura_proxy", "reload", str(self.pidfile)],
            capture_output=True, text=True, timeout=30,
        )
        self.assertEqual(reloaded.returncode, 0, reloaded.stderr)
        self.wait_for(lambda: self.status("/api/new/json") == 200, "the new route")
        self.assertIn("reloaded", self.log())

        self.path.write_text(self.text(NEW_ROUTE.format(upstream=self.upstream)) +
                             "[limits]\nmax_streams_total = lots\n")
        os.kill(self.gateway.pid, signal.SIGHUP)
        self.wait_for(lambda: "[limits] max_streams_total" in self.log(), "the refusal in the log")
        self.assertIn("refused", self.log())
        self.assertEqual(self.status("/api/new/json"), 200)
        status, body = post_json(self.admin, "/reload")
        self.assertEqual(status, 400)
        self.assertEqual(body["status"], "refused")
        self.assertIn("[limits] max_streams_total: expected a whole number", body["problems"][0])

        self.path.write_text(self.text())
        status, body = post_json(self.admin, "/reload")
        self.assertEqual((status, body["status"], body["routes"]), (200, "reloaded", 1))
        self.assertEqual(self.status("/api/new/json"), 404)

        for client in clients:
            client.join(60)
        for client in clients:
            self.assertIsNone(client.error)
            self.assertEqual(client.status, 200)
            self.assertEqual(client.indexes, list(range(1, EVENTS + 1)))
            self.assertTrue(client.done)
        # No stall either: the longest silence of any stream (events every
        # INTERVAL s) stays far below a reconnect's (generous under CI load).
        longest = max(c.longest_gap for c in clients)
        print(f"\n{STREAMS} streams through 3 reloads: longest silence between events {longest:.3f}s")
        self.assertLess(longest, 5.0)
        self.assertTrue(self.gateway.poll() is None, "the gateway still runs")


class WorkersTests(ReloadBase):
    """workers = 2: the parent forwards the reload to both workers."""

    workers = 2

    def test_both_workers_reload(self) -> None:
        """POST /reload on the parent reaches both workers: each logs it, and the new route answers."""
        self.path.write_text(self.text(NEW_ROUTE.format(upstream=self.upstream)))
        status, body = post_json(self.admin, "/reload")
        self.assertEqual((status, body["status"], body["workers"]), (200, "reloaded", 2))

        def both_logged() -> bool:
            lines = [line for line in self.log().splitlines() if "reloaded" in line]
            return all(any(f"[worker-{i}" in line for line in lines) for i in (1, 2))

        self.wait_for(both_logged, "both workers' reload lines")
        self.assertEqual([self.status("/api/new/json") for _ in range(20)], [200] * 20)

    def test_sighup_to_the_parent(self) -> None:
        """SIGHUP to the parent (the pid file's) reloads both workers; an invalid file reaches neither."""
        self.path.write_text(self.text(NEW_ROUTE.format(upstream=self.upstream)) + "[bogus]\n")
        os.kill(self.gateway.pid, signal.SIGHUP)
        self.wait_for(lambda: "[bogus]: unknown section" in self.log(), "the refusal")
        self.assertEqual(self.status("/api/new/json"), 404)
        self.path.write_text(self.text(NEW_ROUTE.format(upstream=self.upstream)))
        os.kill(int(self.pidfile.read_text()), signal.SIGHUP)
        self.wait_for(lambda: sum("reloaded" in line and "[worker-" in line
                                  for line in self.log().splitlines()) >= 2, "both workers' reload lines")
        self.assertEqual([self.status("/api/new/json") for _ in range(20)], [200] * 20)
