"""
Tests for L{aura_proxy.metrics}: the figures after real calls through the
in-memory request path (treq's StubTreq, a fake clock), the collectors read
at scrape time, the workers' sum, and the admin site's C{/metrics}.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, Optional

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, TimeoutError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel
from treq.testing import StubTreq

from aura_proxy.admin import Admin
from aura_proxy.config import parse_config
from aura_proxy.metrics import GatewayMetrics, WorkersMetrics, exposition, sum_families
from aura_proxy.proxy import Gateway
from aura_proxy.relay import ACCELERATED, PyRelay
from aura_proxy.upstream import UpstreamClient

from tests.test_proxy import CONFIG, TENANT, ControlledAgent, Echo, Harness, Stream, Streams
from tests.test_relay import end, start

SSE = {"X-Tenant-ID": "t1", "Accept": "text/event-stream"}


class MetricsHarness(Harness):
    """L{Harness} with a gateway that keeps figures in its own registry."""

    def __init__(self, upstream: Any, config: str = CONFIG, resume: bool = False, stall_after: float = 15.0) -> None:
        super().__init__(upstream, config, resume)
        self.registry = CollectorRegistry(auto_describe=False)
        self.metrics = GatewayMetrics(self.clock, self.registry, stall_after)
        self.metrics.resume = self.log
        client = UpstreamClient(self.clock, 5, 10, agent=self.agent)
        self.gateway = Gateway(
            parse_config(config, "test.ini"), self.clock, client, self.history, self.log, metrics=self.metrics
        )  # type: ignore[arg-type]
        self.client = StubTreq(self.gateway.resource())

    def value(self, name: str, **labels: str) -> Optional[float]:
        """One sample's value now (a scrape), None when absent."""
        return self.registry.get_sample_value(name, labels)


def bucket(h: MetricsHarness, name: str, le: str, route: str = "aura") -> Optional[float]:
    return h.value(name + "_bucket", route=route, le=le)


class CallTests(TestCase):
    """Every call is counted when it ends, by route, method and status class."""

    def test_plain_calls_by_status_class(self) -> None:
        """A routed 200 and an unrouted 404 are counted under their route (C{-}: none) and class."""
        h = MetricsHarness(Echo())
        h.request("GET", "/api/aura/x", headers=TENANT)
        h.request("GET", "/api/aura/x", headers=TENANT)
        h.request("POST", "/nowhere", headers=TENANT)
        self.assertEqual(h.value("aura_proxy_requests_total", route="aura", method="GET", status_class="2xx"), 2)
        self.assertEqual(h.value("aura_proxy_requests_total", route="-", method="POST", status_class="4xx"), 1)
        self.assertEqual(h.value("aura_proxy_request_duration_seconds_count", route="aura"), 2)

    def test_odd_methods_are_one_label(self) -> None:
        """A method outside the usual few is counted as C{other}: labels stay bounded."""
        h = MetricsHarness(Echo())
        h.request("BREW", "/api/aura/x", headers=TENANT)
        self.assertEqual(h.value("aura_proxy_requests_total", route="aura", method="other", status_class="2xx"), 1)

    def test_upstream_error_kinds(self) -> None:
        """A refused connection, a connect timeout and a response timeout are counted by kind."""
        agent = ControlledAgent()
        h = MetricsHarness(agent)
        first = h.client.get("http://gw.example/api/aura/x", headers=TENANT)
        second = h.client.get("http://gw.example/api/aura/x", headers=TENANT)
        third = h.client.get("http://gw.example/api/aura/x", headers=SSE)
        h.flush()
        self.assertEqual(h.value("aura_proxy_upstream_pool_connections", state="active"), 3)
        agent.requests[0][2].errback(ConnectionRefusedError())
        agent.requests[1][2].errback(TimeoutError())
        h.clock.advance(30)
        for d in (first, second, third):
            h.successResultOf(d)
        for kind in ("connect_error", "connect_timeout", "response_timeout"):
            self.assertEqual(h.value("aura_proxy_upstream_errors_total", route="aura", kind=kind), 1, kind)
        # The stream asked for never started: it ended by response_timeout.
        self.assertEqual(h.value("aura_proxy_sse_ends_total", route="aura", reason="response_timeout"), 1)
        self.assertEqual(h.value("aura_proxy_requests_total", route="aura", method="GET", status_class="5xx"), 3)
        self.assertEqual(h.value("aura_proxy_upstream_pool_connections", state="active"), 0)

    def test_disabled_counts_nothing(self) -> None:
        """With C{[metrics] enabled = false} the pipeline gets no metrics: nothing is counted."""
        h = MetricsHarness(Echo(), CONFIG + "[metrics]\nenabled = false\n")
        h.request("GET", "/api/aura/x", headers=TENANT)
        self.assertIsNone(h.value("aura_proxy_requests_total", route="aura", method="GET", status_class="2xx"))


