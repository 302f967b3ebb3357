"""Tests for L{aura_proxy.deadlines}: many fixed-length timeouts on one timer."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from aura_proxy.deadlines import Deadlines


class DeadlinesTests(SynchronousTestCase):
    """L{Deadlines}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.deadlines = Deadlines(self.clock, 30.0)
        self.fired: list[str] = []

    def add(self, name: str) -> int:
        return self.deadlines.add(lambda: self.fired.append(name))

    def test_fires_after_its_time(self) -> None:
        """A timeout fires C{seconds} after it was added, not before."""
        self.add("a")
        self.clock.advance(29.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, ["a"])
        self.assertEqual(len(self.deadlines), 0)

    def test_discarded(self) -> None:
        """A discarded timeout never fires, and with nothing pending no timer is left."""
        key = self.add("a")
        self.deadlines.discard(key)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(60)
        self.assertEqual(self.fired, [])
        self.deadlines.discard(key)  # twice: nothing

    def test_each_at_its_own_time_one_timer(self) -> None:
        """Timeouts added at different times fire each at its own deadline, from one timer."""
        self.add("a")
        self.clock.advance(10)
        self.add("b")
        self.clock.advance(5)
        self.add("c")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(15)
        self.assertEqual(self.fired, ["a"])
        self.clock.advance(9.9)
        self.assertEqual(self.fired, ["a"])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, ["a", "b"])
        self.clock.advance(5)
        self.assertEqual(self.fired, ["a", "b", "c"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_oldest_discarded(self) -> None:
        """With the oldest discarded, the timer wakes early and waits for the next one's time."""
        first = self.add("a")
        self.clock.advance(20)
        self.add("b")
        self.deadlines.discard(first)
        self.clock.advance(10)
        self.assertEqual(self.fired, [])
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [50.0])
        self.clock.advance(20)
        self.assertEqual(self.fired, ["b"])

    def test_same_time(self) -> None:
        """Timeouts due at the same moment all fire, in the order they were added."""
        for name in "abc":
            self.add(name)
        self.clock.advance(30)
        self.assertEqual(self.fired, ["a", "b", "c"])

    def test_failing_handler(self) -> None:
        """A handler that raises is logged; the timeouts after it still fire."""
        self.deadlines.add(lambda: 1 / 0)
        self.add("b")
        self.clock.advance(30)
        self.assertEqual(self.fired, ["b"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_added_after_all_fired(self) -> None:
        """Once all have fired, a new timeout arms the timer again."""
        self.add("a")
        self.clock.advance(30)
        self.add("b")
        self.clock.advance(30)
        self.assertEqual(self.fired, ["a", "b"])
