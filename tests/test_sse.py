"""
Tests for L{aura_proxy.sse}: the reference parser, the id helpers and the
incremental id-stamping rewriter.
"""

from __future__ import annotations

import base64
import functools
import re
from typing import List, Optional, Sequence, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from aura_proxy.sse import (
    DEFAULT_MAX_BUFFER,
    Event,
    SseRewriter,
    StampedEvent,
    event_id_factory,
    format_comment,
    format_event_id,
    make_stream_id,
    parse_event_id,
    parse_gateway_id,
    parse_events,
)

SID = "A" * 21 + "Q"
make_id = functools.partial(format_event_id, SID)


def gid(seq: int) -> bytes:
    """The gateway id the tests' rewriters stamp for C{seq}."""
    return make_id(seq)


def rewrite(chunks: Sequence[bytes], **kw: object) -> Tuple[bytes, SseRewriter]:
    """Feed C{chunks} to a recording rewriter; return all output (with flush)."""
    rw = SseRewriter(make_id, record=True, **kw)  # type: ignore[arg-type]
    out = b"".join(rw.feed(c) for c in chunks) + rw.flush()
    return out, rw


_LINES = re.compile(rb"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+\Z")
_BOM = b"\xef\xbb\xbf"


def split_lines(data: bytes) -> List[bytes]:
    """C{data}'s lines, each with its line end (the last may have none)."""
    return _LINES.findall(data)


def content(line: bytes) -> bytes:
    """A line without its line end."""
    return line.rstrip(b"\r\n")


def is_id_line(line: bytes) -> bool:
    """Whether a line (with or without its end) is an C{id} field."""
    c = content(line)
    return c == b"id" or c.startswith(b"id:")


def id_value(line: bytes) -> bytes:
    """The value of an C{id} line."""
    v = content(line)[3:]
    return v[1:] if v.startswith(b" ") else v


def without_ids(data: bytes) -> bytes:
    """C{data} with every C{id} line removed (a stream-start BOM is kept)."""
    bom = data.startswith(_BOM)
    if bom:
        data = data[3:]
    kept = b"".join(line for line in split_lines(data) if not is_id_line(line))
    return (_BOM if bom else b"") + kept


def gateway_ids(data: bytes) -> List[bytes]:
    """The values of all valid (NUL-free) C{id} lines in C{data}."""
    if data.startswith(_BOM):
        data = data[3:]
    return [
        id_value(line)
        for line in split_lines(data)
        if is_id_line(line) and b"\0" not in id_value(line)
    ]


def spec_blocks(data: bytes) -> List[Tuple[bool, bool, Optional[str]]]:
    """
    Independent model of the complete blocks of C{data}, per spec: for each
    non-empty block, (stamped: has data or a valid id, dispatched: has data,
    the last event ID buffer after it or None if never set).
    """
    if data.startswith(_BOM):
        data = data[3:]
    result = []
    buffer: Optional[str] = None
    has_data = has_id = any_line = False
    for line in split_lines(data):
        if not line.endswith((b"\r", b"\n")):
            break  # incomplete last line
        c = content(line)
        if not c:
            if any_line:
                result.append((has_data or has_id, has_data, buffer))
            has_data = has_id = any_line = False
            continue
        any_line = True
        name = c.split(b":", 1)[0]
        if name == b"data":
            has_data = True
        elif name == b"id" and b"\0" not in id_value(line):
            has_id = True
            buffer = id_value(line).decode("utf-8", "replace")
    return result


