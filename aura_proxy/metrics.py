"""
Prometheus figures of one gateway process (C{[metrics]}, docs/operations.md).

L{GatewayMetrics} is the one object the request path talks to (through
L{aura_proxy.proxy.Services}): stages call it once per call or per stream,
never per event.  What changes per event (events and bytes delivered, gaps
between events, stalls, the first event's time) is counted by the relay's
per-read step itself (L{aura_proxy.relay}, in C where built) and read here
at scrape time: L{GatewayMetrics.collect} adds the figures of the streams
still open to the totals folded in when each stream ended, so a scrape sees
them current.  Gauges (open streams, the upstream pool, history and resume
log sizes) are read at scrape time too; nothing is pushed.

It is a prometheus_client collector registered on a L{CollectorRegistry} it
is given: one per gateway process (the tests make their own), never the
global one.  With C{workers > 1} the parent sums its workers' figures
(L{WorkersMetrics}): prometheus_client's multiprocess mode cannot carry
figures read from live objects at scrape time, so each worker serves its
own on a private Unix socket and the parent scrapes them.

Labels stay bounded: route names from the configuration (C{-} when
unrouted), status classes, methods from a fixed list, reasons and kinds
from fixed lists; never paths, tenants or ids.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from aura_proxy import __version__
from aura_proxy.stages import EndStage

if TYPE_CHECKING:
    from aura_proxy.call import Call
    from aura_proxy.history import HistoryService
    from aura_proxy.relay import Relay
    from aura_proxy.resume.replay import Replay
    from aura_proxy.upstream import UpstreamClient

__all__ = [
    "CONTENT_TYPE_LATEST",
    "END_REASONS",
    "GAP_BUCKETS",
    "GatewayMetrics",
    "UPSTREAM_ERROR_KINDS",
    "WorkersMetrics",
    "exposition",
]

log = Logger()

#: Why a stream ended, as C{aura_proxy_sse_ends_total{reason}} says.
END_REASONS = (
    "completed", "client_disconnect", "upstream_error", "idle_timeout",
    "response_timeout", "shutdown", "detached",
)
#: What went wrong upstream, as C{aura_proxy_upstream_errors_total{kind}} says.
UPSTREAM_ERROR_KINDS = ("connect_error", "connect_timeout", "response_timeout", "protocol_error")

#: Upper bounds (seconds) of the histogram buckets.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FIRST_EVENT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: The gap histogram's bounds, handed to every metered relay (at most 24).
GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0)
DURATION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0)

_METHODS = frozenset((b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"))
_STATUS_CLASSES = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
#: A relay's end reason, as a stream end reason (the relay says client_disconnect
#: also for a detached stream's end; that one was counted when it detached).
_RELAY_REASONS = {r: r for r in END_REASONS}
_SSE_ACCEPT = b"text/event-stream"

_PREFIX = "aura_proxy_"


class _Histogram:
    """Counts per bucket (not cumulative; the last is +Inf) and the sum, for one label set."""

    __slots__ = ("counts", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.total = 0.0


def _observe(table: dict[str, _Histogram], key: str, bounds: Sequence[float], value: float) -> None:
    h = table.get(key)
    if h is None:
        h = table[key] = _Histogram(len(bounds) + 1)
    h.counts[bisect_left(bounds, value)] += 1
    h.total += value


def _bump(table: dict[Any, float], key: Any, by: float = 1) -> None:
    table[key] = table.get(key, 0) + by


def _buckets(bounds: Sequence[float], counts: Sequence[float]) -> list[tuple[str, float]]:
    out = []
    running = 0.0
    for bound, count in zip(bounds, counts):
        running += count
        out.append((repr(float(bound)), running))
    out.append(("+Inf", running + counts[-1]))
    return out


class _Stream:
    """An open stream's route and start, as the metrics see it."""

    __slots__ = ("route", "started")

    def __init__(self, route: str, started: float) -> None:
        self.route = route
        self.started = started


