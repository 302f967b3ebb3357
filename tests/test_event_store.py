"""
Tests for the memory resume log's per-stream storage: the C
C{aura_proxy._sse_stamp.EventStore} against its Python reference
C{aura_proxy.resume.log._PyEventStore}, and the C stamper adding to a store
directly.

The C half is skipped when the extension is not built, unless
C{AURA_PROXY_REQUIRE_C=1} (C{./dev test} sets it, so CI cannot skip it).
"""

from __future__ import annotations

import gc
import os
from collections import deque
from typing import Any, List, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from aura_proxy.resume.log import MemoryResumeLog, _PyEventStore, _Stream
from aura_proxy.sse import SseRewriter
from tests.test_sse_accel import lf_reads

SID = "B" * 21 + "A"
_REQUIRE_C = os.environ.get("AURA_PROXY_REQUIRE_C") == "1"


def c_store() -> Any:
    """The C EventStore type (the test is skipped if it is not built)."""
    try:
        from aura_proxy._sse_stamp import EventStore
    except ImportError:
        if _REQUIRE_C:
            raise
        raise SkipTest("aura_proxy._sse_stamp is not built")
    return EventStore


class Recorder:
    """A subscriber that records what it is handed."""

    def __init__(self) -> None:
        self.events: List[Tuple[int, bytes]] = []

    def replay_event(self, seq: int, block: bytes) -> None:
        self.events.append((seq, block))

    def replay_end(self) -> None:
        pass


class Attachment:
    def __init__(self, subscriber: Recorder) -> None:
        self.subscriber = subscriber


def _deque_property() -> Any:
    """
    The deque property as a test method.  Each store's test class gets its
    own (one Hypothesis test shared by two classes fails its health check).
    """

    @settings(max_examples=200, deadline=None)
    @given(
        sizes=st.lists(st.integers(min_value=0, max_value=300), max_size=400),
        max_events=st.integers(min_value=1, max_value=50),
        max_bytes=st.integers(min_value=1, max_value=3000),
        after=st.integers(min_value=0, max_value=400),
    )
    def test_keeps_exactly_what_a_deque_would(
        self: Any, sizes: List[int], max_events: int, max_bytes: int, after: int
    ) -> None:
        """Any sizes and limits: the same kept events and range as a dropping deque."""
        self.check_against_deque(sizes, max_events, max_bytes, after)

    return test_keeps_exactly_what_a_deque_would