class EventIdTests(SynchronousTestCase):
    """Gateway stream ids and event ids."""

    def test_make_stream_id_shape(self) -> None:
        """A stream id is 22 URL-safe base64 characters with no padding."""
        for _ in range(50):
            sid = make_stream_id()
            self.assertEqual(len(sid), 22)
            self.assertRegex(sid, r"\A[A-Za-z0-9_-]{22}\Z")

    def test_make_stream_id_random(self) -> None:
        """Stream ids do not repeat (128 random bits)."""
        self.assertEqual(len({make_stream_id() for _ in range(1000)}), 1000)

    def test_round_trip(self) -> None:
        """parse_event_id inverts format_event_id for fresh stream ids."""
        for seq in (1, 17, 10**17):
            sid = make_stream_id()
            value = format_event_id(sid, seq)
            self.assertIsInstance(value, bytes)
            self.assertEqual(value, f"{sid}.{seq}".encode())
            self.assertEqual(parse_event_id(value.decode()), (sid, seq))

    def test_ids_carry_the_upstream_id(self) -> None:
        """An id made with an upstream getter carries the upstream id; parse_gateway_id gets it back."""
        sid = make_stream_id()
        current: list[Optional[bytes]] = [None]
        maker = event_id_factory(sid, lambda: current[0])
        self.assertEqual(maker(1), format_event_id(sid, 1))
        current[0] = "réponse-41".encode()
        value = maker(2).decode()
        self.assertEqual(parse_gateway_id(value), (sid, 2, "réponse-41".encode()))
        self.assertEqual(parse_event_id(value), (sid, 2))
        current[0] = b"x" * 97
        self.assertEqual(maker(3), format_event_id(sid, 3))

    def test_carried_id_rejects_line_breaks(self) -> None:
        """A carried upstream id that decodes to CR, LF or NUL is not a gateway id."""
        sid = make_stream_id()
        bad = base64.urlsafe_b64encode(b"a\r\nX-Evil: 1").rstrip(b"=").decode()
        self.assertIsNone(parse_gateway_id(f"{sid}.3.{bad}"))

    def test_event_id_factory(self) -> None:
        """event_id_factory(sid)(seq) equals format_event_id(sid, seq)."""
        sid = make_stream_id()
        maker = event_id_factory(sid)
        for seq in (1, 2, 99, 10**17):
            self.assertEqual(maker(seq), format_event_id(sid, seq))

    def test_parse_rejects_malformed(self) -> None:
        """Anything but the exact canonical form parses as None."""
        good = SID + ".5"
        self.assertEqual(parse_event_id(good), (SID, 5))
        bad = [
            "",
            SID,
            SID + ".",
            SID + ".0",
            SID + ".05",
            SID + ".-5",
            SID + ".+5",
            SID + ". 5",
            SID + ".5 ",
            " " + good,
            good + "\n",
            SID + ".5.6",
            SID[:-1] + ".5",
            "A" + SID + ".5",
            "A" * 21 + "B.5",  # not the canonical encoding of 128 bits
            "A" * 21 + "=.5",
            "A" * 20 + "+Q.5",
            "A" * 20 + "/Q.5",
            SID + ".\u0665",  # Arabic-Indic digit five
            SID + "." + "9" * 19,
            "\u0410" * 21 + "Q.5",
        ]
        for value in bad:
            self.assertIsNone(parse_event_id(value), value)

    def test_parse_rejects_non_str(self) -> None:
        """A non-str value (e.g. raw header bytes) is not an id."""
        self.assertIsNone(parse_event_id(b"x"))  # type: ignore[arg-type]


class FormatCommentTests(SynchronousTestCase):
    """Heartbeat comments."""

    def test_keep_alive(self) -> None:
        """A comment is ': text' followed by a blank line."""
        self.assertEqual(format_comment("keep-alive"), b": keep-alive\n\n")

    def test_empty(self) -> None:
        """An empty comment is a bare colon line."""
        self.assertEqual(format_comment(), b":\n\n")

    def test_no_events(self) -> None:
        """Clients dispatch nothing for a comment."""
        self.assertEqual(parse_events(format_comment("x")), [])

    def test_rejects_line_ends(self) -> None:
        """CR or LF in the text would inject fields, so they are refused."""
        for text in ("a\nb", "a\rb", "\r\n"):
            self.assertRaises(ValueError, format_comment, text)