def route_name(call: "Call") -> str:
    """The call's route label: the route's name, C{-} when unrouted."""
    route = call.route
    return route.name if route is not None else "-"


class GatewayMetrics(EndStage):
    """
    The figures of one gateway process, and the collector that exposes them;
    also the pipeline's end stage that counts every call (L{ended}).

    @param registry: where the figures are registered (one per process).
    @param stall_after: a gap between events longer than this is a stall.
    @param worker: the C{worker} label of C{aura_proxy_up}; None: this
        process's figures are summed by a parent (L{WorkersMetrics}), which
        gives C{up} and C{build_info} itself.
    """

    def __init__(
        self,
        clock: IReactorTime,
        registry: CollectorRegistry,
        stall_after: float = 15.0,
        worker: Optional[str] = "main",
        fast_path: bool = True,
    ) -> None:
        self._seconds = clock.seconds
        self.registry = registry
        self.stall_after = stall_after
        self._worker = worker
        self._fast_path = fast_path
        self.history: Optional["HistoryService"] = None
        self.resume: Any = None
        self.client: Optional["UpstreamClient"] = None
        #: The detached streams and their caps (L{aura_proxy.detached.DetachedStreams}).
        self.detached: Any = None
        # Folded totals: what ended streams and calls left.
        # (route, method bytes, status // 100): calls.
        self._requests: dict[tuple[str, bytes, int], float] = {}
        self._request_seconds: dict[str, _Histogram] = {}
        self._streams_total: dict[str, float] = {}
        self._first_event: dict[str, _Histogram] = {}
        self._gaps: dict[str, _Histogram] = {}
        self._duration: dict[str, _Histogram] = {}
        self._events: dict[str, float] = {}
        self._bytes: dict[str, float] = {}
        self._stalls: dict[str, float] = {}
        self._ends: dict[tuple[str, str], float] = {}
        self._resumes: dict[str, float] = {}
        self._replayed: dict[str, float] = {}
        self._heartbeats: dict[str, float] = {}
        self._upstream_errors: dict[tuple[str, str], float] = {}
        self._upstream_active = 0
        # The streams a client is attached to now.
        self._relays: dict["Relay", _Stream] = {}
        self._replays: dict["Replay", _Stream] = {}
        registry.register(self)  # type: ignore[arg-type]

    # -- what the request path reports ------------------------------------------

    def ended(self, request: Request, call: "Call") -> None:
        """
        Every call, when it ends (an end stage of the pipeline): its status
        class; a plain call's duration.
        """
        route = call.route
        name = route.name if route is not None else "-"
        method = request.method
        # Raw in the key (labels made at scrape time), bounded all the same.
        key = (name, method if method in _METHODS else b"other", call.status // 100)
        requests = self._requests
        requests[key] = requests.get(key, 0) + 1
        if call.upstream_call is not None:
            self._upstream_active -= 1
        if not call.is_sse and call.replay is None:
            h = self._request_seconds.get(name)
            if h is None:
                h = self._request_seconds[name] = _Histogram(len(REQUEST_BUCKETS) + 1)
            took = self._seconds() - call.started
            h.counts[bisect_left(REQUEST_BUCKETS, took)] += 1
            h.total += took
        if call.timed_out and call.relay is None:
            accept = request.getHeader(b"accept")
            if accept is not None and _SSE_ACCEPT in accept:
                # A stream asked for, whose response head never came.
                _bump(self._ends, (name, "response_timeout"))

    def upstream_started(self) -> None:
        """A call went upstream (it holds an upstream connection until it ends)."""
        self._upstream_active += 1

    def upstream_error(self, call: "Call", kind: str) -> None:
        """The upstream failed before its response head (C{kind}: L{UPSTREAM_ERROR_KINDS})."""
        _bump(self._upstream_errors, (route_name(call), kind))

    def stream_started(self, call: "Call", relay: "Relay", event_source: Optional[object]) -> None:
        """An SSE response's head is out and its relay starts: meter it."""
        route = route_name(call)
        now = self._seconds()
        _bump(self._streams_total, route)
        _observe(self._request_seconds, route, REQUEST_BUCKETS, now - call.started)
        relay._meter(GAP_BUCKETS, self.stall_after, event_source)
        self._relays[relay] = _Stream(route, call.started)
        relay.notify_on_detach(lambda detached: self.stream_ended(detached, "detached"))

    def stream_ended(self, relay: "Relay", reason: str) -> None:
        """
        The client's stream ended (or detached: the client left, the upstream
        is still read into the stream log): fold its figures into the totals.
        A second call for the same relay does nothing.
        """
        stream = self._relays.pop(relay, None)
        if stream is None:
            return
        route = stream.route
        now = self._seconds()
        relay.note_stall(now)
        self._fold_relay(route, relay, self._events, self._bytes, self._stalls, self._gaps,
                         self._first_event, self._heartbeats, stream.started)
        _observe(self._duration, route, DURATION_BUCKETS, now - stream.started)
        _bump(self._ends, (route, _RELAY_REASONS.get(reason, "upstream_error")))

    @staticmethod
    def _fold_relay(
        route: str,
        relay: "Relay",
        events: dict[str, float],
        sent: dict[str, float],
        stalls: dict[str, float],
        gaps: dict[str, _Histogram],
        first: dict[str, _Histogram],
        heartbeats: dict[str, float],
        started: float,
    ) -> None:
        """Add one relay's figures to the tables given."""
        _bump(events, route, relay._events_out)
        _bump(sent, route, relay.sent)
        _bump(stalls, route, relay._stalls)
        _bump(heartbeats, route, relay.heartbeats)
        if relay._events_out > 1:
            h = gaps.get(route)
            if h is None:
                h = gaps[route] = _Histogram(len(GAP_BUCKETS) + 1)
            for i, count in enumerate(relay._gap_counts()):
                h.counts[i] += count
            h.total += relay._gap_sum
        if relay._first_event_at >= 0:
            _observe(first, route, FIRST_EVENT_BUCKETS, relay._first_event_at - started)

    def replay_started(self, call: "Call", replay: "Replay") -> None:
        """A C{Last-Event-ID} is answered from the stream log: a resumed stream."""
        route = route_name(call)
        _bump(self._resumes, route)
        _bump(self._streams_total, route)
        self._replays[replay] = _Stream(route, call.started)

    def replay_ended(self, replay: "Replay", reason: str) -> None:
        """A resumed stream ended: its events are replayed events (and delivered ones)."""
        stream = self._replays.pop(replay, None)
        if stream is None:
            return
        route = stream.route
        _bump(self._replayed, route, replay.events)
        _bump(self._events, route, replay.events)
        _bump(self._heartbeats, route, replay.heartbeats)
        if replay.first_write_at is not None:
            _observe(self._first_event, route, FIRST_EVENT_BUCKETS, replay.first_write_at - stream.started)
        _observe(self._duration, route, DURATION_BUCKETS, self._seconds() - stream.started)
        _bump(self._ends, (route, _RELAY_REASONS.get(reason, "upstream_error")))

    # -- the collector -------------------------------------------------------------

    def describe(self) -> list[Metric]:
        """Nothing up front: the families are made at scrape time (prometheus_client skips the checks)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Every family, current now: totals plus the open streams' own counts."""
        now = self._seconds()
        events = dict(self._events)
        sent = dict(self._bytes)
        stalls = dict(self._stalls)
        heartbeats = dict(self._heartbeats)
        gaps = {k: _copy(h) for k, h in self._gaps.items()}
        first = {k: _copy(h) for k, h in self._first_event.items()}
        # Every route that has had a stream shows every stream figure, 0 included.
        routes = list(self._streams_total)
        open_streams: dict[str, float] = dict.fromkeys(routes, 0)
        for table in (events, sent, stalls, heartbeats):
            for route in routes:
                table.setdefault(route, 0)
        duration = {k: _copy(h) for k, h in self._duration.items()}
        for hists, bounds in ((gaps, GAP_BUCKETS), (first, FIRST_EVENT_BUCKETS), (duration, DURATION_BUCKETS)):
            for route in routes:
                if route not in hists:
                    hists[route] = _Histogram(len(bounds) + 1)
        for relay, stream in list(self._relays.items()):
            relay.note_stall(now)
            self._fold_relay(stream.route, relay, events, sent, stalls, gaps, first, heartbeats, stream.started)
            if not relay._client_gone:
                _bump(open_streams, stream.route)
        for replay, stream in self._replays.items():
            _bump(open_streams, stream.route)
            _bump(events, stream.route, replay.events)
            _bump(heartbeats, stream.route, replay.heartbeats)

        p = _PREFIX
        requests = CounterMetricFamily(
            p + "requests", "Calls answered, by route, method and status class.",
            labels=("route", "method", "status_class"),
        )
        merged: dict[tuple[str, str, str], float] = {}
        for (route, method, status), n in self._requests.items():
            _bump(merged, (route, method.decode("ascii"), _STATUS_CLASSES.get(status, "none")), n)
        for labels, n in sorted(merged.items()):
            requests.add_metric(labels, n)
        yield requests
        yield _histogram(
            p + "request_duration_seconds",
            "Seconds from request to its end (plain calls) or to the response head (streams).",
            self._request_seconds, REQUEST_BUCKETS,
        )
        yield _gauge(p + "sse_open_streams", "SSE streams a client is attached to now.", open_streams)
        yield _counter(p + "sse_streams", "SSE streams started (relayed or resumed).", self._streams_total)
        yield _histogram(
            p + "sse_first_event_seconds", "Seconds from the request to the first event the client got.",
            first, FIRST_EVENT_BUCKETS,
        )
        yield _histogram(
            p + "sse_event_gap_seconds", "Seconds between consecutive events the client got.",
            gaps, GAP_BUCKETS,
        )
        yield _histogram(
            p + "sse_stream_duration_seconds", "Seconds from the request to the stream's end for its client.",
            duration, DURATION_BUCKETS,
        )
        yield _counter(p + "sse_events", "SSE events delivered to clients.", events)
        yield _counter(p + "sse_bytes", "SSE body bytes delivered to clients.", sent)
        yield _counter(p + "sse_stalls", "Gaps between events longer than [metrics] stall_after.", stalls)
        ends = CounterMetricFamily(p + "sse_ends", "SSE streams ended, by reason.", labels=("route", "reason"))
        for (route, reason), n in sorted(self._ends.items()):
            ends.add_metric((route, reason), n)
        yield ends
        yield _counter(p + "sse_resumes", "Streams resumed from the stream log (Last-Event-ID).",
                       dict(dict.fromkeys(routes, 0), **self._resumes))
        yield _counter(p + "sse_replayed_events", "Events written to resumed clients from the stream log.",
                       dict(dict.fromkeys(routes, 0), **self._replayed))
        yield _counter(p + "sse_heartbeats", "Heartbeat comments sent on silent streams.", heartbeats)
        errors = CounterMetricFamily(
            p + "upstream_errors", "Upstream failures before a response head, by route and kind.",
            labels=("route", "kind"),
        )
        for (route, kind), n in sorted(self._upstream_errors.items()):
            errors.add_metric((route, kind), n)
        yield errors
        pool = GaugeMetricFamily(
            p + "upstream_pool_connections", "Upstream connections: idle in the pool, active in calls.",
            labels=("state",),
        )
        pool.add_metric(("idle",), self.client.idle_connections() if self.client is not None else 0)
        pool.add_metric(("active",), max(self._upstream_active, 0))
        yield pool
        yield from self._history_families()
        yield from self._resume_families()
        yield from self._bound_families()
        if self._worker is not None:
            up = GaugeMetricFamily(p + "up", "1 while the gateway process serves.", labels=("worker",))
            up.add_metric((self._worker,), 1)
            yield up
            yield build_info(self._fast_path)

    def _history_families(self) -> Iterator[Metric]:
        history = self.history
        if history is None:
            return
        stats = history.stats()
        p = _PREFIX
        yield GaugeMetricFamily(p + "history_queue_depth", "History rows waiting in memory.",
                                value=stats.get("queue_length", 0))
        yield GaugeMetricFamily(p + "history_spool_bytes", "Bytes of history rows spooled to disk.",
                                value=_spool_bytes(history.config.spool_dir) if stats.get("spool_pending") else 0)
        yield CounterMetricFamily(p + "history_rows_written", "History rows committed to the database.",
                                  value=stats.get("written", 0))
        yield CounterMetricFamily(p + "history_rows_failed",
                                  "History rows lost: refused by the database or dropped.",
                                  value=stats.get("failed", 0) + stats.get("dropped", 0))

    def _resume_families(self) -> Iterator[Metric]:
        stats = getattr(self.resume, "log_size", None)
        if stats is None:
            return
        store, streams, size = stats()
        p = _PREFIX
        size_family = GaugeMetricFamily(p + "resume_log_bytes", "Event bytes kept for resume.", labels=("store",))
        size_family.add_metric((store,), size)
        yield size_family
        count = GaugeMetricFamily(p + "resume_log_streams", "Streams kept for resume.", labels=("store",))
        count.add_metric((store,), streams)
        yield count


    def _bound_families(self) -> Iterator[Metric]:
        """The caps of issue 15: detached streams now and cancelled by a cap; memory logs evicted."""
        p = _PREFIX
        if self.detached is not None:
            stats = self.detached.stats()
            yield GaugeMetricFamily(p + "sse_detached_streams",
                                    "Streams whose client left, still read into the resume log.",
                                    value=stats["detached"])
            cancelled = CounterMetricFamily(
                p + "sse_detached_cancelled",
                "Detached streams cancelled by max_detached_streams (total) or its per-tenant cap.",
                labels=("cap",),
            )
            cancelled.add_metric(("total",), stats["cancelled_by_max_detached_streams"])
            cancelled.add_metric(("per_tenant",), stats["cancelled_by_max_detached_streams_per_tenant"])
            yield cancelled
        stats_of = getattr(self.resume, "stats", None)
        if stats_of is not None:
            stats = stats_of()
            if "evicted_finished" in stats:
                evicted = CounterMetricFamily(
                    p + "resume_log_evicted",
                    "Memory stream logs dropped by resume_max_total_bytes, by the stream's state.",
                    labels=("state",),
                )
                for state in ("finished", "detached", "open"):
                    evicted.add_metric((state,), stats["evicted_" + state])
                yield evicted


def build_info(fast_path: bool) -> Metric:
    """C{aura_proxy_build_info}: the version, and whether the fast path is on."""
    info = GaugeMetricFamily(_PREFIX + "build_info", "The gateway's version and fast path.",
                             labels=("version", "fast_path"))
    info.add_metric((__version__, "on" if fast_path else "off"), 1)
    return info


def _copy(h: _Histogram) -> _Histogram:
    c = _Histogram(len(h.counts))
    c.counts[:] = h.counts
    c.total = h.total
    return c


def _counter(name: str, doc: str, values: dict[str, float]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=("route",))
    for route, n in sorted(values.items()):
        family.add_metric((route,), n)
    return family


def _gauge(name: str, doc: str, values: dict[str, float]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=("route",))
    for route, n in sorted(values.items()):
        family.add_metric((route,), n)
    return family


def _histogram(name: str, doc: str, table: dict[str, _Histogram], bounds: Sequence[float]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=("route",))
    for route, h in sorted(table.items()):
        family.add_metric((route,), _buckets(bounds, h.counts), h.total)
    return family


def _spool_bytes(directory: str) -> int:
    """The size of the history spool's segment files (read only when rows are spooled)."""
    total = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.endswith(".jsonl") and entry.is_file():
                    total += entry.stat().st_size
    except OSError:
        return 0
    return total


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry's figures in the Prometheus text format."""
    return generate_latest(registry)


# -- workers > 1 -------------------------------------------------------------------


#: A worker's figures: the text its private endpoint answered, or None (not answering).
Scrape = Callable[[int], "Deferred[Optional[str]]"]


class WorkersMetrics:
    """
    The parent's figures with C{workers > 1}: every worker's scraped and
    summed (a gauge such as open streams sums as well: each worker counts
    its own streams), C{aura_proxy_up{worker}} for each worker slot (0 for
    one that is not running or did not answer, whose figures are then
    absent), and C{aura_proxy_build_info}.

    Registered in C{registry} (when given) as a collector of the last sum
    (the dashboard reads it there): L{render} scrapes and refreshes it.

    @param workers: the worker slots' indexes and whether each is running.
    @param scrape: fetches one worker's text by index.
    """

    def __init__(
        self,
        workers: Callable[[], Iterable[tuple[int, bool]]],
        scrape: Scrape,
        fast_path: bool = True,
        registry: Optional[CollectorRegistry] = None,
    ) -> None:
        self._workers = workers
        self._scrape = scrape
        self._fast_path = fast_path
        self._families: list[Metric] = []
        if registry is not None:
            registry.register(self)  # type: ignore[arg-type]

    def collect(self) -> list[Metric]:
        """The sum as of the last L{render} (nothing before the first)."""
        return self._families

    def render(self) -> "Deferred[bytes]":
        """Scrape every running worker now; the summed text."""
        slots = list(self._workers())
        scrapes: list[Deferred[Optional[str]]] = [
            self._scrape(index) if alive else succeed(None) for index, alive in slots
        ]

        def merge(results: list[tuple[bool, Optional[str]]]) -> bytes:
            parsed: list[list[Metric]] = []
            up = GaugeMetricFamily(_PREFIX + "up", "1 while the gateway process serves.", labels=("worker",))
            for (index, _), (ok, text) in zip(slots, results):
                families = _parse(text) if ok and isinstance(text, str) else None
                up.add_metric((str(index),), 0 if families is None else 1)
                if families is not None:
                    parsed.append(families)
            self._families = sum_families(parsed) + [up, build_info(self._fast_path)]
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Fixed(self._families))  # type: ignore[arg-type]
            return generate_latest(registry)

        # A failed scrape's result is a Failure (not a str): that worker is down.
        return DeferredList(scrapes, consumeErrors=True).addCallback(merge)


class _Fixed:
    """A collector of families made already."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def _parse(text: str) -> Optional[list[Metric]]:
    """The families of one worker's text; None (that worker counts as down) if it does not parse."""
    try:
        return list(text_string_to_metric_families(text))
    except Exception:
        log.failure("a worker's /metrics text does not parse: left out of the sum")
        return None


def sum_families(processes: Iterable[Iterable[Metric]]) -> list[Metric]:
    """
    The families of several processes (each parsed from its text), each
    sample summed over the processes by name and labels (counters, gauges
    and histograms alike: a histogram's buckets, sum and count are sums too).
    """
    families: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for process in processes:
        for family in process:
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                sums[family.name] = {}
            table = sums[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                table[key] = table.get(key, 0.0) + sample.value
    out = []
    for name, family in families.items():
        for (sample_name, labels), value in sums[name].items():
            family.add_sample(sample_name, dict(labels), value)
        out.append(family)
    return out


def metrics_resource_answer(request: Request, body: bytes) -> bytes:
    """Headers of a C{/metrics} answer, and its body."""
    request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
    request.setHeader(b"cache-control", b"no-store")
    return body
