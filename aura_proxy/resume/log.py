"""
Stream logs: what lets a client that lost its connection get exactly the
events it missed.

A relayed SSE stream writes each event it stamped (its sequence number and the
exact bytes the client was sent) to a L{ResumeLog}.  A client that comes back
with the gateway id of the last event it saw is attached to the log: it gets
every later event, in order, then the live rest, then the end.

Two implementations share this contract: L{MemoryResumeLog} (one process) and
L{aura_proxy.resume.redis.RedisResumeLog} (Redis Streams, shared by every
gateway process and host).
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from aura_proxy.sse import _CEventStore

__all__ = ["Subscriber", "Attachment", "ResumeLog", "MemoryResumeLog", "FOREIGN"]


class Subscriber(Protocol):
    """Receives a stream's events from a log."""

    def replay_event(self, seq: int, block: bytes) -> None:
        """One event, exactly as the original client was sent it."""

    def replay_end(self) -> None:
        """The stream has ended and every event was delivered."""


class Attachment(Protocol):
    """A subscriber's hold on a stream."""

    def detach(self) -> None:
        """Deliver nothing more (the resumed client went away)."""


class _Foreign:
    """What L{ResumeLog.attach} answers for a stream someone else owns."""

    def detach(self) -> None:
        pass

    def __repr__(self) -> str:
        return "FOREIGN"


#: L{ResumeLog.attach}'s answer for a stream another tenant owns: nothing is
#: delivered, and the request must not learn anything of that stream.
FOREIGN: Attachment = _Foreign()


class ResumeLog(Protocol):
    """Where relayed streams are kept for resumption."""

    def open(self, stream_id: str, owner: str) -> None:
        """A new stream, resumable only by C{owner}."""

    def append(self, stream_id: str, seq: int, block: bytes) -> None:
        """Event C{seq} (1, 2, ...) of an open stream."""

    def appender(self, stream_id: str) -> Callable[[int, bytes], None]:
        """
        C{append} for one open stream, as one callable: what the stream's
        rewriter calls per event, without looking the stream up each time.
        """

    def close(self, stream_id: str) -> None:
        """The stream ended complete; it stays replayable for the log's TTL."""

    def abandon(self, stream_id: str) -> None:
        """
        The stream ended early (upstream error, idle timeout, cancelled,
        shutdown): forget it, ending any live subscriber, so that a resume goes
        upstream with the upstream's own id instead of getting a cut stream
        replayed as if it were whole.
        """

    def attach(
        self, stream_id: str, owner: str, after_seq: int, subscriber: Subscriber
    ) -> "Deferred[Optional[Attachment]]":
        """
        Deliver the events after C{after_seq}, then the live rest, then the end.

        Fires with None, delivering nothing, when the stream is unknown,
        expired, or no longer holds every event after C{after_seq}: the
        caller then treats the request as a fresh one.  Fires with L{FOREIGN},
        delivering nothing, when another owner's stream has that id.
        """

    def stop(self) -> "Deferred[None]":
        """Release connections and timers (on shutdown)."""


class _PyEventStore:
    """
    One stream's kept events, stored compactly: their bytes back to back in
    one C{bytearray}, their sequence numbers and end offsets in two C{array}s.
    Per event that is its bytes plus 16, instead of a bytes object, a tuple
    and a deque slot (about 100 bytes more each), and no objects for the
    garbage collector to walk.  Evicted events leave a dead prefix, cut off
    once it is as large as what is kept (amortised O(1) per event).

    This is the reference for C{aura_proxy._sse_stamp.EventStore}, which
    does the same in C (and which the C SSE rewriter adds to without a Python
    call per event); it is used when the C extension is not built.
    """

    __slots__ = (
        "data", "seqs", "ends", "head", "dead", "size", "first_seq", "last_seq",
        "ended", "subscribers", "max_events", "max_bytes",
    )

    def __init__(self, max_events: int, max_bytes: int) -> None:
        if max_events < 1 or max_bytes < 1:
            raise ValueError("max_events and max_bytes must be at least 1")
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.data = bytearray()
        self.seqs = array("q")
        self.ends = array("q")
        self.head = 0  # index of the oldest kept event
        self.dead = 0  # bytes before it
        self.size = 0  # bytes kept
        self.first_seq = 1
        self.last_seq = 0
        self.ended = False
        self.subscribers: Optional[set["_MemoryAttachment"]] = None

    def __len__(self) -> int:
        return len(self.seqs) - self.head

    def add(self, seq: int, block: bytes) -> None:
        """Event C{seq} of this stream: kept, and passed to live subscribers."""
        if self.ended:
            return
        data = self.data
        data += block
        self.seqs.append(seq)
        self.ends.append(len(data))
        self.size += len(block)
        self.last_seq = seq
        while len(self.seqs) - self.head > self.max_events or (
            self.size > self.max_bytes and len(self.seqs) - self.head > 1
        ):
            end = self.ends[self.head]
            self.size -= end - self.dead
            self.dead = end
            self.first_seq = self.seqs[self.head] + 1
            self.head += 1
        if self.dead and self.dead >= self.size:
            self._compact()
        if self.subscribers:
            for attachment in list(self.subscribers):
                attachment.subscriber.replay_event(seq, block)

    __call__ = add

    def _compact(self) -> None:
        dead, head = self.dead, self.head
        del self.data[:dead]
        self.seqs = self.seqs[head:]
        self.ends = array("q", (end - dead for end in self.ends[head:]))
        self.head = self.dead = 0

    def events_after(self, after_seq: int) -> list[tuple[int, bytes]]:
        """The kept events with a sequence number above C{after_seq}, in order."""
        data, seqs, ends = self.data, self.seqs, self.ends
        start = self.dead
        out = []
        for i in range(self.head, len(seqs)):
            end = ends[i]
            if seqs[i] > after_seq:
                out.append((seqs[i], bytes(data[start:end])))
            start = end
        return out


