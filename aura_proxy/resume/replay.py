"""
The answer to a resumed stream: events from a stream log, not from upstream.

A L{Replay} is the log's L{Subscriber} for one client: it opens the SSE
response on the first event (or as soon as the log accepts the attachment),
writes each block as the log delivers it (the missed events, then the live
tail), sends heartbeats on silence, and finishes when the stream has ended.
Like the relay, it writes only through the request (whose client writer
frames and sends) and ends the response with L{end_response}.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.server import Request

from aura_proxy.client_wire import end_response
from aura_proxy.relay import HEARTBEAT, RETRY_HINT
from aura_proxy.resume.log import Attachment

__all__ = ["Replay"]


class Replay:
    """
    Writes a stream log's events to one resumed client.

    @ivar done: fires with the end reason (C{completed}, C{shutdown}: the
        log was cut short, or C{client_disconnect}).
    @ivar events: events written.
    @ivar sent: bytes of those events written (heartbeats not counted).
    @ivar first_write_at: clock time of the first event written, or None.
    """

    def __init__(
        self,
        request: Request,
        clock: IReactorTime,
        heartbeat_interval: float,
        open_response: Callable[[], None],
    ) -> None:
        """
        @param open_response: sets the status and headers of the SSE response;
            called once, before anything is written.
        """
        self._request = request
        self._clock = clock
        self._heartbeat_interval = heartbeat_interval
        self._open_response = open_response
        self._opened = False
        self._attachment: Optional[Attachment] = None
        self._beat: Optional[IDelayedCall] = None
        self._last_write = clock.seconds()
        self.done: Deferred[str] = Deferred()
        self.events = 0
        self.sent = 0
        #: Heartbeats written.
        self.heartbeats = 0
        self.first_write_at: Optional[float] = None

    def attached(self, attachment: Attachment) -> None:
        """The log accepted the attachment: the response opens now."""
        self._attachment = attachment
        self._open()

    def _open(self) -> None:
        if self._opened:
            return
        self._opened = True
        self._open_response()
        self._request.write(b"")
        if self._heartbeat_interval > 0 and not self.done.called:
            self._beat = self._clock.callLater(self._heartbeat_interval, self._check_beat)

    # -- Subscriber --------------------------------------------------------------

    def replay_event(self, seq: int, block: bytes) -> None:
        """Write one event."""
        if self.done.called:
            return
        self._open()
        self._last_write = self._clock.seconds()
        if self.first_write_at is None:
            self.first_write_at = self._last_write
        self.events += 1
        self.sent += len(block)
        self._request.write(block)

    def replay_end(self) -> None:
        """The stream ended: finish the response."""
        self._finish(b"", "completed")

    def replay_cut(self) -> None:
        """
        The log was cut short (its gateway shut down or died) and every
        event it holds was written: finish the response with a C{retry:}
        hint; the client reconnects, and goes upstream from its last id.
        """
        self._finish(RETRY_HINT, "shutdown")

    def _finish(self, last: bytes, reason: str) -> None:
        if self.done.called:
            return
        self._open()
        self._stop_beat()
        if last:
            self._request.write(last)
        end_response(self._request, complete=True)
        self.done.callback(reason)

    # -- the client ----------------------------------------------------------------

    def client_gone(self) -> None:
        """The resumed client went away: stop delivering."""
        if self.done.called:
            return
        self._stop_beat()
        if self._attachment is not None:
            self._attachment.detach()
        self.done.callback("client_disconnect")

    def _check_beat(self) -> None:
        silent = self._clock.seconds() - self._last_write
        if silent >= self._heartbeat_interval:
            self._request.write(HEARTBEAT)
            self.heartbeats += 1
            self._last_write = self._clock.seconds()
            silent = 0.0
        self._beat = self._clock.callLater(self._heartbeat_interval - silent, self._check_beat)

    def _stop_beat(self) -> None:
        if self._beat is not None and self._beat.active():
            self._beat.cancel()
        self._beat = None
