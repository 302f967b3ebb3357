"""
Tests for L{aura_proxy.relay}: timers on a fake clock, backpressure and ends,
with no sockets.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone, ResponseFailed

from aura_proxy.relay import HEARTBEAT, Relay


class FakeRequest:
    """The parts of a server request the relay uses."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer: Any = None
        self.finished = False
        self.aborted = False
        self.transport = self

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


def start(idle: float = 300, beat: float = 15, **kw: Any) -> tuple[Relay, FakeRequest, FakeUpstream, Clock]:
    clock = Clock()
    request = FakeRequest()
    relay = Relay(request, clock, idle_timeout=idle, heartbeat_interval=beat, **kw)  # type: ignore[arg-type]
    upstream = FakeUpstream()
    relay.makeConnection(upstream)  # type: ignore[arg-type]
    return relay, request, upstream, clock


def end(relay: Relay, error: Optional[Exception] = None) -> None:
    relay.connectionLost(Failure(error or ResponseDone()))


class TimerTests(TestCase):
    """Heartbeats on silence and the idle timeout, on a fake clock."""

    def test_heartbeat_after_silence(self) -> None:
        """After heartbeat_interval of silence the client gets one comment line, then one per interval."""
        relay, request, _, clock = start(beat=15)
        clock.advance(14.9)
        self.assertEqual(request.written, [])
        clock.advance(0.1)
        self.assertEqual(request.written, [HEARTBEAT])
        clock.advance(15)
        self.assertEqual(request.written, [HEARTBEAT, HEARTBEAT])

    def test_no_heartbeat_while_events_flow(self) -> None:
        """A stream that talks more often than the interval never gets a heartbeat."""
        relay, request, _, clock = start(beat=15)
        for _ in range(10):
            clock.advance(10)
            relay.dataReceived(b"data: x\n\n")
        self.assertNotIn(HEARTBEAT, request.written)

    def test_heartbeat_counts_from_last_event(self) -> None:
        """The silence is measured from the last upstream bytes, not from the stream start."""
        relay, request, _, clock = start(beat=15)
        clock.advance(10)
        relay.dataReceived(b"data: x\n\n")
        clock.advance(14)
        self.assertEqual(request.written, [b"data: x\n\n"])
        clock.advance(1)
        self.assertEqual(request.written[-1], HEARTBEAT)

    def test_no_heartbeat_inside_an_event(self) -> None:
        """A heartbeat is never written in the middle of an event the client has part of."""
        relay, request, _, clock = start(beat=15)
        relay.dataReceived(b"data: par")
        clock.advance(15)
        self.assertEqual(request.written, [b"data: par"])
        relay.dataReceived(b"t\n\n")
        clock.advance(15)
        self.assertEqual(request.written[-1], HEARTBEAT)

    def test_heartbeat_off(self) -> None:
        """heartbeat_interval 0 sends none."""
        relay, request, _, clock = start(beat=0, idle=1000)
        clock.advance(500)
        self.assertEqual(request.written, [])

    def test_idle_timeout_closes_silent_stream(self) -> None:
        """A stream silent for idle_timeout is closed upstream and ended for the client."""
        relay, request, upstream, clock = start(idle=300, beat=0)
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
        relay, request, upstream, clock = start(idle=300, beat=15)
        for _ in range(100):
            clock.advance(250)
            relay.dataReceived(b"data: x\n\n")
        self.assertEqual(upstream.state, "producing")
        self.assertEqual(len(clock.getDelayedCalls()), 1)

    def test_heartbeats_until_idle_timeout(self) -> None:
        """Heartbeats do not count as upstream activity: a silent upstream is still closed at idle_timeout."""
        relay, request, upstream, clock = start(idle=40, beat=15)
        clock.advance(15)
        clock.advance(15)
        self.assertEqual(request.written, [HEARTBEAT, HEARTBEAT])
        clock.advance(9.9)
        self.assertEqual(upstream.state, "producing")
        clock.advance(0.1)
        self.assertEqual(upstream.state, "stopped")

    def test_timers_cancelled_at_end(self) -> None:
        """No timer is left behind when the stream ends."""
        relay, _, _, clock = start()
        end(relay)
        self.assertEqual(clock.getDelayedCalls(), [])


class FlowTests(TestCase):
    """Backpressure, transforms and how a stream ends."""

    def test_backpressure(self) -> None:
        """The client's pause and resume reach the upstream transport."""
        relay, request, upstream, _ = start()
        self.assertIs(request.producer, relay)
        request.producer.pauseProducing()
        self.assertEqual(upstream.state, "paused")
        request.producer.resumeProducing()
        self.assertEqual(upstream.state, "producing")

    def test_client_gone_stops_upstream(self) -> None:
        """A client that goes away closes the upstream connection; the end reason says so."""
        relay, request, upstream, _ = start()
        reasons: list[str] = []
        relay.done.addCallback(reasons.append)
        request.producer.stopProducing()
        self.assertEqual(upstream.state, "stopped")
        end(relay, ResponseFailed([Failure(Exception("closed"))]))
        self.assertEqual(reasons, ["client_disconnect"])
        self.assertFalse(request.finished)

    def test_bytes_pass_unchanged_and_counted(self) -> None:
        """Without a transform the bytes reach the client as they came, and are counted."""
        relay, request, _, _ = start()
        relay.dataReceived(b"data: 1\n\n")
        relay.dataReceived(b"data: 2\r\n\r\n")
        end(relay)
        self.assertEqual(b"".join(request.written), b"data: 1\n\ndata: 2\r\n\r\n")
        self.assertEqual(relay.sent, 20)
        self.assertTrue(request.finished)

    def test_transform(self) -> None:
        """A transform rewrites each read, its flush ends the body, and its count is the event count."""
        relay, request, _, _ = start(transform=Upper())
        relay.dataReceived(b"a")
        end(relay)
        self.assertEqual(request.written, [b"A", b"!"])
        self.assertEqual(relay.events, 1)

    def test_upstream_error_clean_end(self) -> None:
        """An upstream dying mid-stream ends an SSE client's response cleanly."""
        relay, request, _, _ = start(clean_end=True)
        reasons: list[str] = []
        relay.done.addCallback(reasons.append)
        relay.dataReceived(b"data: 1\n\n")
        end(relay, ResponseFailed([Failure(Exception("reset"))]))
        self.assertEqual(reasons, ["upstream_error"])
        self.assertTrue(request.finished)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_upstream_error_aborts_plain_body(self) -> None:
        """A truncated non-stream body aborts the client connection instead of looking complete."""
        relay, request, _, _ = start(clean_end=False)
        relay.dataReceived(b"{\"partial\":")
        end(relay, ResponseFailed([Failure(Exception("reset"))]))
        self.assertFalse(request.finished)
        self.assertTrue(request.aborted)