class StreamFigureTests(TestCase):
    """SSE figures: current at scrape time while the stream is open, folded when it ends (C relay step)."""

    fast_path = "on"

    def cfg(self, config: str = CONFIG) -> str:
        """C{config} with this class's C{fast_path}."""
        return config.replace("[gateway]\n", f"[gateway]\nfast_path = {self.fast_path}\n", 1)

    def open(self, config: str = CONFIG, stall_after: float = 15.0) -> tuple[MetricsHarness, Stream, list[bytes]]:
        upstream = Stream()
        h = MetricsHarness(upstream, self.cfg(config), stall_after=stall_after)
        response = h.request("GET", "/api/aura/stream", headers=TENANT, unbuffered=True)
        received: list[bytes] = []
        h.client.collect(response, received.append)
        return h, upstream, received

    def emit(self, h: MetricsHarness, upstream: Stream, data: bytes) -> None:
        assert upstream.request is not None
        upstream.request.write(data)
        h.flush()

    def test_open_stream_counts_are_current(self) -> None:
        """Events and bytes delivered show at a scrape while the stream is still open."""
        h, upstream, received = self.open()
        [relay] = h.gateway.streams._relays
        if ACCELERATED:
            self.assertEqual(type(relay) is PyRelay, self.fast_path == "off")
        self.assertEqual(h.value("aura_proxy_sse_open_streams", route="aura"), 1)
        self.assertEqual(h.value("aura_proxy_sse_streams_total", route="aura"), 1)
        h.clock.advance(2)
        self.emit(h, upstream, b"data: one\n\n")
        self.assertEqual(h.value("aura_proxy_sse_events_total", route="aura"), 1)
        self.assertEqual(h.value("aura_proxy_sse_bytes_total", route="aura"), len(b"".join(received)))
        self.assertEqual(h.value("aura_proxy_sse_first_event_seconds_sum", route="aura"), 2)
        self.assertEqual(h.value("aura_proxy_sse_first_event_seconds_count", route="aura"), 1)
        self.emit(h, upstream, b"data: two\n\n")
        self.assertEqual(h.value("aura_proxy_sse_events_total", route="aura"), 2)
        # No end yet, and the first event is counted once (not again at the end).
        self.assertIsNone(h.value("aura_proxy_sse_ends_total", route="aura", reason="completed"))
        assert upstream.request is not None
        upstream.request.finish()
        h.flush()
        self.assertEqual(h.value("aura_proxy_sse_ends_total", route="aura", reason="completed"), 1)
        self.assertEqual(h.value("aura_proxy_sse_open_streams", route="aura"), 0)
        self.assertEqual(h.value("aura_proxy_sse_events_total", route="aura"), 2)
        self.assertEqual(h.value("aura_proxy_sse_first_event_seconds_count", route="aura"), 1)
        self.assertEqual(h.value("aura_proxy_sse_stream_duration_seconds_count", route="aura"), 1)
        self.assertEqual(h.value("aura_proxy_sse_stream_duration_seconds_sum", route="aura"), 2)
        self.assertEqual(h.value("aura_proxy_requests_total", route="aura", method="GET", status_class="2xx"), 1)

    def test_gaps_and_stalls(self) -> None:
        """
        Gaps between events fall in their buckets; one over stall_after is a
        stall, counted once whether a scrape, the timer or the next event sees it first.
        """
        h, upstream, _ = self.open(stall_after=5)
        self.emit(h, upstream, b"data: 1\n\n")
        h.clock.advance(0.5)
        self.emit(h, upstream, b"data: 2\n\n")
        self.assertEqual(bucket(h, "aura_proxy_sse_event_gap_seconds", "0.25"), 0)
        self.assertEqual(bucket(h, "aura_proxy_sse_event_gap_seconds", "0.5"), 1)
        self.assertEqual(h.value("aura_proxy_sse_stalls_total", route="aura"), 0)
        h.clock.advance(6)
        # Still silent: the scrape sees the stall going on.
        self.assertEqual(h.value("aura_proxy_sse_stalls_total", route="aura"), 1)
        h.clock.advance(4)
        self.emit(h, upstream, b"data: 3\n\n")
        self.assertEqual(h.value("aura_proxy_sse_stalls_total", route="aura"), 1)
        self.assertEqual(bucket(h, "aura_proxy_sse_event_gap_seconds", "10.0"), 2)
        self.assertEqual(h.value("aura_proxy_sse_event_gap_seconds_sum", route="aura"), 10.5)
        h.clock.advance(1)
        self.emit(h, upstream, b"data: 4\n\n")
        h.clock.advance(7)
        self.assertEqual(h.value("aura_proxy_sse_stalls_total", route="aura"), 2)

    def test_stall_seen_by_the_heartbeat_timer(self) -> None:
        """A silence over stall_after is counted by the stream's timer, without a scrape."""
        h, upstream, _ = self.open(stall_after=5)
        self.emit(h, upstream, b"data: 1\n\n")
        h.clock.advance(16)  # the heartbeat timer runs at 15 s
        relay = next(iter(h.gateway.streams._relays))
        self.assertEqual(relay._stalls, 1)
        self.assertEqual(h.value("aura_proxy_sse_heartbeats_total", route="aura"), 1)
        self.assertEqual(h.value("aura_proxy_sse_stalls_total", route="aura"), 1)

    def test_events_of_one_read(self) -> None:
        """Several events in one upstream read: each counted; the gaps between them are zero."""
        h, upstream, _ = self.open()
        self.emit(h, upstream, b"data: a\n\ndata: b\n\ndata: c\n\n")
        self.assertEqual(h.value("aura_proxy_sse_events_total", route="aura"), 3)
        self.assertEqual(h.value("aura_proxy_sse_event_gap_seconds_count", route="aura"), 2)
        self.assertEqual(bucket(h, "aura_proxy_sse_event_gap_seconds", "0.001"), 2)

    def test_comments_are_not_events(self) -> None:
        """An upstream comment (its own keep-alive) is bytes delivered, not an event, and no gap."""
        h, upstream, _ = self.open()
        self.emit(h, upstream, b"data: a\n\n")
        h.clock.advance(3)
        self.emit(h, upstream, b": ping\n\n")
        self.assertEqual(h.value("aura_proxy_sse_events_total", route="aura"), 1)
        self.assertEqual(h.value("aura_proxy_sse_event_gap_seconds_count", route="aura"), 0)

    def test_idle_timeout(self) -> None:
        """A stream closed for silence ends by C{idle_timeout}."""
        h, upstream, _ = self.open(CONFIG.replace("heartbeat_interval = 15", "heartbeat_interval = 15\nidle_timeout = 20"))
        h.clock.advance(21)
        h.flush()
        self.assertEqual(h.value("aura_proxy_sse_ends_total", route="aura", reason="idle_timeout"), 1)

    def test_shutdown(self) -> None:
        """A stream ended by the gateway's shutdown ends by C{shutdown}."""
        h, upstream, _ = self.open()
        self.emit(h, upstream, b"data: a\n\n")
        h.gateway.shutdown()
        h.flush()
        self.assertEqual(h.value("aura_proxy_sse_ends_total", route="aura", reason="shutdown"), 1)
        self.assertEqual(h.value("aura_proxy_sse_events_total", route="aura"), 1)

    def test_client_disconnect(self) -> None:
        """With C{on_client_disconnect = cancel}, a client that leaves ends by C{client_disconnect}."""
        h = MetricsHarness(Stream(), self.cfg(CONFIG + "[sse]\non_client_disconnect = cancel\n"))
        d = h.gateway.handle(_request())  # type: ignore[arg-type]
        h.flush()
        self.assertEqual(h.value("aura_proxy_sse_open_streams", route="aura"), 1)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        h.flush()
        self.assertEqual(h.value("aura_proxy_sse_ends_total", route="aura", reason="client_disconnect"), 1)
        self.assertEqual(h.value("aura_proxy_sse_open_streams", route="aura"), 0)

    def test_detached(self) -> None:
        """
        With resume on and C{detach}, a client that leaves ends its stream
        by C{detached} at once; what the upstream sends later is not delivered.
        """
        upstream = Stream()
        h = MetricsHarness(upstream, self.cfg(CONFIG + "[sse]\nresume = memory\nresume_ttl = 60\n"), resume=True)
        d = h.gateway.handle(_request())  # type: ignore[arg-type]
        h.flush()
        self.emit(h, upstream, b"data: 1\n\n")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(h.value("aura_proxy_sse_ends_total", route="aura", reason="detached"), 1)
        self.assertEqual(h.value("aura_proxy_sse_open_streams", route="aura"), 0)
        self.emit(h, upstream, b"data: 2\n\n")
        self.assertEqual(h.value("aura_proxy_sse_events_total", route="aura"), 1)
        self.assertEqual(h.value("aura_proxy_resume_log_streams", store="memory"), 1)
        self.assertGreater(h.value("aura_proxy_resume_log_bytes", store="memory") or 0, 0)
        assert upstream.request is not None
        upstream.request.finish()
        h.flush()
        # The detached stream's end is not a second end.
        self.assertEqual(h.value("aura_proxy_sse_ends_total", route="aura", reason="completed"), None)
        self.assertEqual(h.value("aura_proxy_sse_stream_duration_seconds_count", route="aura"), 1)

    def test_upstream_error_reason(self) -> None:
        """A relay whose upstream fails mid-body is folded as C{upstream_error}."""
        metrics = GatewayMetrics(Clock(), CollectorRegistry(auto_describe=False))
        relay, request, _, _ = start()
        call = _FakeCall()
        metrics.stream_started(call, relay, None)  # type: ignore[arg-type]
        relay.dataReceived(b"data: x\n\n")
        relay.done.addCallback(lambda reason: metrics.stream_ended(relay, reason))
        end(relay, ConnectionLost())
        registry = metrics.registry
        self.assertEqual(registry.get_sample_value(
            "aura_proxy_sse_ends_total", {"route": "aura", "reason": "upstream_error"}), 1)
        # Without a stamper each write is an event.
        self.assertEqual(registry.get_sample_value("aura_proxy_sse_events_total", {"route": "aura"}), 1)


