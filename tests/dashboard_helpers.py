"""
A metrics registry with the gateway's metric names (the contract in
docs/operations.md), for the dashboard's tests: it stands in for the
metrics module, so that the dashboard is tested against names, not code.
(No tests here.)
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["FakeMetrics", "fake_metrics"]

#: Bucket bounds of the fixture's histograms (seconds).
BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


@dataclass
class FakeMetrics:
    """The registry and the metrics in it, to bump from a test."""

    registry: CollectorRegistry
    requests: Counter
    request_duration: Histogram
    open_streams: Gauge
    first_event: Histogram
    event_gap: Histogram
    events: Counter
    ends: Counter
    stalls: Counter


def fake_metrics() -> FakeMetrics:
    """A fresh registry holding the gateway's metrics the dashboard reads, all zero."""
    r = CollectorRegistry()
    return FakeMetrics(
        registry=r,
        requests=Counter("aura_proxy_requests", "calls", ["route", "method", "status_class"], registry=r),
        request_duration=Histogram(
            "aura_proxy_request_duration_seconds", "latency", ["route"], buckets=BUCKETS, registry=r
        ),
        open_streams=Gauge("aura_proxy_sse_open_streams", "open", ["route"], registry=r),
        first_event=Histogram(
            "aura_proxy_sse_first_event_seconds", "ttfe", ["route"], buckets=BUCKETS, registry=r
        ),
        event_gap=Histogram("aura_proxy_sse_event_gap_seconds", "gap", ["route"], buckets=BUCKETS, registry=r),
        events=Counter("aura_proxy_sse_events", "events", ["route"], registry=r),
        ends=Counter("aura_proxy_sse_ends", "ends", ["route", "reason"], registry=r),
        stalls=Counter("aura_proxy_sse_stalls", "stalls", ["route"], registry=r),
    )
