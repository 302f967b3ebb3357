"""Tests for L{aura_proxy.streams}: the registry of open relays and the shutdown drain."""

from __future__ import annotations

from typing import Optional

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from aura_proxy.streams import OpenStreams


class Transport:
    """A client connection that closes when told to, or never."""

    def __init__(self, closes: bool = True) -> None:
        self.closes = closes
        self.disconnected = False
        self.lost = 0

    def loseConnection(self) -> None:
        self.lost += 1
        self.disconnected = self.closes


class FakeRelay:
    """A relay that ends when stopped (or when the test says)."""

    def __init__(self, transport: Optional[Transport], ends_at_once: bool = True) -> None:
        self.transport = transport
        self.ends_at_once = ends_at_once
        self.stopped: list[str] = []
        self.done: Deferred[str] = Deferred()

    detached = False

    def client_transport(self) -> Optional[Transport]:
        return self.transport

    def stop(self, reason: str) -> None:
        self.stopped.append(reason)
        if self.ends_at_once:
            self.done.callback(reason)


class OpenStreamsTests(SynchronousTestCase):
    """L{OpenStreams}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.streams = OpenStreams(self.clock)

    def test_counts(self) -> None:
        """Relays are counted from add to discard."""
        a, b = FakeRelay(None), FakeRelay(None)
        self.streams.add(a)  # type: ignore[arg-type]
        self.streams.add(b)  # type: ignore[arg-type]
        self.assertEqual(len(self.streams), 2)
        self.streams.discard(a)  # type: ignore[arg-type]
        self.streams.discard(a)  # type: ignore[arg-type]
        self.assertEqual(len(self.streams), 1)

    def test_stop_all(self) -> None:
        """stop_all stops every relay with the reason and fires once all have ended."""
        a, b = FakeRelay(None), FakeRelay(None, ends_at_once=False)
        for relay in (a, b):
            self.streams.add(relay)  # type: ignore[arg-type]
        ended = self.streams.stop_all("shutdown")
        self.assertEqual((a.stopped, b.stopped), (["shutdown"], ["shutdown"]))
        self.assertNoResult(ended)
        b.done.callback("shutdown")
        self.assertEqual(sorted(self.successResultOf(ended)), ["shutdown", "shutdown"])

    def test_shutdown_drains_clients(self) -> None:
        """Shutdown closes each client connection and fires once they have all closed."""
        transport = Transport()
        self.streams.add(FakeRelay(transport))  # type: ignore[arg-type]
        self.successResultOf(self.streams.shutdown(grace=2))
        self.assertEqual(transport.lost, 1)

    def test_shutdown_waits_at_most_grace(self) -> None:
        """A client connection that does not close holds shutdown back for grace seconds, no longer."""
        self.streams.add(FakeRelay(Transport(closes=False)))  # type: ignore[arg-type]
        done = self.streams.shutdown(grace=2)
        self.clock.advance(1.9)
        self.assertNoResult(done)
        self.clock.pump([0.05] * 3)
        self.successResultOf(done)

    def test_shutdown_with_nothing_open(self) -> None:
        """Shutdown with no stream open is done at once."""
        self.successResultOf(self.streams.shutdown())


class DrainTests(SynchronousTestCase):
    """L{OpenStreams.drain} and L{OpenStreams.shutdown} on SIGTERM."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.streams = OpenStreams(self.clock)

    def test_waits_for_calls_in_flight(self) -> None:
        """The drain fires once the last call in flight has ended, not before, and marks the streams draining."""
        a: Deferred[None] = Deferred()
        b: Deferred[None] = Deferred()
        self.streams.track(a)
        self.streams.track(b)
        self.assertEqual(self.streams.calls, 2)
        drained = self.streams.drain(30)
        self.assertTrue(self.streams.draining)
        a.callback(None)
        self.clock.advance(1)
        self.assertNoResult(drained)
        b.errback(Exception("failed call"))
        self.failureResultOf(b)
        self.clock.advance(0.05)
        self.successResultOf(drained)
        self.assertEqual(self.streams.calls, 0)

    def test_gives_up_after_timeout(self) -> None:
        """A call that never ends holds the drain back for drain_timeout seconds, no longer."""
        self.streams.track(Deferred())
        drained = self.streams.drain(5)
        self.clock.advance(4.9)
        self.assertNoResult(drained)
        self.clock.advance(0.2)
        self.successResultOf(drained)

    def test_detached_streams_end_at_once(self) -> None:
        """A relay whose client is gone (detached into the log) is stopped when the drain begins; others run on."""
        gone, live = FakeRelay(None), FakeRelay(Transport())
        gone.detached = True
        for relay in (gone, live):
            self.streams.add(relay)  # type: ignore[arg-type]
        self.streams.drain(30)
        self.assertEqual((gone.stopped, live.stopped), (["shutdown"], []))

    def test_shutdown_runs_then_after_relays_ended(self) -> None:
        """shutdown() stops every relay, then runs C{then} (the resume log's stop), and waits for it."""
        relay = FakeRelay(Transport(), ends_at_once=False)
        self.streams.add(relay)  # type: ignore[arg-type]
        order: list[str] = []
        stopped: Deferred[None] = Deferred()

        def then() -> Deferred[None]:
            order.append("then")
            return stopped

        done = self.streams.shutdown(grace=2, then=then)
        self.assertEqual((relay.stopped, order), (["shutdown"], []))
        relay.done.callback("shutdown")
        self.assertEqual(order, ["then"])
        self.clock.advance(0.1)
        self.assertNoResult(done)
        stopped.callback(None)
        self.successResultOf(done)
