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

from aura_proxy.sse import EVENT_STORE_ENTRY_BYTES, _CEventStore

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
    one ring buffer (a C{bytearray}), their sequence numbers and lengths in
    two ring C{array}s.  Per event that is its bytes plus
    L{EVENT_STORE_ENTRY_BYTES}, instead of a bytes object, a tuple and a
    deque slot (about 100 bytes more each), and no objects for the garbage
    collector to walk.

    The oldest events are evicted before a new one is copied in, so the space
    they held is reused at once: the rings grow (by 1.5x) only while what is
    kept grows, and never beyond C{max_bytes} bytes and C{max_events} slots
    (unless one event alone is larger).  A stream at its limits reserves
    about what it keeps: its L{footprint} is at most C{max(max_bytes, largest
    event) + EVENT_STORE_ENTRY_BYTES x max_events}.  C{on_grow}, when set, is
    called with each change of the footprint (a few dozen times in a
    stream's life, never once a stream is at its limits).

    This is the reference for C{aura_proxy._sse_stamp.EventStore}, which
    does the same in C, with the same growth rules (and which the C SSE
    rewriter adds to without a Python call per event); it is used when the
    C extension is not built.
    """

    __slots__ = (
        "data", "seqs", "lens", "start", "size", "head", "count", "first_seq", "last_seq",
        "ended", "subscribers", "max_events", "max_bytes", "on_grow",
    )

    def __init__(self, max_events: int, max_bytes: int) -> None:
        if max_events < 1 or max_bytes < 1:
            raise ValueError("max_events and max_bytes must be at least 1")
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.data = bytearray()  # ring: the kept bytes from data[start], size of them
        self.seqs = array("q")  # rings: the kept events from [head], count of them
        self.lens = array("q")
        self.start = 0
        self.size = 0
        self.head = 0
        self.count = 0
        self.first_seq = 1
        self.last_seq = 0
        self.ended = False
        self.subscribers: Optional[set["_MemoryAttachment"]] = None
        self.on_grow: Optional[Callable[[int], object]] = None

    def __len__(self) -> int:
        return self.count

    @property
    def capacity(self) -> int:
        """Bytes reserved for events (the data ring)."""
        return len(self.data)

    @property
    def slots(self) -> int:
        """Entries reserved for events (the sequence number and length rings)."""
        return len(self.seqs)

    @property
    def footprint(self) -> int:
        """Bytes the store reserves: C{capacity + EVENT_STORE_ENTRY_BYTES x slots}."""
        return len(self.data) + EVENT_STORE_ENTRY_BYTES * len(self.seqs)

    def add(self, seq: int, block: bytes) -> None:
        """Event C{seq} of this stream: kept, and passed to live subscribers."""
        if self.ended:
            return
        n = len(block)
        # The same as evicting after the add while there are more than
        # max_events or max_bytes and more than the new event, done first so
        # that the new event goes into the space freed.
        while self.count and (self.count >= self.max_events or self.size + n > self.max_bytes):
            self._evict()
        grown = self._reserve(n)
        data, cap = self.data, len(self.data)
        if n:
            pos = self.start + self.size
            if pos >= cap:
                pos -= cap
            first = min(n, cap - pos)
            data[pos:pos + first] = block[:first]
            data[:n - first] = block[first:]
        slot = self.head + self.count
        if slot >= len(self.seqs):
            slot -= len(self.seqs)
        self.seqs[slot] = seq
        self.lens[slot] = n
        self.count += 1
        self.size += n
        self.last_seq = seq
        if grown and self.on_grow is not None:
            self.on_grow(grown)
        if self.subscribers:
            for attachment in list(self.subscribers):
                attachment.subscriber.replay_event(seq, block)

    __call__ = add

    def _evict(self) -> None:
        """Forget the oldest kept event."""
        head = self.head
        n = self.lens[head]
        self.first_seq = self.seqs[head] + 1
        self.size -= n
        self.start += n
        if self.start >= len(self.data):
            self.start -= len(self.data)
        self.head = 0 if head + 1 == len(self.seqs) else head + 1
        self.count -= 1
        if not self.count:
            self.start = self.head = 0

    def _reserve(self, n: int) -> int:
        """
        Room for C{n} more bytes and one more entry (the evictions done):
        grow the rings, by 1.5x up to the limits, what is kept moved to their
        start.  Returns the bytes reserved in addition.
        """
        grown = 0
        cap = len(self.data)
        if self.size + n > cap:
            new = max(min(cap + cap // 2 + 64, self.max_bytes), self.size + n)
            kept = self._kept_bytes()
            self.data = bytearray(new)
            self.data[:len(kept)] = kept
            self.start = 0
            grown += new - cap
        slots = len(self.seqs)
        if self.count == slots:
            new = min(slots + slots // 2 + 4, self.max_events)
            order = [(self.head + i) % slots for i in range(self.count)] if slots else []
            seqs = array("q", bytes(8 * new))
            lens = array("q", bytes(8 * new))
            for i, j in enumerate(order):
                seqs[i] = self.seqs[j]
                lens[i] = self.lens[j]
            self.seqs, self.lens, self.head = seqs, lens, 0
            grown += (new - slots) * EVENT_STORE_ENTRY_BYTES
        return grown

    def _kept_bytes(self) -> bytes:
        """The kept events' bytes, oldest first."""
        data, start, end = self.data, self.start, self.start + self.size
        if end <= len(data):
            return bytes(data[start:end])
        return bytes(data[start:]) + bytes(data[:end - len(data)])

    def release(self) -> int:
        """Free the buffers and end the store (add keeps nothing more); the footprint freed."""
        freed = self.footprint
        self.data = bytearray()
        self.seqs = array("q")
        self.lens = array("q")
        self.start = self.size = self.head = self.count = 0
        self.ended = True
        self.first_seq = self.last_seq + 1
        return freed

    def events_after(self, after_seq: int) -> list[tuple[int, bytes]]:
        """The kept events with a sequence number above C{after_seq}, in order."""
        kept = self._kept_bytes()
        slots = len(self.seqs)
        out = []
        pos = 0
        for i in range(self.count):
            j = (self.head + i) % slots
            n = self.lens[j]
            if self.seqs[j] > after_seq:
                out.append((self.seqs[j], kept[pos:pos + n]))
            pos += n
        return out


if TYPE_CHECKING:
    from aura_proxy.detached import DetachedStreams

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

    All logs together reserve at most C{max_total_bytes} (each store's
    C{footprint}, told by its C{on_grow}): past it, on the next reactor turn,
    the logs of the oldest finished streams are dropped first, then those of
    the oldest detached streams (L{detached}, whose upstream is cancelled,
    being read for nothing), then those of the oldest open streams (which go
    on, no longer resumable: a resume goes upstream with the upstream's id).

    @ivar detached: the gateway's detached streams (set by the gateway), or None.
    @ivar evicted_finished: finished streams' logs dropped by the global cap.
    @ivar evicted_detached: detached streams' logs dropped (and the streams
        cancelled) by the global cap.
    @ivar evicted_open: open streams' logs dropped by the global cap.
    """

    def __init__(
        self,
        clock: IReactorTime,
        ttl: float,
        max_events: int,
        max_bytes: int,
        accelerate: bool = True,
        max_total_bytes: Optional[int] = None,
    ) -> None:
        self._clock = clock
        self._stream = _Stream if accelerate else _PyStream
        self._ttl = ttl
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._max_total = max_total_bytes
        self._streams: dict[str, _PyStream] = {}
        # Finished streams, oldest finished first (a dict as an ordered set).
        self._finished: dict[str, None] = {}
        #: Bytes the logs reserve now (the sum of their stores' footprints).
        self.total_bytes = 0
        self._trim_call: Optional[IDelayedCall] = None
        self.detached: Optional["DetachedStreams"] = None
        self.evicted_finished = 0
        self.evicted_detached = 0
        self.evicted_open = 0

    def __len__(self) -> int:
        return len(self._streams)

    def stats(self) -> dict[str, int]:
        """
        Plain figures for health and metrics: streams logged, bytes the logs
        reserve and their cap, and logs dropped by the cap so far (finished,
        detached, open streams).
        """
        return {
            "streams": len(self._streams),
            "finished": len(self._finished),
            "bytes": self.total_bytes,
            "max_total_bytes": self._max_total or 0,
            "evicted_finished": self.evicted_finished,
            "evicted_detached": self.evicted_detached,
            "evicted_open": self.evicted_open,
        }

    def log_size(self) -> tuple[str, int, int]:
        """For metrics, at scrape time: C{("memory", streams logged, bytes the logs reserve)}."""
        return "memory", len(self._streams), self.total_bytes

    def open(self, stream_id: str, owner: str) -> None:
        if stream_id in self._streams:
            self._forget(stream_id)
        stream = self._streams[stream_id] = self._stream(owner, self._max_events, self._max_bytes)
        stream.on_grow = self._grown

    def _grown(self, delta: int) -> None:
        """A store reserved C{delta} more bytes: trim on the next turn if the logs are over the cap."""
        self.total_bytes += delta
        if self._max_total is not None and self.total_bytes > self._max_total and self._trim_call is None:
            self._trim_call = self._clock.callLater(0, self._trim)

    def _trim(self) -> None:
        """Drop logs until the logs are within the cap: finished, detached, then open streams, oldest first."""
        self._trim_call = None
        cap = self._max_total
        if cap is None:
            return
        for stream_id in list(self._finished):
            if self.total_bytes <= cap:
                return
            self._forget(stream_id)
            self.evicted_finished += 1
        detached = self.detached
        if detached is not None:
            for stream_id in detached.stream_ids():
                if self.total_bytes <= cap:
                    return
                if stream_id in self._streams:
                    self._forget(stream_id)
                    self.evicted_detached += 1
                    detached.cancel_stream(stream_id)
        for stream_id in list(self._streams):
            if self.total_bytes <= cap:
                return
            self._forget(stream_id)
            self.evicted_open += 1

    def _forget(self, stream_id: str) -> None:
        """
        Drop a stream's log: its store's memory freed (a stream still
        relayed adds nothing more to it), any live subscriber ended.
        """
        stream = self._streams.pop(stream_id)
        self._finished.pop(stream_id, None)
        if stream.expiry is not None and stream.expiry.active():
            stream.expiry.cancel()
        stream.expiry = None
        stream.on_grow = None
        self._end_subscribers(stream)
        self.total_bytes -= stream.release()

    def append(self, stream_id: str, seq: int, block: bytes) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.add(seq, block)

    def appender(self, stream_id: str) -> Callable[[int, bytes], None]:
        stream = self._streams.get(stream_id)
        if stream is None:
            return _ignore
        # The stream itself: the C rewriter adds to it directly.  A stream
        # dropped later is released: adding to it keeps nothing.
        return stream

    def close(self, stream_id: str) -> None:
        stream = self._streams.get(stream_id)
        if stream is None or stream.ended:
            return
        stream.ended = True
        self._finished[stream_id] = None
        self._end_subscribers(stream)
        stream.expiry = self._clock.callLater(self._ttl, self._expire, stream_id)

    def _expire(self, stream_id: str) -> None:
        """A finished stream's C{ttl} ran out."""
        self._streams[stream_id].expiry = None
        self._forget(stream_id)

    def abandon(self, stream_id: str) -> None:
        if stream_id in self._streams:
            self._forget(stream_id)

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
        if self._trim_call is not None and self._trim_call.active():
            self._trim_call.cancel()
        self._trim_call = None
        for stream in self._streams.values():
            if stream.expiry is not None and stream.expiry.active():
                stream.expiry.cancel()
        self._streams.clear()
        self._finished.clear()
        self.total_bytes = 0
        return succeed(None)
