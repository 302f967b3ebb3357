"""
Tests for the C stamper (L{aura_proxy._sse_stamp}) behind
L{SseRewriter.for_stream}: it must give exactly what the Python rewriter
gives, byte for byte, event for event.

Skipped when the extension is not built, unless C{AURA_PROXY_REQUIRE_C=1}
(C{./dev test} sets it, so CI cannot skip them silently).
"""

from __future__ import annotations

import base64
import os
from typing import List, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from aura_proxy import sse
from aura_proxy.sse import MAX_CARRIED_UPSTREAM_ID, SseRewriter, event_id_factory
from tests.test_sse import chunked

SID = "A" * 21 + "Q"

if not sse.ACCELERATED and os.environ.get("AURA_PROXY_REQUIRE_C") != "1":
    skip = "aura_proxy._sse_stamp is not built (no C compiler at install time?)"


def run(
    chunks: List[bytes], accelerate: bool, carry: bool = True
) -> Tuple[List[bytes], bytes, List[Tuple[int, bytes]], SseRewriter]:
    """Feed C{chunks} to a for_stream rewriter; its outputs, flush and events."""
    events: List[Tuple[int, bytes]] = []
    rw = SseRewriter.for_stream(
        SID, carry_upstream=carry, on_event=lambda seq, block: events.append((seq, block)),
        accelerate=accelerate,
    )
    outs = [rw.feed(c) for c in chunks]
    return outs, rw.flush(), events, rw


_up = st.one_of(
    st.sampled_from([b"", b"1", b"42", b"a\0b", b"x" * MAX_CARRIED_UPSTREAM_ID,
                     b"y" * (MAX_CARRIED_UPSTREAM_ID + 1), b" lead", b"\xff\xfe"]),
    st.binary(max_size=100).filter(lambda b: b"\n" not in b and b"\r" not in b),
)
_lf_line = st.one_of(
    st.binary(max_size=20).filter(lambda b: b"\n" not in b and b"\r" not in b).map(lambda v: b"data: " + v),
    st.just(b"data"),
    _up.map(lambda v: b"id: " + v),
    _up.map(lambda v: b"id:" + v),
    st.sampled_from([b"id", b"event: x", b": comment", b"retry: 5", b"idx: 1", b"datax", b"x"]),
)


