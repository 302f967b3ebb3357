"""
The dashboard's figures, read from a Prometheus registry.

The gateway's metrics (docs/operations.md, "Metrics") live in a
C{prometheus_client} C{CollectorRegistry}; the dashboard reads them back by
name through C{registry.collect()}, the way a scrape would, so it sees
whatever the registry holds (one process's figures, or the sum of every
worker's).  Nothing here is on the request path: a L{Figures} samples the
registry once per dashboard tick, and only while a dashboard is open.

  - L{Sample} is one reading: the counters and histogram buckets the page
    shows, summed over routes (and over any other label but the ones kept);
  - L{histogram_quantile} estimates a percentile from cumulative buckets, as
    PromQL's function of the same name does;
  - L{Figures} keeps the last few minutes of samples and turns them into the
    page's figures: rates from counter deltas, percentiles over the last
    minute and since start, ends by reason.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

__all__ = [
    "END_REASONS",
    "Figures",
    "Sample",
    "histogram_quantile",
    "read_registry",
]

#: Why an SSE stream ends (the C{reason} label of C{aura_proxy_sse_ends_total}).
END_REASONS = (
    "completed",
    "client_disconnect",
    "upstream_error",
    "idle_timeout",
    "response_timeout",
    "shutdown",
    "detached",
)

#: The histograms whose percentiles the page shows, by the name it uses.
HISTOGRAMS = {
    "first_event": "aura_proxy_sse_first_event_seconds",
    "event_gap": "aura_proxy_sse_event_gap_seconds",
    "request_duration": "aura_proxy_request_duration_seconds",
}

#: Percentiles shown for every histogram.
QUANTILES = (0.5, 0.9, 0.99)

#: Buckets: (upper bound, cumulative count) in increasing bound order, the last +Inf.
Buckets = tuple[tuple[float, float], ...]


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> Optional[float]:
    """
    The C{q}-quantile (0 to 1) of a histogram from its cumulative buckets,
    interpolated linearly inside the bucket it falls in (PromQL's
    C{histogram_quantile}): None when the histogram is empty; the highest
    finite bound when it falls in the C{+Inf} bucket; a first bucket's lower
    bound is 0.
    """
    if not buckets:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank and count > lower_count:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        if not math.isinf(bound):
            lower_bound = bound
        lower_count = count
    return lower_bound


@dataclass(frozen=True)
class Sample:
    """
    One reading of the registry, summed over every label but those named.

    @ivar t: when it was read (the dashboard's clock, seconds).
    @ivar open_streams: C{aura_proxy_sse_open_streams} by route.
    @ivar events: C{aura_proxy_sse_events_total} by route.
    @ivar requests: C{aura_proxy_requests_total} by route.
    @ivar errors: C{aura_proxy_requests_total} with status class 5xx, by route.
    @ivar ends: C{aura_proxy_sse_ends_total} by reason.
    @ivar stalls: C{aura_proxy_sse_stalls_total}, all routes.
    @ivar histograms: cumulative buckets by L{HISTOGRAMS} name, all routes.
    @ivar seen: whether the registry had any C{aura_proxy_} sample at all.
    """

    t: float
    open_streams: dict[str, float] = field(default_factory=dict)
    events: dict[str, float] = field(default_factory=dict)
    requests: dict[str, float] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    ends: dict[str, float] = field(default_factory=dict)
    stalls: float = 0.0
    histograms: dict[str, Buckets] = field(default_factory=dict)
    seen: bool = False


def _add(into: dict[str, float], key: str, value: float) -> None:
    into[key] = into.get(key, 0.0) + value


def read_registry(registry: Any, t: float) -> Sample:
    """
    Read the figures the dashboard shows from C{registry} (anything with
    C{prometheus_client}'s C{collect()}), by sample name; a metric the
    registry does not have reads as zero.
    """
    sample = Sample(t)  # its dicts filled below; stalls and histograms set at the end
    by_name = {name: key for key, name in HISTOGRAMS.items()}
    buckets: dict[str, dict[float, float]] = {}
    stalls = 0.0
    seen = False
    for metric in registry.collect():
        for s in metric.samples:
            name, labels, value = s.name, s.labels, s.value
            seen = seen or name.startswith("aura_proxy_")
            if name == "aura_proxy_sse_open_streams":
                _add(sample.open_streams, labels.get("route", "-"), value)
            elif name == "aura_proxy_sse_events_total":
                _add(sample.events, labels.get("route", "-"), value)
            elif name == "aura_proxy_requests_total":
                route = labels.get("route", "-")
                _add(sample.requests, route, value)
                if labels.get("status_class") == "5xx":
                    _add(sample.errors, route, value)
            elif name == "aura_proxy_sse_ends_total":
                _add(sample.ends, labels.get("reason", "-"), value)
            elif name == "aura_proxy_sse_stalls_total":
                stalls += value
            elif name.endswith("_bucket") and name[: -len("_bucket")] in by_name:
                key = by_name[name[: -len("_bucket")]]
                le = float(labels.get("le", "+Inf"))
                into = buckets.setdefault(key, {})
                into[le] = into.get(le, 0.0) + value
    histograms = {key: tuple(sorted(by_bound.items())) for key, by_bound in buckets.items()}
    return Sample(
        t, sample.open_streams, sample.events, sample.requests, sample.errors, sample.ends, stalls, histograms,
        seen,
    )


def _minus(now: Buckets, before: Buckets) -> Buckets:
    """Bucket counts of C{now} since C{before} (the same bounds), or C{now} after a reset."""
    old = dict(before)
    out = tuple((bound, count - old.get(bound, 0.0)) for bound, count in now)
    if any(count < 0 for _, count in out):
        return now  # a counter went back (a worker restarted): count from zero
    return out


def _percentiles(buckets: Optional[Buckets]) -> dict[str, object]:
    if not buckets:
        return {"count": 0, **{f"p{round(q * 100)}": None for q in QUANTILES}}
    out: dict[str, object] = {"count": buckets[-1][1]}
    for q in QUANTILES:
        out[f"p{round(q * 100)}"] = histogram_quantile(q, buckets)
    return out


def _delta(now: float, before: float) -> float:
    """A counter's increase; after a reset (it went back), its whole new value."""
    return now - before if now >= before else now


class Figures:
    """
    The last C{keep} seconds of registry samples, and the figures the page
    draws from them.

    @ivar registry: the registry read (C{collect()}).
    """

    def __init__(self, registry: Any, keep: float = 300.0, window: float = 60.0) -> None:
        """
        @param keep: seconds of samples kept (the span of the page's charts).
        @param window: seconds over which the "last minute" percentiles are taken.
        """
        self.registry = registry
        self.keep = keep
        self.window = window
        self._samples: deque[Sample] = deque()

    def sample(self, now: float) -> Sample:
        """Read the registry at C{now}, keep the sample, forget those older than C{keep}."""
        s = read_registry(self.registry, now)
        self._samples.append(s)
        while self._samples and self._samples[0].t < now - self.keep:
            self._samples.popleft()
        return s

    @property
    def latest(self) -> Optional[Sample]:
        """The last sample taken, if any."""
        return self._samples[-1] if self._samples else None

    def series(self) -> list[dict[str, float]]:
        """
        One point per kept sample after the first: its time, the streams open
        then, and the event rate (events per second since the sample before).
        """
        points = []
        samples = list(self._samples)
        for before, now in zip(samples, samples[1:]):
            dt = now.t - before.t
            if dt <= 0:
                continue
            events = sum(_delta(now.events.get(r, 0.0), before.events.get(r, 0.0)) for r in now.events)
            points.append({
                "t": round(now.t, 3),
                "open_streams": sum(now.open_streams.values()),
                "event_rate": round(events / dt, 3),
            })
        return points

    def _back(self, now: Sample, seconds: float) -> Optional[Sample]:
        """The oldest kept sample no more than C{seconds} before C{now}, if not C{now} itself."""
        for s in self._samples:
            if s.t >= now.t - seconds and s is not now:
                return s
        return None

    def snapshot(self) -> dict[str, Any]:
        """
        The figures of the latest sample (call L{sample} first): whether the
        registry holds the gateway's metrics at all, open streams
        and event rate now and over time, requests and errors per route,
        percentiles of each histogram over the last C{window} seconds and
        since start, ends by reason, stalls.
        """
        if not self._samples:
            return {}
        now = self._samples[-1]
        before = self._back(now, self.window)
        series = self.series()
        percentiles: dict[str, Any] = {}
        for key in HISTOGRAMS:
            total = now.histograms.get(key)
            recent = total
            if total is not None and before is not None and key in before.histograms:
                recent = _minus(total, before.histograms[key])
            percentiles[key] = {"window": _percentiles(recent), "total": _percentiles(total)}
        ends = {reason: now.ends.get(reason, 0.0) for reason in END_REASONS}
        for reason, value in now.ends.items():
            ends.setdefault(reason, value)
        routes = sorted(set(now.open_streams) | set(now.events) | set(now.requests))
        return {
            "metrics": now.seen,
            "open_streams": sum(now.open_streams.values()),
            "events_total": sum(now.events.values()),
            "event_rate": series[-1]["event_rate"] if series else 0.0,
            "series": series,
            "window_seconds": self.window,
            "percentiles": percentiles,
            "ends": ends,
            "stalls": now.stalls,
            "by_route": {
                route: {
                    "open_streams": now.open_streams.get(route, 0.0),
                    "events": now.events.get(route, 0.0),
                    "requests": now.requests.get(route, 0.0),
                    "errors": now.errors.get(route, 0.0),
                }
                for route in routes
            },
        }

