"""
C{GET /metrics} on the admin port of C{twistd -n aura-proxy}, after real
traffic from the FastAPI + sse-starlette upstream: the counts of requests,
of each way a stream ends, of a stall, of resumes and heartbeats; and with
C{workers = 2}, the parent's sum of its workers and C{aura_proxy_up{worker}}.

(A stream ended by the gateway's shutdown cannot be scraped from the
stopped process: tests/test_metrics.py pins C{shutdown}.)
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import TestCase

from tests.integration.gateway import twistd_ini
from tests.integration.upstreams import free_port, get_json, start_fastapi_upstream, start_process

TWISTD = str(Path(sys.executable).with_name("twistd"))
SSE = {"X-Tenant-ID": "t1", "Accept": "text/event-stream"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(admin: int) -> Samples:
    """Every sample of the admin port's C{/metrics}, by name and sorted labels."""
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=20)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read().decode("utf-8")
        assert response.status == 200, (response.status, body)
        assert response.getheader("content-type", "").startswith("text/plain; version="), response.getheaders()
    finally:
        conn.close()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body) for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value, 0 when absent."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def get(port: int, path: str, headers: Optional[dict[str, str]] = None, timeout: float = 20) -> tuple[int, bytes]:
    """One request on a new connection, read to its end: status and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {"X-Tenant-ID": "t1"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def read_then_leave(port: int, path: str, until: bytes, headers: str = "") -> bytes:
    """Open a stream on a raw socket, read until C{until} has come, then close the connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: gw\r\nX-Tenant-ID: t1\r\nAccept: text/event-stream\r\n{headers}\r\n".encode()
        )
        got = b""
        while until not in got:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        return got
    finally:
        sock.close()


