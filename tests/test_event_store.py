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
from aura_proxy.sse import EVENT_STORE_ENTRY_BYTES as ENTRY, SseRewriter
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
        grown: List[int] = []
        store.on_grow = grown.append
        model: deque[tuple[int, bytes]] = deque()
        total = 0
        first = 1
        for seq, size in enumerate(sizes, 1):
            block = bytes([seq % 251]) * size
            store.add(seq, block) if seq % 2 else store(seq, block)
            # The rings never exceed the limits (one larger event aside),
            # and on_grow is told every byte they reserve.
            self.assertLessEqual(store.capacity, max([max_bytes] + sizes[:seq]))  # type: ignore[attr-defined]
            self.assertLessEqual(store.slots, max_events)  # type: ignore[attr-defined]
            self.assertEqual(sum(grown), store.footprint)  # type: ignore[attr-defined]
            self.assertEqual(store.footprint, store.capacity + ENTRY * store.slots)  # type: ignore[attr-defined]
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

    def test_capacity_follows_what_is_kept(self) -> None:
        """
        A stream at its limits reserves about what it keeps and stops growing:
        held to max_events (small events) the data ring ends within 1.5x of
        the bytes kept and never above max_bytes; held to max_bytes (large
        events) it ends at max_bytes.  After that, nothing grows (on_grow is
        silent) however many more events come.
        """
        for max_events, event, kept_at_most in ((2000, 115, 2000 * 115), (2000, 300, 262144)):
            store = self.store_type()(max_events, 262144)
            grown: List[int] = []
            store.on_grow = grown.append
            for seq in range(1, 3 * max_events):
                store.add(seq, b"x" * event)
            calls = len(grown)
            for seq in range(3 * max_events, 6 * max_events):
                store.add(seq, b"x" * event)
            self.assertEqual(len(grown), calls)  # type: ignore[attr-defined]
            self.assertLessEqual(store.size, kept_at_most)  # type: ignore[attr-defined]
            self.assertLessEqual(store.capacity, min(262144, int(store.size * 1.5) + 64))  # type: ignore[attr-defined]
            self.assertLessEqual(store.footprint, 262144 + ENTRY * max_events)  # type: ignore[attr-defined]
            self.assertLessEqual(store.slots, min(max_events, int(len(store) * 1.5) + 4))  # type: ignore[attr-defined]

    def test_release(self) -> None:
        """
        release() frees the rings and answers the footprint it freed; the
        store keeps nothing more and replays nothing.
        """
        store = self.store_type()(100, 10_000)
        for seq in range(1, 51):
            store.add(seq, b"e" * 100)
        footprint = store.footprint
        self.assertEqual(store.release(), footprint)  # type: ignore[attr-defined]
        store.add(51, b"late")
        self.assertEqual(  # type: ignore[attr-defined]
            (store.footprint, store.size, len(store), store.ended, store.events_after(0)),
            (0, 0, 0, True, []),
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

    @settings(max_examples=200, deadline=None)
    @given(
        sizes=st.lists(st.integers(min_value=0, max_value=300), max_size=400),
        max_events=st.integers(min_value=1, max_value=50),
        max_bytes=st.integers(min_value=1, max_value=3000),
        after=st.integers(min_value=0, max_value=400),
    )
    def test_grows_as_the_python_store(self, sizes: List[int], max_events: int, max_bytes: int, after: int) -> None:
        """
        Any sizes and limits: the C store reserves exactly what the Python
        one does (capacity, slots, each growth told to on_grow) and answers
        the same.
        """
        c, py = c_store()(max_events, max_bytes), _PyEventStore(max_events, max_bytes)
        c_grown: List[int] = []
        py_grown: List[int] = []
        c.on_grow, py.on_grow = c_grown.append, py_grown.append
        for seq, size in enumerate(sizes, 1):
            block = bytes([seq % 251]) * size
            c.add(seq, block)
            py.add(seq, block)
            self.assertEqual((c.capacity, c.slots, c.size, len(c)), (py.capacity, py.slots, py.size, len(py)))
        self.assertEqual(c_grown, py_grown)
        self.assertEqual(c.events_after(after), py.events_after(after))
        self.assertEqual((c.first_seq, c.last_seq), (py.first_seq, py.last_seq))
        self.assertEqual(c.release(), py.release())

    def test_release_refused_while_in_use(self) -> None:
        """A subscriber or on_grow that releases the store it is called by is refused with RuntimeError."""
        store = c_store()(5, 100)
        refused: List[BaseException] = []

        def release(*args: object) -> None:
            try:
                store.release()
            except RuntimeError as e:
                refused.append(e)

        store.on_grow = release
        store.add(1, b"a")
        self.assertEqual((len(refused), store.events_after(0)), (1, [(1, b"a")]))

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
