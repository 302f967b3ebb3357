"""
Server-Sent Events on the gateway's hot path: an incremental stream rewriter
that stamps the gateway's own event ids, plus the small helpers around it.

The wire format is the one in the WHATWG HTML standard, section "Server-sent
events", "Interpreting an event stream":

  - lines end in CRLF, LF or CR; a CR may be the last byte of one read and its
    LF the first byte of the next, which is still one line end;
  - one leading UTF-8 BOM, at stream start only, is not part of the stream;
  - a line starting with C{:} is a comment; C{name: value} sets a field (one
    space after the colon is dropped); a line without a colon is a field name
    with an empty value;
  - fields: C{data} (appended, joined by LF), C{event}, C{id} (ignored if the
    value contains NUL; otherwise it sets the "last event ID buffer", which
    persists across blocks), C{retry} (ASCII digits only); other names are
    ignored;
  - a blank line ends a block: the block dispatches an event if it had data.

L{SseRewriter} passes upstream bytes through to the client unchanged except
that every block with a C{data} or C{id} field gets the gateway's id: the
block's own C{id} lines are dropped and one C{id: <gateway id>} line is put
first.  L{parse_events} is a plain, non-incremental reference parser (the
test oracle).  Gateway ids are C{<stream id>.<seq>}: see L{make_stream_id},
L{format_event_id} and L{parse_event_id}.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, List, NamedTuple, Optional

from aura_proxy import c_extensions

if TYPE_CHECKING:
    from aura_proxy import _sse_stamp

__all__ = [
    "ACCELERATED",
    "C_DISABLED_REASON",
    "DEFAULT_MAX_BUFFER",
    "Event",
    "SseRewriter",
    "StampedEvent",
    "format_comment",
    "event_id_factory",
    "format_event_id",
    "make_stream_id",
    "parse_event_id",
    "parse_events",
    "parse_gateway_id",
    "MAX_CARRIED_UPSTREAM_ID",
]

#: Default cap, in bytes, on the partial block an L{SseRewriter} buffers.
DEFAULT_MAX_BUFFER = 1024 * 1024

#: The longest upstream id (bytes) a gateway id carries.
MAX_CARRIED_UPSTREAM_ID = 96

#: Bytes per event slot of the resume log's event store (its sequence number
#: and its length: L{aura_proxy.resume.log}); also a version mark of the C
#: store's layout (a build of the older store lacks it and is not used).
EVENT_STORE_ENTRY_BYTES = 16

_BOM = b"\xef\xbb\xbf"
_LF = b"\n"
_CRLF = b"\r\n"
_LFLF = b"\n\n"
#: The line a stamped block starts with, before the gateway id.
_ID_FIELD = b"id: "
#: Between a gateway id's sequence number and the upstream id it carries.
_CARRY_SEPARATOR = b"."
#: The carried upstream id's alphabet: base64url (RFC 4648, section 5), unpadded.
_BASE64URL_ALPHABET = bytes(base64.urlsafe_b64encode(bytes([i << 2]))[0] for i in range(64))
_CRLFCRLF = b"\r\n\r\n"
_NOT_A_BLOCK_START = (b"", b"\n", b"\r")
_COLON = 0x3A
_LF_BYTE = 0x0A
_CR_BYTE = 0x0D

#: Why L{aura_proxy._sse_stamp} is not used (not built, or built with other
#: constants), or None.
C_DISABLED_REASON: Optional[str]
# The C stamper and event store, if built with the constants above.
_c_module, C_DISABLED_REASON = c_extensions.load("aura_proxy._sse_stamp", {
    "MAX_CARRIED_UPSTREAM_ID": MAX_CARRIED_UPSTREAM_ID,
    "EVENT_STORE_ENTRY_BYTES": EVENT_STORE_ENTRY_BYTES,
    "ID_FIELD": _ID_FIELD,
    "CARRY_SEPARATOR": _CARRY_SEPARATOR,
    "BLOCK_END": _LFLF,
    "BASE64URL_ALPHABET": _BASE64URL_ALPHABET,
})
_Stamper: Optional[type[_sse_stamp.Stamper]] = None if _c_module is None else _c_module.Stamper
#: The memory resume log's C store (L{aura_proxy.resume.log}), or None.
_CEventStore: Optional[type[_sse_stamp.EventStore]] = None if _c_module is None else _c_module.EventStore

#: Whether the C stamper (L{aura_proxy._sse_stamp}) is built and used by
#: L{SseRewriter.for_stream}.
ACCELERATED = _Stamper is not None

# One line and its end (the general scanner).  CRLF is tried before CR, so a
# CR followed by LF in the same buffer is one line end.
_LINE_RE = re.compile(rb"([^\r\n]*)(\r\n?|\n)")


# -- gateway ids ---------------------------------------------------------------


def make_stream_id() -> str:
    """
    A new random stream id: 128 random bits as URL-safe base64 without
    padding, always 22 characters of C{[A-Za-z0-9_-]}.
    """
    return secrets.token_urlsafe(16)


def format_event_id(stream_id: str, seq: int) -> bytes:
    """
    The gateway's event id for the C{seq}-th stamped event (from 1) of the
    stream C{stream_id}: C{b"<stream_id>.<seq>"}.

    L{event_id_factory} makes the equivalent C{make_id} for an L{SseRewriter}.
    """
    return f"{stream_id}.{seq}".encode("ascii")


def event_id_factory(
    stream_id: str, upstream: Optional[Callable[[], Optional[bytes]]] = None
) -> Callable[[int], bytes]:
    """
    A C{make_id} for L{SseRewriter}: C{seq -> format_event_id(stream_id, seq)},
    with the constant prefix encoded once (it runs once per stamped event).

    @param upstream: returns the upstream's last event id (raw bytes) when
        the id is made, or None.  When given, an id carries that upstream id
        too (C{<stream>.<seq>.<base64url>}), so that a gateway that can no
        longer replay the stream can still hand the upstream its own id.
        Upstream ids longer than L{MAX_CARRIED_UPSTREAM_ID} bytes are not
        carried.
    """
    prefix = f"{stream_id}.".encode("ascii")

    if upstream is None:

        def make_id(seq: int) -> bytes:
            return prefix + b"%d" % seq

        return make_id

    # The upstream id rarely changes between events: encode it once per change.
    last: list[Optional[bytes]] = [None]
    suffix = [b""]

    def make_id_carrying(seq: int) -> bytes:
        up = upstream()
        if up is None or len(up) > MAX_CARRIED_UPSTREAM_ID:
            return prefix + b"%d" % seq
        if up is not last[0]:
            last[0] = up
            suffix[0] = _CARRY_SEPARATOR + base64.urlsafe_b64encode(up).rstrip(b"=")
        return prefix + b"%d" % seq + suffix[0]

    return make_id_carrying


# 22 base64url characters carry 132 bits; for 128 bits of data the last one
# encodes 2 bits followed by 4 zero bits, so it is one of A, Q, g, w.  Checking
# that keeps the mapping id <-> string one-to-one (no two spellings of one id).
# The sequence number is decimal without leading zeros, at least 1, at most 18
# digits (fits in a signed 64-bit column).  [0-9] rather than \d: \d would
# accept non-ASCII digits in a str pattern.
_EVENT_ID_RE = re.compile(
    r"([A-Za-z0-9_-]{21}[AQgw])\.([1-9][0-9]{0,17})(?:\.([A-Za-z0-9_-]{1,128}))?"
)


def parse_event_id(value: str) -> Optional[tuple[str, int]]:
    """
    The C{(stream_id, seq)} of a gateway event id, or None if C{value} is not
    exactly one as L{format_event_id} writes it.

    Values come from clients (C{Last-Event-ID}), so this is strict: no
    surrounding whitespace, no leading zeros, no sign, ASCII only, a stream id
    that is the canonical encoding of 128 bits.
    """
    parsed = parse_gateway_id(value)
    if parsed is None:
        return None
    return parsed[0], parsed[1]


def parse_gateway_id(value: str) -> Optional[tuple[str, int, Optional[bytes]]]:
    """
    The C{(stream_id, seq, upstream_id)} of a gateway event id, or None if
    C{value} is not one; C{upstream_id} is the upstream's own last id the
    gateway id carries (raw bytes), or None.
    """
    if not isinstance(value, str) or len(value) > 41 + 129:
        return None
    match = _EVENT_ID_RE.fullmatch(value)
    if match is None:
        return None
    carried: Optional[bytes] = None
    if match.group(3) is not None:
        encoded = match.group(3)
        try:
            carried = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except (ValueError, binascii.Error):
            return None
        if b"\x00" in carried or b"\r" in carried or b"\n" in carried:
            return None
    return match.group(1), int(match.group(2)), carried


def format_comment(text: str = "") -> bytes:
    """
    A comment-only block such as C{b": keep-alive\\n\\n"}: clients ignore it, so
    it serves as a heartbeat that keeps idle connections and proxies alive.

    @raise ValueError: if C{text} contains CR or LF (which would end the
        comment and let the rest be read as fields).
    """
    if "\r" in text or "\n" in text:
        raise ValueError("a comment cannot contain CR or LF")
    if not text:
        return b":\n\n"
    return b": " + text.encode("utf-8") + b"\n\n"


# -- reference parser -----------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """
    One dispatched event, as a spec-conforming client sees it.

    @ivar event_type: the event type (C{"message"} if the block set none).
    @ivar data: the data, lines joined by LF, without the final LF.
    @ivar id: the last event ID buffer at dispatch (persists across blocks;
        C{""} if never set).
    @ivar retry: the reconnection time in effect at dispatch, in
        milliseconds, or None if the stream never set a valid one.
    """

    event_type: str
    data: str
    id: str
    retry: Optional[int]


_SPEC_LINE_END = re.compile("\r\n|\r|\n")


def parse_events(data: bytes) -> List[Event]:
    """
    The events a spec-conforming client dispatches for the whole stream
    C{data}.  Not incremental and not fast: this is the reference behaviour
    the rewriter is tested against.

    A trailing block without its blank line is not dispatched (the spec
    discards pending data at end of stream).  An empty C{retry} value is
    ignored.
    """
    text = data.decode("utf-8", "replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = _SPEC_LINE_END.split(text)
    # The last element is whatever follows the last line end: never a
    # complete line.
    lines.pop()
    events: List[Event] = []
    data_buf = ""
    event_type = ""
    last_id = ""
    retry: Optional[int] = None
    for line in lines:
        if not line:
            # Dispatch.
            if data_buf:
                if data_buf.endswith("\n"):
                    data_buf = data_buf[:-1]
                events.append(Event(event_type or "message", data_buf, last_id, retry))
            data_buf = ""
            event_type = ""
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data_buf += value + "\n"
        elif name == "event":
            event_type = value
        elif name == "id":
            if "\0" not in value:
                last_id = value
        elif name == "retry":
            if value and value.isascii() and value.isdigit():
                retry = int(value)
    return events


# -- the rewriter -----------------------------------------------------------------


class StampedEvent(NamedTuple):
    """
    What the resume log needs about one stamped block.

    @ivar seq: the block's sequence number (1, 2, ...), as passed to
        C{make_id}.
    @ivar upstream_id: the upstream's last event ID buffer after this block
        (UTF-8 decoded as a client would), or None if the upstream has not
        sent an id so far.
    @ivar block: the rewritten block exactly as sent to the client, from its
        first line to its terminating blank line.  A stream-start BOM is not
        part of it, nor is the LF of a CRLF blank line whose CR ended a read
        (that LF is sent at the start of the next output); either way the
        block can be replayed on its own.
    """

    seq: int
    upstream_id: Optional[str]
    block: bytes


_NO_ID = object()


class _State:
    """A pure-Python rewriter's share of the state the C stamper would hold."""

    __slots__ = ("seq", "upstream", "slow")

    def __init__(self) -> None:
        self.seq = 0
        self.upstream: Optional[bytes] = None
        self.slow = True


