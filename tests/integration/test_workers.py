"""
C{[gateway] workers = 2} as operators run it: C{twistd -n aura-proxy --config
FILE} in front of the FastAPI upstream, with history in one SQLite file.

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

from twisted.trial.unittest import TestCase

from tests.integration.gateway import HOT_PATH, twistd_ini
from tests.integration.upstreams import free_port, get_json, start_fastapi_upstream, start_process

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


class WorkersTests(TestCase):
    """One twistd with two workers per test."""

    timeout = 60

    def setUp(self) -> None:
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir(parents=True)
        self.listen, self.admin = free_port(), free_port()
        upstream = start_fastapi_upstream(self)
        path = self.workdir / "gateway.ini"
        path.write_text(config_text(self.listen, self.admin, upstream, self.workdir))
        self.gateway = start_process(
            self,
            [TWISTD, "-n", "--pidfile=", "aura-proxy", "--config", str(path)],
            f"http://127.0.0.1:{self.admin}/healthz",
            cwd=self.workdir,
        )
        self.requests = 0
        self.wait_for(lambda: len(self.serving_pids()) == 2, "both workers up")

    def health(self) -> Any:
        return get_json(f"http://127.0.0.1:{self.admin}/healthz")

    def serving_pids(self) -> list[int]:
        return [w["pid"] for w in self.health()["workers"] if w["alive"]]

    def wait_for(self, condition: Any, what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}; log:\n{Path(self.gateway.log_path).read_text()[-3000:]}")  # type: ignore[attr-defined]
            time.sleep(0.05)

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

    def freeze(self, pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(self.thaw, pid)
        self.wait_for(lambda: state(pid) in ("T", "t"), f"pid {pid} stopped")

    def thaw(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

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