class PyStreamFigureTests(StreamFigureTests):
    """The same figures with C{fast_path = off}: the relay's per-read step in Python."""

    fast_path = "off"


class ResumeFigureTests(TestCase):
    """Resumed streams: counted as resumes, their events as replayed."""

    def test_resume_counts(self) -> None:
        """A reconnect with a gateway id is one resume with the events it was replayed."""
        upstream = Streams()
        h = MetricsHarness(upstream, CONFIG + "[sse]\nresume = memory\nresume_ttl = 60\n", resume=True)
        first = h.request("GET", "/api/aura/stream", headers=TENANT, unbuffered=True)
        received: list[bytes] = []
        h.client.collect(first, received.append)
        h.flush()
        for n in (1, 2, 3):
            upstream.requests[0].write(b"data: %d\n\n" % n)
            h.flush()
        first_id = [line for line in b"".join(received).splitlines() if line.startswith(b"id:")][0][4:].strip()
        second = h.request("GET", "/api/aura/stream", headers={"X-Tenant-ID": "t1", "Last-Event-ID": first_id.decode()},
                           unbuffered=True)
        h.client.collect(second, lambda data: None)
        h.flush()
        self.assertEqual(h.value("aura_proxy_sse_resumes_total", route="aura"), 1)
        self.assertEqual(h.value("aura_proxy_sse_open_streams", route="aura"), 2)
        upstream.requests[0].finish()
        h.flush()
        self.assertEqual(h.value("aura_proxy_sse_replayed_events_total", route="aura"), 2)
        self.assertEqual(h.value("aura_proxy_sse_streams_total", route="aura"), 2)
        self.assertEqual(h.value("aura_proxy_sse_ends_total", route="aura", reason="completed"), 2)
        self.assertEqual(h.value("aura_proxy_sse_events_total", route="aura"), 5)