class ParseEventsTests(SynchronousTestCase):
    """The reference parser follows the spec's rules."""

    def test_line_endings(self) -> None:
        """LF, CRLF and CR each end lines."""
        for eol in (b"\n", b"\r\n", b"\r"):
            self.assertEqual(
                parse_events(b"data: a" + eol + eol),
                [Event("message", "a", "", None)],
            )

    def test_one_space_removed(self) -> None:
        """Only one space after the colon is removed."""
        self.assertEqual(parse_events(b"data:  a\n\n")[0].data, " a")
        self.assertEqual(parse_events(b"data:a\n\n")[0].data, "a")

    def test_multi_line_data(self) -> None:
        """Data lines are joined by LF; the final LF is dropped."""
        self.assertEqual(parse_events(b"data: a\ndata:\ndata: b\n\n")[0].data, "a\n\nb")

    def test_field_without_colon(self) -> None:
        """A line with no colon is a field with an empty value."""
        self.assertEqual(parse_events(b"data\n\n"), [Event("message", "", "", None)])

    def test_no_data_no_dispatch(self) -> None:
        """A block without data dispatches nothing, and resets the event type."""
        self.assertEqual(parse_events(b"event: x\n\ndata: y\n\n"), [Event("message", "y", "", None)])

    def test_event_type(self) -> None:
        """The event field sets the type for that block only."""
        self.assertEqual(
            [e.event_type for e in parse_events(b"event: t\ndata: a\n\ndata: b\n\n")],
            ["t", "message"],
        )

    def test_id_persists(self) -> None:
        """The last event ID buffer persists across blocks; an empty id resets it."""
        events = parse_events(b"id: 1\ndata: a\n\ndata: b\n\nid\ndata: c\n\n")
        self.assertEqual([e.id for e in events], ["1", "1", ""])

    def test_id_with_nul_ignored(self) -> None:
        """An id value containing NUL is ignored."""
        events = parse_events(b"id: 1\n\nid: 2\x003\ndata: a\n\n")
        self.assertEqual(events[0].id, "1")

    def test_retry(self) -> None:
        """retry takes ASCII digits only and persists."""
        events = parse_events(b"retry: 100\n\ndata: a\n\nretry: 1x\ndata: b\n\nretry:\ndata: c\n\n")
        self.assertEqual([e.retry for e in events], [100, 100, 100])

    def test_comments_and_unknown_fields(self) -> None:
        """Comment lines and unknown fields are ignored."""
        self.assertEqual(
            parse_events(b": hi\nfoo: bar\ndata: a\n\n"), [Event("message", "a", "", None)]
        )

    def test_bom(self) -> None:
        """A leading BOM is dropped; elsewhere it is part of the field name."""
        self.assertEqual(parse_events(_BOM + b"data: a\n\n")[0].data, "a")
        self.assertEqual(parse_events(b"data: a\n\n" + _BOM + b"data: b\n\n")[1:], [])

    def test_incomplete_block_discarded(self) -> None:
        """A block without its blank line at end of stream is not dispatched."""
        self.assertEqual(parse_events(b"data: a\n"), [])
        self.assertEqual(parse_events(b"data: a\n\ndata: b"), [Event("message", "a", "", None)])

    def test_crlf_split_is_one_line_end(self) -> None:
        """CR LF is one line end, not a line end and a blank line."""
        self.assertEqual(parse_events(b"data: a\r\ndata: b\r\n\r\n")[0].data, "a\nb")


