"""
The client's HTTP/1.1 wire after the response head.

twisted.web writes a response's head; after it, on plain TCP, the body goes
through a L{ClientWriter} that L{aura_proxy.site.GatewayRequest} owns (its
C{write} uses it, and the relay's C per-read step calls it without a Python
call).  The writer frames each write as an HTTP/1.1 chunk when the response
is chunked and sends it straight to the client's socket when nothing is
queued in the transport before it: Twisted's transports queue every write
and send it on the next loop turn, registering and unregistering the socket
with epoll each time, two C{epoll_ctl} calls and a turn of latency per SSE
event.  What the kernel does not take goes to the transport's queue, so bytes
are never reordered, and C{finish()}'s last chunk goes after all of them.

L{ClientWriter} is C (L{aura_proxy._relay_core}) when built;
L{_PyClientWriter} is the same in Python.  L{end_response} is how a relay
ends the client's response.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.web.server import Request

from aura_proxy.c_extensions import load
from aura_proxy.twisted_internals import WRITE_BUFFER_ATTRIBUTES, send_queue_empty

__all__ = ["ClientWriter", "ACCELERATED", "abort_client", "end_response"]


class _PyClientWriter:
    """
    A response's body bytes to the client's plain TCP connection: the
    reference for L{aura_proxy._relay_core.ClientWriter}, and what runs when
    that extension is not built.

    @ivar sent: body bytes written (before framing).
    @ivar chunked: whether each write is framed as an HTTP/1.1 chunk.
    """

    __slots__ = ("tcp", "chunked", "sent", "_state")

    def __init__(self, tcp: Any, chunked: bool) -> None:
        """
        @param tcp: the client's connection, as
            L{aura_proxy.twisted_internals.direct_send_transport} gave it.
        """
        self.tcp: Any = tcp
        self.chunked = bool(chunked)
        self.sent = 0
        self._state = _OPEN

    @property
    def open(self) -> bool:
        """Whether body bytes may still be written."""
        return self._state is _OPEN

    def write(self, data: bytes) -> None:
        """Body bytes to the client, framed as the response needs."""
        if self._state is not _OPEN:
            if self._state is _LOST:
                return  # the client is gone: dropped, as twisted.web's Request.write drops
            raise RuntimeError("ClientWriter.write called after the response was finished")
        n = len(data)
        if not n:
            return  # an empty chunk would end the body
        self.sent += n
        frame = b"%x\r\n%b\r\n" % (n, data) if self.chunked else data
        t = self.tcp
        if not send_queue_empty(t):
            t.write(frame)
            return
        try:
            sent = t.socket.send(frame)
        except OSError:
            sent = 0  # EAGAIN; any other error the transport's write finds and reports
        if sent != len(frame):
            t.write(frame[sent:] if sent else frame)

    def end(self) -> None:
        """The response is finished: a later write raises C{RuntimeError}."""
        self._close(_ENDED)

    def lose(self) -> None:
        """The client is gone: later writes are dropped."""
        self._close(_LOST)

    def _close(self, state: object) -> None:
        if self._state is _OPEN:
            self._state = state
        self.tcp = None


_OPEN, _ENDED, _LOST = object(), object(), object()

#: The C module of the writer and the relay's per-read step, if built with
#: the transport attributes the seam probes; else None, and why.
C_MODULE, C_DISABLED_REASON = load("aura_proxy._relay_core", {"transport_attributes": WRITE_BUFFER_ATTRIBUTES})

if TYPE_CHECKING:
    ClientWriter = _PyClientWriter
else:
    ClientWriter = _PyClientWriter if C_MODULE is None else C_MODULE.ClientWriter

#: Whether the client writer is the C one (L{aura_proxy._relay_core}).
ACCELERATED = ClientWriter is not _PyClientWriter


def end_response(request: Request, complete: bool) -> None:
    """
    End the client's response to C{request}, whose client is still there:
    finish it when C{complete} (its last chunk goes after every byte before
    it), else abort the connection (a truncated body must not look
    complete).  A producer still registered with the request is unregistered.
    """
    if request.producer is not None:
        request.unregisterProducer()
    if complete:
        request.finish()
    else:
        abort_client(request)


def abort_client(request: Request) -> None:
    """
    Cut the client's response to C{request} short: HTTP/1.1 aborts the
    connection; an HTTP/2 stream (whose request has no transport: the
    stream is its channel) is reset, the connection's other streams go on.
    """
    transport: Any = request.transport
    if transport is None:
        transport = request.channel
    if transport is not None:
        transport.abortConnection()