class _StorageContract:
    """What both store implementations must do; C{store_type} picks one."""

    def store_type(self) -> Any:
        raise NotImplementedError

    def check_against_deque(self, sizes: List[int], max_events: int, max_bytes: int, after: int) -> None:
        """
        Whatever the event sizes and limits, the kept events (after any
        eviction and reclaiming of space) and the replayable range are those
        of a deque that drops the oldest first, the newest always kept.
        """
        store = self.store_type()(max_events, max_bytes)
        model: deque[tuple[int, bytes]] = deque()
        total = 0
        first = 1
        for seq, size in enumerate(sizes, 1):
            block = bytes([seq % 251]) * size
            store.add(seq, block) if seq % 2 else store(seq, block)
            model.append((seq, block))
            total += size
            while len(model) > max_events or (total > max_bytes and len(model) > 1):
                old_seq, old = model.popleft()
                total -= len(old)
                first = old_seq + 1
            self.assertEqual(len(store), len(model))  # type: ignore[attr-defined]
        self.assertEqual(list(store.events_after(after)), [e for e in model if e[0] > after])  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            (store.first_seq, store.last_seq, store.size), (first, len(sizes), total)
        )

    def test_ended_keeps_nothing_more(self) -> None:
        """Once C{ended} is set, added events are neither kept nor passed on."""
        store = self.store_type()(10, 1000)
        rec = Recorder()
        store.subscribers = {Attachment(rec)}
        store.add(1, b"a")
        store.ended = True
        store.add(2, b"b")
        self.assertEqual(store.events_after(0), [(1, b"a")])  # type: ignore[attr-defined]
        self.assertEqual(rec.events, [(1, b"a")])  # type: ignore[attr-defined]
        self.assertIs(store.ended, True)  # type: ignore[attr-defined]

    def test_subscribers_get_each_event(self) -> None:
        """Every live subscriber gets each added event; one may detach meanwhile."""
        store = self.store_type()(10, 1000)
        a, b = Recorder(), Recorder()
        att_b = Attachment(b)

        class Detaching(Recorder):
            def replay_event(self, seq: int, block: bytes) -> None:
                super().replay_event(seq, block)
                store.subscribers.discard(att_b)

        c = Detaching()
        store.subscribers = {Attachment(a), Attachment(c)}
        store.add(1, b"x")
        store.subscribers.add(att_b)
        store(2, b"y")
        self.assertEqual(a.events, [(1, b"x"), (2, b"y")])  # type: ignore[attr-defined]
        self.assertEqual(c.events, [(1, b"x"), (2, b"y")])  # type: ignore[attr-defined]
        self.assertIn(b.events, ([], [(2, b"y")]))  # type: ignore[attr-defined]
        store.subscribers = None
        store.add(3, b"z")
        self.assertEqual(a.events[-1], (2, b"y"))  # type: ignore[attr-defined]

    def test_subscriber_error_propagates(self) -> None:
        """An exception in replay_event reaches the caller of add (the event is kept)."""
        store = self.store_type()(10, 1000)

        class Boom(Recorder):
            def replay_event(self, seq: int, block: bytes) -> None:
                raise RuntimeError("boom")

        store.subscribers = {Attachment(Boom())}
        self.assertRaises(RuntimeError, store.add, 1, b"a")  # type: ignore[attr-defined]
        self.assertEqual(store.events_after(0), [(1, b"a")])  # type: ignore[attr-defined]

    def test_bad_limits(self) -> None:
        """Limits below 1 are refused."""
        self.assertRaises(ValueError, self.store_type(), 0, 10)  # type: ignore[attr-defined]
        self.assertRaises(ValueError, self.store_type(), 10, 0)  # type: ignore[attr-defined]


class PythonStoreTests(_StorageContract, SynchronousTestCase):
    """The Python reference store."""

    def store_type(self) -> Any:
        return _PyEventStore

    test_keeps_exactly_what_a_deque_would = _deque_property()



