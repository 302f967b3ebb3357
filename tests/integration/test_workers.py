"""
C{[gateway] workers = 2} as operators run it: C{twistd -n aura-proxy --config
FILE} in front of the FastAPI upstream, with history in one SQLite file
(L{WorkersTests}), and on a C{tcp:} and an C{ssl:} listener at once, with
C{curl --http2} over TLS (L{TlsWorkersTests}).

Which worker accepts a connection is the kernel's choice, so the tests prove
that each worker serves by freezing the other one (SIGSTOP): a stopped process
cannot accept, so every request must then be served by the one left running.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from tests.integration.gateway import HOT_PATH, twistd_ini
from tests.integration.test_tls import _curl_http2, curl_tls
from tests.integration.upstreams import free_port, get_json, start_fastapi_upstream, start_process
from tests.tls_certs import make_pki

TWISTD = str(Path(sys.executable).with_name("twistd"))


def config_text(listen: int, admin: int, upstream: int, workdir: Path) -> str:
    return twistd_ini(listen, admin, upstream, gateway="workers = 2\n", sections=(
        f"[history]\ndsn = sqlite:///{workdir}/history.db\nspool_dir = {workdir}/spool\n"
        "flush_interval = 0.2\n\n[sse]\nresume = off\n"))


def state(pid: int) -> str:
    """The process state letter of C{pid} (R, S, T, Z...), or "" if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def gone(pid: int) -> bool:
    """Whether C{pid} no longer runs (gone, or a zombie waiting for its parent)."""
    return state(pid) in ("", "Z", "X")


class Freezer:
    """Freezes and thaws processes (workers) for a test with C{wait_for} and C{addCleanup}."""

    def freeze(self, pid: int) -> None:
        """Stop C{pid} (SIGSTOP): it accepts no connection until thawed (at cleanup at the latest)."""
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(self.thaw, pid)  # type: ignore[attr-defined]
        self.wait_for(lambda: state(pid) in ("T", "t"), f"pid {pid} stopped")  # type: ignore[attr-defined]

    def thaw(self, pid: int) -> None:
        """Let C{pid} run again (SIGCONT)."""
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


