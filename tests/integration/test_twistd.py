"""
The gateway as operators run it: C{twistd -n aura-proxy}, the C{.tac} file
and C{python -m aura_proxy check}, as subprocesses on free ports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import ResponseDone

from tests.integration.gateway import (
    HOT_PATH, ChunkCollector, client, parse_events, twistd_ini, wait_until,
)
from tests.integration.upstreams import (
    REPO_ROOT,
    free_port,
    get_json,
    start_fastapi_upstream,
    start_process,
    tail,
)

TWISTD = str(Path(sys.executable).with_name("twistd"))
TENANT = {b"X-Tenant-ID": [b"t1"]}


def config_text(listen: int, admin: int, upstream_port: int, extra: str = "", gateway: str = "") -> str:
    return twistd_ini(listen, admin, upstream_port, gateway=gateway, sections=(
        "[history]\nenabled = false\n\n"
        f"[sse]\ninject_ids = false\nresume = off\non_client_disconnect = cancel\n{extra}"))



class TwistdTests(TestCase):
    """Each test runs its own twistd (and, where needed, FastAPI upstream)."""

    timeout = 30

    def setUp(self) -> None:
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir(parents=True)
        self.listen, self.admin = free_port(), free_port()

    def write_config(self, text: str, name: str = "gateway.ini") -> str:
        path = self.workdir / name
        path.write_text(text)
        return str(path)

    def start_twistd(self, config: str, *extra: str) -> subprocess.Popen[bytes]:
        return start_process(
            self,
            [TWISTD, "-n", "--pidfile=", "aura-proxy", "--config", config, *extra],
            f"http://127.0.0.1:{self.admin}/healthz",
            cwd=self.workdir,
        )

    def run_twistd(self, config: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [TWISTD, "-n", "--pidfile=", "aura-proxy", "--config", config],
            cwd=self.workdir, capture_output=True, text=True, timeout=20,
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        )

    async def stream(self, path: str) -> list[dict[str, str]]:
        http, _ = client()
        response = await http.get(
            f"http://127.0.0.1:{self.listen}{path}", headers=TENANT, unbuffered=True
        )
        self.assertEqual(response.code, 200)
        collector = ChunkCollector()
        response.deliverBody(collector)
        await collector.done
        self.assertTrue(collector.reason.check(ResponseDone), collector.reason)
        return parse_events(collector.body)

    async def test_healthAndStream(self) -> None:
        """
        twistd -n aura-proxy --config FILE answers /healthz on the admin port
        with 200 JSON (status ok, no active stream) and relays an SSE stream
        from the upstream on the public port.
        """
        up = start_fastapi_upstream(self)
        process = self.start_twistd(self.write_config(config_text(self.listen, self.admin, up)))
        health = get_json(f"http://127.0.0.1:{self.admin}/healthz")
        self.assertEqual(health["status"], "ok")
        self.assertEqual(health["active_streams"], 0)
        events = await self.stream("/api/aura/stream?count=3&interval=0.01")
        self.assertEqual([e.get("id") for e in events], ["1", "2", "3", None])
        self.assertEqual(events[-1]["event"], "done")
        # The process is tuned for the hot path, and says so once.
        self.assertEqual(Path(process.log_path).read_text().count(HOT_PATH), 1)

    async def test_demo(self) -> None:
        """
        twistd aura-proxy --demo serves the demo agent's stream through the
        gateway (the demo listens on 127.0.0.1:9000).
        """
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.bind(("127.0.0.1", 9000))
        except OSError:
            raise SkipTest("port 9000 (the demo agent's fixed port) is busy on this machine")
        finally:
            probe.close()
        self.start_twistd(self.write_config(config_text(self.listen, self.admin, 9000)), "--demo")
        events = await self.stream("/api/aura/chat/stream?q=hello+twisted")
        tokens = [e for e in events if e.get("event") == "token"]
        self.assertGreater(len(tokens), 2)
        self.assertEqual([e["id"] for e in tokens], [str(i) for i in range(1, len(tokens) + 1)])
        self.assertEqual(events[-1]["event"], "done")

    def test_invalidConfigs(self) -> None:
        """
        An invalid configuration (unknown key, bad value, duplicate route
        path, route without upstream, no route at all) makes twistd exit 1
        with only the problems on stderr, each naming the file, the section
        and the key: not twistd's usage text.
        """
        base = config_text(self.listen, self.admin, 1)
        cases = {
            "unknown": (base.replace("heartbeat_interval = 0", "heartbeat_interval = 0\nbogus_key = 1"),
                        "[gateway] bogus_key", "unknown key"),
            "badvalue": (base.replace("heartbeat_interval = 0", "idle_timeout = soon"),
                         "[gateway] idle_timeout", "soon"),
            "duplicate": (base + "\n[route:again]\npath = /api/aura/**\nupstream = http://127.0.0.1:2\n",
                          "[route:again] path", "duplicate route"),
            "noupstream": (base + "\n[route:lonely]\npath = /api/lonely/**\n",
                           "[route:lonely] upstream", "missing"),
            "noroute": (base.split("[route:aura]")[0] + "[headers]\nrequired = X-Tenant-ID\n",
                        "[route:NAME]", "no route"),
        }
        for name, (text, where, what) in cases.items():
            path = self.write_config(text, f"{name}.ini")
            result = self.run_twistd(path)
            output = result.stdout + result.stderr
            self.assertEqual(result.returncode, 1, f"{name}: twistd started: {output}")
            self.assertIn(f"{path}: {where}", output, name)
            self.assertIn(what, output, name)
            self.assertNotIn("Usage:", output, name)
            self.assertEqual(result.stdout, "", name)
            lines = result.stderr.splitlines()
            self.assertTrue(lines and all(line.startswith(f"{path}: [") for line in lines), (name, lines))

    def test_checkCommand(self) -> None:
        """
        python -m aura_proxy check: 0 and "FILE: OK (n routes)" for a valid
        file; 1 and "FILE: [section] key: ..." on stderr for an invalid one;
        2 and the usage without a file.
        """
        good = self.write_config(config_text(self.listen, self.admin, 1), "good.ini")
        bad = self.write_config("[gateway]\nconnect_timeout = -1\n", "bad.ini")

        def check(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "aura_proxy", "check", *args],
                cwd=self.workdir, capture_output=True, text=True, timeout=20,
            )

        result = check(good)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), f"{good}: OK (1 routes)")
        result = check(bad)
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"{bad}: [gateway] connect_timeout:", result.stderr)
        result = check(good, bad)
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"{good}: OK", result.stdout)
        result = check()
        self.assertEqual(result.returncode, 2)
        self.assertIn("usage:", result.stderr)
        # A file without any route can serve nothing: refused, not "OK (0 routes)".
        empty = self.write_config(
            f"[gateway]\nlisten = tcp:{self.listen}\nadmin_listen = tcp:{self.admin}\n", "empty.ini")
        result = check(empty)
        self.assertEqual((result.returncode, result.stdout), (1, ""))
        self.assertIn(f"{empty}: [route:NAME]: no route", result.stderr)

    async def test_tac(self) -> None:
        """
        twistd -n -y aura-proxy.tac with AURA_PROXY_CONFIG=FILE starts the
        same gateway: /healthz answers and a stream flows.
        """
        up = start_fastapi_upstream(self)
        config = self.write_config(config_text(self.listen, self.admin, up))
        process = start_process(
            self,
            [TWISTD, "-n", "--pidfile=", "-y", str(REPO_ROOT / "aura-proxy.tac")],
            f"http://127.0.0.1:{self.admin}/healthz",
            cwd=self.workdir,
            env={"AURA_PROXY_CONFIG": config},
        )
        self.assertEqual(get_json(f"http://127.0.0.1:{self.admin}/healthz")["status"], "ok")
        events = await self.stream("/api/aura/stream?count=2&interval=0.01")
        self.assertEqual([e.get("id") for e in events], ["1", "2", None])
        self.assertIn(HOT_PATH, Path(process.log_path).read_text())

    async def test_tacWithWorkers(self) -> None:
        """
        twistd -n -y aura-proxy.tac with workers = 2 runs the supervisor and
        two workers, as twistd aura-proxy does (it once ran one process):
        /healthz lists both, and each is a tuned gateway that serves.
        """
        up = start_fastapi_upstream(self)
        config = self.write_config(config_text(self.listen, self.admin, up).replace(
            "heartbeat_interval = 0", "heartbeat_interval = 0\nworkers = 2"))
        process = start_process(
            self,
            [TWISTD, "-n", "--pidfile=", "-y", str(REPO_ROOT / "aura-proxy.tac")],
            f"http://127.0.0.1:{self.admin}/healthz",
            cwd=self.workdir,
            env={"AURA_PROXY_CONFIG": config},
        )
        await wait_until(
            lambda: [w["alive"] for w in get_json(f"http://127.0.0.1:{self.admin}/healthz")["workers"]]
            == [True, True],
            15.0, "two live workers",
        )
        events = await self.stream("/api/aura/stream?count=2&interval=0.01")
        self.assertEqual([e.get("id") for e in events], ["1", "2", None])

        def tuned(name: str) -> bool:
            return any(f"[{name}]" in line and HOT_PATH in line
                       for line in Path(process.log_path).read_text().splitlines())

        for name in ("worker-1", "worker-2"):
            await wait_until(lambda: tuned(name), 10.0, f"{name}'s hot-path line")

    async def sigterm_with_open_stream(self) -> ChunkCollector:
        """Start twistd, open an endless stream, SIGTERM; return the stream."""
        up = start_fastapi_upstream(self)
        # An endless stream runs on for drain_timeout, then is ended.
        process = self.start_twistd(self.write_config(
            config_text(self.listen, self.admin, up, gateway="drain_timeout = 0.5")))
        http, _ = client()
        response = await http.get(
            f"http://127.0.0.1:{self.listen}/api/aura/endless", headers=TENANT, unbuffered=True
        )
        collector = ChunkCollector()
        response.deliverBody(collector)
        await collector.wait_for(lambda b: len(parse_events(b)) >= 2)
        process.send_signal(signal.SIGTERM)
        start = time.monotonic()
        await wait_until(lambda: process.poll() is not None, 5.0,
                         f"twistd still running after SIGTERM: {tail(process.log_path)}")
        log = tail(process.log_path)
        # twistd ends a signalled run by re-raising the signal once it has shut
        # down cleanly (Twisted >= 20.3): -SIGTERM here, 143 from a shell.
        self.assertIn(process.returncode, (0, -signal.SIGTERM), log)
        self.assertIn("Server Shut Down.", log)
        self.assertNotIn("Traceback", log)
        self.assertLess(time.monotonic() - start, 5.0)
        await wait_until(lambda: collector.done.called, 2.0, "client stream still open")
        return collector

    async def test_sigtermWithOpenStream(self) -> None:
        """
        SIGTERM while a stream is open: twistd shuts down cleanly within a
        few seconds (exit 0, or the re-raised SIGTERM twistd uses to report a
        signalled stop; no traceback) and the client's stream ends.
        """
        await self.sigterm_with_open_stream()

    async def test_sigtermEndsStreamCleanly(self) -> None:
        """
        On SIGTERM an open SSE stream is ended cleanly for the client
        (terminating chunk, so an EventSource sees a normal end and
        reconnects), not cut mid-body.
        """
        collector = await self.sigterm_with_open_stream()
        self.assertTrue(collector.reason.check(ResponseDone), collector.reason)