def _no_make_id(seq: int) -> bytes:
    raise AssertionError("replaced by the stamper's make_id")


def _classify(lines: List[bytes]) -> tuple[bool, object, Optional[List[int]]]:
    """
    For the line contents (no line ends) of one block: whether it has a data
    field, the value of its last valid C{id} field (C{_NO_ID} if none), and
    the indexes of all its C{id} lines (None if none).
    """
    has_data = False
    upstream: object = _NO_ID
    drop: Optional[List[int]] = None
    for i, line in enumerate(lines):
        if line[:4] == b"data":
            if len(line) == 4 or line[4] == _COLON:
                has_data = True
        elif line[:2] == b"id":
            if len(line) == 2 or line[2] == _COLON:
                if drop is None:
                    drop = []
                drop.append(i)
                value = line[3:]
                if value[:1] == b" ":
                    value = value[1:]
                if b"\0" not in value:
                    upstream = value
    return has_data, upstream, drop


def _has_blank(data: bytes) -> bool:
    """
    Whether C{data} has a blank line that does not start it: a line end
    directly followed by another.  Any such pair contains LF LF, LF CR or
    CR CR (CRLF followed by a line end contains LF LF or LF CR).
    """
    return _LFLF in data or (b"\r" in data and (b"\n\r" in data or b"\r\r" in data))


