"""
C{[limits]} end to end: C{twistd -n aura-proxy --config FILE} in front of the
FastAPI upstream.  One process counting in memory; two workers counting in
the REAL Redis at 127.0.0.1:6379 (a key prefix of the test's own, its keys
deleted in cleanup); and Redis down (the store pointed at a closed port).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.integration.gateway import TwistdLog, twistd_ini
from tests.integration.sse_threads import SseClient, request
from tests.integration.test_limits_redis import closed_port
from tests.integration.test_workers import Freezer
from tests.integration.upstreams import free_port, get_json, start_fastapi_upstream, start_process
from tests.test_resume_log import REDIS_HOST, REDIS_PORT, REDIS_URL, delete_keys, redis_available

TWISTD = str(Path(sys.executable).with_name("twistd"))
ENDLESS = "/api/aura/endless?interval=0.1"


class LimitsBase(TwistdLog, TestCase):
    """One twistd gateway per test with max_streams_per_tenant = 2."""

    timeout = 90
    workers = 1
    #: [limits] stream_lease: how long a dead worker's slots outlive it.
    lease = 3

    def store(self) -> str:
        return "memory"

    def setUp(self) -> None:
        self.prefix = f"aura-proxy-test:limits:{uuid.uuid4().hex}:"
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir(parents=True)
        self.listen, self.admin = free_port(), free_port()
        upstream = start_fastapi_upstream(self)
        # Streams are open at the end: no drain on stop.
        gateway = "drain_timeout = 0\n" + (f"workers = {self.workers}\n" if self.workers > 1 else "")
        path = self.workdir / "gateway.ini"
        path.write_text(twistd_ini(self.listen, self.admin, upstream, gateway=gateway, sections=(
            "[history]\nenabled = false\n\n[sse]\nresume = off\n\n"
            f"[limits]\nmax_streams_per_tenant = 2\nstore = {self.store()}\nkey_prefix = {self.prefix}\n"
            f"stream_lease = {self.lease}\n")))
        self.gateway = start_process(
            self, [TWISTD, "-n", "--pidfile=", "aura-proxy", "--config", str(path)],
            f"http://127.0.0.1:{self.admin}/healthz", cwd=self.workdir,
        )
        if self.workers > 1:
            self.wait_for(lambda: sum(w["alive"] for w in get_json(
                f"http://127.0.0.1:{self.admin}/healthz")["workers"]) == self.workers, "the workers up")
        self.tenant = f"tenant-{uuid.uuid4().hex[:8]}"

    def stream(self) -> SseClient:
        """A stream of the test's tenant, started; once its head has come."""
        client = SseClient(self.listen, ENDLESS, {"X-Tenant-ID": self.tenant, "Accept": "text/event-stream"})
        client.start()
        self.addCleanup(client.close)
        self.wait_for(lambda: client.status != 0 or client.error is not None, "the stream's head")
        return client

    def check_third_refused_until_one_ends(self) -> None:
        first, second = self.stream(), self.stream()
        self.assertEqual((first.status, second.status), (200, 200))
        self.wait_for(lambda: first.indexes and second.indexes, "both streams flowing")
        third = self.stream()
        third.join(10)
        self.assertEqual(third.status, 429)
        self.assertEqual(third.headers.get("retry-after"), "1")
        error = json.loads(third.body)["error"]
        self.assertEqual(error["code"], "too_many_streams")
        self.assertEqual(error["request_id"], third.headers["x-request-id"])
        # a plain request of the tenant is not a stream
        status, _, _ = request(self.listen, "GET", "/api/aura/json", {"X-Tenant-ID": self.tenant})
        self.assertEqual(status, 200)
        first.close()
        self.wait_for(lambda: self.stream_status() == 200, "a slot after one stream ended", timeout=15)

    def stream_status(self) -> int:
        """Open a stream; its status (a served one stays open until cleanup)."""
        client = self.stream()
        if client.status != 200:
            client.join(10)
        return client.status


class SingleProcessTests(LimitsBase):
    """One process, counting in memory."""

    def test_third_stream(self) -> None:
        """The third stream of a tenant with max_streams_per_tenant = 2 gets 429, and 200 once one ends."""
        self.check_third_refused_until_one_ends()


class RedisDownTests(LimitsBase):
    """The store is a Redis nobody listens for."""

    def store(self) -> str:
        return f"redis://127.0.0.1:{closed_port()}/0"

    def test_traffic_flows(self) -> None:
        """Requests and streams are served, limits counted in the process, the outage logged once."""
        for _ in range(3):
            status, _, _ = request(self.listen, "GET", "/api/aura/json", {"X-Tenant-ID": self.tenant})
            self.assertEqual(status, 200)
        self.check_third_refused_until_one_ends()
        self.wait_for(lambda: "limits: Redis at" in self.log(), "the outage's log line")
        for _ in range(3):
            status, _, _ = request(self.listen, "GET", "/api/aura/json", {"X-Tenant-ID": self.tenant})
            self.assertEqual(status, 200)
        self.assertEqual(self.log().count("limits: Redis at"), 1)


class WorkersTests(Freezer, LimitsBase):
    """workers = 2 sharing the counts in Redis."""

    workers = 2
    # Long enough that a loaded machine checks before a dead worker's slots expire.
    lease = 8

    if not redis_available():
        skip = f"no Redis at {REDIS_HOST}:{REDIS_PORT}"

    def store(self) -> str:
        return REDIS_URL

    def setUp(self) -> None:
        super().setUp()
        self.addCleanup(delete_keys, self.prefix)

    def test_shared_across_workers(self) -> None:
        """
        The limit holds for the tenant whichever worker serves each stream:
        two streams opened on worker 1 (worker 2 frozen: it cannot accept)
        make worker 2 (worker 1 frozen) refuse the third, and serve it once
        one of them has ended.
        """
        one, two = [w["pid"] for w in get_json(f"http://127.0.0.1:{self.admin}/healthz")["workers"]]
        self.freeze(two)
        first, second = self.stream(), self.stream()
        self.assertEqual((first.status, second.status), (200, 200))
        self.thaw(two)
        self.freeze(one)
        self.assertEqual([self.stream_status() for _ in range(3)], [429] * 3)
        first.close()
        # worker 1 (frozen) cannot free the slot yet: its lease keeps it
        self.thaw(one)
        self.wait_for(lambda: self.stream_status() == 200, "a slot after one stream ended", timeout=15)

    def test_crashed_worker_slots_expire(self) -> None:
        """
        A worker killed (SIGKILL) while it holds a tenant's two streams
        cannot free their slots: they expire with their lease (8 s here),
        then the tenant's streams are served again.
        """
        one, two = [w["pid"] for w in get_json(f"http://127.0.0.1:{self.admin}/healthz")["workers"]]
        self.freeze(two)
        first, second = self.stream(), self.stream()
        self.assertEqual((first.status, second.status), (200, 200))
        os.kill(one, signal.SIGKILL)
        self.thaw(two)
        killed = time.monotonic()
        self.assertEqual(self.stream_status(), 429)
        self.wait_for(lambda: self.stream_status() == 200, "the dead worker's slots to expire", timeout=40)
        self.assertGreater(time.monotonic() - killed, 3.0)

    def test_third_stream(self) -> None:
        """The third stream of a tenant gets 429 and 200 once one ends, over two workers."""
        self.check_third_refused_until_one_ends()