class _FakeHistory:
    """A history service's stats, as L{aura_proxy.history.HistoryService.stats} gives them."""

    class config:
        spool_dir = "/nonexistent-spool"

    def stats(self) -> dict[str, int]:
        return {"queue_length": 7, "spool_pending": 0, "written": 120, "failed": 2, "dropped": 1}


class GaugeTests(SynchronousTestCase):
    """Figures read from the gateway's parts at scrape time."""

    def test_history(self) -> None:
        """History's queue depth, spool size, rows written and rows lost (refused + dropped)."""
        registry = CollectorRegistry(auto_describe=False)
        metrics = GatewayMetrics(Clock(), registry)
        metrics.history = _FakeHistory()  # type: ignore[assignment]
        self.assertEqual(registry.get_sample_value("aura_proxy_history_queue_depth"), 7)
        self.assertEqual(registry.get_sample_value("aura_proxy_history_spool_bytes"), 0)
        self.assertEqual(registry.get_sample_value("aura_proxy_history_rows_written_total"), 120)
        self.assertEqual(registry.get_sample_value("aura_proxy_history_rows_failed_total"), 3)

    def test_redis_resume_log(self) -> None:
        """A Redis stream log reports the streams this process writes and their kept bytes."""
        from aura_proxy.resume.redis import RedisResumeLog

        log = RedisResumeLog(Clock(), "redis://127.0.0.1:1/0", 60, 10, 1000)
        log.open("s1", "owner")
        log.append("s1", 1, b"data: 12345\n\n")
        log.append("s1", 2, b"data: 1\n\n")
        registry = CollectorRegistry(auto_describe=False)
        metrics = GatewayMetrics(Clock(), registry)
        metrics.resume = log
        self.assertEqual(registry.get_sample_value("aura_proxy_resume_log_streams", {"store": "redis"}), 1)
        self.assertEqual(registry.get_sample_value("aura_proxy_resume_log_bytes", {"store": "redis"}), 22)

    def test_no_history_no_resume(self) -> None:
        """Without history or a stream log, their figures are absent (not zero)."""
        registry = CollectorRegistry(auto_describe=False)
        GatewayMetrics(Clock(), registry)
        self.assertIsNone(registry.get_sample_value("aura_proxy_history_queue_depth"))
        self.assertIsNone(registry.get_sample_value("aura_proxy_resume_log_streams", {"store": "memory"}))