def _end_of_blank(prev: bytes, data: bytes) -> tuple[int, bool]:
    """
    Where in C{data} the first blank line ends, given C{prev}, the byte sent
    just before C{data} (or C{b""}); -1 if there is none.  The flag says the
    blank line is a CR at the very end of C{data} (its LF may come next).
    """
    s = prev + data
    found = [i for i in (s.find(_LFLF), s.find(b"\n\r"), s.find(b"\r\r")) if i >= 0]
    if not found:
        return -1, False
    k = min(found) + 1  # the blank line's own line end starts here
    if s[k] == _LF_BYTE:
        end, pending_lf = k + 1, False
    elif k + 1 == len(s):
        end, pending_lf = k + 1, True
    else:
        end, pending_lf = (k + 2 if s[k + 1] == _LF_BYTE else k + 1), False
    return end - len(prev), pending_lf


class SseRewriter:
    """
    Incremental rewriter for one event stream, upstream to client.

    Feed it each upstream read with L{feed}; send what it returns.  Every
    complete block (one ended by a blank line) comes out unchanged except:
    if it has a C{data} field or a valid C{id} field (an id containing NUL
    counts as none, as clients ignore it), its own C{id} lines are removed
    and one line C{id: <make_id(seq)>} is put first (after the stream-start
    BOM, if any), ending in CRLF if the block's first line does and in LF
    otherwise (never a bare CR, which could merge with a following LF).
    Other blocks (comments, C{retry}/C{event} without data, empty lines)
    pass through untouched and are not counted.  Bytes after the last
    blank line are buffered until their block completes; L{flush} returns
    them, unchanged, at end of stream.

    One corner: if the removed C{id} line was the last line of a block whose
    previous line ends in a bare CR and whose blank line is a bare LF, the
    gateway line is put last instead of first, because dropping the id line
    would otherwise turn CR + LF into one line end and swallow the block's
    blank line.

    Safety cap: if more than C{max_buffer} bytes are buffered without a blank
    line, they are sent on unchanged, and so is everything up to and
    including the next blank line; that block is not stamped or counted, its
    upstream C{id} lines reach the client, and they are not tracked in
    L{upstream_id}.  Normal rewriting resumes after it.

    @ivar events: if constructed with C{record=True}, a L{StampedEvent} is
        appended here for every stamped block; the caller drains it (see
        L{take_events}).  Without C{record} it stays empty and nothing is
        allocated for it.
    """

    def __init__(
        self,
        make_id: Callable[[int], bytes],
        max_buffer: int = DEFAULT_MAX_BUFFER,
        record: bool = False,
        on_event: Optional[Callable[[int, bytes], None]] = None,
    ) -> None:
        """
        @param make_id: returns the gateway id for the C{seq}-th stamped
            block (from 1); it must not contain CR, LF or NUL.
        @param max_buffer: the cap on a buffered partial block, in bytes.
        @param record: whether to append a L{StampedEvent} to L{events} per
            stamped block.
        @param on_event: called with C{(seq, block)} for every stamped block
            as it is made, instead of recording it in L{events} (cheaper on
            the hot path: no tuple, no list).
        """
        self._make_id = make_id
        self._max = max_buffer
        self._record = record or on_event is not None
        if on_event is not None:
            self._recorded = on_event  # type: ignore[method-assign,assignment]
        self.events: List[StampedEvent] = []
        # The sequence number, the upstream id and the "slow" flag below: a
        # _State, or the C stamper that shares them (see for_stream).
        self._st: Any = _State()
        # Pending partial block: a list so that a big block arriving in many
        # reads is joined once, not once per read.
        self._parts: List[bytes] = []
        self._plen = 0
        self._at_start = True
        # The last output ended with a CR blank line: an LF first in the next
        # read is the rest of that line end.
        self._skip_lf = False
        # Passing a too-big block through until its blank line.
        self._resync = False
        self._last_byte = b""
        # Any of the above needs attention (self._st.slow): one attribute test
        # on the hot path.

    @classmethod
    def for_stream(
        cls,
        stream_id: str,
        carry_upstream: bool = False,
        on_event: Optional[Callable[[int, bytes], None]] = None,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        accelerate: bool = True,
    ) -> "SseRewriter":
        """
        The rewriter of one relayed stream: ids as L{event_id_factory} makes
        them for C{stream_id} (carrying the upstream's id when
        C{carry_upstream}), each stamped block passed to C{on_event}.

        When the C extension L{aura_proxy._sse_stamp} is built (see
        L{ACCELERATED}) and C{accelerate} is true, the common case (a read of
        whole blocks with LF line ends and nothing held back) is done in C,
        with the same output; everything else still runs here.
        """
        if _Stamper is None or not accelerate:
            rewriter: SseRewriter
            make_id = event_id_factory(
                stream_id, (lambda: rewriter._st.upstream) if carry_upstream else None
            )
            rewriter = cls(make_id, max_buffer, on_event=on_event)
            return rewriter
        rewriter = cls(_no_make_id, max_buffer, on_event=on_event)
        stamper = _Stamper(f"{stream_id}.".encode("ascii"), carry_upstream, on_event, rewriter.feed)
        rewriter._st = stamper
        rewriter._make_id = stamper.make_id
        # Straight to C: the relay calls rewriter.feed once per read.
        rewriter.feed = stamper.feed  # type: ignore[method-assign]
        return rewriter

    @property
    def seq(self) -> int:
        """How many blocks have been stamped so far."""
        return self._st.seq  # type: ignore[no-any-return]

    @property
    def counter(self) -> object:
        """
        An object whose C{seq} attribute is L{seq}, read without a Python
        call (the C stamper's, or the Python state's): what the relay reads
        per read when it meters a stream (L{aura_proxy.metrics}).
        """
        return self._st  # type: ignore[no-any-return]

    @property
    def upstream_id(self) -> Optional[str]:
        """The upstream's last event ID buffer so far, or None if it sent none."""
        up = self._st.upstream
        if up is None:
            return None
        return up.decode("utf-8", "replace")  # type: ignore[no-any-return]

    @property
    def upstream_id_bytes(self) -> Optional[bytes]:
        """The upstream's last event ID buffer so far, raw, or None."""
        return self._st.upstream  # type: ignore[no-any-return]

    @property
    def at_block_end(self) -> bool:
        """
        Whether what was sent so far ends at a block boundary: always, but
        while an oversized block is passed through unparsed (see the safety
        cap above), whose rest has not been sent yet.
        """
        return not self._resync

    @property
    def buffered(self) -> int:
        """How many bytes are held back, waiting for their block to complete."""
        return self._plen

    def take_events(self) -> List[StampedEvent]:
        """Return the recorded L{events} and start a new, empty list."""
        events = self.events
        self.events = []
        return events

    def feed(self, data: bytes) -> bytes:
        """
        Take the next upstream bytes; return the bytes to send to the client
        now (possibly C{b""}).
        """
        if self._st.slow or not data:
            return self._feed_slow(data)
        # Hot path: nothing buffered, no pending state; data starts a block.
        if b"\r" not in data:
            return self._uniform(data, _LF, _LFLF)
        return self._process(data)

    def flush(self) -> bytes:
        """
        End of stream: return the buffered bytes of an incomplete block,
        unchanged and unstamped (a client discards them anyway).
        """
        rest = b"".join(self._parts)
        self._parts = []
        self._plen = 0
        self._update_slow()
        return rest

    # -- internals --

    def _update_slow(self) -> None:
        self._st.slow = bool(self._parts) or self._at_start or self._skip_lf or self._resync

    def _feed_slow(self, data: bytes) -> bytes:
        """L{feed} when there is state to deal with first."""
        if not data:
            return b""
        pre = b""
        if self._skip_lf:
            self._skip_lf = False
            if data[0] == _LF_BYTE:
                pre = _LF
                data = data[1:]
        if self._resync and data:
            end, self._skip_lf = _end_of_blank(self._last_byte, data)
            if end < 0:
                self._last_byte = data[-1:]
                self._update_slow()
                return pre + data
            self._resync = False
            pre += data[:end]
            data = data[end:]
        if not data:
            self._update_slow()
            return pre
        if self._at_start:
            head = b"".join(self._parts) + data if self._parts else data
            if len(head) < 3 and _BOM.startswith(head):
                # Might still be a BOM: wait for more.
                self._parts = [head]
                self._plen = len(head)
                return pre
            self._at_start = False
            self._parts = []
            self._plen = 0
            if head.startswith(_BOM):
                pre += _BOM
                head = head[3:]
                if not head:
                    self._update_slow()
                    return pre
            data = head
        parts = self._parts
        if parts:
            # Only the new bytes (and the one before them) can complete the
            # block, so a big block arriving in many reads costs O(n).
            if not (_has_blank(data) or _has_blank(parts[-1][-1:] + data[:1])):
                parts.append(data)
                self._plen += len(data)
                if self._plen > self._max:
                    return pre + self._overflow(b"".join(parts))
                return pre
            parts.append(data)
            data = b"".join(parts)
            self._parts = []
            self._plen = 0
        self._st.slow = False  # _process sets it again if it leaves state
        return pre + self._process(data)

    def _overflow(self, rest: bytes) -> bytes:
        """Send C{rest} unchanged and pass bytes through up to the next blank line."""
        self._parts = []
        self._plen = 0
        self._resync = self._st.slow = True
        self._last_byte = rest[-1:]
        return rest

    def _keep(self, rest: bytes) -> None:
        """Buffer the partial block C{rest}."""
        self._parts = [rest]
        self._plen = len(rest)
        self._st.slow = True

    def _process(self, buf: bytes) -> bytes:
        """
        Rewrite the complete blocks in C{buf}, which starts at a block
        boundary; keep the rest.  Picks a split-based fast path for streams
        that use only LF or only CRLF, the line scanner otherwise.
        """
        if b"\r" not in buf:
            return self._uniform(buf, _LF, _LFLF)
        n = buf.count(_CRLF)
        if n == buf.count(b"\n"):
            c = buf.count(b"\r")
            # All CRs are in CRLFs, but one CR may end the buffer: fine for
            # the fast path unless it could be a CR blank line, which ends a
            # block now (the scanner handles that).
            if c == n or (c == n + 1 and buf[-1] == _CR_BYTE and len(buf) > 1 and buf[-2] != _LF_BYTE):
                return self._uniform(buf, _CRLF, _CRLFCRLF)
        return self._general(buf)

    def _stamp(self, upstream: object) -> tuple[int, bytes]:
        """Count one stamped block; update the upstream id; return (seq, id)."""
        if upstream is not _NO_ID:
            assert isinstance(upstream, bytes)
            self._st.upstream = upstream
        st = self._st
        st.seq = seq = st.seq + 1
        return seq, self._make_id(seq)

    def _recorded(self, seq: int, block: bytes) -> None:
        up = self._st.upstream
        self.events.append(
            StampedEvent(seq, None if up is None else up.decode("utf-8", "replace"), block)
        )

    def _uniform(self, buf: bytes, sep: bytes, term: bytes) -> bytes:
        """Fast path: every line end in C{buf} is C{sep} (C{term} is two)."""
        pieces = buf.split(term)
        rest = pieces.pop()
        # pieces[i] + term is: an optional blank line (sep), then a block's
        # lines, then the block's last line end and the blank line; or, for
        # an empty piece, two blank lines.
        if len(pieces) == 1 and pieces[0][:1] not in _NOT_A_BLOCK_START:
            # One block in this read, no blank line before it: the common
            # case, without the list and join.
            out = self._block(pieces[0], sep, term)
        elif pieces:
            chunks: List[bytes] = []
            block = self._block
            for piece in pieces:
                if not piece:
                    chunks.append(term)
                    continue
                if piece.startswith(sep):
                    chunks.append(sep)
                    piece = piece[len(sep):]
                chunks.append(block(piece, sep, term))
            out = b"".join(chunks)
        else:
            out = b""
        if rest:
            if len(rest) > self._max:
                return out + self._overflow(rest)
            self._keep(rest)
        return out

    def _block(self, piece: bytes, sep: bytes, term: bytes) -> bytes:
        """Rewrite one block: C{piece} is its lines joined by C{sep}."""
        if b"\nid" not in piece:
            # No line but maybe the first starts with "id".
            if piece.startswith(b"data:"):
                # Common case: a data block without id lines.
                st = self._st
                st.seq = seq = st.seq + 1
                block = _ID_FIELD + self._make_id(seq) + sep + piece + term
                if self._record:
                    self._recorded(seq, block)
                return block
            if piece.startswith(b"id:"):
                # Common with upstream ids: exactly one id line, first.
                nl = piece.find(sep)
                value = piece[3:] if nl < 0 else piece[3:nl]
                if value[:1] == b" ":
                    value = value[1:]
                if b"\0" not in value:
                    st = self._st
                    st.upstream = value
                    st.seq = seq = st.seq + 1
                    gid = self._make_id(seq)
                    if nl < 0:
                        block = _ID_FIELD + gid + term
                    else:
                        block = _ID_FIELD + gid + sep + piece[nl + len(sep):] + term
                    if self._record:
                        self._recorded(seq, block)
                    return block
        lines = piece.split(sep)
        has_data, upstream, drop = _classify(lines)
        if not has_data and upstream is _NO_ID:
            return piece + term
        seq, gid = self._stamp(upstream)
        if drop is None:
            block = _ID_FIELD + gid + sep + piece + term
        else:
            kept = [line for i, line in enumerate(lines) if i not in drop]
            if kept:
                block = _ID_FIELD + gid + sep + sep.join(kept) + term
            else:
                block = _ID_FIELD + gid + sep + sep
        if self._record:
            self._recorded(seq, block)
        return block

    def _general(self, buf: bytes) -> bytes:
        """Line scanner for CR-only or mixed line ends."""
        chunks: List[bytes] = []
        start = 0  # where the current block starts
        contents: List[bytes] = []
        ends: List[bytes] = []
        last_end = b""
        for m in _LINE_RE.finditer(buf):
            content, end = m.group(1, 2)
            if content:
                contents.append(content)
                ends.append(end)
                continue
            stop = m.end()
            last_end = end
            if not contents:
                chunks.append(end)  # an empty line between blocks
            else:
                chunks.append(self._general_block(buf[start:m.start()], contents, ends, end))
                contents = []
                ends = []
            start = stop
        rest = buf[start:]
        if not rest and last_end == b"\r":
            # The blank line was a CR ending the read; its LF may come next.
            self._skip_lf = self._st.slow = True
        out = b"".join(chunks)
        if rest:
            if len(rest) > self._max:
                return out + self._overflow(rest)
            self._keep(rest)
        return out

    def _general_block(
        self, body: bytes, contents: List[bytes], ends: List[bytes], blank: bytes
    ) -> bytes:
        """One block from the scanner: C{body} is its lines with their ends."""
        has_data, upstream, drop = _classify(contents)
        if not has_data and upstream is _NO_ID:
            return body + blank
        seq, gid = self._stamp(upstream)
        # Same rule as the fast paths, so the output does not depend on how
        # reads were split: CRLF if the block's first line ends in CRLF.
        idline = _ID_FIELD + gid + (_CRLF if ends[0] == _CRLF else _LF)
        if drop is None:
            block = idline + body + blank
        else:
            kept = [i for i in range(len(contents)) if i not in drop]
            body = b"".join([contents[i] + ends[i] for i in kept])
            if kept and ends[kept[-1]] == b"\r" and blank == b"\n":
                # Dropping the id line would make this CR and the blank
                # line's LF one CRLF: the block would not end.  Put our id
                # line between them instead.
                block = body + idline + blank
            else:
                block = idline + body + blank
        if self._record:
            self._recorded(seq, block)
        return block
