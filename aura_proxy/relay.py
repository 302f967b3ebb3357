"""
The response relay: bytes from the upstream socket to the client socket.

This is the hot path.  Per upstream read it does: one clock read, one optional
SSE rewrite, one write to the client through the request's client writer
(L{aura_proxy.client_wire}: framing, straight to the socket when it can).
That step runs in C (L{aura_proxy._relay_core}, which calls the C writer
without a Python call) when the extension is built; L{_PyRelayCore} is the
same in Python.  The relay never touches the client's socket itself: it
writes through the request (or its writer) and ends the response with
L{end_response}.  Timers are not reset per read; each fires at
its deadline and, if bytes arrived meanwhile, re-arms itself for the rest.

Backpressure runs both ways through the producer chain: the relay is the
client request's streaming producer, so a client that stops reading pauses the
upstream socket.  A client that goes away reaches the relay once, through
the request's C{connectionLost} (L{client_gone}, from the gateway): that
closes the upstream connection instead of returning it to the pool, or
detaches it into the stream log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ITransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.server import Request
from zope.interface import implementer

from aura_proxy import client_wire
from aura_proxy.client_wire import ClientWriter, end_response

__all__ = ["Relay", "PyRelay", "StreamTransform", "HEARTBEAT", "RETRY_HINT", "ACCELERATED"]

#: What the client gets on a silent SSE stream: a comment line, ignored by
#: every EventSource, which keeps proxies and browsers from timing out.
HEARTBEAT = b": keep-alive\n\n"

#: What ends an SSE stream the gateway cuts on shutdown (after a whole event):
#: a C{retry} field alone, which dispatches nothing and tells an EventSource
#: to reconnect after one second (to another instance, which resumes it).
RETRY_HINT = b"retry: 1000\n\n"

_BLOCK_ENDS = (b"\n\n", b"\r\r", b"\r\n\r\n")

log = Logger()


class StreamTransform(TypingProtocol):
    """Rewrites an SSE body on its way to the client (L{aura_proxy.sse})."""

    def feed(self, data: bytes) -> bytes:
        """Bytes to send now for C{data} received."""

    def flush(self) -> bytes:
        """Bytes still held back when the upstream body ends."""


class _PyRelayCore:
    """
    The relay's per-read step (L{Relay.dataReceived}) and the state it uses:
    the reference for L{aura_proxy._relay_core.RelayCore}, which does the
    same in C, and what runs when that extension is not built.
    """

    _seconds: Callable[[], float]
    _feed: Optional[Callable[[bytes], bytes]]
    _request: Request
    _writer: Optional[ClientWriter]
    _client_gone: bool
    _beats: bool
    _at_boundary: bool
    _last_read: float
    first_write_at: Optional[float]
    sent: int
    # Metering (L{_meter}): what the client got, per read, never per event.
    _metered: bool
    _stall_open: bool
    _event_source: Optional[object]
    _seen_seq: int
    _events_out: int
    _first_event_at: float
    _last_event_at: float
    _stall_after: float
    _gap_sum: float
    _stalls: int
    _gap_bounds: tuple[float, ...]
    _gaps: list[int]

    def _meter(self, bounds: tuple[float, ...], stall_after: float, event_source: Optional[object]) -> None:
        """
        Start metering this stream: gaps between the events the client gets
        into buckets with the upper C{bounds} given (ascending; the last
        bucket is +Inf), stalls (gaps over C{stall_after} seconds), events
        counted by C{event_source.seq} (the SSE stamper's; None: each write
        is one event).
        """
        if len(bounds) > 24:
            raise ValueError("at most 24 gap bounds")
        if any(b < 0 for b in bounds) or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError("gap bounds must be ascending and not negative")
        self._gap_bounds = tuple(float(b) for b in bounds)
        self._gaps = [0] * (len(bounds) + 1)
        self._gap_sum = 0.0
        self._stall_after = stall_after
        self._stalls = 0
        self._stall_open = False
        self._events_out = 0
        self._first_event_at = self._last_event_at = -1.0
        self._seen_seq = event_source.seq if event_source is not None else 0  # type: ignore[attr-defined]
        self._event_source = event_source
        self._metered = True

    def _gap_counts(self) -> tuple[int, ...]:
        """The gap histogram's counts per bucket (not cumulative), the +Inf bucket last."""
        return tuple(self._gaps)

    def _meter_write(self, t: float) -> None:
        """
        After a write to the client at time C{t}: the events it delivered,
        the gap before the first of them (the others of the same read had
        none), and a stall when that gap is over C{stall_after} and the
        timer has not counted this silence already.
        """
        k = 1
        source = self._event_source
        if source is not None:
            seq: int = source.seq  # type: ignore[attr-defined]
            k = seq - self._seen_seq
            self._seen_seq = seq
            if k <= 0:
                return
        if self._events_out == 0:
            self._first_event_at = t
        else:
            gap = t - self._last_event_at
            bounds = self._gap_bounds
            i = 0
            while i < len(bounds) and gap > bounds[i]:
                i += 1
            self._gaps[i] += 1
            self._gap_sum += gap
            if gap > self._stall_after and not self._stall_open:
                self._stalls += 1
        self._gaps[0] += k - 1
        self._stall_open = False
        self._last_event_at = t
        self._events_out += k

    def dataReceived(self, data: bytes) -> None:
        """One upstream read: rewrite it, count it, write it to the client."""
        if not data:
            # Nothing read: no bytes for the client (an empty chunk would end its body).
            return
        self._last_read = self._seconds()
        if self._feed is not None:
            data = self._feed(data)
            if not data:
                return
        if self._client_gone:
            return
        if self.first_write_at is None:
            self.first_write_at = self._last_read
        self.sent += len(data)
        writer = self._writer
        if writer is None:
            self._request.write(data)
        else:
            writer.write(data)
        if self._beats:
            self._at_boundary = data.endswith(_BLOCK_ENDS)
        if self._metered:
            self._meter_write(self._last_read)


