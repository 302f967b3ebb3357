"""Tests for L{aura_proxy.call.Call}: one request's state, and what a client leaving stops."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from tests.test_stages import make_call


class Stoppable:
    """A relay or replay that notes the client leaving."""

    def __init__(self) -> None:
        self.gone = 0

    def client_gone(self) -> None:
        self.gone += 1


class CallTests(SynchronousTestCase):
    """L{Call}."""

    def test_fresh(self) -> None:
        """A new call has its own request id, the body's size and the client's address."""
        a, b = make_call(), make_call()
        self.assertNotEqual(a.id, b.id)
        self.assertEqual(a.request_size, 4)
        self.assertEqual(a.client_ip, "192.168.1.1")  # DummyChannel's peer
        self.assertEqual((a.status, a.route, a.finished, a.client_gone), (0, None, None, False))

    def test_cancel_stops_the_relay_first(self) -> None:
        """A client leaving stops the relay when there is one, not the upstream request."""
        call = make_call()
        relay = Stoppable()
        upstream: Deferred[Any] = Deferred()
        call.relay, call.upstream_call = relay, upstream  # type: ignore[assignment]
        call.cancel(Deferred())
        self.assertEqual((call.client_gone, relay.gone), (True, 1))
        self.assertNoResult(upstream)

    def test_cancel_stops_a_replay(self) -> None:
        """A client leaving a replayed stream stops the replay."""
        call = make_call()
        replay = Stoppable()
        call.replay = replay  # type: ignore[assignment]
        call.cancel(Deferred())
        self.assertEqual(replay.gone, 1)

    def test_cancel_before_the_response(self) -> None:
        """A client leaving before the upstream's response cancels the upstream request."""
        call = make_call()
        call.upstream_call = Deferred()
        call.cancel(Deferred())
        self.failureResultOf(call.upstream_call)

    def test_expire(self) -> None:
        """The response timeout notes itself and cancels the upstream request."""
        call = make_call()
        call.upstream_call = Deferred()
        call.expire()
        self.assertTrue(call.timed_out)
        self.failureResultOf(call.upstream_call)

    def test_describe(self) -> None:
        """A call describes itself by route and request target, for log lines."""
        from tests.test_stages import C

        call = make_call(b"/api/aura/x?q=1")
        self.assertEqual(call.describe(), "route - (/api/aura/x?q=1)")
        call.route = C.routes[0]
        self.assertEqual(call.describe(), "route aura (/api/aura/x?q=1)")