class RewriterTests(SynchronousTestCase):
    """The incremental rewriter, rule by rule."""

    def test_lf(self) -> None:
        """LF stream: the id line goes first, with LF."""
        out, rw = rewrite([b"data: a\n\n"])
        self.assertEqual(out, b"id: " + gid(1) + b"\ndata: a\n\n")
        self.assertEqual(rw.seq, 1)

    def test_crlf(self) -> None:
        """CRLF stream (sse-starlette's default): the id line uses CRLF."""
        out, _ = rewrite([b"event: t\r\ndata: a\r\n\r\n"])
        self.assertEqual(out, b"id: " + gid(1) + b"\r\nevent: t\r\ndata: a\r\n\r\n")

    def test_cr(self) -> None:
        """CR-only stream: blocks are found and stamped (id line uses LF)."""
        out, _ = rewrite([b"data: a\rdata: b\r\rdata: c\r\r"])
        self.assertEqual(
            out,
            b"id: " + gid(1) + b"\ndata: a\rdata: b\r\rid: " + gid(2) + b"\ndata: c\r\r",
        )
        self.assertEqual([e.data for e in parse_events(out)], ["a\nb", "c"])

    def test_cr_at_chunk_end_then_lf(self) -> None:
        """A CR blank line ending a read is sent at once; a following LF is not a second blank line."""
        rw = SseRewriter(make_id)
        first = rw.feed(b"data: a\r\n\r")
        self.assertEqual(first, b"id: " + gid(1) + b"\r\ndata: a\r\n\r")
        second = rw.feed(b"\ndata: b\r\n\r\n")
        self.assertEqual(second, b"\nid: " + gid(2) + b"\r\ndata: b\r\n\r\n")
        events = parse_events(first + second)
        self.assertEqual([(e.data, e.id) for e in events], [("a", gid(1).decode()), ("b", gid(2).decode())])

    def test_cr_at_chunk_end_mid_block(self) -> None:
        """A CR ending a read inside a block joins the next read's LF as one CRLF."""
        rw = SseRewriter(make_id)
        self.assertEqual(rw.feed(b"data: a\r"), b"")
        self.assertEqual(rw.feed(b"\ndata: b\r"), b"")
        out = rw.feed(b"\n\r\n")
        self.assertEqual(out, b"id: " + gid(1) + b"\r\ndata: a\r\ndata: b\r\n\r\n")

    def test_lone_lf_after_cr_block(self) -> None:
        """A read that is only the LF of a split CRLF is passed straight on."""
        rw = SseRewriter(make_id)
        rw.feed(b"data: a\r\r")
        self.assertEqual(rw.feed(b"\n"), b"\n")
        self.assertEqual(rw.feed(b"\n"), b"")  # now a real (empty) line: buffered
        self.assertEqual(rw.flush(), b"\n")

    def test_bom(self) -> None:
        """A stream-start BOM stays first; the id line goes right after it."""
        out, rw = rewrite([_BOM + b"id: 1\ndata: a\n\n"])
        self.assertEqual(out, _BOM + b"id: " + gid(1) + b"\ndata: a\n\n")
        self.assertEqual(rw.events[0], StampedEvent(1, "1", b"id: " + gid(1) + b"\ndata: a\n\n"))

    def test_bom_split(self) -> None:
        """A BOM split across reads is still recognised."""
        out, _ = rewrite([_BOM[:1], _BOM[1:2], _BOM[2:] + b"id: 1\ndata: a\n\n"])
        self.assertEqual(out, _BOM + b"id: " + gid(1) + b"\ndata: a\n\n")

    def test_bom_prefix_only(self) -> None:
        """Bytes that start like a BOM but are not one are ordinary bytes."""
        out, _ = rewrite([b"\xef", b"\xbbdata: a\n\n"])
        self.assertEqual(out, b"\xef\xbbdata: a\n\n")  # field "\xef\xbbdata": unknown
        out, _ = rewrite([b"\xef"])
        self.assertEqual(out, b"\xef")

    def test_bom_later_is_not_stripped(self) -> None:
        """A BOM after stream start is part of the field name, so not an id line."""
        out, _ = rewrite([b": x\n\n" + _BOM + b"id: 5\n\n"])
        self.assertEqual(out, b": x\n\n" + _BOM + b"id: 5\n\n")

    def test_comment_block_passes(self) -> None:
        """Comment-only blocks pass through untouched and are not counted."""
        out, rw = rewrite([b": keep-alive\n\n:\r\n\r\n"])
        self.assertEqual(out, b": keep-alive\n\n:\r\n\r\n")
        self.assertEqual(rw.seq, 0)
        self.assertEqual(rw.events, [])

    def test_comment_inside_data_block(self) -> None:
        """Comments inside a stamped block are kept."""
        out, _ = rewrite([b": c\ndata: a\n\n"])
        self.assertEqual(out, b"id: " + gid(1) + b"\n: c\ndata: a\n\n")

    def test_multi_line_data(self) -> None:
        """A multi-line data block is one event and one stamp."""
        out, rw = rewrite([b"data: a\ndata: b\ndata\n\n"])
        self.assertEqual(out, b"id: " + gid(1) + b"\ndata: a\ndata: b\ndata\n\n")
        self.assertEqual(parse_events(out)[0].data, "a\nb\n")

    def test_retry_only_passes(self) -> None:
        """retry-only blocks pass through and are not counted; with data they are stamped."""
        out, rw = rewrite([b"retry: 10\n\nretry: 20\ndata: x\n\n"])
        self.assertEqual(out, b"retry: 10\n\nid: " + gid(1) + b"\nretry: 20\ndata: x\n\n")
        self.assertEqual(rw.seq, 1)

    def test_event_only_passes(self) -> None:
        """event-only blocks (no data) pass through untouched."""
        out, rw = rewrite([b"event: x\n\n"])
        self.assertEqual(out, b"event: x\n\n")
        self.assertEqual(rw.seq, 0)

    def test_id_only_block(self) -> None:
        """An id-only block is stamped (it changes the client's last event id)."""
        out, rw = rewrite([b"id: 7\n\n"])
        self.assertEqual(out, b"id: " + gid(1) + b"\n\n")
        self.assertEqual(rw.events, [StampedEvent(1, "7", b"id: " + gid(1) + b"\n\n")])

    def test_bare_id_field(self) -> None:
        """'id' without a colon is an id field with empty value: stamped, buffer reset to ''."""
        out, rw = rewrite([b"id: 3\n\nid\ndata: a\n\n"])
        self.assertEqual(out, b"id: " + gid(1) + b"\n\nid: " + gid(2) + b"\ndata: a\n\n")
        self.assertEqual([e.upstream_id for e in rw.events], ["3", ""])

    def test_single_block_not_starting_with_data(self) -> None:
        """A read holding one block that starts with an id or event line is rewritten the same."""
        for block in (b"id: 5\nevent: e\ndata: a\n\n", b"event: e\r\ndata: a\r\n\r\n", b"id: 5\n\n"):
            sep = b"\r\n" if b"\r" in block else b"\n"
            out, rw = rewrite([block])
            lines = block.split(sep)
            kept = [line for line in lines if not line.startswith(b"id:")]
            self.assertEqual(out, b"id: " + gid(1) + sep + sep.join(kept))

    def test_upstream_ids_removed(self) -> None:
        """All of a block's own id lines are removed, wherever they are."""
        out, rw = rewrite([b"id: 1\ndata: a\nid: 2\ndata: b\nid: 3\n\n"])
        self.assertEqual(out, b"id: " + gid(1) + b"\ndata: a\ndata: b\n\n")
        self.assertEqual(rw.events[0].upstream_id, "3")

    def test_id_like_fields_kept(self) -> None:
        """Fields that only look like id or data ('idx', 'id ', 'database') are left alone."""
        out, rw = rewrite([b"idx: 1\nid : 2\ndatabase: x\n\n"])
        self.assertEqual(out, b"idx: 1\nid : 2\ndatabase: x\n\n")
        self.assertEqual(rw.seq, 0)

    def test_id_with_nul(self) -> None:
        """An id with NUL is ignored: alone it is not stamped and does not change the buffer."""
        out, rw = rewrite([b"id: 1\n\nid: a\x00b\n\ndata: x\nid: c\x00\n\n"])
        self.assertEqual(
            out,
            b"id: " + gid(1) + b"\n\nid: a\x00b\n\nid: " + gid(2) + b"\ndata: x\n\n",
        )
        self.assertEqual([e.upstream_id for e in rw.events], ["1", "1"])

    def test_upstream_id_persists(self) -> None:
        """upstream_id reports the spec's persisting last event ID buffer."""
        out, rw = rewrite([b"data: a\n\nid: 9\ndata: b\n\ndata: c\n\n"])
        self.assertEqual([e.upstream_id for e in rw.events], [None, "9", "9"])
        self.assertEqual(rw.upstream_id, "9")

    def test_empty_data(self) -> None:
        """'data' / 'data:' with empty value still dispatches, so the block is stamped."""
        out, rw = rewrite([b"data\n\ndata:\n\n"])
        self.assertEqual(out, b"id: " + gid(1) + b"\ndata\n\nid: " + gid(2) + b"\ndata:\n\n")
        self.assertEqual([e.data for e in parse_events(out)], ["", ""])

    def test_extra_blank_lines(self) -> None:
        """Blank lines between blocks pass through unchanged."""
        out, _ = rewrite([b"\n\ndata: a\n\n\n\n\ndata: b\n\n\n"])
        self.assertEqual(
            out, b"\n\nid: " + gid(1) + b"\ndata: a\n\n\n\n\nid: " + gid(2) + b"\ndata: b\n\n\n"
        )

    def test_partial_buffered_until_complete(self) -> None:
        """Incomplete trailing bytes are held until their blank line arrives."""
        rw = SseRewriter(make_id)
        self.assertEqual(rw.feed(b"data: a\n\ndata: b\n"), b"id: " + gid(1) + b"\ndata: a\n\n")
        self.assertEqual(rw.buffered, len(b"data: b\n"))
        self.assertEqual(rw.feed(b"\n"), b"id: " + gid(2) + b"\ndata: b\n\n")
        self.assertEqual(rw.buffered, 0)

    def test_flush(self) -> None:
        """flush returns the incomplete block unchanged and unstamped."""
        rw = SseRewriter(make_id)
        rw.feed(b"id: 1\ndata: par")
        self.assertEqual(rw.flush(), b"id: 1\ndata: par")
        self.assertEqual(rw.flush(), b"")
        self.assertEqual(rw.seq, 0)

    def test_many_small_reads(self) -> None:
        """A block arriving in many small reads is stamped once when complete."""
        rw = SseRewriter(make_id)
        stream = b"event: e\r\ndata: " + b"x" * 1000 + b"\r\n\r\n"
        outs = [rw.feed(stream[i : i + 7]) for i in range(0, len(stream), 7)]
        self.assertEqual(b"".join(outs), b"id: " + gid(1) + b"\r\n" + stream)
        self.assertEqual([o for o in outs if o], [b"id: " + gid(1) + b"\r\n" + stream])

    def test_every_split_point(self) -> None:
        """A mixed-ending stream split at every byte gives the same output as unsplit."""
        stream = (
            _BOM + b"id: 1\r\ndata: a\r\n\r\n: c\r\rretry: 5\rdata: b\rid: 2\r\r"
            b"data: c\n\nid: 3\r\n\r\ndata: d\r\n\nevent: x\n\r\n"
        )
        whole, rw = rewrite([stream])
        expected = [(e.seq, e.upstream_id) for e in rw.events]
        self.assertEqual(expected, [(1, "1"), (2, "2"), (3, "2"), (4, "3"), (5, "3")])
        for i in range(len(stream) + 1):
            for j in range(i, min(i + 4, len(stream) + 1)):
                out, rw2 = rewrite([stream[:i], stream[i:j], stream[j:]])
                self.assertEqual(out, whole, (i, j))
                self.assertEqual([(e.seq, e.upstream_id) for e in rw2.events], expected)
        bytewise, _ = rewrite([stream[i : i + 1] for i in range(len(stream))])
        self.assertEqual(bytewise, whole)

    def test_mixed_endings_dropped_id_before_blank(self) -> None:
        """
        Dropping an id line between a bare-CR line and an LF blank line would
        merge them into CRLF; the gateway line goes between them instead.
        """
        stream = b"data: a\rid: 5\n\ndata: b\n\n"
        out, rw = rewrite([stream])
        self.assertEqual(out, b"data: a\rid: " + gid(1) + b"\n\nid: " + gid(2) + b"\ndata: b\n\n")
        self.assertEqual([(e.data, e.id) for e in parse_events(out)],
                         [("a", gid(1).decode()), ("b", gid(2).decode())])

    def test_record_off(self) -> None:
        """Without record=True nothing is collected."""
        rw = SseRewriter(make_id)
        rw.feed(b"data: a\n\n")
        self.assertEqual(rw.events, [])

    def test_take_events(self) -> None:
        """take_events hands over the recorded events and starts a new list."""
        rw = SseRewriter(make_id, record=True)
        rw.feed(b"data: a\n\n")
        taken = rw.take_events()
        self.assertEqual([e.seq for e in taken], [1])
        self.assertEqual(rw.events, [])
        rw.feed(b"data: b\n\n")
        self.assertEqual([e.seq for e in rw.take_events()], [2])

    def test_recorded_block_is_sent_bytes(self) -> None:
        """A recorded block is exactly the bytes sent for it, several per read."""
        rw = SseRewriter(make_id, record=True)
        out = rw.feed(b": c\n\nid: 4\ndata: a\n\ndata: b\n\n")
        blocks = [e.block for e in rw.events]
        self.assertEqual(out, b": c\n\n" + b"".join(blocks))

    def test_default_max_buffer(self) -> None:
        """The default cap is 1 MiB."""
        self.assertEqual(DEFAULT_MAX_BUFFER, 1 << 20)

    def test_overflow_passes_through(self) -> None:
        """A partial block over max_buffer is sent unchanged; its block is not stamped."""
        rw = SseRewriter(make_id, max_buffer=16, record=True)
        self.assertEqual(rw.feed(b"id: 1\ndata: 0123"), b"")
        self.assertEqual(rw.feed(b"456789"), b"id: 1\ndata: 0123456789")
        self.assertEqual(rw.buffered, 0)
        self.assertEqual(rw.feed(b"abc\n"), b"abc\n")
        # The blank line ends the passed-through block; rewriting resumes.
        self.assertEqual(rw.feed(b"\ndata: x\n\n"), b"\nid: " + gid(1) + b"\ndata: x\n\n")
        self.assertEqual([(e.seq, e.upstream_id) for e in rw.events], [(1, None)])

    def test_overflow_single_read(self) -> None:
        """A single read leaving more than max_buffer pending is passed through too."""
        rw = SseRewriter(make_id, max_buffer=4)
        self.assertEqual(rw.feed(b"data: a\n\ndata: long"), b"id: " + gid(1) + b"\ndata: a\n\ndata: long")
        self.assertEqual(rw.feed(b"er\r"), b"er\r")
        self.assertEqual(rw.feed(b"\r"), b"\r")
        # That CR blank line may be followed by its LF.
        self.assertEqual(rw.feed(b"\ndata: b\n\n"), b"\nid: " + gid(2) + b"\ndata: b\n\n")

    def test_complete_big_block_not_capped(self) -> None:
        """The cap applies to buffered partial bytes, not to a block that completes in one read."""
        rw = SseRewriter(make_id, max_buffer=8)
        block = b"data: " + b"y" * 100 + b"\n\n"
        self.assertEqual(rw.feed(block), b"id: " + gid(1) + b"\n" + block)