class CStoreTests(_StorageContract, SynchronousTestCase):
    """The C store, against the same contract."""

    def store_type(self) -> Any:
        return c_store()

    test_keeps_exactly_what_a_deque_would = _deque_property()


    def test_stream_is_the_c_store(self) -> None:
        """The memory log's streams are C stores when it is built, and are their own appender."""
        c_store()
        log = MemoryResumeLog(clock=None, ttl=1.0, max_events=5, max_bytes=100)  # type: ignore[arg-type]
        log.open("s", "t")
        appender = log.appender("s")
        self.assertIsInstance(appender, c_store())
        self.assertIsInstance(appender, _Stream)
        self.assertEqual(appender.owner, "t")

    def test_bad_arguments(self) -> None:
        """add() wants an int and bytes; the store takes no keyword arguments when called."""
        store = c_store()(5, 100)
        self.assertRaises(TypeError, store.add, 1, "str")
        self.assertRaises(TypeError, store.add, "1", b"x")
        self.assertRaises(TypeError, store.add, 1)
        self.assertRaises(TypeError, store, seq=1, block=b"x")
        self.assertRaises(TypeError, setattr, store, "subscribers", [])
        self.assertEqual(len(store), 0)

    def test_uninitialised(self) -> None:
        """
        A store that __init__ never ran on (made by __new__, or a subclass
        that skipped it) refuses every method and attribute with RuntimeError,
        and so does a stamper adding to it.
        """
        from aura_proxy._sse_stamp import Stamper

        EventStore = c_store()
        store = EventStore.__new__(EventStore)
        for use in (
            lambda: store.add(1, b"x"), lambda: store(1, b"x"), lambda: store.events_after(0),
            lambda: len(store), lambda: store.size, lambda: store.first_seq, lambda: store.last_seq,
            lambda: store.max_events, lambda: store.max_bytes, lambda: store.ended,
            lambda: store.subscribers, lambda: setattr(store, "ended", True),
            lambda: setattr(store, "subscribers", None),
        ):
            self.assertRaises(RuntimeError, use)
        stamper = Stamper(b"p.", False, store, lambda d: d)
        stamper.slow = 0
        self.assertRaises(RuntimeError, stamper.feed, b"data: a\n\n")

    def test_reinitialised_by_a_subscriber(self) -> None:
        """
        A subscriber that re-initialises the store it is handed events by is
        refused with RuntimeError; the store keeps what it had.
        """
        store = c_store()(5, 100)
        refused: List[BaseException] = []

        class Reinitialising(Recorder):
            def replay_event(self, seq: int, block: bytes) -> None:
                try:
                    store.__init__(1, 1)
                except RuntimeError as e:
                    refused.append(e)

        store.subscribers = {Attachment(Reinitialising())}
        store.add(1, b"a")
        store.add(2, b"b")
        self.assertEqual(len(refused), 2)
        self.assertEqual((store.events_after(0), store.max_events), ([(1, b"a"), (2, b"b")], 5))
        store.subscribers = None
        store.__init__(1, 1)
        self.assertEqual((len(store), store.max_events), (0, 1))

    def test_changed_during_events_after(self) -> None:
        """
        A store changed while events_after makes its list (by a finalizer the
        garbage collector runs then) fails it with RuntimeError instead of
        reading moved bytes.
        """
        store = c_store()(100, 10_000)
        for seq in range(1, 4):
            store.add(seq, b"x" * 10)

        class Adds:
            def __del__(self) -> None:
                store.add(99, b"late")

        thresholds = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *thresholds)
        self.addCleanup(gc.enable)
        # Lists and pairs come from free lists, which skip the collector:
        # empty them, so that the list events_after makes is a new object.
        held = [[(i, -i)] for i in range(3000)]
        gc.disable()
        cycle: List[Any] = [Adds()]
        cycle.append(cycle)
        del cycle
        events_after = store.events_after
        gc.set_threshold(1)
        with self.assertRaises(RuntimeError):
            # The first object events_after makes starts a collection.
            gc.enable()
            events_after(0)
        del held
        self.assertEqual(store.last_seq, 99)

    @settings(max_examples=200, deadline=None)
    @given(lf_reads(), st.booleans(), st.integers(min_value=1, max_value=6))
    def test_stamper_adds_directly(self, chunks: List[bytes], carry: bool, max_events: int) -> None:
        """
        A C stamper whose on_event is a store adds to it exactly what a
        Python callable would have been handed (and subscribers get it too).
        """
        c_store()
        direct, rec = _Stream("t", max_events, 10_000), Recorder()
        direct.subscribers = {Attachment(rec)}
        reference = _PyEventStore(max_events, 10_000)
        seen: List[Tuple[int, bytes]] = []

        def via_python(seq: int, block: bytes) -> None:
            seen.append((seq, block))
            reference.add(seq, block)

        a = SseRewriter.for_stream(SID, carry_upstream=carry, on_event=direct)
        b = SseRewriter.for_stream(SID, carry_upstream=carry, on_event=via_python)
        for chunk in chunks:
            self.assertEqual(a.feed(chunk), b.feed(chunk))
        self.assertEqual(a.flush(), b.flush())
        self.assertEqual(direct.events_after(0), reference.events_after(0))
        self.assertEqual((direct.first_seq, direct.last_seq, len(direct)),
                         (reference.first_seq, reference.last_seq, len(reference)))
        self.assertEqual(rec.events, seen)