if TYPE_CHECKING:
    _EventStore = _PyEventStore
else:
    # The C store if aura_proxy.sse uses its module (built, with the same constants).
    _EventStore = _CEventStore or _PyEventStore


def _stream_init(store_init: Callable[..., None]) -> Callable[..., None]:
    def __init__(self: Any, owner: str, max_events: int, max_bytes: int) -> None:
        store_init(self, max_events, max_bytes)
        self.owner = owner
        self.expiry = None

    return __init__


class _PyStream(_PyEventStore):
    """
    A stream in the memory log: its kept events (an event store, which is
    also what the stream's rewriter calls per event), whose it is, and the
    timer that forgets it after it ended.
    """

    __slots__ = ("owner", "expiry")
    owner: str
    expiry: Optional[IDelayedCall]
    __init__ = _stream_init(_PyEventStore.__init__)


#: The stream on the C event store where it is built: the same slots and
#: __init__ on another base.
_Stream: type[_PyStream] = _PyStream if _EventStore is _PyEventStore else type(
    "_Stream", (_EventStore,),
    {"__slots__": _PyStream.__slots__, "__doc__": _PyStream.__doc__,
     "__init__": _stream_init(_EventStore.__init__)},
)


def _ignore(seq: int, block: bytes) -> None:
    pass


class _MemoryAttachment:
    def __init__(self, stream: _PyStream, subscriber: Subscriber) -> None:
        self.stream = stream
        self.subscriber = subscriber

    def detach(self) -> None:
        if self.stream.subscribers is not None:
            self.stream.subscribers.discard(self)


class MemoryResumeLog:
    """
    Stream logs in this process's memory.

    Each stream keeps at most C{max_events} events and C{max_bytes} bytes
    (the oldest go first) and is forgotten C{ttl} seconds after it ends.
    With C{accelerate} (C{[gateway] fast_path}) the events are kept in the C
    store where it is built; else in the Python one, the same.
    """

    def __init__(
        self, clock: IReactorTime, ttl: float, max_events: int, max_bytes: int, accelerate: bool = True
    ) -> None:
        self._clock = clock
        self._stream = _Stream if accelerate else _PyStream
        self._ttl = ttl
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._streams: dict[str, _PyStream] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def stats(self) -> tuple[str, int, int]:
        """For metrics, at scrape time: C{("memory", streams kept, event bytes kept)}."""
        return "memory", len(self._streams), sum(stream.size for stream in self._streams.values())

    def open(self, stream_id: str, owner: str) -> None:
        self._streams[stream_id] = self._stream(owner, self._max_events, self._max_bytes)

    def append(self, stream_id: str, seq: int, block: bytes) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.add(seq, block)

    def appender(self, stream_id: str) -> Callable[[int, bytes], None]:
        stream = self._streams.get(stream_id)
        if stream is None:
            return _ignore
        # The stream itself: the C rewriter adds to it directly.  A stream
        # abandoned later is no longer in the log: adding to it is harmless,
        # nobody reads it.
        return stream

    def close(self, stream_id: str) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.ended:
            return
        stream.ended = True
        self._end_subscribers(stream)
        stream.expiry = self._clock.callLater(self._ttl, self._streams.pop, stream_id, None)

    def abandon(self, stream_id: str) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        if stream.expiry is not None and stream.expiry.active():
            stream.expiry.cancel()
        self._end_subscribers(stream)

    @staticmethod
    def _end_subscribers(stream: _PyStream) -> None:
        subscribers, stream.subscribers = stream.subscribers, None
        for attachment in subscribers or ():
            attachment.subscriber.replay_end()

    def attach(
        self, stream_id: str, owner: str, after_seq: int, subscriber: Subscriber
    ) -> "Deferred[Optional[Attachment]]":
        stream = self._streams.get(stream_id)
        if stream is not None and stream.owner != owner:
            return succeed(FOREIGN)
        if (
            stream is None
            or after_seq < stream.first_seq - 1
            or after_seq > stream.last_seq
        ):
            return succeed(None)
        attachment = _MemoryAttachment(stream, subscriber)
        for seq, block in stream.events_after(after_seq):
            subscriber.replay_event(seq, block)
        if stream.ended:
            subscriber.replay_end()
        else:
            if stream.subscribers is None:
                stream.subscribers = set()
            stream.subscribers.add(attachment)
        return succeed(attachment)

    def stop(self) -> "Deferred[None]":
        for stream in self._streams.values():
            if stream.expiry is not None and stream.expiry.active():
                stream.expiry.cancel()
        self._streams.clear()
        return succeed(None)