class _TwistdWorkers(Freezer):
    """A twistd with two workers: start it, ask its admin port, freeze and thaw workers."""

    admin: int
    gateway: Any

    def start_gateway(self, text: str) -> None:
        """Start twistd on the configuration C{text}; return once both workers run."""
        path = self.workdir / "gateway.ini"  # type: ignore[attr-defined]
        path.write_text(text)
        self.gateway = start_process(
            self,  # type: ignore[arg-type]
            [TWISTD, "-n", "--pidfile=", "aura-proxy", "--config", str(path)],
            f"http://127.0.0.1:{self.admin}/healthz",
            cwd=self.workdir,  # type: ignore[attr-defined]
        )
        self.wait_for(lambda: len(self.serving_pids()) == 2, "both workers up")

    def health(self) -> Any:
        return get_json(f"http://127.0.0.1:{self.admin}/healthz")

    def serving_pids(self) -> list[int]:
        return [w["pid"] for w in self.health()["workers"] if w["alive"]]

    def wait_for(self, condition: Any, what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                log = Path(self.gateway.log_path).read_text()[-3000:]
                self.fail(f"timed out waiting for {what}; log:\n{log}")  # type: ignore[attr-defined]
            time.sleep(0.05)


class WorkersTests(_TwistdWorkers, TestCase):
    """One twistd with two workers per test."""

    timeout = 60

    def setUp(self) -> None:
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir(parents=True)
        self.listen, self.admin = free_port(), free_port()
        upstream = start_fastapi_upstream(self)
        self.requests = 0
        self.start_gateway(config_text(self.listen, self.admin, upstream, self.workdir))

    def get(self, path: str = "/api/aura/json") -> int:
        """One request on a new connection; its status."""
        conn = http.client.HTTPConnection("127.0.0.1", self.listen, timeout=10)
        try:
            conn.request("GET", path, headers={"X-Tenant-ID": "t1"})
            response = conn.getresponse()
            response.read()
            self.requests += 1
            return response.status
        finally:
            conn.close()

    def test_workers_are_tuned(self) -> None:
        """Each worker process tunes itself for the hot path (lean epoll loop, GC) and says so."""
        line = HOT_PATH

        def logged(name: str) -> bool:
            log = Path(self.gateway.log_path).read_text()  # type: ignore[attr-defined]
            return any(f"[{name}]" in entry and line in entry for entry in log.splitlines())

        for name in ("worker-1", "worker-2"):
            self.wait_for(lambda: logged(name), f"{name}'s hot-path line")

    def test_health_lists_workers(self) -> None:
        """/healthz on the parent's admin port lists two live workers, children of the gateway."""
        health = self.health()
        self.assertEqual(health["status"], "ok")
        self.assertEqual([w["index"] for w in health["workers"]], [1, 2])
        self.assertEqual([w["restarts"] for w in health["workers"]], [0, 0])
        for w in health["workers"]:
            with open(f"/proc/{w['pid']}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            self.assertEqual(ppid, self.gateway.pid)

    def readyz(self) -> tuple[int, Any]:
        """The parent's C{/readyz}: its status and JSON body."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/readyz", timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def test_readyz_asks_every_worker(self) -> None:
        """
        The parent's /readyz is 200 when both workers answer their own
        /readyz as ready (over their private sockets); with one frozen, it is
        503 naming that worker, which did not answer; thawed, 200 again.
        """
        self.wait_for(lambda: self.readyz()[0] == 200, "/readyz 200")
        status, body = self.readyz()
        self.assertEqual(body["checks"]["workers"], {"ok": True, "alive": 2, "ready": 2, "workers": 2})
        frozen = self.serving_pids()[1]
        self.freeze(frozen)
        status, body = self.readyz()
        self.assertEqual((status, body["failing"]), (503, ["workers"]))
        [entry] = body["checks"]["workers"]["not_ready"]
        self.assertEqual((entry["pid"], entry["failing"]), (frozen, ["answer"]))
        self.assertIn("no answer within", entry["error"])
        self.thaw(frozen)
        self.wait_for(lambda: self.readyz()[0] == 200, "/readyz 200 after thaw")

    def test_each_worker_serves(self) -> None:
        """
        50 requests succeed; with either worker frozen, the other alone
        accepts on the shared socket and serves every request.
        """
        self.assertEqual([self.get() for _ in range(50)], [200] * 50)
        first, second = self.serving_pids()
        for frozen in (first, second):
            self.freeze(frozen)
            self.assertEqual([self.get() for _ in range(10)], [200] * 10)
            self.thaw(frozen)

    def test_killed_worker_restarts(self) -> None:
        """
        A worker killed with SIGKILL is restarted (new pid, restarts 1) and
        requests keep succeeding meanwhile.
        """
        before = self.health()["workers"]
        victim = before[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        statuses = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            statuses.append(self.get())
            now = self.health()["workers"]
            if now[0]["alive"] and now[0]["pid"] != victim:
                break
        self.assertEqual(now[0]["restarts"], 1)
        self.assertNotEqual(now[0]["pid"], victim)
        self.assertEqual(now[1], before[1])
        self.assertEqual(set(statuses), {200})
        # The new worker serves too.
        self.freeze(now[1]["pid"])
        self.assertEqual([self.get() for _ in range(5)], [200] * 5)

    def test_sigterm_stops_everything(self) -> None:
        """
        SIGTERM to the parent stops both workers and the parent within
        seconds, closes the port, and every request is in the shared SQLite
        history (both workers served some, each flushed its own before exiting).
        """
        pids = self.serving_pids()
        for frozen in pids:
            self.freeze(frozen)
            self.assertEqual([self.get() for _ in range(10)], [200] * 10)
            self.thaw(frozen)
        self.assertEqual([self.get() for _ in range(10)], [200] * 10)
        started = time.monotonic()
        os.kill(self.gateway.pid, signal.SIGTERM)
        # twistd re-raises the signal after a clean shutdown (Twisted >= 20.3).
        self.assertIn(self.gateway.wait(10), (0, -signal.SIGTERM))
        log = Path(self.gateway.log_path).read_text()  # type: ignore[attr-defined]
        self.assertIn("Server Shut Down.", log)
        self.assertIn("worker 1 (pid", log)
        self.assertNotIn("SIGKILL", log)
        self.assertLess(time.monotonic() - started, 8)
        self.wait_for(lambda: all(gone(pid) for pid in pids), "workers gone", timeout=5)
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", self.listen), timeout=1).close()
        db = sqlite3.connect(self.workdir / "history.db")
        try:
            (rows,) = db.execute(
                "SELECT count(*) FROM sys_api_call_histories WHERE path = '/api/aura/json'"
            ).fetchone()
        finally:
            db.close()
        # On failure, the workers' own account of their history says where rows went.
        self.assertEqual(rows, self.requests, "\n".join(
            line for line in log.splitlines() if "history" in line))
        # Spool directories (made when needed) are per worker.
        spool = self.workdir / "spool"
        names = {p.name for p in spool.iterdir()} if spool.exists() else set()
        self.assertLessEqual(names, {"worker-1", "worker-2"})


class TlsWorkersTests(_TwistdWorkers, TestCase):
    """twistd with workers = 2 on a tcp: and an ssl: listener; curl over HTTP/2 and HTTP/1.1."""

    timeout = 90

    def setUp(self) -> None:
        curl = _curl_http2()
        if curl is None:
            raise SkipTest("curl with HTTP/2 is not installed")
        self.curl = curl
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir(parents=True)
        self.pki = make_pki(self.workdir / "pki")
        self.plain, self.secure, self.admin = free_port(), free_port(), free_port()
        upstream = start_fastapi_upstream(self)
        text = twistd_ini(self.plain, self.admin, upstream, gateway="workers = 2\n", sections=(
            "[history]\nenabled = false\n\n[sse]\ninject_ids = false\nresume = off\n"))
        text = text.replace(
            f"listen = tcp:{self.plain}:interface=127.0.0.1\n",
            f"listen = tcp:{self.plain}:interface=127.0.0.1, ssl:{self.secure}:interface=127.0.0.1"
            f":privateKey={self.pki.server_key}:certKey={self.pki.server_cert}\n",
        )
        self.start_gateway(text)

    def curl_get(self, *args: str) -> tuple[str, str, str]:
        """curl C{args} (one request, on a new connection); its response head, body and HTTP version."""
        return curl_tls(self, self.curl, self.pki.ca, *args)

    def assert_h2_stream(self) -> None:
        """An SSE stream over TLS and HTTP/2 (ALPN) on the ssl: port: every event, no HTTP/1.1 headers."""
        head, body, version = self.curl_get(
            "--http2", f"https://127.0.0.1:{self.secure}/api/aura/stream?count=5&interval=0.02")
        self.assertEqual(version, "2", head)
        self.assertTrue(head.startswith("HTTP/2 200"), head)
        lower = head.lower()
        self.assertIn("content-type: text/event-stream", lower)
        self.assertNotIn("transfer-encoding:", lower)
        self.assertEqual(body.count("event: token"), 5, body)
        self.assertIn("event: done", body)

    def assert_plain_http1(self) -> None:
        """A JSON document over plain HTTP/1.1 on the tcp: port."""
        _, body, version = self.curl_get(f"http://127.0.0.1:{self.plain}/api/aura/json")
        self.assertEqual((version, json.loads(body)["ok"]), ("1.1", True))

    def test_tls_http2_and_plain_http1(self) -> None:
        """
        With workers = 2 and listen = tcp:P1, ssl:P2: an SSE stream over
        HTTP/2 on the TLS port, HTTP/1.1 over TLS on the same port (ALPN
        offers both), and plain HTTP/1.1 on the tcp: port.
        """
        self.assert_h2_stream()
        _, body, version = self.curl_get("--http1.1", f"https://127.0.0.1:{self.secure}/api/aura/json")
        self.assertEqual((version, json.loads(body)["ok"]), ("1.1", True))
        self.assert_plain_http1()
        self.assertIn("tls 127.0.0.1:%d" % self.secure, Path(self.gateway.log_path).read_text())

    def test_each_worker_serves_tls(self) -> None:
        """
        With either worker frozen (SIGSTOP), the other alone accepts on both
        shared sockets: HTTP/2 streams over TLS and plain HTTP/1.1 all succeed.
        """
        first, second = self.serving_pids()
        for frozen in (first, second):
            self.freeze(frozen)
            for _ in range(3):
                self.assert_h2_stream()
                self.assert_plain_http1()
            self.thaw(frozen)