@st.composite
def lf_reads(draw: st.DrawFn) -> List[bytes]:
    """LF-only streams, read at block boundaries (so the C path runs) or anywhere."""
    blocks = draw(st.lists(st.lists(_lf_line, max_size=4), max_size=10))
    pieces = []
    for lines in blocks:
        pieces.append(b"".join(line + b"\n" for line in lines) + b"\n")
    data = b"".join(pieces)
    if draw(st.booleans()):
        # Group whole blocks into reads.
        reads, cur = [], b""
        for piece in pieces:
            cur += piece
            if draw(st.booleans()):
                reads.append(cur)
                cur = b""
        return reads + ([cur] if cur else [])
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0] + cuts + [len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


class EquivalenceTests(SynchronousTestCase):
    """The C stamper and the Python rewriter agree on every stream."""

    def assertSame(self, chunks: List[bytes], carry: bool) -> None:
        py = run(chunks, accelerate=False, carry=carry)
        c = run(chunks, accelerate=True, carry=carry)
        self.assertEqual(c[0], py[0])  # every read's output
        self.assertEqual(c[1], py[1])  # the flush
        self.assertEqual(c[2], py[2])  # (seq, block) handed to on_event
        self.assertEqual(c[3].seq, py[3].seq)
        self.assertEqual(c[3].upstream_id_bytes, py[3].upstream_id_bytes)

    @settings(max_examples=400, deadline=None)
    @given(lf_reads(), st.booleans())
    def test_lf_streams(self, chunks: List[bytes], carry: bool) -> None:
        """LF-only streams (the C path's case), read at block boundaries or anywhere."""
        self.assertSame(chunks, carry)

    @settings(max_examples=300, deadline=None)
    @given(chunked(), st.booleans())
    def test_any_stream(self, case: Tuple[bytes, List[bytes]], carry: bool) -> None:
        """Any stream (CR, CRLF, BOM, partial blocks), split anywhere: C hands over exactly."""
        self.assertSame(case[1], carry)

    def test_accelerated_when_built(self) -> None:
        """for_stream uses the C stamper when it is built."""
        rw = SseRewriter.for_stream(SID)
        self.assertEqual(type(rw._st).__name__, "Stamper")


class StamperTests(SynchronousTestCase):
    """The C stamper's own behaviour."""

    def stamper(self, carry: bool = True) -> Tuple[object, List[bytes]]:
        from aura_proxy._sse_stamp import Stamper

        fell_back: List[bytes] = []

        def fallback(data: bytes) -> bytes:
            fell_back.append(data)
            return b"<python>"

        s = Stamper((SID + ".").encode(), carry, None, fallback)
        s.slow = 0
        return s, fell_back

    def test_whole_lf_blocks_stay_in_c(self) -> None:
        """Reads of whole LF blocks are rewritten without the Python fallback."""
        s, fell_back = self.stamper()
        out = s.feed(b"id: 7\ndata: a\n\n: c\n\ndata: b\n\n")  # type: ignore[attr-defined]
        carried = base64.urlsafe_b64encode(b"7").rstrip(b"=")
        self.assertEqual(
            out,
            b"id: " + SID.encode() + b".1." + carried + b"\ndata: a\n\n: c\n\n"
            + b"id: " + SID.encode() + b".2." + carried + b"\ndata: b\n\n",
        )
        self.assertEqual(fell_back, [])
        self.assertEqual((s.seq, s.upstream), (2, b"7"))  # type: ignore[attr-defined]

    def test_other_reads_fall_back(self) -> None:
        """A CR, a partial block or the slow flag hand the read to Python unchanged."""
        for data in (b"data: a\r\n\r\n", b"data: a\n\ndata: b", b"data: a\n", b"a\n\n\n"):
            s, fell_back = self.stamper()
            self.assertEqual(s.feed(data), b"<python>")  # type: ignore[attr-defined]
            self.assertEqual(fell_back, [data])
            self.assertEqual(s.seq, 0)  # type: ignore[attr-defined]
        s, fell_back = self.stamper()
        s.slow = 1  # type: ignore[attr-defined]
        self.assertEqual(s.feed(b"data: a\n\n"), b"<python>")  # type: ignore[attr-defined]

    def test_make_id_matches_event_id_factory(self) -> None:
        """make_id gives event_id_factory's ids for every upstream id length."""
        s, _ = self.stamper()
        for up in [None, b"", b"a", b"ab", b"abc", b"\x00\xff\xfe", b"z" * 96, b"z" * 97]:
            s.upstream = up  # type: ignore[attr-defined]
            expected = event_id_factory(SID, lambda: up)
            for seq in (1, 9, 10, 12345678901234):
                self.assertEqual(s.make_id(seq), expected(seq))  # type: ignore[attr-defined]
        s, _ = self.stamper(carry=False)
        s.upstream = b"abc"  # type: ignore[attr-defined]
        self.assertEqual(s.make_id(3), event_id_factory(SID)(3))  # type: ignore[attr-defined]

    def test_bad_arguments(self) -> None:
        """Wrong types are refused with TypeError or ValueError, not a crash."""
        from aura_proxy._sse_stamp import Stamper

        with self.assertRaises(TypeError):
            Stamper("text", True, None, lambda d: d)
        with self.assertRaises(TypeError):
            Stamper(b"p.", True, 3, lambda d: d)
        s, _ = self.stamper()
        with self.assertRaises(TypeError):
            s.upstream = "text"  # type: ignore[attr-defined]
        with self.assertRaises(ValueError):
            s.make_id(-1)  # type: ignore[attr-defined]
        with self.assertRaises(TypeError):
            s.make_id("1")  # type: ignore[attr-defined]
        # Not bytes: the fallback decides.
        self.assertEqual(s.feed(bytearray(b"data: a\n\n")), b"<python>")  # type: ignore[attr-defined]

    def test_on_event_error_propagates(self) -> None:
        """An exception in on_event comes out of feed."""
        from aura_proxy._sse_stamp import Stamper

        def boom(seq: int, block: bytes) -> None:
            raise RuntimeError("log down")

        s = Stamper(b"p.", False, boom, lambda d: d)
        s.slow = 0
        with self.assertRaises(RuntimeError):
            s.feed(b"data: a\n\n")

    def test_many_blocks_in_one_read(self) -> None:
        """More blocks in one read than fit the stack buffers all reach on_event."""
        from aura_proxy._sse_stamp import Stamper

        got: List[Tuple[int, bytes]] = []
        s = Stamper(b"p.", False, lambda seq, block: got.append((seq, block)), lambda d: d)
        s.slow = 0
        out = s.feed(b"data: x\n\n" * 100)
        self.assertEqual(out, b"".join(b"id: p.%d\ndata: x\n\n" % i for i in range(1, 101)))
        self.assertEqual(got, [(i, b"id: p.%d\ndata: x\n\n" % i) for i in range(1, 101)])

    def test_uninitialised(self) -> None:
        """A Stamper that __init__ never ran on refuses every method and attribute with RuntimeError (it crashed)."""
        from aura_proxy._sse_stamp import Stamper

        s = Stamper.__new__(Stamper)
        for use in (
            lambda: s.feed(b"data: a\n\n"), lambda: s.make_id(1), lambda: s.seq, lambda: s.slow,
            lambda: s.upstream, lambda: setattr(s, "seq", 1), lambda: setattr(s, "slow", 0),
            lambda: setattr(s, "upstream", b"x"),
        ):
            self.assertRaises(RuntimeError, use)

    def test_reinitialised_by_on_event(self) -> None:
        """
        An on_event that re-initialises the stamper during feed (here: to no
        on_event at all) is refused with RuntimeError; the read's events all
        reach the on_event it started with.
        """
        from aura_proxy._sse_stamp import Stamper

        got: List[Tuple[int, bytes]] = []
        refused: List[BaseException] = []

        def on_event(seq: int, block: bytes) -> None:
            got.append((seq, block))
            try:
                s.__init__(b"other.", False, None, lambda d: d)  # type: ignore[misc]
            except RuntimeError as e:
                refused.append(e)

        s = Stamper(b"p.", False, on_event, lambda d: d)
        s.slow = 0
        self.assertEqual(s.feed(b"data: a\n\ndata: b\n\n"), b"id: p.1\ndata: a\n\nid: p.2\ndata: b\n\n")
        self.assertEqual(got, [(1, b"id: p.1\ndata: a\n\n"), (2, b"id: p.2\ndata: b\n\n")])
        self.assertEqual(len(refused), 2)

    def test_reinitialised_by_a_store_subscriber(self) -> None:
        """
        A subscriber of the stamper's EventStore that re-initialises the
        stamper mid-read with a much longer prefix (the output buffer is sized
        for the current one) is refused; the read is stamped with the prefix
        it started with.
        """
        from aura_proxy._sse_stamp import EventStore, Stamper

        refused: List[BaseException] = []

        class Reinitialising:
            def replay_event(self, seq: int, block: bytes) -> None:
                try:
                    s.__init__(b"x" * 4096 + b".", True, store, lambda d: d)  # type: ignore[misc]
                except RuntimeError as e:
                    refused.append(e)

        class Attachment:
            subscriber = Reinitialising()

        store = EventStore(100, 100_000)
        store.subscribers = {Attachment()}
        s = Stamper(b"p.", False, store, lambda d: d)
        s.slow = 0
        out = s.feed(b"data: x\n\n" * 50)
        self.assertEqual(out, b"".join(b"id: p.%d\ndata: x\n\n" % i for i in range(1, 51)))
        self.assertEqual(len(refused), 50)
        self.assertEqual(len(store), 50)

    def test_feed_holds_its_callables(self) -> None:
        """
        A fallback that drops every other reference to itself and to
        on_event (by re-initialising, refused, or by the rewriter letting go)
        still runs to its end: feed holds them for the call.
        """
        from aura_proxy._sse_stamp import Stamper

        refused: List[BaseException] = []

        def fallback(data: bytes) -> bytes:
            try:
                s.__init__(b"q.", False, None, lambda d: d)  # type: ignore[misc]
            except RuntimeError as e:
                refused.append(e)
            return b"<python>"

        s = Stamper(b"p.", False, None, fallback)
        del fallback
        self.assertEqual(s.feed(b"data: a\r\n\r\n"), b"<python>")
        self.assertEqual(len(refused), 1)
        self.assertEqual(s.make_id(1), b"p.1")