class _Gateway(TestCase):
    """Runs one twistd per test, in front of the FastAPI upstream."""

    timeout = 90

    def start(self, gateway: str, sections: str) -> None:
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir(parents=True)
        self.listen, self.admin = free_port(), free_port()
        upstream = start_fastapi_upstream(self)
        path = self.workdir / "gateway.ini"
        text = twistd_ini(self.listen, self.admin, upstream, gateway=gateway, sections=sections)
        if "heartbeat_interval" in gateway:  # twistd_ini's own (0) gives way
            text = text.replace("heartbeat_interval = 0\n", "", 1)
        path.write_text(text)
        self.process = start_process(
            self,
            [TWISTD, "-n", "--pidfile=", "aura-proxy", "--config", str(path)],
            f"http://127.0.0.1:{self.admin}/healthz",
            cwd=self.workdir,
        )

    def wait_for(self, condition: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
        """Poll C{condition} until it is true (generous: the machine is busy)."""
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if result:
                return result
            if time.monotonic() > deadline:
                log = Path(self.process.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
                self.fail(f"timed out waiting for {what}; log:\n{log}")
            time.sleep(0.1)


class MetricsTests(_Gateway):
    """One gateway process: the figures after each kind of call."""

    def test_counts_after_traffic(self) -> None:
        """
        After plain calls, an unrouted call, and streams that complete,
        stall, lose their client, lose their upstream, go silent past
        idle_timeout and never get a head within response_timeout,
        /metrics counts each: requests by route and status class, streams
        ended by each reason, events delivered, the stall, heartbeats.
        """
        self.start(
            "heartbeat_interval = 0.5\nidle_timeout = 4\nresponse_timeout = 3\n",
            "[history]\nenabled = false\n\n"
            "[sse]\nresume = off\non_client_disconnect = cancel\n\n"
            "[metrics]\nstall_after = 1\n",
        )
        port = self.listen
        for _ in range(3):
            self.assertEqual(get(port, "/api/aura/json")[0], 200)
        self.assertEqual(get(port, "/nowhere")[0], 404)
        status, body = get(port, "/api/aura/stream?count=3&interval=0.01", SSE)
        self.assertEqual((status, body.count(b"event: token")), (200, 3))
        # 2 s of silence between two events: a stall (stall_after = 1) and heartbeats.
        status, body = get(port, "/api/aura/silent?seconds=2", SSE)
        self.assertEqual(body.count(b"event: token"), 2)
        self.assertIn(b": keep-alive", body)
        read_then_leave(port, "/api/aura/endless?interval=0.05", b"event: tick")
        get(port, "/api/aura/die", SSE)
        get(port, "/api/aura/silent?seconds=30", SSE)  # idle_timeout after 4 s
        status, _ = get(port, "/api/aura/slow_head?seconds=10", SSE)
        self.assertEqual(status, 504)

        def ends() -> Samples:
            samples = scrape(self.admin)
            return samples if value(samples, "aura_proxy_sse_ends_total", route="aura",
                                    reason="client_disconnect") >= 1 else {}

        m = self.wait_for(ends, "the client_disconnect end")
        self.assertEqual(value(m, "aura_proxy_requests_total", route="aura", method="GET", status_class="2xx"), 8)
        self.assertEqual(value(m, "aura_proxy_requests_total", route="-", method="GET", status_class="4xx"), 1)
        self.assertEqual(value(m, "aura_proxy_requests_total", route="aura", method="GET", status_class="5xx"), 1)
        self.assertEqual(value(m, "aura_proxy_requests_total", route="aura", method="GET", status_class="4xx"), 0)
        self.assertEqual(value(m, "aura_proxy_request_duration_seconds_count", route="aura"), 9)
        for reason, n in (("completed", 2), ("client_disconnect", 1), ("upstream_error", 1),
                          ("idle_timeout", 1), ("response_timeout", 1)):
            self.assertEqual(value(m, "aura_proxy_sse_ends_total", route="aura", reason=reason), n, reason)
        self.assertEqual(value(m, "aura_proxy_sse_streams_total", route="aura"), 5)
        self.assertEqual(value(m, "aura_proxy_sse_open_streams", route="aura"), 0)
        self.assertEqual(value(m, "aura_proxy_sse_stalls_total", route="aura"), 2)  # silent 2 s; silent 30 s
        self.assertGreaterEqual(value(m, "aura_proxy_sse_heartbeats_total", route="aura"), 3)
        self.assertEqual(value(m, "aura_proxy_upstream_errors_total", route="aura", kind="response_timeout"), 1)
        # 3 tokens + done, 2 silent, >= 1 endless, 2 die, 1 silent before idle.
        self.assertGreaterEqual(value(m, "aura_proxy_sse_events_total", route="aura"), 4 + 2 + 1 + 2 + 1)
        self.assertGreater(value(m, "aura_proxy_sse_bytes_total", route="aura"), 0)
        self.assertEqual(value(m, "aura_proxy_sse_first_event_seconds_count", route="aura"), 5)
        # One gap per event but the first of each stream.
        self.assertEqual(value(m, "aura_proxy_sse_event_gap_seconds_count", route="aura"),
                         value(m, "aura_proxy_sse_events_total", route="aura") - 5)
        # The 2 s silence is a gap over 1 s.
        self.assertGreaterEqual(value(m, "aura_proxy_sse_event_gap_seconds_bucket", route="aura", le="+Inf")
                                - value(m, "aura_proxy_sse_event_gap_seconds_bucket", route="aura", le="1.0"), 1)
        self.assertEqual(value(m, "aura_proxy_up", worker="main"), 1)
        self.assertEqual(value(m, "aura_proxy_upstream_pool_connections", state="active"), 0)

    def test_open_stream_and_resume(self) -> None:
        """
        With resume on (memory, detach): an open stream shows in the open
        gauge with its events so far; a client that leaves ends it by
        C{detached}; its reconnect with Last-Event-ID is a resume, whose
        missed events are replayed events.
        """
        self.start(
            "",
            "[history]\nenabled = false\n\n[sse]\nresume = memory\nresume_ttl = 30\n",
        )
        got = read_then_leave(self.listen, "/api/aura/stream?count=6&interval=0.3", b"event: token")
        found = re.search(rb"^id: ?([^\r\n]+)", got, re.M)
        assert found is not None, got
        first_id = found.group(1).decode()
        m = self.wait_for(
            lambda: (lambda s: s if value(s, "aura_proxy_sse_ends_total", route="aura", reason="detached") else {})(
                scrape(self.admin)),
            "the detached end",
        )
        self.assertEqual(value(m, "aura_proxy_sse_open_streams", route="aura"), 0)
        self.assertGreaterEqual(value(m, "aura_proxy_resume_log_streams", store="memory"), 1)
        status, body = get(self.listen, "/api/aura/stream?count=6&interval=0.3",
                           {"X-Tenant-ID": "t1", "Last-Event-ID": first_id})
        self.assertEqual(status, 200)
        m = scrape(self.admin)
        self.assertEqual(value(m, "aura_proxy_sse_resumes_total", route="aura"), 1)
        replayed = value(m, "aura_proxy_sse_replayed_events_total", route="aura")
        self.assertEqual(replayed, body.count(b"data:"))
        self.assertGreaterEqual(replayed, 5)
        self.assertEqual(value(m, "aura_proxy_sse_ends_total", route="aura", reason="completed"), 1)
        self.assertEqual(value(m, "aura_proxy_sse_streams_total", route="aura"), 2)

    def test_disabled(self) -> None:
        """With C{[metrics] enabled = false}, C{/metrics} is a 404 and the gateway serves as usual."""
        self.start("", "[history]\nenabled = false\n\n[sse]\nresume = off\n\n[metrics]\nenabled = false\n")
        self.assertEqual(get(self.listen, "/api/aura/json")[0], 200)
        self.assertEqual(get(self.admin, "/metrics")[0], 404)


class WorkersMetricsTests(_Gateway):
    """C{workers = 2}: the parent's C{/metrics} is the whole gateway's."""

    def test_summed_and_up(self) -> None:
        """
        The parent sums both workers' counts (each served some: the other
        was frozen meanwhile) and says C{up} per worker; a frozen worker's
        figures vanish and its C{up} is 0.
        """
        self.start("workers = 2\n", "[history]\nenabled = false\n\n[sse]\nresume = off\n")

        def alive() -> list[int]:
            return [w["pid"] for w in get_json(f"http://127.0.0.1:{self.admin}/healthz")["workers"] if w["alive"]]

        first, second = self.wait_for(lambda: len(alive()) == 2 and alive(), "both workers up")
        m = self.wait_for(
            lambda: (lambda s: s if value(s, "aura_proxy_up", worker="1") + value(s, "aura_proxy_up", worker="2") == 2
                     else {})(scrape(self.admin)),
            "both workers scraped",
        )
        for frozen, n in ((first, 4), (second, 6)):
            os.kill(frozen, signal.SIGSTOP)
            try:
                for _ in range(n):
                    self.assertEqual(get(self.listen, "/api/aura/json")[0], 200)
                self.assertEqual(get(self.listen, "/api/aura/stream?count=2&interval=0.01", SSE)[0], 200)
            finally:
                os.kill(frozen, signal.SIGCONT)
        m = scrape(self.admin)
        self.assertEqual(value(m, "aura_proxy_requests_total", route="aura", method="GET", status_class="2xx"), 12)
        self.assertEqual(value(m, "aura_proxy_sse_streams_total", route="aura"), 2)
        self.assertEqual(value(m, "aura_proxy_sse_ends_total", route="aura", reason="completed"), 2)
        self.assertEqual([value(m, "aura_proxy_up", worker=w) for w in ("1", "2")], [1, 1])
        self.assertEqual(len([k for k in m if k[0] == "aura_proxy_build_info"]), 1)
        # Worker 1 frozen: it cannot answer the parent's scrape; only worker 2's figures are left.
        os.kill(first, signal.SIGSTOP)
        try:
            m = scrape(self.admin)
        finally:
            os.kill(first, signal.SIGCONT)
        self.assertEqual([value(m, "aura_proxy_up", worker=w) for w in ("1", "2")], [0, 1])
        # Worker 2 served while worker 1 was frozen: 4 calls and a stream.
        self.assertEqual(value(m, "aura_proxy_requests_total", route="aura", method="GET", status_class="2xx"), 5)
