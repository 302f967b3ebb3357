"""
Tests for L{aura_proxy.relay}: timers on a fake clock, backpressure and ends,
with no sockets; and reads handed to the request's client writer, on socket
pairs (the writer itself: tests/test_client_wire.py).  Every test runs twice: with the per-read step in C
(L{aura_proxy._relay_core}, skipped when not built unless
C{AURA_PROXY_REQUIRE_C=1}) and with its Python reference.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone, ResponseFailed

from aura_proxy import relay as relay_module
from aura_proxy.client_wire import ClientWriter, _PyClientWriter
from aura_proxy.relay import HEARTBEAT, RETRY_HINT, PyRelay, Relay
from aura_proxy.sse import SseRewriter, parse_events

from tests.test_client_wire import FakeTCP, received, socket_pair

_C_SKIP = (
    None if relay_module.ACCELERATED or os.environ.get("AURA_PROXY_REQUIRE_C") == "1"
    else "aura_proxy._relay_core is not built (no C compiler at install time?)"
)


class FakeRequest:
    """The parts of a server request the relay uses (a GatewayRequest's client_writer when given one)."""

    def __init__(self, writer: Any = None) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None
        self.finished = False
        self.aborted = False
        self.transport = self
        self.writer = writer

    def client_writer(self) -> Any:
        return self.writer

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        assert not self.finished
        self.written.append(data)

    def finish(self) -> None:
        self.finished = True

    def abortConnection(self) -> None:
        self.aborted = True


class FakeUpstream:
    """The upstream body transport (a TransportProxyProducer) the relay controls."""

    def __init__(self) -> None:
        self.state = "producing"

    def pauseProducing(self) -> None:
        self.state = "paused"

    def resumeProducing(self) -> None:
        self.state = "producing"

    def stopProducing(self) -> None:
        self.state = "stopped"


class Upper:
    """A transform that upper-cases and counts feeds, holding back nothing."""

    count = 0

    def feed(self, data: bytes) -> bytes:
        self.count += 1
        return data.upper()

    def flush(self) -> bytes:
        return b"!"


def start(
    idle: float = 300, beat: float = 15, cls: type[Relay] = Relay, writer: Any = None, **kw: Any
) -> tuple[Relay, FakeRequest, FakeUpstream, Clock]:
    clock = Clock()
    request = FakeRequest(writer)
    relay = cls(request, clock, idle_timeout=idle, heartbeat_interval=beat, **kw)  # type: ignore[arg-type]
    upstream = FakeUpstream()
    relay.makeConnection(upstream)  # type: ignore[arg-type]
    return relay, request, upstream, clock


def end(relay: Relay, error: Optional[Exception] = None) -> None:
    relay.connectionLost(Failure(error or ResponseDone()))


class _RelayCase(TestCase):
    """Runs its tests on L{Relay} (the C per-read step when built)."""

    relay_class: type[Relay] = Relay
    skip = _C_SKIP

    def start(self, **kw: Any) -> tuple[Relay, FakeRequest, FakeUpstream, Clock]:
        return start(cls=self.relay_class, **kw)


class TimerTests(_RelayCase):
    """Heartbeats on silence and the idle timeout, on a fake clock."""

    def test_heartbeat_after_silence(self) -> None:
        """After heartbeat_interval of silence the client gets one comment line, then one per interval."""
        relay, request, _, clock = self.start(beat=15)
        clock.advance(14.9)
        self.assertEqual(request.written, [])
        clock.advance(0.1)
        self.assertEqual(request.written, [HEARTBEAT])
        clock.advance(15)
        self.assertEqual(request.written, [HEARTBEAT, HEARTBEAT])

    def test_no_heartbeat_while_events_flow(self) -> None:
        """A stream that talks more often than the interval never gets a heartbeat."""
        relay, request, _, clock = self.start(beat=15)
        for _ in range(10):
            clock.advance(10)
            relay.dataReceived(b"data: x\n\n")
        self.assertNotIn(HEARTBEAT, request.written)

    def test_heartbeat_counts_from_last_event(self) -> None:
        """The silence is measured from the last upstream bytes, not from the stream start."""
        relay, request, _, clock = self.start(beat=15)
        clock.advance(10)
        relay.dataReceived(b"data: x\n\n")
        clock.advance(14)
        self.assertEqual(request.written, [b"data: x\n\n"])
        clock.advance(1)
        self.assertEqual(request.written[-1], HEARTBEAT)

    def test_no_heartbeat_inside_an_event(self) -> None:
        """A heartbeat is never written in the middle of an event the client has part of."""
        relay, request, _, clock = self.start(beat=15)
        relay.dataReceived(b"data: par")
        clock.advance(15)
        self.assertEqual(request.written, [b"data: par"])
        relay.dataReceived(b"t\n\n")
        clock.advance(15)
        self.assertEqual(request.written[-1], HEARTBEAT)

    def test_heartbeat_off(self) -> None:
        """heartbeat_interval 0 sends none."""
        relay, request, _, clock = self.start(beat=0, idle=1000)
        clock.advance(500)
        self.assertEqual(request.written, [])

    def test_idle_timeout_closes_silent_stream(self) -> None:
        """A stream silent for idle_timeout is closed upstream and ended for the client."""
        relay, request, upstream, clock = self.start(idle=300, beat=0)
        reasons: list[str] = []
        relay.done.addCallback(reasons.append)
        clock.advance(299)
        self.assertEqual(upstream.state, "producing")
        clock.advance(1)
        self.assertEqual(upstream.state, "stopped")
        end(relay, ResponseFailed([Failure(Exception("closed"))]))
        self.assertEqual(reasons, ["idle_timeout"])
        self.assertTrue(request.finished)

    def test_stream_never_cut_while_alive(self) -> None:
        """Events keep a stream alive far beyond idle_timeout, with one timer per stream."""
        relay, request, upstream, clock = self.start(idle=300, beat=15)
        for _ in range(100):
            clock.advance(250)
            relay.dataReceived(b"data: x\n\n")
        self.assertEqual(upstream.state, "producing")
        self.assertEqual(len(clock.getDelayedCalls()), 1)

    def test_heartbeats_until_idle_timeout(self) -> None:
        """Heartbeats do not count as upstream activity: a silent upstream is still closed at idle_timeout."""
        relay, request, upstream, clock = self.start(idle=40, beat=15)
        clock.advance(15)
        clock.advance(15)
        self.assertEqual(request.written, [HEARTBEAT, HEARTBEAT])
        clock.advance(9.9)
        self.assertEqual(upstream.state, "producing")
        clock.advance(0.1)
        self.assertEqual(upstream.state, "stopped")

    def test_timers_cancelled_at_end(self) -> None:
        """No timer is left behind when the stream ends."""
        relay, _, _, clock = self.start()
        end(relay)
        self.assertEqual(clock.getDelayedCalls(), [])


class FlowTests(_RelayCase):
    """Backpressure, transforms and how a stream ends."""

    def test_backpressure(self) -> None:
        """The client's pause and resume reach the upstream transport."""
        relay, request, upstream, _ = self.start()
        self.assertIs(request.producer, relay)
        request.producer.pauseProducing()
        self.assertEqual(upstream.state, "paused")
        request.producer.resumeProducing()
        self.assertEqual(upstream.state, "producing")

    def test_client_gone_stops_upstream(self) -> None:
        """A client that goes away closes the upstream connection; the end reason says so."""
        relay, request, upstream, _ = self.start()
        reasons: list[str] = []
        relay.done.addCallback(reasons.append)
        relay.client_gone()
        self.assertEqual(upstream.state, "stopped")
        end(relay, ResponseFailed([Failure(Exception("closed"))]))
        self.assertEqual(reasons, ["client_disconnect"])
        self.assertFalse(request.finished)

    def test_delivered_stops_when_the_client_leaves(self) -> None:
        """
        The relay counts what the client got apart from what it read: events
        and bytes written before the client left, the moment it left, and
        (detached) the events read into the log after that.
        """
        relay, request, upstream, clock = self.start(transform=Upper(), detach_seconds=30)
        relay.dataReceived(b"one")
        relay.dataReceived(b"two")
        self.assertEqual((relay.delivered, relay.detached_events, relay.left_at), (2, None, None))
        clock.advance(4)
        relay.client_gone()
        self.assertEqual((relay.left_at, relay.detached_at), (4.0, 4.0))
        self.assertEqual(upstream.state, "producing")
        relay.dataReceived(b"three")
        relay.dataReceived(b"four")
        relay.dataReceived(b"five")
        self.assertEqual(request.written, [b"ONE", b"TWO"])
        self.assertEqual((relay.events, relay.delivered, relay.detached_events, relay.sent), (5, 2, 3, 6))
        end(relay)
        self.assertEqual((relay.delivered, relay.detached_events, relay.sent), (2, 3, 6))

    def test_left_without_detaching(self) -> None:
        """A client that leaves a relay that does not detach: delivered is frozen, and there is no tail."""
        relay, _, upstream, clock = self.start(transform=Upper())
        relay.dataReceived(b"one")
        clock.advance(1)
        relay.client_gone()
        self.assertEqual(upstream.state, "stopped")
        end(relay, ResponseFailed([Failure(Exception("closed"))]))
        self.assertEqual((relay.delivered, relay.detached_events, relay.left_at, relay.detached_at),
                         (1, None, 1.0, None))

    def test_stop_producing_only_pauses(self) -> None:
        """
        The client transport's stopProducing (its connection closing) only
        stops reading the upstream: the relay ends through client_gone, the
        one path a disconnect takes.
        """
        relay, request, upstream, _ = self.start()
        request.producer.stopProducing()
        self.assertEqual(upstream.state, "paused")
        self.assertFalse(relay.done.called)
        relay.client_gone()
        self.assertEqual(upstream.state, "stopped")
        relay.stopProducing()
        self.assertEqual(upstream.state, "stopped")

    def test_empty_read_writes_nothing(self) -> None:
        """An empty upstream read writes nothing and does not count as the first write."""
        relay, request, _, _ = self.start()
        relay.dataReceived(b"")
        self.assertEqual((request.written, relay.sent), ([], 0))
        self.assertIsNone(relay.first_write_at)

    def test_bytes_pass_unchanged_and_counted(self) -> None:
        """Without a transform the bytes reach the client as they came, and are counted."""
        relay, request, _, _ = self.start()
        relay.dataReceived(b"data: 1\n\n")
        relay.dataReceived(b"data: 2\r\n\r\n")
        end(relay)
        self.assertEqual(b"".join(request.written), b"data: 1\n\ndata: 2\r\n\r\n")
        self.assertEqual(relay.sent, 20)
        self.assertTrue(request.finished)

    def test_transform(self) -> None:
        """A transform rewrites each read, its flush ends the body, and its count is the event count."""
        relay, request, _, _ = self.start(transform=Upper())
        relay.dataReceived(b"a")
        end(relay)
        self.assertEqual(request.written, [b"A", b"!"])
        self.assertEqual(relay.events, 1)

    def test_upstream_error_clean_end(self) -> None:
        """An upstream dying mid-stream ends an SSE client's response cleanly."""
        relay, request, _, _ = self.start(clean_end=True)
        reasons: list[str] = []
        relay.done.addCallback(reasons.append)
        relay.dataReceived(b"data: 1\n\n")
        end(relay, ResponseFailed([Failure(Exception("reset"))]))
        self.assertEqual(reasons, ["upstream_error"])
        self.assertTrue(request.finished)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_upstream_error_aborts_plain_body(self) -> None:
        """A truncated non-stream body aborts the client connection instead of looking complete."""
        relay, request, _, _ = self.start(clean_end=False)
        relay.dataReceived(b"{\"partial\":")
        end(relay, ResponseFailed([Failure(Exception("reset"))]))
        self.assertFalse(request.finished)
        self.assertTrue(request.aborted)


class WriterTests(_RelayCase):
    """Reads handed to the request's client writer (L{aura_proxy.client_wire}), on a socket pair."""

    writer_class: Any = ClientWriter

    def setUp(self) -> None:
        self.ours, self.peer = socket_pair(self)

    def relay(self, chunked: bool = True, transform: Any = None) -> tuple[Relay, FakeRequest, FakeTCP]:
        tcp = FakeTCP(self.ours)
        relay, request, _, _ = self.start(transform=transform, writer=self.writer_class(tcp, chunked))
        return relay, request, tcp

    def test_reads_go_to_the_writer(self) -> None:
        """Each read reaches the client through the writer (framed, sent), not request.write."""
        relay, request, tcp = self.relay(chunked=True, transform=Upper())
        relay.dataReceived(b"data: 1\n\n")
        relay.dataReceived(b"x" * 5000)
        self.assertEqual(received(self.peer), b"9\r\nDATA: 1\n\n\r\n1388\r\n" + b"X" * 5000 + b"\r\n")
        self.assertEqual((request.written, tcp.queued), ([], []))
        self.assertEqual((relay.sent, relay._writer.sent), (5009, 5009))
        self.assertFalse(relay._at_boundary)

    def test_empty_read_writes_nothing(self) -> None:
        """An empty upstream read writes nothing: no empty chunk, which would end the client's body."""
        relay, request, tcp = self.relay(chunked=True)
        relay.dataReceived(b"")
        self.assertEqual((received(self.peer), tcp.queued, relay.sent), (b"", [], 0))
        self.assertIsNone(relay.first_write_at)

    def test_client_gone_writes_nothing(self) -> None:
        """Once the client is gone, reads are still transformed but not written."""
        upper = Upper()
        relay, request, tcp = self.relay(chunked=True, transform=upper)
        relay._client_gone = True
        relay.dataReceived(b"abc")
        self.assertEqual((upper.count, relay.sent, tcp.queued, received(self.peer)), (1, 0, [], b""))
        self.assertIsNone(relay.first_write_at)

    def test_writer_error_propagates(self) -> None:
        """A write after the response was finished raises, as twisted.web's own write would."""
        relay, _, _ = self.relay()
        relay._writer.end()
        self.assertRaises(RuntimeError, relay.dataReceived, b"x")


class DrainTests(_RelayCase):
    """An SSE relay cut by a drain (L{Relay.stop} with C{shutdown})."""

    def test_cut_after_a_whole_event_with_retry_hint(self) -> None:
        """
        A stream stopped for shutdown in the middle of an event ends after
        the last whole event: the held-back half is dropped (never half an
        event), a C{retry:} hint follows, and the response ends cleanly.
        """
        rewriter = SseRewriter.for_stream("A" * 22, carry_upstream=True)
        relay, request, upstream, _ = self.start(transform=rewriter)
        relay.dataReceived(b"id: 1\ndata: one\n\nid: 2\ndata: tw")
        relay.stop("shutdown")
        self.assertEqual(upstream.state, "stopped")
        end(relay, ResponseFailed([Failure(Exception("cut"))]))
        body = b"".join(request.written)
        self.assertTrue(body.endswith(b"data: one\n\n" + RETRY_HINT), body)
        self.assertNotIn(b"tw", body)
        events = parse_events(body)
        self.assertEqual([e.data for e in events], ["one"])
        self.assertEqual(events[0].id, "A" * 22 + ".1.MQ")
        self.assertTrue(request.finished)
        self.assertFalse(request.aborted)
        self.assertEqual(self.successResultOf(relay.done), "shutdown")
        self.assertFalse(relay.upstream_complete)

    def test_no_hint_inside_an_oversized_block(self) -> None:
        """
        A stream cut while an oversized block passes through unparsed (its
        start already sent) gets no retry hint, which would complete that
        block as an event: the client discards the partial block at the end.
        """
        rewriter = SseRewriter.for_stream("A" * 22, max_buffer=16)
        relay, request, _, _ = self.start(transform=rewriter)
        relay.dataReceived(b"data: " + b"x" * 40)
        self.assertFalse(rewriter.at_block_end)
        relay.stop("shutdown")
        end(relay, ResponseFailed([Failure(Exception("cut"))]))
        body = b"".join(request.written)
        self.assertNotIn(b"retry:", body)
        self.assertEqual(parse_events(body), [])

    def test_other_ends_flush_as_before(self) -> None:
        """An upstream error still hands the client what the transform held back (no retry hint)."""
        relay, request, _, _ = self.start(transform=Upper())
        relay.dataReceived(b"data: x\n\n")
        end(relay, ResponseFailed([Failure(Exception("boom"))]))
        self.assertEqual(request.written[-1], b"!")


class PyDrainTests(DrainTests):
    """L{DrainTests} on the Python per-read step."""

    relay_class = PyRelay
    skip = None


class PyWriterTests(WriterTests):
    """L{WriterTests} with the Python per-read step and the Python writer."""

    relay_class = PyRelay
    writer_class = _PyClientWriter
    skip = None


class MixedWriterTests(WriterTests):
    """L{WriterTests} with the C per-read step calling the Python writer."""

    writer_class = _PyClientWriter


class PyTimerTests(TimerTests):
    """L{TimerTests} with the Python per-read step."""

    relay_class = PyRelay
    skip = None


class PyFlowTests(FlowTests):
    """L{FlowTests} with the Python per-read step."""

    relay_class = PyRelay
    skip = None


class CoreTests(_RelayCase):
    """The C per-read step's own guards."""

    def test_relay_is_accelerated_when_built(self) -> None:
        """Relay's per-read step is the C one when the extension is built."""
        self.assertTrue(relay_module.ACCELERATED)
        self.assertEqual(Relay.dataReceived.__qualname__, "RelayCore.dataReceived")

    def test_bad_input(self) -> None:
        """Non-bytes reads and transforms are refused."""
        relay, _, _, _ = self.start(transform=None)
        self.assertRaises(TypeError, relay.dataReceived, "text")
        relay._feed = lambda data: "text"  # type: ignore[assignment,return-value]
        self.assertRaises(TypeError, relay.dataReceived, b"x")


class Seq:
    """A stamper's counter: C{seq} is how many events it has stamped."""

    seq = 0


class MeterTests(_RelayCase):
    """The relay's metering (L{aura_proxy.metrics}): per read, the events the client got."""

    def metered(self, source: Any = None, stall_after: float = 5.0) -> tuple[Relay, FakeRequest, Clock]:
        relay, request, _, clock = self.start(idle=300, beat=0)
        relay._meter((0.5, 1.0, 10.0), stall_after, source)
        return relay, request, clock

    def test_off_by_default(self) -> None:
        """Without _meter nothing is counted."""
        relay, _, _, _ = self.start()
        relay.dataReceived(b"data: x\n\n")
        self.assertEqual((relay._metered, relay._events_out), (False, 0))

    def test_writes_are_events_without_a_source(self) -> None:
        """Without a stamper each write is one event; gaps land in their buckets, +Inf last."""
        relay, _, clock = self.metered()
        clock.advance(2)
        relay.dataReceived(b"a")
        clock.advance(0.5)
        relay.dataReceived(b"b")
        clock.advance(30)
        relay.dataReceived(b"c")
        self.assertEqual(relay._events_out, 3)
        self.assertEqual(relay._first_event_at, 2.0)
        self.assertEqual(relay._last_event_at, 32.5)
        self.assertEqual(relay._gap_counts(), (1, 0, 0, 1))
        self.assertEqual(relay._gap_sum, 30.5)
        self.assertEqual(relay._stalls, 1)

    def test_source_counts_events(self) -> None:
        """With a stamper, a read counts the events it stamped; the others of that read had no gap."""
        source = Seq()
        relay, _, clock = self.metered(source)
        source.seq = 3
        relay.dataReceived(b"three events")
        clock.advance(1)
        relay.dataReceived(b": a comment, no event")
        source.seq = 4
        clock.advance(1)
        relay.dataReceived(b"one more")
        self.assertEqual(relay._events_out, 4)
        self.assertEqual(relay._gap_counts(), (2, 0, 1, 0))
        self.assertEqual(relay._last_event_at, 2.0)

    def test_stall_counted_once(self) -> None:
        """A silence noted as a stall (timer, scrape) is not counted again by the event that ends it."""
        relay, _, clock = self.metered()
        relay.dataReceived(b"a")
        clock.advance(6)
        self.assertTrue(relay.note_stall(clock.seconds()))
        self.assertTrue(relay.note_stall(clock.seconds()))
        self.assertEqual(relay._stalls, 1)
        relay.dataReceived(b"b")
        self.assertEqual(relay._stalls, 1)
        self.assertFalse(relay._stall_open)
        clock.advance(6)
        relay.dataReceived(b"c")
        self.assertEqual(relay._stalls, 2)

    def test_nothing_counted_after_the_client_left(self) -> None:
        """Reads after the client is gone (detached) are not delivered: not counted."""
        relay, _, clock = self.metered()
        relay.dataReceived(b"a")
        relay._client_gone = True
        relay.dataReceived(b"b")
        self.assertEqual((relay._events_out, relay.sent), (1, 1))

    def test_bad_bounds(self) -> None:
        """Gap bounds must ascend."""
        relay, _, _, _ = self.start()
        self.assertRaises(ValueError, relay._meter, (1.0, 0.5), 5.0, None)

    def test_heartbeats_counted(self) -> None:
        """Each heartbeat written is counted."""
        relay, request, _, clock = self.start(beat=15)
        clock.advance(15)
        clock.advance(15)
        self.assertEqual(relay.heartbeats, request.written.count(HEARTBEAT))
        self.assertEqual(relay.heartbeats, 2)


class PyMeterTests(MeterTests):
    """L{MeterTests} on the Python per-read step."""

    relay_class = PyRelay
    skip = None
