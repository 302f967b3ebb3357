"""
Unit tests for L{aura_proxy.dashboard}: the figures read back from a
metrics registry (percentiles from buckets, rates from counter deltas, ends
by reason), and the admin site's dashboard routes (the page, the JSON
snapshot, the Server-Sent Events stream) driven through a real
C{HTTPChannel} on a C{StringTransport}, time on a C{MemoryReactorClock}.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Histogram
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from aura_proxy.admin import admin_site
from aura_proxy.config import parse_config
from aura_proxy.dashboard import (
    END_REASONS,
    Dashboard,
    Figures,
    dashboard_service,
    histogram_quantile,
    read_registry,
    static_file,
)
from aura_proxy.history.recent import CallFilter
from tests.dashboard_helpers import BUCKETS, fake_metrics

INI = """
[gateway]
listen = tcp:0:interface=127.0.0.1
admin_listen = tcp:0:interface=127.0.0.1

[route:aura]
path = /api/aura/**
upstream = http://127.0.0.1:9000

[route:tools]
path = /api/tools/**
upstream = http://tools.internal:8000/base
"""


class HistogramQuantileTests(SynchronousTestCase):
    """L{histogram_quantile}: PromQL's estimate from cumulative buckets."""

    BUCKETS = ((0.1, 10.0), (0.5, 20.0), (1.0, 30.0), (math.inf, 30.0))

    def test_interpolatesInsideTheBucket(self) -> None:
        """The median of 30 observations (10 per bucket) is halfway into the second bucket."""
        self.assertAlmostEqual(histogram_quantile(0.5, self.BUCKETS), 0.3)  # type: ignore[arg-type]
        self.assertAlmostEqual(histogram_quantile(0.99, self.BUCKETS), 0.985)  # type: ignore[arg-type]

    def test_firstBucketStartsAtZero(self) -> None:
        """A quantile in the first bucket interpolates from 0 to its bound."""
        self.assertAlmostEqual(histogram_quantile(0.1, self.BUCKETS), 0.03)  # type: ignore[arg-type]

    def test_emptyHistogramHasNone(self) -> None:
        """No observations (or no buckets): no percentile, not 0."""
        self.assertIsNone(histogram_quantile(0.5, ((0.1, 0.0), (math.inf, 0.0))))
        self.assertIsNone(histogram_quantile(0.5, ()))

    def test_infBucketAnswersHighestFiniteBound(self) -> None:
        """Observations above every finite bound: the highest finite bound, as PromQL does."""
        buckets = ((0.1, 1.0), (1.0, 1.0), (math.inf, 10.0))
        self.assertEqual(histogram_quantile(0.9, buckets), 1.0)

    def test_emptyBucketsBeforeTheRankAreSkipped(self) -> None:
        """A run of buckets with no new observations does not pull the estimate down."""
        buckets = ((0.1, 0.0), (0.5, 0.0), (1.0, 4.0), (math.inf, 4.0))
        self.assertAlmostEqual(histogram_quantile(0.5, buckets), 0.75)  # type: ignore[arg-type]


class ReadRegistryTests(SynchronousTestCase):
    """L{read_registry}: the contract's metric names, summed over labels."""

    def test_emptyRegistryReadsAsZero(self) -> None:
        """A registry without the gateway's metrics: nothing seen, every figure empty."""
        sample = read_registry(CollectorRegistry(), 5.0)
        self.assertFalse(sample.seen)
        self.assertEqual((sample.t, sample.open_streams, sample.events, sample.stalls), (5.0, {}, {}, 0.0))

    def test_sumsOverLabelsButRoute(self) -> None:
        """Open streams and events by route; requests by route with 5xx apart; ends by reason over routes."""
        m = fake_metrics()
        m.open_streams.labels("aura").set(3)
        m.open_streams.labels("tools").set(1)
        m.events.labels("aura").inc(40)
        m.requests.labels("aura", "GET", "2xx").inc(7)
        m.requests.labels("aura", "POST", "5xx").inc(2)
        m.ends.labels("aura", "completed").inc(4)
        m.ends.labels("tools", "completed").inc(1)
        m.ends.labels("tools", "upstream_error").inc(2)
        m.stalls.labels("aura").inc()
        m.stalls.labels("tools").inc()
        sample = read_registry(m.registry, 1.0)
        self.assertTrue(sample.seen)
        self.assertEqual(sample.open_streams, {"aura": 3.0, "tools": 1.0})
        self.assertEqual(sample.events, {"aura": 40.0})
        self.assertEqual(sample.requests, {"aura": 9.0})
        self.assertEqual(sample.errors, {"aura": 2.0})
        self.assertEqual(sample.ends, {"completed": 5.0, "upstream_error": 2.0})
        self.assertEqual(sample.stalls, 2.0)

    def test_histogramBucketsMergedAcrossRoutes(self) -> None:
        """Buckets of the same bound add up over routes, in bound order, +Inf last."""
        m = fake_metrics()
        m.first_event.labels("aura").observe(0.03)
        m.first_event.labels("tools").observe(0.3)
        buckets = read_registry(m.registry, 1.0).histograms["first_event"]
        self.assertEqual([b for b, _ in buckets], [*BUCKETS, math.inf])
        self.assertEqual([c for _, c in buckets], [0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0])


class FiguresTests(SynchronousTestCase):
    """L{Figures}: rates and percentiles over time."""

    def test_eventRateFromCounterDeltas(self) -> None:
        """The event rate is the events counter's increase over the time between two samples."""
        m = fake_metrics()
        figures = Figures(m.registry)
        figures.sample(100.0)
        m.events.labels("aura").inc(10)
        figures.sample(101.0)
        m.events.labels("aura").inc(30)
        m.events.labels("tools").inc(10)
        figures.sample(103.0)
        snapshot = figures.snapshot()
        self.assertEqual([p["event_rate"] for p in snapshot["series"]], [10.0, 20.0])
        self.assertEqual([p["t"] for p in snapshot["series"]], [101.0, 103.0])
        self.assertEqual(snapshot["event_rate"], 20.0)
        self.assertEqual(snapshot["events_total"], 50.0)

    def test_counterResetCountsFromZero(self) -> None:
        """A counter that goes back (a worker restarted) counts its new value, never a negative rate."""
        figures = Figures(CollectorRegistry())
        from aura_proxy.dashboard.figures import Sample

        figures._samples.extend([Sample(1.0, events={"aura": 100.0}), Sample(2.0, events={"aura": 5.0})])
        self.assertEqual(figures.series()[0]["event_rate"], 5.0)

    def test_openStreamsOverTime(self) -> None:
        """Each point carries the streams open at its sample, summed over routes."""
        m = fake_metrics()
        figures = Figures(m.registry)
        figures.sample(0.0)
        m.open_streams.labels("aura").set(2)
        m.open_streams.labels("tools").set(1)
        figures.sample(1.0)
        m.open_streams.labels("aura").set(0)
        figures.sample(2.0)
        self.assertEqual([p["open_streams"] for p in figures.series()], [3.0, 1.0])
        self.assertEqual(figures.snapshot()["open_streams"], 1.0)

    def test_oldSamplesForgotten(self) -> None:
        """Samples older than C{keep} seconds are dropped."""
        figures = Figures(CollectorRegistry(), keep=10.0)
        for t in range(0, 30):
            figures.sample(float(t))
        self.assertEqual(len(figures.series()), 10)

    def test_percentilesSinceStartAndInWindow(self) -> None:
        """
        Since start: every observation; the last minute: only those after the
        sample a minute back (the slow first events of long ago drop out).
        """
        m = fake_metrics()
        figures = Figures(m.registry, window=60.0)
        for _ in range(10):
            m.first_event.labels("aura").observe(4.0)  # (1, 5] bucket
        figures.sample(0.0)
        figures.sample(50.0)
        for _ in range(10):
            m.first_event.labels("aura").observe(0.02)  # (0.01, 0.05] bucket
        figures.sample(100.0)
        p = figures.snapshot()["percentiles"]["first_event"]
        self.assertEqual(p["total"]["count"], 20.0)
        self.assertEqual(p["window"]["count"], 10.0)
        self.assertAlmostEqual(p["window"]["p50"], 0.03)
        self.assertAlmostEqual(p["total"]["p90"], 1.0 + 4.0 * 0.8)
        self.assertAlmostEqual(p["total"]["p50"], 0.05)

    def test_percentilesMatchPrometheusBucketsOfARealHistogram(self) -> None:
        """A prometheus_client histogram observed 100 times, uniformly: p50, p90, p99 as PromQL would say."""
        r = CollectorRegistry()
        h = Histogram("aura_proxy_sse_event_gap_seconds", "gap", ["route"], buckets=(0.25, 0.5, 0.75, 1.0), registry=r)
        for i in range(100):
            h.labels("aura").observe((i + 0.5) / 100)
        figures = Figures(r)
        figures.sample(0.0)
        p = figures.snapshot()["percentiles"]["event_gap"]["total"]
        self.assertAlmostEqual(p["p50"], 0.5)
        self.assertAlmostEqual(p["p90"], 0.9)
        self.assertAlmostEqual(p["p99"], 0.99)

    def test_endsListEveryReason(self) -> None:
        """Every end reason is listed, zero when none ended so; an unknown reason is kept too."""
        m = fake_metrics()
        m.ends.labels("aura", "idle_timeout").inc(2)
        m.ends.labels("aura", "mystery").inc()
        figures = Figures(m.registry)
        figures.sample(0.0)
        ends = figures.snapshot()["ends"]
        self.assertEqual(list(ends)[: len(END_REASONS)], list(END_REASONS))
        self.assertEqual(ends["idle_timeout"], 2.0)
        self.assertEqual(ends["completed"], 0.0)
        self.assertEqual(ends["mystery"], 1.0)


# -- the admin site's dashboard routes ------------------------------------------


class FakeProber:
    """An upstream prober with a fixed report."""

    def report(self) -> dict[str, dict[str, object]]:
        return {"aura": {"host": "127.0.0.1", "port": 9000, "up": True, "connect_ms": 0.5, "last_error": None}}


class FakeCalls:
    """A call history reader: records each filter asked; answers from C{rows} or a Deferred held open."""

    def __init__(self) -> None:
        self.asked: list[CallFilter] = []
        self.rows: list[dict[str, object]] = [{"id": "c1", "tenant_id": "t1", "status_code": 200}]
        self.hold: Optional[Deferred[list[dict[str, object]]]] = None
        self.fail: Optional[Exception] = None

    def __call__(self, where: CallFilter) -> "Deferred[list[dict[str, object]]]":
        self.asked.append(where)
        if self.fail is not None:
            d: Deferred[list[dict[str, object]]] = Deferred()
            d.errback(Failure(self.fail))
            return d
        if self.hold is not None:
            return self.hold
        return succeed(list(self.rows))


class Client:
    """One HTTP/1.1 connection to the admin site over a StringTransport."""

    def __init__(self, site: Any) -> None:
        self.transport = StringTransport()
        self.channel = site.buildProtocol(None)
        self.channel.makeConnection(self.transport)

    def get(self, path: str, version: str = "1.0") -> None:
        """Send a GET (HTTP/1.0: the answer is not chunked, and ends with the connection)."""
        self.channel.dataReceived(f"GET {path} HTTP/{version}\r\nHost: admin\r\n\r\n".encode("ascii"))

    def text(self) -> str:
        return self.transport.value().decode("utf-8")

    def leave(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


def status_and_body(raw: str) -> tuple[int, dict[str, str], str]:
    """Status, headers (lower-cased names) and body of one plain (Content-Length) response."""
    head, _, body = raw.partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def sse_snapshots(raw: str) -> list[dict[str, Any]]:
    """The JSON of every C{snapshot} event in a raw chunked SSE response."""
    out = []
    for line in raw.split("\n"):
        if line.startswith("data: "):
            out.append(json.loads(line[len("data: "):]))
    return out


class DashboardSiteTests(SynchronousTestCase):
    """The dashboard's routes on the admin site."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1000.0)
        self.metrics = fake_metrics()
        self.calls = FakeCalls()
        config = parse_config(INI, "gw.ini")
        self.dashboard = Dashboard(
            self.metrics.registry, self.clock, routes=config.routes, prober=FakeProber(),
            calls=self.calls, health=lambda: {"status": "ok"},
        )
        self.site = admin_site(lambda: {"status": "ok"}, self.clock, self.dashboard)
        self.site.timeOut = None
        self.addCleanup(self.dashboard.stop)

    def test_pageAndItsFiles(self) -> None:
        """C{/} is the page (HTML), its script and style sheet are under /dashboard/, as packaged."""
        for path, kind, name in [
            ("/", "text/html", "index.html"),
            ("/dashboard/dashboard.js", "text/javascript", "dashboard.js"),
            ("/dashboard/dashboard.css", "text/css", "dashboard.css"),
        ]:
            c = Client(self.site)
            c.get(path)
            status, headers, body = status_and_body(c.text())
            self.assertEqual(status, 200, path)
            self.assertTrue(headers["content-type"].startswith(kind), headers)
            self.assertEqual(body.encode("utf-8"), static_file(name))
        self.assertIn(b'src="/dashboard/dashboard.js"', static_file("index.html"))
        self.assertIn(b'new EventSource("/dashboard/events"', static_file("dashboard.js"))

    def test_unknownFileIsJson404(self) -> None:
        """Only the page's own files are served: anything else under /dashboard/ is a 404 (JSON when routed)."""
        c = Client(self.site)
        c.get("/dashboard/..%2Fadmin.py")
        self.assertEqual(status_and_body(c.text())[0], 404)
        c = Client(self.site)
        c.get("/dashboard/admin.py")
        status, headers, body = status_and_body(c.text())
        self.assertEqual(status, 404)
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(json.loads(body)["error"]["code"], "not_found")

    def test_withoutDashboardThePageIs404(self) -> None:
        """An admin site built without a dashboard answers C{/} and the stream with 404, health as before."""
        site = admin_site(lambda: {"status": "ok"}, self.clock)
        for path in ("/", "/dashboard/events", "/dashboard/snapshot"):
            c = Client(site)
            c.get(path)
            self.assertEqual(status_and_body(c.text())[0], 404, path)
        c = Client(site)
        c.get("/healthz")
        self.assertEqual(status_and_body(c.text())[0], 200)

    def test_snapshotAsJson(self) -> None:
        """
        C{/dashboard/snapshot}: the figures (from the registry), the routes
        with their upstream health, the health report, and the calls of
        the filter given in the query.
        """
        self.metrics.open_streams.labels("aura").set(2)
        self.metrics.requests.labels("aura", "GET", "5xx").inc()
        c = Client(self.site)
        c.get("/dashboard/snapshot?tenant=t1&status=5xx&path=/api/aura/&limit=5")
        status, headers, body = status_and_body(c.text())
        self.assertEqual(status, 200)
        snapshot = json.loads(body)
        self.assertEqual(snapshot["open_streams"], 2.0)
        self.assertEqual(snapshot["time"], 1000.0)
        self.assertEqual(snapshot["health"], {"status": "ok"})
        self.assertEqual(snapshot["calls"], self.calls.rows)
        self.assertEqual(self.calls.asked, [CallFilter(5, "t1", "5xx", "/api/aura/")])
        self.assertEqual(snapshot["filter"], {"limit": 5, "tenant": "t1", "status": "5xx", "path": "/api/aura/"})
        aura, tools = snapshot["routes"]
        self.assertEqual(
            (aura["name"], aura["path"], aura["upstream"], aura["upstream_health"]["up"], aura["errors"]),
            ("aura", "/api/aura/**", "http://127.0.0.1:9000", True, 1.0),
        )
        self.assertEqual((tools["upstream"], tools["upstream_health"], tools["open_streams"]),
                         ("http://tools.internal:8000/base", None, 0))

    def test_badFilterIsJson400(self) -> None:
        """A filter that is not of its form is refused with a JSON 400 naming the parameter, for both routes."""
        for query in ("status=abc", "limit=0", "limit=9999", "path=api", "tenant=a&tenant=b", "tenant=%01"):
            for route in ("/dashboard/snapshot", "/dashboard/events"):
                c = Client(self.site)
                c.get(f"{route}?{query}")
                status, headers, body = status_and_body(c.text())
                self.assertEqual(status, 400, query)
                self.assertEqual(headers["content-type"], "application/json")
                error = json.loads(body)["error"]
                self.assertEqual(error["code"], "bad_request")
                self.assertIn(query.split("=")[0], error["message"])
        self.assertEqual(self.dashboard.clients, 0)
        self.assertEqual(self.calls.asked, [])

    def test_historyFailureIsShownNotFatal(self) -> None:
        """A history database that cannot be read: the snapshot still comes, with no calls and the error."""
        self.calls.fail = RuntimeError("database is locked")
        c = Client(self.site)
        c.get("/dashboard/snapshot")
        snapshot = json.loads(status_and_body(c.text())[2])
        self.assertEqual((snapshot["calls"], snapshot["calls_error"]), ([], "database is locked"))

    def test_eventsStreamEverySecond(self) -> None:
        """
        C{/dashboard/events} answers C{text/event-stream} at once with a
        retry hint and a first snapshot, then one snapshot per second on
        the clock, numbered, each with the figures of that moment.
        """
        c = Client(self.site)
        c.get("/dashboard/events?tenant=t1", "1.1")
        head = c.text()
        self.assertIn("HTTP/1.1 200", head)
        self.assertIn("Content-Type: text/event-stream", head)
        self.assertIn("retry: 2000\n\n", head)
        self.assertEqual(len(sse_snapshots(c.text())), 1)
        self.metrics.events.labels("aura").inc(25)
        self.metrics.open_streams.labels("aura").set(4)
        self.clock.advance(1.0)
        self.metrics.events.labels("aura").inc(5)
        self.clock.advance(1.0)
        snapshots = sse_snapshots(c.text())
        self.assertEqual(len(snapshots), 3)
        self.assertEqual([s["time"] for s in snapshots], [1000.0, 1001.0, 1002.0])
        self.assertEqual([s["event_rate"] for s in snapshots[1:]], [25.0, 5.0])
        self.assertEqual(snapshots[2]["open_streams"], 4.0)
        self.assertEqual(snapshots[2]["calls"], self.calls.rows)
        self.assertEqual(snapshots[2]["filter"]["tenant"], "t1")
        self.assertIn("event: snapshot\nid: 3\n", c.text())

    def test_heartbeats(self) -> None:
        """A comment line goes out every 15 seconds besides the snapshots."""
        c = Client(self.site)
        c.get("/dashboard/events")
        self.clock.pump([1.0] * 15)
        self.assertEqual(c.text().count(": heartbeat\n\n"), 1)

    def test_clientLeavingStopsTheStream(self) -> None:
        """
        When the page goes away its stream is dropped at once: nothing more
        is written and, with no page left, the ticking stops (no timers
        left on the clock).
        """
        c = Client(self.site)
        c.get("/dashboard/events")
        self.assertEqual(self.dashboard.clients, 1)
        self.assertTrue(self.clock.getDelayedCalls())
        c.leave()
        self.assertEqual(self.dashboard.clients, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        before = c.text()
        self.clock.advance(5.0)
        self.assertEqual(c.text(), before)

    def test_severalPagesOneQueryPerFilter(self) -> None:
        """Two pages with the same filter share one history query per tick; a third with another filter has its own."""
        pages = [Client(self.site) for _ in range(3)]
        pages[0].get("/dashboard/events?tenant=a")
        pages[1].get("/dashboard/events?tenant=a")
        pages[2].get("/dashboard/events?tenant=b")
        self.calls.asked.clear()
        self.clock.advance(1.0)
        self.assertEqual(sorted(w.tenant or "" for w in self.calls.asked), ["a", "b"])
        for page in pages:
            self.assertEqual(len(sse_snapshots(page.text())), 2)
        pages[0].leave()
        self.clock.advance(1.0)
        self.assertEqual(self.dashboard.clients, 2)

    def test_slowHistoryDoesNotPileUp(self) -> None:
        """
        While the last history query has not answered, the next ticks send
        their figures with the calls shown last and ask no new query; the
        answer, when it comes, is sent at once.
        """
        c = Client(self.site)
        c.get("/dashboard/events")
        self.calls.hold = Deferred()
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        self.assertEqual(len(self.calls.asked), 2)  # the first page's, the one held
        snapshots = sse_snapshots(c.text())
        self.assertEqual(len(snapshots), 3)
        self.calls.hold.callback([{"id": "late"}])
        snapshots = sse_snapshots(c.text())
        self.assertEqual(len(snapshots), 4)
        self.assertEqual(snapshots[-1]["calls"], [{"id": "late"}])

    def test_slowPageSkipsSnapshots(self) -> None:
        """
        While the page's connection cannot take more (the transport pauses
        the response's producer), its snapshots and heartbeats are skipped,
        not queued; once it drains, the next tick's snapshot goes out.
        """
        c = Client(self.site)
        c.get("/dashboard/events", "1.1")
        self.assertEqual(len(sse_snapshots(c.text())), 1)
        c.transport.producer.pauseProducing()  # the HTTP channel, as a full socket would
        self.clock.pump([1.0] * 20)
        self.assertEqual(len(sse_snapshots(c.text())), 1)
        self.assertNotIn(": heartbeat", c.text())
        c.transport.producer.resumeProducing()
        self.clock.advance(1.0)
        self.assertEqual(len(sse_snapshots(c.text())), 2)

    def test_stopEndsEveryStream(self) -> None:
        """Stopping the dashboard (the admin site stops) ends each open stream's response cleanly."""
        c = Client(self.site)
        c.get("/dashboard/events", "1.1")
        self.dashboard.stop()
        self.assertTrue(c.text().endswith("0\r\n\r\n"), c.text()[-40:])
        self.assertEqual(self.dashboard.clients, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class DashboardServiceTests(SynchronousTestCase):
    """L{dashboard_service}: what runs beside the admin site."""

    def test_proberRunsWhileRunning(self) -> None:
        """Started, the upstream prober connects to every upstream; stopped, nothing is left on the clock."""
        clock = MemoryReactorClock()
        # IP addresses only: a host name would be resolved for real on older Twisted's MemoryReactor.
        config = parse_config(INI.replace("tools.internal", "10.1.2.3") + "\n[history]\nenabled = false\n", "gw.ini")
        service = dashboard_service(config, CollectorRegistry(), clock)
        self.assertEqual(clock.tcpClients, [])
        service.startService()
        self.assertEqual(sorted((h, p) for h, p, *_ in clock.tcpClients), [("10.1.2.3", 8000), ("127.0.0.1", 9000)])
        self.successResultOf(service.stopService())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_historyReaderOnlyWhenHistoryIsOn(self) -> None:
        """History off: the page says so (no calls reader); on: a reader of [history]'s database, opened when first asked."""
        off = dashboard_service(parse_config(INI + "\n[history]\nenabled = false\n", "gw.ini"),
                                CollectorRegistry(), MemoryReactorClock())
        self.assertFalse(off.dashboard._base()["history"])
        path = os.path.abspath(self.mktemp())
        on = dashboard_service(parse_config(INI + f"\n[history]\ndsn = sqlite:///{path}\n", "gw.ini"),
                               CollectorRegistry(), MemoryReactorClock())
        self.assertTrue(on.dashboard._base()["history"])
        self.assertFalse(os.path.exists(path))


class ContinuousSamplingTests(SynchronousTestCase):
    """A started dashboard (the admin site runs) samples with no page open."""

    def test_pageOpenedLaterGetsThePast(self) -> None:
        """
        Started, the dashboard samples every second without pages; a page
        opened later gets the figures of the last seconds in its first
        snapshot (rates of before it came), and no sample of its own.
        """
        clock = MemoryReactorClock()
        metrics = fake_metrics()
        dashboard = Dashboard(metrics.registry, clock, idle_interval=1.0)
        dashboard.start()
        self.addCleanup(dashboard.stop)
        for i in range(5):
            metrics.events.labels("aura").inc(10 * i)
            clock.advance(1.0)
        self.assertEqual(dashboard.clients, 0)
        site = admin_site(lambda: {"status": "ok"}, clock, dashboard)
        site.timeOut = None
        c = Client(site)
        c.get("/dashboard/events")
        first = sse_snapshots(c.text())[0]
        self.assertEqual([p["event_rate"] for p in first["series"]], [10.0, 20.0, 30.0, 40.0])
        self.assertEqual(first["time"], 5.0)
        c.leave()
        # The page gone, sampling goes on (heartbeats do not).
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        dashboard.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_idleSamplingIsSparse(self) -> None:
        """With no page open, a sample every C{idle_interval} seconds only; with one, every second."""
        clock = MemoryReactorClock()
        dashboard = Dashboard(CollectorRegistry(), clock, idle_interval=5.0)
        dashboard.start()
        self.addCleanup(dashboard.stop)
        clock.pump([1.0] * 20)
        times = [p["t"] for p in dashboard.figures.series()]
        self.assertEqual(times, [6.0, 11.0, 16.0])  # the first sample at 1.0
        site = admin_site(lambda: {"status": "ok"}, clock, dashboard)
        site.timeOut = None
        Client(site).get("/dashboard/events")
        clock.pump([1.0] * 3)
        self.assertEqual([p["t"] for p in dashboard.figures.series()][-3:], [21.0, 22.0, 23.0])