if TYPE_CHECKING:
    _RelayCore = _PyRelayCore
else:
    # With the C writer only: the C step calls it without a Python call.
    _RelayCore = _PyRelayCore if client_wire.C_MODULE is None else client_wire.C_MODULE.RelayCore

#: Whether the relay's per-read step runs in C (L{aura_proxy._relay_core}).
ACCELERATED = _RelayCore is not _PyRelayCore


@implementer(IPushProducer)
class Relay(_RelayCore, Protocol):
    """
    Carries one upstream response body to one client request.

    @ivar done: fires with the end reason (C{completed}, C{client_disconnect},
        C{upstream_error}, C{idle_timeout} or C{shutdown}) once the client's
        response is finished or the client is gone.
    @ivar sent: body bytes written to the client (none after it left).
    @ivar first_write_at: clock time of the first body write, or None.
    @ivar left_at: clock time the client left before the response ended, or None.
    @ivar detached_at: clock time the relay detached into the stream log, or None.
    """

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        idle_timeout: float,
        heartbeat_interval: float = 0.0,
        transform: Optional[StreamTransform] = None,
        clean_end: bool = True,
        detach_seconds: float = 0.0,
        describe: Callable[[], str] = lambda: "upstream",
        on_detach: Optional[Callable[["Relay"], None]] = None,
    ) -> None:
        """
        @param heartbeat_interval: seconds of silence before L{HEARTBEAT} is
            written; 0 for none (only SSE responses get heartbeats).
        @param clean_end: on an upstream error or idle timeout, end the client's
            response normally (SSE: the client sees the stream end and may
            resume) rather than abort its connection (a truncated body must
            not look complete).
        @param detach_seconds: when the client goes away, keep reading the
            upstream for up to this long (its events go to the stream log, for
            a client that resumes); 0 closes the upstream at once.
        @param on_detach: called with this relay when it detaches (its client
            left, its upstream goes on): where the detached-stream caps count
            it (L{aura_proxy.detached.DetachedStreams}), which may L{stop} it.
        """
        self._request = request
        self._clock = clock
        self._seconds = clock.seconds
        self._idle_timeout = idle_timeout
        self._heartbeat_interval = heartbeat_interval
        self._transform = transform
        self._feed = transform.feed if transform is not None else None
        self._clean_end = clean_end
        self._detach_seconds = detach_seconds
        self._orphan_call: Optional[IDelayedCall] = None
        self._describe = describe
        # Called in order when the relay detaches: the caps (given here),
        # then whoever asked later (metrics end the client's stream there).
        self._detach_observers: list[Callable[["Relay"], None]] = (
            [on_detach] if on_detach is not None else []
        )
        self.done: Deferred[str] = Deferred()
        self.sent = 0
        self.first_write_at: Optional[float] = None
        self._reason: Optional[str] = None
        self._last_read = clock.seconds()
        self._last_beat = self._last_read
        self._at_boundary = True
        # One timer per stream for both the idle timeout and heartbeats: a
        # DelayedCall is several hundred bytes, and thousands of streams each
        # hold one.
        self._timer: Optional[IDelayedCall] = None
        self._beats = heartbeat_interval > 0
        self._client_gone = False
        self._finished = False
        # The request's client writer once the head is out (connectionMade);
        # None: write through request.write.
        self._writer: Optional[ClientWriter] = None
        #: Whether the upstream sent its whole body (even if the client left).
        self.upstream_complete = False
        #: Clock time the client went away while its response was relayed, or None.
        self.left_at: Optional[float] = None
        #: Clock time the relay detached (kept reading into the stream log
        #: after the client left), or None.
        self.detached_at: Optional[float] = None
        self._events_when_left: Optional[int] = None
        self._stopped = False
        #: Heartbeats written to the client.
        self.heartbeats = 0
        # Metering is off until _meter (aura_proxy.metrics) turns it on.
        self._metered = False

    def notify_on_detach(self, observer: Callable[["Relay"], None]) -> None:
        """
        Call C{observer} with this relay if it detaches (its client left, its
        upstream is still read into the stream log), after the callers
        before it.
        """
        self._detach_observers.append(observer)

    @property
    def events(self) -> Optional[int]:
        """
        SSE events read from the upstream (stamped; those read after the
        client left included), when an SSE transform counts them; else None.
        """
        return getattr(self._transform, "count", None)

    @property
    def delivered(self) -> Optional[int]:
        """
        SSE events written to the client: all of L{events}, or those written
        before the client left (when an SSE transform counts them; else None).
        """
        return self.events if self.left_at is None else self._events_when_left

    @property
    def detached_events(self) -> Optional[int]:
        """Events read into the stream log after the client left; None when the relay never detached."""
        if self.detached_at is None:
            return None
        events, delivered = self.events, self._events_when_left
        return None if events is None or delivered is None else events - delivered

    def client_transport(self) -> Optional[ITransport]:
        """The client's connection, or None once the client is gone."""
        if self._client_gone or self._finished:
            return None
        return self._request.transport  # type: ignore[no-any-return]

    @property
    def detached(self) -> bool:
        """Whether the client is gone while the upstream is still read."""
        return self._client_gone and self._orphan_call is not None

    # -- upstream side (IProtocol) -------------------------------------------

    def connectionMade(self) -> None:
        self._request.registerProducer(self, True)
        # A GatewayRequest's own writer, called per read without going
        # through request.write (twisted.web requests have none).
        open_writer = getattr(self._request, "client_writer", None)
        self._writer = open_writer() if open_writer is not None else None
        first = min(self._idle_timeout, self._heartbeat_interval) if self._beats else self._idle_timeout
        self._timer = self._clock.callLater(first, self._check_timers)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self._cancel_timers()
        # isinstance, not Failure.check: check() formats every class name it compares.
        ended_cleanly = isinstance(reason.value, (ResponseDone, PotentialDataLoss))
        self.upstream_complete = not self._stopped and ended_cleanly
        if self._reason is None:
            if ended_cleanly:
                self._reason = "completed"
            else:
                self._reason = "upstream_error"
                log.warn(
                    "{upstream} failed mid-body after {sent} bytes: {error}",
                    upstream=self._describe(),
                    sent=self.sent,
                    error=reason.getErrorMessage(),
                )
        if self._transform is not None and not self._client_gone:
            if self._reason == "shutdown":
                # Cut by a drain: never half an event.  The rewriter sends
                # whole blocks only, so the client has whole events; what it
                # holds back of the next one is dropped (the client resumes
                # and gets that event whole), and the retry hint follows.
                # (An oversized block passed through unparsed has its start
                # out already: no hint, which would complete it as an event.)
                self._transform.flush()
                rest = RETRY_HINT if getattr(self._transform, "at_block_end", True) else b""
            else:
                rest = self._transform.flush()
            if rest:
                self.sent += len(rest)
                self._request.write(rest)
        self._end_client()
        self.done.callback(self._reason)

    # -- client side (IPushProducer) ----------------------------------------

    def pauseProducing(self) -> None:
        """The client's socket is full: stop reading the upstream socket."""
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        """The client's socket drained: read the upstream socket again."""
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        """
        The client's connection is closing: stop reading the upstream
        meanwhile.  What ends the relay is the request's C{connectionLost},
        which follows (through the gateway, L{client_gone}): one path for a
        disconnect, not two.
        """
        if not self._client_gone and not self._stopped and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def client_gone(self) -> None:
        """
        Stop relaying because the client disconnected (the request's
        C{connectionLost}, through the gateway: the one path a disconnect takes).
        """
        if self._client_gone:
            return
        self._client_gone = True
        # What the client got is fixed now: once per stream, nothing per read
        # (the step writes nothing more once _client_gone is set).
        self.left_at = self._clock.seconds()
        self._events_when_left = self.events
        if self._detach_seconds > 0 and self.transport is not None and self._reason is None:
            # Detached: the upstream goes on into the stream log, unpaused.
            self._reason = "client_disconnect"
            self.detached_at = self.left_at
            self.transport.resumeProducing()  # type: ignore[attr-defined]
            self._orphan_call = self._clock.callLater(
                self._detach_seconds, self.stop, "client_disconnect"
            )
            for observer in self._detach_observers:
                observer(self)
            return
        self.stop("client_disconnect")

    def stop(self, reason: str) -> None:
        """
        End the relay early: close the upstream connection (it is not reused)
        and record C{reason} as the end reason.
        """
        if self._reason is None:
            self._reason = reason
        self._stopped = True
        self._cancel_timers()
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    # -- timers ---------------------------------------------------------------

    def _check_timers(self) -> None:
        """
        The stream's one timer: close it after C{idle_timeout} of upstream
        silence, send a heartbeat after C{heartbeat_interval} of silence
        towards the client, then sleep until whichever is due next.
        """
        self._timer = None
        now = self._clock.seconds()
        if self._metered:
            self.note_stall(now)
        silent = now - self._last_read
        if silent >= self._idle_timeout:
            log.info(
                "{upstream} silent for {seconds:g} s: closing the stream",
                upstream=self._describe(),
                seconds=self._idle_timeout,
            )
            self.stop("idle_timeout")
            return
        wait = self._idle_timeout - silent
        if self._beats:
            quiet = now - max(self._last_read, self._last_beat)
            if quiet >= self._heartbeat_interval:
                # Never inside an event the client has only part of.
                if self._at_boundary and not self._client_gone:
                    self._request.write(HEARTBEAT)
                    self.heartbeats += 1
                self._last_beat = now
                quiet = 0.0
            wait = min(wait, self._heartbeat_interval - quiet)
        self._timer = self._clock.callLater(wait, self._check_timers)

    def note_stall(self, now: float) -> bool:
        """
        When metered: count the silence since the last event as a stall if
        it is over C{stall_after} and not counted yet (the timer, the end of
        the stream, a scrape); whether it is one.
        """
        if self._events_out > 0 and now - self._last_event_at > self._stall_after:
            if not self._stall_open:
                self._stall_open = True
                self._stalls += 1
            return True
        return False

    def _cancel_timers(self) -> None:
        for call in (self._timer, self._orphan_call):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._orphan_call = None

    def _end_client(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._client_gone:
            return
        # A truncated non-stream body must not look complete to the client.
        end_response(self._request, complete=self._reason == "completed" or self._clean_end)



#: L{Relay} with its per-read step in Python whether or not the C one is
#: built: C{[gateway] fast_path = off}, and the reference the tests hold the
#: C step to.  (When the extension is built the attributes still live in the
#: C base's slots; no C step runs per read.)
if TYPE_CHECKING or not ACCELERATED:
    PyRelay = Relay
else:

    class PyRelay(_PyRelayCore, Relay):
        pass