# -- property tests ------------------------------------------------------------------

_value = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"),
    max_size=12,
)
_id_value = st.one_of(_value, st.sampled_from(["", "1", "a\0b", "\0", " x", "7"]))


def _field(name: str, values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(name),
        values.map(lambda v: f"{name}:{v}"),
        values.map(lambda v: f"{name}: {v}"),
    )


_line = st.one_of(
    _field("data", _value),
    _field("data", _value),
    _field("event", _value),
    _field("id", _id_value),
    _field("retry", st.one_of(st.from_regex(r"\A[0-9]{0,4}\Z"), _value)),
    _value.map(lambda v: ":" + v),
    st.sampled_from(["idx: 1", "id : 2", "database: 3", "dat: 4", "\ufeffid: 5", " id: 6", "x"]),
)
_block = st.lists(_line, min_size=0, max_size=4)


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """Random event streams: random fields, endings, comments, ids or not."""
    style = draw(st.sampled_from(["\n", "\r\n", "\r", "mixed"]))

    def eol() -> str:
        if style == "mixed":
            return draw(st.sampled_from(["\n", "\r\n", "\r"]))
        return style

    parts = []
    if draw(st.booleans()):
        parts.append("\ufeff")
    for block in draw(st.lists(_block, max_size=8)):
        for line in block:
            parts.append(line + eol())
        parts.append(eol())
    # Maybe an incomplete trailing block (and maybe an unterminated line).
    for line in draw(st.lists(_line, max_size=2)):
        parts.append(line + eol())
    parts.append(draw(st.sampled_from(["", "data: part", "id", "\r"])))
    return "".join(parts).encode("utf-8")