class WorkersSumTests(SynchronousTestCase):
    """The parent's C{/metrics} with C{workers > 1}: the workers' figures summed."""

    def worker_text(self, streams: int, requests: int) -> str:
        clock = Clock()
        registry = CollectorRegistry(auto_describe=False)
        metrics = GatewayMetrics(clock, registry, worker=None)
        metrics._requests[("aura", b"GET", 2)] = requests
        metrics._streams_total["aura"] = streams
        return exposition(registry).decode()

    def test_sum_and_up(self) -> None:
        """
        Counters and histograms sum; each slot has C{up}; a worker that did
        not answer, or answered what does not parse, is 0 and absent.
        """
        texts = {1: self.worker_text(2, 10), 2: self.worker_text(3, 5), 5: "garbage{ 1\n"}

        def scrape(index: int) -> Deferred[Optional[str]]:
            if index == 3:
                return fail(ConnectionRefusedError())
            return succeed(texts[index])

        body = self.successResultOf(
            WorkersMetrics(lambda: [(1, True), (2, True), (3, True), (4, False), (5, True)], scrape).render()
        ).decode()
        self.flushLoggedErrors()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body) for s in f.samples
        }
        self.assertEqual(samples[("aura_proxy_requests_total",
                                  (("method", "GET"), ("route", "aura"), ("status_class", "2xx")))], 15)
        self.assertEqual(samples[("aura_proxy_sse_streams_total", (("route", "aura"),))], 5)
        self.assertEqual(
            [samples[("aura_proxy_up", (("worker", str(i)),))] for i in (1, 2, 3, 4, 5)], [1, 1, 0, 0, 0]
        )
        self.assertEqual(samples[("aura_proxy_upstream_pool_connections", (("state", "idle"),))], 0)
        self.assertIn(("aura_proxy_build_info", (("fast_path", "on"), ("version", "0.1.0"))), samples)

    def test_last_sum_in_the_registry(self) -> None:
        """The parent's registry (which the dashboard reads) holds the sum of the last scrape."""
        registry = CollectorRegistry(auto_describe=False)
        text = self.worker_text(2, 10)
        summed = WorkersMetrics(lambda: [(1, True), (2, True)], lambda index: succeed(text), registry=registry)
        self.assertIsNone(registry.get_sample_value("aura_proxy_sse_streams_total", {"route": "aura"}))
        self.successResultOf(summed.render())
        self.assertEqual(registry.get_sample_value("aura_proxy_sse_streams_total", {"route": "aura"}), 4)
        self.assertEqual(registry.get_sample_value("aura_proxy_up", {"worker": "2"}), 1)

    def test_gauges_of_a_dead_worker_vanish(self) -> None:
        """Summing only what answered: a gauge is the sum over the workers still there."""
        clock = Clock()
        texts = []
        for open_streams in (2, 5):
            registry = CollectorRegistry(auto_describe=False)
            metrics = GatewayMetrics(clock, registry, worker=None)
            metrics._upstream_active = open_streams
            texts.append(exposition(registry).decode())
        parsed = [list(text_string_to_metric_families(text)) for text in texts]
        [pool] = [f for f in sum_families(parsed) if f.name == "aura_proxy_upstream_pool_connections"]
        self.assertEqual({s.labels["state"]: s.value for s in pool.samples}, {"idle": 0, "active": 7})
        [pool] = [f for f in sum_families(parsed[:1]) if f.name == "aura_proxy_upstream_pool_connections"]
        self.assertEqual({s.labels["state"]: s.value for s in pool.samples}, {"idle": 0, "active": 2})


