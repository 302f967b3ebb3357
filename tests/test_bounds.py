"""
Tests for the bounds of C{[sse]}: detached streams capped in all and per
tenant (L{aura_proxy.detached.DetachedStreams}, through the gateway), and the
memory log's global cap C{resume_max_total_bytes}
(L{aura_proxy.resume.log.MemoryResumeLog}), on the C store and the Python one.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, List

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from aura_proxy.config import ConfigError, parse_config
from aura_proxy.detached import DetachedStreams
from aura_proxy.resume.log import MemoryResumeLog
from aura_proxy.sse import EVENT_STORE_ENTRY_BYTES
from tests.test_proxy import CONFIG, Harness, Streams, ids, without_ids

MINIMAL = """
[route:aura]
path = /api/aura/**
upstream = http://127.0.0.1:9000
"""


class FakeRelay:
    """A relay that notes being stopped."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stopped: List[str] = []

    def stop(self, reason: str) -> None:
        self.stopped.append(reason)

    def __repr__(self) -> str:
        return self.name


class ConfigTests(SynchronousTestCase):
    """The new [sse] keys."""

    def test_defaults(self) -> None:
        """Defaults: 1000 detached streams, 100 per tenant, 512 MiB of memory logs."""
        sse = parse_config(MINIMAL, "gw.ini").sse
        self.assertEqual(
            (sse.max_detached_streams, sse.max_detached_streams_per_tenant, sse.resume_max_total_bytes),
            (1000, 100, 512 * 2**20),
        )

    def test_set(self) -> None:
        """The keys are read; 0 detached streams is allowed (every detached stream is cancelled)."""
        sse = parse_config(
            MINIMAL + "[sse]\nmax_detached_streams = 0\nmax_detached_streams_per_tenant = 7\n"
            "resume_max_total_bytes = 1000000\n", "gw.ini").sse
        self.assertEqual(
            (sse.max_detached_streams, sse.max_detached_streams_per_tenant, sse.resume_max_total_bytes),
            (0, 7, 1000000),
        )

    def test_bad_values_named(self) -> None:
        """A negative cap or a total of 0 bytes is refused, naming file, section and key."""
        with self.assertRaises(ConfigError) as caught:
            parse_config(MINIMAL + "[sse]\nmax_detached_streams = -1\nmax_detached_streams_per_tenant = x\n"
                         "resume_max_total_bytes = 0\n", "gw.ini")
        found = "\n".join(caught.exception.problems)
        for key in ("max_detached_streams:", "max_detached_streams_per_tenant:", "resume_max_total_bytes:"):
            self.assertIn(f"gw.ini: [sse] {key}", found)


class DetachedStreamsTests(SynchronousTestCase):
    """L{DetachedStreams}: the oldest detached stream goes first past a cap."""

    def test_total_cap_cancels_the_oldest(self) -> None:
        """Past max_total, the oldest detached stream of any tenant is stopped and no longer counted."""
        d = DetachedStreams()
        relays = [FakeRelay(f"r{i}") for i in range(4)]
        for i, relay in enumerate(relays):
            d.add(relay, f"t{i}", f"s{i}", 3, 10)  # type: ignore[arg-type]
        self.assertEqual([r.stopped for r in relays], [["client_disconnect"], [], [], []])
        self.assertEqual(list(d.stream_ids()), ["s1", "s2", "s3"])
        self.assertEqual(d.stats(), {
            "detached": 3, "detached_tenants": 3, "detached_max_per_tenant": 1,
            "cancelled_by_max_detached_streams": 1, "cancelled_by_max_detached_streams_per_tenant": 0,
        })

    def test_tenant_cap_cancels_that_tenants_oldest(self) -> None:
        """Past max_per_tenant, the oldest detached stream of that tenant goes, not an older one of another."""
        d = DetachedStreams()
        other = FakeRelay("other")
        d.add(other, "b", "s-b", 10, 2)  # type: ignore[arg-type]
        mine = [FakeRelay(f"a{i}") for i in range(3)]
        for i, relay in enumerate(mine):
            d.add(relay, "a", f"s-a{i}", 10, 2)  # type: ignore[arg-type]
        self.assertEqual((other.stopped, [r.stopped for r in mine]), ([], [["client_disconnect"], [], []]))
        self.assertEqual(len(d), 3)
        self.assertEqual(d.cancelled_tenant, 1)

    def test_zero_cancels_at_once(self) -> None:
        """With a cap of 0, a stream is cancelled as soon as it detaches."""
        d = DetachedStreams()
        relay = FakeRelay("r")
        d.add(relay, "t", "s", 0, 10)  # type: ignore[arg-type]
        self.assertEqual((relay.stopped, len(d)), (["client_disconnect"], 0))

    def test_discard_and_cancel_stream(self) -> None:
        """An ended relay is forgotten (its tenant too); cancel_stream stops a detached one by stream id."""
        d = DetachedStreams()
        a, b = FakeRelay("a"), FakeRelay("b")
        d.add(a, "t", "sa", 10, 10)  # type: ignore[arg-type]
        d.add(b, "u", "sb", 10, 10)  # type: ignore[arg-type]
        d.discard(a)  # type: ignore[arg-type]
        d.discard(a)  # type: ignore[arg-type]
        self.assertEqual(d.stats()["detached_tenants"], 1)
        self.assertFalse(d.cancel_stream("sa"))
        self.assertTrue(d.cancel_stream("sb"))
        self.assertEqual((a.stopped, b.stopped, len(d)), ([], ["client_disconnect"], 0))


def event(seq: int, size: int = 100) -> bytes:
    return b"id: s.%d\ndata: " % seq + b"x" * (size - 20) + b"\n\n"


class MemoryLogCapTests(SynchronousTestCase):
    """L{MemoryResumeLog} under C{resume_max_total_bytes}."""

    accelerate = True

    def make_log(self, max_total: int, max_events: int = 10, max_bytes: int = 1000) -> MemoryResumeLog:
        self.clock = Clock()
        log = MemoryResumeLog(self.clock, 60, max_events, max_bytes, accelerate=self.accelerate,
                              max_total_bytes=max_total)
        self.addCleanup(log.stop)
        return log

    def fill(self, log: MemoryResumeLog, stream_id: str, events: int = 10) -> None:
        log.open(stream_id, "o")
        add = log.appender(stream_id)
        for seq in range(1, events + 1):
            add(seq, event(seq))

    def full(self) -> int:
        """The footprint of one stream filled to 10 events of 100 bytes."""
        log = self.make_log(1 << 30)
        self.fill(log, "probe")
        return log.total_bytes

    def test_bytes_counted_and_released(self) -> None:
        """total_bytes is the stores' footprints; it falls back to 0 as streams are abandoned or expire."""
        one = self.full()
        self.assertLessEqual(one, 1000 + 10 * EVENT_STORE_ENTRY_BYTES)
        log = self.make_log(1 << 30)
        self.fill(log, "a")
        self.fill(log, "b")
        self.assertEqual(log.total_bytes, 2 * one)
        log.abandon("a")
        log.close("b")
        self.assertEqual(log.total_bytes, one)
        self.clock.advance(60)
        self.assertEqual((log.total_bytes, len(log)), (0, 0))

    def test_finished_go_first(self) -> None:
        """Over the cap, the oldest finished stream's log is dropped first, not an open one's."""
        one = self.full()
        log = self.make_log(3 * one)
        for sid in ("open-old", "done-1", "done-2"):
            self.fill(log, sid)
        log.close("done-2")
        log.close("done-1")
        self.fill(log, "open-new")
        self.clock.advance(0)
        self.assertEqual(sorted(log._streams), ["done-1", "open-new", "open-old"])
        self.assertEqual(log.stats()["evicted_finished"], 1)
        self.assertLessEqual(log.total_bytes, 3 * one)

    def test_detached_then_open(self) -> None:
        """
        With no finished stream left, the oldest detached stream's log goes
        (and the stream is cancelled), then the oldest open one's; a follower
        of a dropped log gets its end, and a resume finds nothing to replay.
        """
        one = self.full()
        log = self.make_log(2 * one)
        detached = log.detached = DetachedStreams()
        relay = FakeRelay("r")
        self.fill(log, "open-old")
        self.fill(log, "detached")
        detached.add(relay, "t", "detached", 10, 10)  # type: ignore[arg-type]
        self.fill(log, "open-new")
        self.clock.advance(0)
        self.assertEqual((sorted(log._streams), relay.stopped), (["open-new", "open-old"], ["client_disconnect"]))
        follower: List[Any] = []

        class Follower:
            def replay_event(self, seq: int, block: bytes) -> None:
                pass

            def replay_end(self) -> None:
                follower.append("end")

        log.attach("open-old", "o", 10, Follower())
        self.fill(log, "open-newer")
        self.clock.advance(0)
        self.assertEqual(sorted(log._streams), ["open-new", "open-newer"])
        self.assertEqual(follower, ["end"])
        self.assertIsNone(self.successResultOf(log.attach("open-old", "o", 5, Follower())))
        stats = log.stats()
        self.assertEqual((stats["evicted_detached"], stats["evicted_open"]), (1, 1))
        self.assertLessEqual(log.total_bytes, 2 * one)

    def test_dropped_store_keeps_nothing(self) -> None:
        """The store of a dropped open stream, still fed by its rewriter, grows no more."""
        one = self.full()
        log = self.make_log(one)
        self.fill(log, "a")
        add = log.appender("a")
        self.fill(log, "b")
        self.clock.advance(0)
        self.assertNotIn("a", log._streams)
        for seq in range(11, 50):
            add(seq, event(seq))
        self.assertEqual(log.total_bytes, one)


class PythonMemoryLogCapTests(MemoryLogCapTests):
    """The same on the Python store (C{fast_path = off})."""

    accelerate = False


class GatewayDetachTests(TestCase):
    """The caps through the gateway: a relay whose client left is counted, the oldest cancelled."""

    def setUp(self) -> None:
        self.upstream = Streams()
        self.h = Harness(self.upstream, CONFIG + (
            "[sse]\nresume = memory\nresume_ttl = 60\n"
            "max_detached_streams = 3\nmax_detached_streams_per_tenant = 2\n"), resume=True)

    def open_and_drop(self, tenant: str) -> str:
        """A stream of C{tenant}, one event, then its client leaves; its first event's gateway id."""
        request = Request(DummyChannel())
        request.method, request.clientproto = b"GET", b"HTTP/1.1"
        request.uri = request.path = b"/api/aura/stream"
        request.content = BytesIO()
        request.requestHeaders.addRawHeader(b"x-tenant-id", tenant.encode())
        d = self.h.gateway.handle(request)
        self.h.flush()
        self.upstream.requests[-1].write(b"data: 1\n\n")
        self.h.flush()
        written = request.channel.transport.written.getvalue()  # type: ignore[union-attr]
        [first_id] = ids(written.partition(b"\r\n\r\n")[2].replace(b"\r\n", b"\n"))
        d.cancel()  # what GatewayResource does when the client disconnects
        self.failureResultOf(d, CancelledError)
        self.h.flush()
        return first_id

    def test_caps(self) -> None:
        """
        Per tenant past 2, that tenant's oldest detached stream is cancelled;
        past 3 in all, the oldest of all; cancelled streams' upstreams are
        closed and their logs dropped, so a resume goes upstream with the
        upstream's id; the figures are in Gateway.bounds().
        """
        first = [self.open_and_drop("a") for _ in range(3)]
        closed = [r._disconnected for r in self.upstream.requests]
        self.assertEqual(closed, [True, False, False])
        self.assertEqual(len(self.h.gateway.detached), 2)
        self.open_and_drop("b")
        self.open_and_drop("c")
        closed = [r._disconnected for r in self.upstream.requests]
        self.assertEqual(closed, [True, True, False, False, False])
        bounds = self.h.gateway.bounds()
        self.assertEqual(
            (bounds["detached"], bounds["cancelled_by_max_detached_streams"],
             bounds["cancelled_by_max_detached_streams_per_tenant"]), (3, 1, 1))
        self.assertIn("resume", bounds)
        # The cancelled stream's log is gone: its resume is a fresh upstream request.
        response = self.h.request("GET", "/api/aura/stream",
                                  headers={"X-Tenant-ID": "a", "Last-Event-ID": first[0]}, unbuffered=True)
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.upstream.requests), 6)
        # A kept one still replays.
        received: List[bytes] = []
        self.upstream.requests[2].write(b"data: 2\n\n")
        self.h.flush()
        response = self.h.request("GET", "/api/aura/stream",
                                  headers={"X-Tenant-ID": "a", "Last-Event-ID": first[2]}, unbuffered=True)
        response.done = self.h.client.collect(response, received.append)
        self.h.flush()
        self.assertEqual(without_ids(b"".join(received)), b"data: 2\n\n")
        self.assertEqual(len(self.upstream.requests), 6)

    def test_ended_detached_stream_uncounted(self) -> None:
        """A detached stream whose upstream ends is no longer counted."""
        self.open_and_drop("a")
        self.assertEqual(len(self.h.gateway.detached), 1)
        self.upstream.requests[0].finish()
        self.h.flush()
        self.assertEqual(len(self.h.gateway.detached), 0)