@st.composite
def chunked(draw: st.DrawFn) -> Tuple[bytes, List[bytes]]:
    """A stream and a split of it into reads at arbitrary byte positions."""
    data = draw(streams())
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    bounds = [0] + cuts + [len(data)]
    return data, [data[a:b] for a, b in zip(bounds, bounds[1:])]


def _semantics(events: List[Event]) -> List[Tuple[str, str, Optional[int]]]:
    return [(e.event_type, e.data, e.retry) for e in events]


class PropertyTests(SynchronousTestCase):
    """The rewriter against the reference parser on random streams."""

    @settings(max_examples=300, deadline=None)
    @given(chunked())
    def test_only_ids_change(self, case: Tuple[bytes, List[bytes]]) -> None:
        """
        For any stream split anywhere: the output equals the input apart from
        id lines; clients see the same events with the gateway's ids
        make_id(1..n) in order; the upstream id reported per stamped block is
        the spec's last event ID buffer; recorded blocks are sent bytes.
        """
        data, chunks = case
        rw = SseRewriter(make_id, record=True)
        outs = [rw.feed(c) for c in chunks]
        sent = b"".join(outs)
        out = sent + rw.flush()

        self.assertEqual(without_ids(out), without_ids(data))

        model = spec_blocks(data)
        stamped = [buf for (is_stamped, _, buf) in model if is_stamped]
        n = len(stamped)
        self.assertEqual(
            [(e.seq, e.upstream_id) for e in rw.events],
            [(i + 1, buf) for i, buf in enumerate(stamped)],
        )
        self.assertEqual(rw.seq, n)
        self.assertEqual(gateway_ids(sent), [gid(i) for i in range(1, n + 1)])

        before, after = parse_events(data), parse_events(out)
        self.assertEqual(_semantics(after), _semantics(before))
        expected_ids = []
        seq = 0
        for is_stamped, dispatched, _ in model:
            seq += is_stamped
            if dispatched:
                expected_ids.append(gid(seq).decode())
        self.assertEqual([e.id for e in after], expected_ids)

        # Each recorded block is sent, in order, and carries its own id.
        pos = 0
        for e in rw.events:
            at = sent.find(e.block, pos)
            self.assertNotEqual(at, -1)
            pos = at + len(e.block)
            self.assertEqual(gateway_ids(e.block), [gid(e.seq)])

    @settings(max_examples=300, deadline=None)
    @given(chunked())
    def test_split_invariant(self, case: Tuple[bytes, List[bytes]]) -> None:
        """
        Output bytes and records do not depend on where the reads are split
        (except that a recorded block whose CRLF blank line was split after
        the CR lacks that LF, which is sent with the next read).
        """
        data, chunks = case
        whole, rw1 = rewrite([data])
        split, rw2 = rewrite(chunks)
        self.assertEqual(split, whole)
        self.assertEqual(
            [(e.seq, e.upstream_id) for e in rw2.events],
            [(e.seq, e.upstream_id) for e in rw1.events],
        )
        for a, b in zip(rw2.events, rw1.events):
            if a.block != b.block:
                self.assertEqual(a.block + b"\n", b.block)
                self.assertTrue(a.block.endswith(b"\r"))

    @settings(max_examples=300, deadline=None)
    @given(chunked(), st.integers(1, 40))
    def test_overflow_keeps_stream(self, case: Tuple[bytes, List[bytes]], cap: int) -> None:
        """
        With a tiny max_buffer (pass-through mode kicking in), the output
        still equals the input apart from id lines, clients see the same
        events, and stamps are still make_id(1..n) in order.
        """
        data, chunks = case
        out, rw = rewrite(chunks, max_buffer=cap)
        self.assertEqual(without_ids(out), without_ids(data))
        self.assertEqual(_semantics(parse_events(out)), _semantics(parse_events(data)))
        self.assertEqual([e.seq for e in rw.events], list(range(1, rw.seq + 1)))


class OnEventTests(SynchronousTestCase):
    """The on_event callback of the rewriter."""

    def test_on_event_gets_each_stamped_block(self) -> None:
        """on_event receives (seq, block) of each stamped block as sent, and nothing is kept in events."""
        got: list[tuple[int, bytes]] = []
        rewriter = SseRewriter(make_id, on_event=lambda seq, block: got.append((seq, block)))
        out = rewriter.feed(b"data: a\n\n: comment\n\ndata: b\n\n")
        self.assertEqual([seq for seq, _ in got], [1, 2])
        self.assertEqual(b"".join(block for _, block in got), out.replace(b": comment\n\n", b""))
        self.assertEqual(rewriter.events, [])