class AdminMetricsTests(SynchronousTestCase):
    """C{GET /metrics} on the admin site."""

    def test_served_in_prometheus_text(self) -> None:
        """The registry's text, with prometheus_client's content type."""
        registry = CollectorRegistry(auto_describe=False)
        GatewayMetrics(Clock(), registry)
        client = StubTreq(Admin(lambda: {"status": "ok"}, metrics=lambda: succeed(exposition(registry))).resource())
        response = self.successResultOf(client.get("http://admin/metrics"))
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders("content-type")[0].startswith("text/plain; version="))
        body = self.successResultOf(client.content(response)).decode()
        self.assertIn('aura_proxy_up{worker="main"} 1.0', body)

    def test_off(self) -> None:
        """Without metrics (C{[metrics] enabled = false}) C{/metrics} is a JSON 404."""
        client = StubTreq(Admin(lambda: {"status": "ok"}).resource())
        response = self.successResultOf(client.get("http://admin/metrics"))
        self.assertEqual(response.code, 404)


class _FakeRoute:
    name = "aura"


class _FakeCall:
    """The parts of a call L{GatewayMetrics.stream_started} reads."""

    route = _FakeRoute()
    started = 0.0


def _request() -> Request:
    request = Request(DummyChannel())
    request.method, request.clientproto = b"GET", b"HTTP/1.1"
    request.uri = request.path = b"/api/aura/stream"
    request.content = BytesIO()
    request.requestHeaders.addRawHeader(b"x-tenant-id", b"t1")
    return request
