"""
A lean HTTP/1.1 client agent for the relay's hot path.

L{FastAgent} is an L{IAgent} for C{http://} and C{https://} URLs with its
own persistent connection pool (TLS through Twisted's TLS wrapper, with the
connection creator an L{IPolicyForHTTPS} gives per host and port).  It exists because Twisted's HTTP/1.1 client spends most of
its time per upstream read in layers (C{LineReceiver}, the stateful
dispatchers of C{Response} and C{HTTP11ClientProtocol}, a transport proxy,
C{_ChunkedTransferDecoder}) that a proxy relaying thousands of long SSE
streams pays for on every read.  Here one read of a chunked body costs one
C{find} per chunk-size line, a few slices, and B{one} C{dataReceived} call on
the body protocol with every chunk of that read joined.

Behaviour follows L{twisted.web.client.Agent} where the gateway depends on
it:

  - C{response.length} is the Content-Length (or L{UNKNOWN_LENGTH}); the
    connection-control headers (C{Content-Length}, C{Transfer-Encoding},
    C{Connection}, C{Keep-Alive}, ...) are removed from C{response.headers}
    (except C{Content-Length} on a C{HEAD} response, which is kept, and the
    length is 0 there, as for 204 and 304); so are the headers the
    response's C{Connection} names (unlike the stock Agent, which keeps them).
  - a complete body ends with C{connectionLost(Failure(ResponseDone()))}, a
    close-delimited one with L{PotentialDataLoss}, a truncated one with
    L{ResponseFailed} (wrapping L{_DataLoss}).
  - a connection closed before a whole response head: L{ResponseNeverReceived};
    cancelling the L{Deferred} aborts the connection (never reused) and fails
    it with L{CancelledError}; connect timeout: L{error.TimeoutError}; refused:
    L{error.ConnectionRefusedError}.
  - the body protocol's transport is an L{IPushProducer}: pause/resume stop and
    start reading the socket, C{stopProducing} aborts the connection.
  - a pooled connection the server closed before answering is retried once on
    a new connection, for C{GET}/C{HEAD}/C{OPTIONS}/C{TRACE}/C{DELETE} without
    a body.

Any other scheme goes to the C{fallback} agent, if one is given.  No
pipelining, no proxies, no HTTP/2.  Over TLS the socket is read through
Twisted's transports (no direct reads).
"""

from __future__ import annotations

import re
from errno import EWOULDBLOCK
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from twisted.internet import error
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IProtocol,
    IPushProducer,
    IReactorTime,
    ITransport,
)
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.protocol import Factory
from twisted.internet.tcp import Client as TCPClient

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    RequestGenerationFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    UNKNOWN_LENGTH,
    IAgent,
    IBodyProducer,
    IClientRequest,
    IPolicyForHTTPS,
    IResponse,
)
from zope.interface import implementer

from aura_proxy import c_extensions
from aura_proxy import twisted_internals as internals
from aura_proxy.eventloop import defer_writes
from aura_proxy.twisted_internals import DataLoss as _DataLoss
from aura_proxy.twisted_internals import ParseError, WrongBodyLength

if TYPE_CHECKING:
    from aura_proxy import _chunked_read

__all__ = ["FastAgent"]

log = Logger()

#: A pool's key: host, port and whether the connection is TLS.
_Key = tuple[bytes, int, bool]

#: Response heads larger than this are refused.
MAX_HEAD = 65536
#: A chunk-size line (with extensions) or trailer section larger than this is refused.
_MAX_CHUNK_LINE = 4096
#: The largest chunk size accepted (15 hex digits, leading zeros aside); a
#: larger one is broken framing.  Sizes stay far from 2**63, so every form of
#: the parser (this one, aura_proxy/_chunked_read.c) holds them in an int64.
_MAX_CHUNK_SIZE = 0xFFFFFFFFFFFFFFF
#: The C reader's read buffer (Twisted's bufferSize for TCP): reads are at most this large.
_C_READ_BUFFER = 65536
_MAX_TRAILERS = 65536

#: Methods retried once when a reused connection turns out to be closed.
_RETRYABLE = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"DELETE"))
_NO_BODY_CODES = frozenset((204, 304))
#: Headers the stock client keeps out of response.headers.
_CONNECTION_CONTROL = frozenset(
    (
        b"content-length",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    )
)
#: Connection options that name no header.
_CONNECTION_OPTIONS = frozenset((b"close", b"keep-alive", b""))
#: Request headers the agent writes itself (body framing).
_FRAMING = frozenset((b"content-length", b"transfer-encoding"))
_HEX = b"0123456789abcdefABCDEF"
_TOKEN = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VALID_TARGET = re.compile(rb"\A[\x21-\x7e]+\Z")
_CRLF = b"\r\n"

# Connection modes.  The body modes come first: dataReceived tests them in order.
_M_CHUNKED = 0  # reading a chunked body
_M_LENGTH = 1  # reading a Content-Length body
_M_CLOSE = 2  # reading a body delimited by the end of the connection
_M_DISCARD = 3  # body delivery stopped; the connection is being aborted
_M_HEAD = 4  # request sent (or being sent), waiting for the response head
_M_TRAILERS = 5  # chunked body read, waiting for the end of the trailers
_M_NEW = 6  # connected, no request yet
_M_IDLE = 7  # in the pool
_M_DEAD = 8  # closed or being closed; nothing more is done


class _ProtocolError(Exception):
    """The upstream broke HTTP framing."""


@implementer(IClientRequest)
class _Request:
    """One request: what to send, where, and the Deferred to fire."""

    __slots__ = (
        "method", "absoluteURI", "headers", "key", "head", "producer", "deferred", "agent",
        "connection", "connecting", "timer", "retried", "cancelled", "timed_out",
    )

    def __init__(
        self,
        agent: "FastAgent",
        method: bytes,
        uri: bytes,
        headers: Headers,
        key: _Key,
        head: bytes,
        producer: Optional[IBodyProducer],
    ) -> None:
        self.agent = agent
        self.method = method
        self.absoluteURI = uri
        self.headers = headers
        self.key = key
        self.head = head
        self.producer = producer
        self.deferred: Deferred[IResponse] = Deferred(self._cancel)
        self.connection: Optional[_Connection] = None
        self.connecting: Optional[Deferred[Any]] = None
        self.timer: Optional[IDelayedCall] = None
        self.retried = False
        self.cancelled = False
        self.timed_out = False

    def _cancel(self, d: "Deferred[IResponse]") -> None:
        # Deferred.cancel errbacks with CancelledError after this returns.
        self.cancelled = True
        self._stop_timer()
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            connecting.cancel()
        connection, self.connection = self.connection, None
        if connection is not None:
            connection._abort_request()

    def _stop_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _connect_timed_out(self) -> None:
        self.timer = None
        self.timed_out = True
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            connecting.cancel()
        if not self.deferred.called:
            self.deferred.errback(
                Failure(error.TimeoutError(string="connecting to %s:%d" % (
                    self.key[0].decode("ascii", "replace"), self.key[1])))
            )

    def _connected(self, connection: "_Connection") -> None:
        self.connecting = None
        self._stop_timer()
        if self.cancelled or self.timed_out or self.deferred.called:
            connection._abort_request()
            return
        connection._send(self, reused=False)

    def _connect_failed(self, reason: Failure) -> None:
        self.connecting = None
        self._stop_timer()
        if self.cancelled or self.timed_out or self.deferred.called:
            return
        self.deferred.errback(reason)


@implementer(IPushProducer)
class _BodyTransport:
    """
    The transport a body protocol gets: a push producer for the upstream
    socket, inert once the body has ended (the connection may be reused).
    """

    __slots__ = ("_connection",)

    def __init__(self, connection: "_Connection") -> None:
        self._connection: Optional[_Connection] = connection

    def pauseProducing(self) -> None:
        c = self._connection
        if c is not None:
            c._user_paused = True
            c._sync_reading()

    def resumeProducing(self) -> None:
        c = self._connection
        if c is not None:
            c._user_paused = False
            c._sync_reading()

    def stopProducing(self) -> None:
        c = self._connection
        if c is not None:
            self._connection = None
            c._stop_body()

    loseConnection = stopProducing
    abortConnection = stopProducing


@implementer(IResponse)
class _Response:
    """An L{IResponse} whose body is read by a L{_Connection}."""

    __slots__ = (
        "version", "code", "phrase", "headers", "length", "request", "previousResponse",
        "_transport", "_pending", "_reason", "_protocol", "_delivered", "complete_body",
    )

    def __init__(
        self,
        version: tuple[bytes, int, int],
        code: int,
        phrase: bytes,
        headers: Headers,
        length: Union[int, object],
        request: Optional[_Request],
    ) -> None:
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self.request = request
        self.previousResponse: Optional[IResponse] = None
        self._transport: Optional[_BodyTransport] = None
        self._pending: list[bytes] = []
        self._reason: Optional[Failure] = None
        self._protocol: Optional[IProtocol] = None
        self._delivered = False
        #: The whole body, when it arrived in the same read as the head (not
        #: part of IResponse: a caller may skip deliverBody's machinery).
        self.complete_body: Optional[bytes] = None

    def setPreviousResponse(self, response: IResponse) -> None:
        """Redirects are not followed: nothing to remember."""

    def deliverBody(self, protocol: IProtocol) -> None:
        """
        Connect C{protocol} to the body: bytes already read first (in one
        C{dataReceived}), then the rest as it arrives, then C{connectionLost}.
        """
        if self._delivered:
            raise RuntimeError("Response already has protocol %r, cannot deliverBody again"
                               % (self._protocol,))
        self._delivered = True
        transport = self._transport
        if transport is None:  # no body, or the body has ended already
            transport = _BodyTransport(None)  # type: ignore[arg-type]
        protocol.makeConnection(transport)  # type: ignore[arg-type]
        pending = self._pending
        if pending:
            self._pending = []
            protocol.dataReceived(pending[0] if len(pending) == 1 else b"".join(pending))
        if self._reason is not None:
            reason, self._reason = self._reason, None
            protocol.connectionLost(reason)
            return
        connection = transport._connection
        if connection is None:
            # Stopped by the protocol while it got the first bytes.
            self._protocol = protocol
            return
        self._protocol = protocol
        connection._deliver = protocol.dataReceived
        connection._await_delivery = False
        connection._sync_reading()

    def _finished(self, reason: Failure) -> None:
        """The body ended (C{reason} says how); tell the protocol, or keep it."""
        transport, self._transport = self._transport, None
        if transport is not None:
            transport._connection = None
        protocol, self._protocol = self._protocol, None
        if protocol is None:
            if not self._delivered:
                self._reason = reason
            return
        try:
            protocol.connectionLost(reason)
        except Exception:
            log.failure("body protocol {protocol!r} failed in connectionLost", protocol=protocol)


@implementer(IConsumer)
class _BodyWriter:
    """Writes a request body: buffered while the producer writes synchronously."""

    __slots__ = (
        "connection", "producer", "chunked", "remaining", "parts", "done", "stopped", "registered",
    )

    def __init__(self, connection: "_Connection", producer: IBodyProducer, chunked: bool,
                 length: int) -> None:
        self.connection = connection
        self.producer = producer
        self.chunked = chunked
        self.remaining = length
        self.parts: Optional[list[bytes]] = None
        self.done = False
        self.stopped = False
        self.registered = False

    def start(self, head: bytes) -> None:
        connection = self.connection
        transport = connection.transport
        assert transport is not None
        self.parts = [head]
        try:
            d = self.producer.startProducing(self)
        except Exception:
            self.parts = None
            self._failed(Failure())
            return
        # A producer that is done already (in-memory bodies) finishes here,
        # so that head, body and chunked terminator go out in one write.
        d.addCallbacks(self._produced, self._failed)
        parts, self.parts = self.parts, None
        if self.stopped:
            return
        transport.write(b"".join(parts))  # type: ignore[arg-type]
        if not self.done:
            # Only a producer still writing needs backpressure from the socket.
            transport.registerProducer(self.producer, True)  # type: ignore[attr-defined]
            self.registered = True

    def write(self, data: bytes) -> None:
        if self.stopped or self.done:
            return
        if self.chunked:
            if not data:
                return
            data = b"%x\r\n%s\r\n" % (len(data), data)
        else:
            self.remaining -= len(data)
            if self.remaining < 0:
                self._wrong_length("the body producer wrote more than its length")
                return
        parts = self.parts
        if parts is not None:
            parts.append(data)
        else:
            self.connection.transport.write(data)  # type: ignore[union-attr]

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """Producers register themselves with C{startProducing}'s consumer."""

    def unregisterProducer(self) -> None:
        """See L{registerProducer}."""

    def _produced(self, _: object) -> None:
        if self.stopped or self.done:
            return
        if not self.chunked and self.remaining:
            self._wrong_length("the body producer wrote less than its length")
            return
        self._finish()
        if self.chunked:
            if self.parts is not None:
                self.parts.append(b"0\r\n\r\n")
            else:
                self.connection.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]
        self.connection._request_written()

    def _finish(self) -> None:
        self.done = True
        if self.registered:
            self.registered = False
            transport = self.connection.transport
            if transport is not None and getattr(transport, "producer", None) is self.producer:
                transport.unregisterProducer()  # type: ignore[attr-defined]

    def _wrong_length(self, message: str) -> None:
        try:
            self.producer.stopProducing()
        except Exception:
            pass
        self._failed(Failure(WrongBodyLength(message)))

    def _failed(self, reason: Failure) -> Optional[Failure]:
        if self.stopped or self.done:
            return None
        self._finish()
        self.stopped = True
        self.connection._request_failed(Failure(RequestGenerationFailed([reason])))
        return None

    def stop(self) -> None:
        """The request is abandoned: stop producing its body."""
        if self.done or self.stopped:
            return
        self.stopped = True
        self._finish()
        try:
            self.producer.stopProducing()
        except Exception:
            pass


@implementer(IProtocol)
class _Connection:
    """One upstream connection: sends a request, parses its response."""

    __slots__ = (
        "transport", "connected", "_agent", "_key", "_mode", "_buf", "_left", "_deliver",
        "_response", "_request", "_writer", "_keep_alive", "_reused", "_got_bytes",
        "_user_paused", "_await_delivery", "_paused", "_idle_call", "_idle_since", "_closed",
    )

    def __init__(self, agent: "FastAgent", key: _Key) -> None:
        self.transport: Optional[ITransport] = None
        self.connected = 0
        self._agent = agent
        self._key = key
        self._mode = _M_NEW
        self._buf = b""
        self._left = 0
        self._deliver: Optional[Callable[[bytes], object]] = None
        self._response: Optional[_Response] = None
        self._request: Optional[_Request] = None
        self._writer: Optional[_BodyWriter] = None
        self._keep_alive = False
        self._reused = False
        self._got_bytes = False
        self._user_paused = False
        self._await_delivery = False
        # Whether we paused the transport's reading: it is paused while the
        # body's consumer is not there yet or has paused it.
        self._paused = False
        self._idle_call: Optional[IDelayedCall] = None
        self._idle_since = 0.0
        self._closed: Optional[Deferred[None]] = None

    # -- IProtocol --------------------------------------------------------

    def makeConnection(self, transport: ITransport) -> None:
        self.transport = transport
        self.connected = 1
        # The client endpoint's wrapper only forwards calls once connected:
        # let the TCP transport call us directly, a call less per read.
        if self._agent.fast_path:
            internals.unwrap_endpoint_protocol(transport, self)
            if type(transport) is TCPClient and transport.protocol is self:  # type: ignore[attr-defined]
                _read_directly(transport, self)  # type: ignore[arg-type]
                defer_writes(self._agent._reactor, transport)
        self.connectionMade()

    def connectionMade(self) -> None:
        pass

    def logPrefix(self) -> str:
        return "FastHTTPClient"

    def dataReceived(self, data: bytes) -> None:
        mode = self._mode
        try:
            if mode == _M_CHUNKED:
                buf = self._buf
                if buf:
                    data = buf + data
                    self._buf = b""
                n = len(data)
                pos = 0
                piece = b""
                out: Optional[list[bytes]] = None
                left = self._left
                if left:
                    # Inside a chunk: `left` bytes of its data and CRLF to go.
                    if left <= n:
                        if left > 2:
                            if data[left - 2] != 13 or data[left - 1] != 10:
                                raise _ProtocolError("chunk data not followed by CRLF")
                            piece = data[:left - 2]
                        elif data[:left] != _CRLF[2 - left:]:
                            raise _ProtocolError("chunk data not followed by CRLF")
                        pos = left
                        self._left = 0
                    else:
                        self._left = left - n
                        dl = left - 2
                        if dl >= n:
                            piece = data
                        elif dl > 0:
                            piece = data[:dl]
                            if data[dl:] != _CRLF[:n - dl]:
                                raise _ProtocolError("chunk data not followed by CRLF")
                        elif data != _CRLF[2 - left:2 - left + n]:
                            raise _ProtocolError("chunk data not followed by CRLF")
                        pos = n
                # Whole chunks: one find per chunk-size line, one slice per chunk.
                while pos < n:
                    i = data.find(b"\n", pos)
                    if i < 0:
                        if n - pos > _MAX_CHUNK_LINE:
                            raise _ProtocolError("chunk-size line too long")
                        self._buf = data[pos:] if pos else data
                        break
                    size = _SIZES.get(data[pos:i])
                    if size is None:
                        size = _chunk_size(data[pos:i])
                    if not size:
                        # The last chunk: deliver, then wait for the trailers.
                        self._mode = _M_TRAILERS
                        if out is not None:
                            piece = b"".join(out)
                        if piece:
                            deliver = self._deliver
                            if deliver is not None:
                                deliver(piece)
                            else:
                                self._response._pending.append(piece)  # type: ignore[union-attr]
                            if self._mode != _M_TRAILERS:
                                return
                        self._trailers(data[i + 1:])
                        return
                    start = i + 1
                    end = start + size
                    if end + 2 <= n:
                        if data[end] != 13 or data[end + 1] != 10:
                            raise _ProtocolError("chunk data not followed by CRLF")
                        p = data[start:end]
                        pos = end + 2
                    else:
                        # The chunk goes on in the next read.
                        self._left = end + 2 - n
                        if end < n:
                            p = data[start:end]
                            if data[end:] != b"\r":
                                raise _ProtocolError("chunk data not followed by CRLF")
                        else:
                            p = data[start:]
                        pos = n
                    if piece:
                        if out is None:
                            out = [piece, p]
                        else:
                            out.append(p)
                    else:
                        piece = p
                if out is not None:
                    piece = b"".join(out)
                if piece:
                    deliver = self._deliver
                    if deliver is not None:
                        deliver(piece)
                    else:
                        self._response._pending.append(piece)  # type: ignore[union-attr]
            elif mode == _M_LENGTH:
                left = self._left
                n = len(data)
                if n < left:
                    self._left = left - n
                    deliver = self._deliver
                    if deliver is not None:
                        deliver(data)
                    else:
                        self._response._pending.append(data)  # type: ignore[union-attr]
                else:
                    self._left = 0
                    piece = data[:left] if n > left else data
                    if piece:
                        deliver = self._deliver
                        if deliver is not None:
                            deliver(piece)
                        else:
                            self._response._pending.append(piece)  # type: ignore[union-attr]
                    if self._mode == _M_LENGTH:
                        self._body_complete(n > left)
            elif mode == _M_CLOSE:
                deliver = self._deliver
                if deliver is not None:
                    deliver(data)
                else:
                    self._response._pending.append(data)  # type: ignore[union-attr]
            elif mode == _M_HEAD:
                self._head_received(data)
            elif mode == _M_TRAILERS:
                self._trailers(data)
            elif mode == _M_IDLE or mode == _M_NEW:
                # Nothing was asked: the connection is out of step.
                self._close()
            # _M_DISCARD, _M_DEAD: drop.
        except Exception:
            self._broken(Failure())

    def _delivery_failed(self, exc: BaseException) -> None:
        """The body's consumer raised (reads decoded in C): as dataReceived does."""
        self._broken(Failure(exc))

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:
        self.connected = 0
        mode = self._mode
        self._mode = _M_DEAD
        self._cancel_idle()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()
        if mode == _M_IDLE:
            self._agent._forget(self)
        elif mode == _M_HEAD:
            request, self._request = self._request, None
            if request is not None and not request.deferred.called:
                if (self._reused and not self._got_bytes and not request.retried
                        and request.method in _RETRYABLE and request.producer is None):
                    request.retried = True
                    request.connection = None
                    self._agent._connect(request)
                else:
                    request.deferred.errback(Failure(ResponseNeverReceived([reason])))
        elif mode <= _M_DISCARD or mode == _M_TRAILERS:
            response, self._response = self._response, None
            self._deliver = None
            if response is not None:
                if mode == _M_CLOSE:
                    response._finished(Failure(PotentialDataLoss()))
                else:
                    response._finished(Failure(ResponseFailed(
                        [reason, Failure(_DataLoss())], response)))  # type: ignore[no-untyped-call]
        closed, self._closed = self._closed, None
        if closed is not None:
            closed.callback(None)

    def _sync_reading(self) -> None:
        """Pause or resume reading the socket, as the body's consumer needs."""
        paused = self._user_paused or self._await_delivery
        if paused != self._paused:
            self._paused = paused
            transport = self.transport
            if transport is not None:
                if paused:
                    transport.pauseProducing()  # type: ignore[attr-defined]
                else:
                    transport.resumeProducing()  # type: ignore[attr-defined]

    # -- sending ------------------------------------------------------------

    def _send(self, request: _Request, reused: bool) -> None:
        """Write C{request} (head, then its body if any) on this connection."""
        self._mode = _M_HEAD
        self._request = request
        self._reused = reused
        self._got_bytes = False
        self._buf = b""
        self._keep_alive = False
        self._user_paused = False
        self._await_delivery = False
        self._sync_reading()
        request.connection = self
        transport = self.transport
        assert transport is not None
        producer = request.producer
        if producer is None:
            transport.write(request.head + _CRLF)
            return
        length = producer.length
        if length is UNKNOWN_LENGTH:
            head = request.head + b"Transfer-Encoding: chunked\r\n\r\n"
            writer = _BodyWriter(self, producer, True, 0)
        else:
            head = request.head + b"Content-Length: %d\r\n\r\n" % (length,)
            writer = _BodyWriter(self, producer, False, length)  # type: ignore[arg-type]
        self._writer = writer
        writer.start(head)

    def _request_written(self) -> None:
        """The whole request body is written."""
        self._writer = None

    def _request_failed(self, reason: Failure) -> None:
        """The request body could not be produced: give up the connection."""
        self._writer = None
        request, self._request = self._request, None
        if self._mode == _M_HEAD:
            self._mode = _M_DEAD
            self.transport.abortConnection()  # type: ignore[union-attr]
        elif self._mode != _M_DEAD:
            self._close()
        if request is not None:
            request.connection = None
            if not request.deferred.called:
                request.deferred.errback(reason)

    def _abort_request(self) -> None:
        """The request was cancelled: abort the connection, never reuse it."""
        self._request = None
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()
        if self._mode != _M_DEAD:
            self._mode = _M_DEAD
            self.transport.abortConnection()  # type: ignore[union-attr]

    # -- the response head ----------------------------------------------------

    def _head_received(self, data: bytes) -> None:
        self._got_bytes = True
        buf = self._buf + data if self._buf else data
        while True:
            if buf[:1] in (b"\r", b"\n"):
                # Tolerate empty lines before the status line.
                buf = buf.lstrip(b"\r\n")
            a = buf.find(b"\n\r\n")
            b = buf.find(b"\n\n")
            if a < 0 and b < 0:
                if len(buf) > MAX_HEAD:
                    raise _ProtocolError("response head too long")
                self._buf = buf
                return
            if a >= 0 and (b < 0 or a < b):
                head, buf = buf[:a], buf[a + 3:]
            else:
                head, buf = buf[:b], buf[b + 2:]
            lines = head.split(b"\n")
            version, code, phrase = _status_line(lines[0].rstrip(b"\r"))
            if 100 <= code < 200:
                continue  # 100 Continue and friends: the real response follows
            break
        self._buf = b""
        self._response_head(version, code, phrase, lines, buf)

    def _response_head(self, version: tuple[bytes, int, int], code: int, phrase: bytes,
                       lines: list[bytes], rest: bytes) -> None:
        request = self._request
        assert request is not None
        is_head = request.method == b"HEAD"
        headers = Headers()
        add = headers.addRawHeader
        content_length: Optional[list[bytes]] = None
        transfer_encoding: Optional[list[bytes]] = None
        connection_tokens: list[bytes] = []
        for line in lines[1:]:
            if line[-1:] == b"\r":
                line = line[:-1]
            if not line:
                continue
            if line[:1] in (b" ", b"\t"):
                raise _ProtocolError("obsolete header line folding")
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.match(name):
                raise _ProtocolError("malformed header line %r" % (line[:100],))
            value = value.strip(b" \t")
            lname = name.lower()
            if lname in _CONNECTION_CONTROL:
                if lname == b"content-length":
                    if is_head:
                        add(name, value)
                    content_length = (content_length or []) + [value]
                elif lname == b"transfer-encoding":
                    transfer_encoding = (transfer_encoding or []) + [value]
                elif lname == b"connection":
                    connection_tokens.extend(
                        t.strip(b" \t").lower() for t in value.split(b","))
                continue
            add(name, value)
        for token in connection_tokens:
            # A header the upstream named in Connection is hop-by-hop (RFC 9110
            # 7.6.1): it is this connection's, never the client's.
            if token not in _CONNECTION_OPTIONS and headers.hasHeader(token):
                headers.removeHeader(token)

        keep_alive = version[1:] >= (1, 1) and b"close" not in connection_tokens
        mode = _M_NEW
        length: Union[int, object] = UNKNOWN_LENGTH
        if is_head or code in _NO_BODY_CODES:
            length = 0
        elif transfer_encoding is not None:
            codings = [c.strip(b" \t").lower() for v in transfer_encoding for c in v.split(b",")]
            if codings[-1] == b"chunked":
                mode = _M_CHUNKED
            else:
                mode = _M_CLOSE
                keep_alive = False
            if content_length is not None:
                keep_alive = False
        elif content_length is not None:
            length = _content_length(content_length)
            if length:
                mode = _M_LENGTH
        else:
            mode = _M_CLOSE
            keep_alive = False

        response = _Response(version, code, phrase, headers, length, request)
        self._keep_alive = keep_alive
        self._request = None
        request.connection = None
        d = request.deferred
        if mode == _M_NEW:
            # No body: the connection is free again now.
            response._reason = Failure(ResponseDone("Response body fully received"))
            self._request_done(bool(rest))
            d.callback(response)
            return
        size: int = length if mode == _M_LENGTH else -1  # type: ignore[assignment]
        if 0 < size <= len(rest):
            # The whole body came with the head (most small responses): the
            # connection is free again before anyone asks for the body.
            body = rest[:size] if len(rest) > size else rest
            response.complete_body = body
            response._pending.append(body)
            response._reason = Failure(ResponseDone("Response body fully received"))
            self._request_done(len(rest) > size)
            d.callback(response)
            return
        self._mode = mode
        self._left = length if mode == _M_LENGTH else 0  # type: ignore[assignment]
        self._response = response
        response._transport = _BodyTransport(self)
        self._deliver = None
        # Read no further until someone wants the body: the caller nearly
        # always asks for it in the callback, so the transport is paused only
        # if it has not by then (pausing and resuming is two epoll_ctl calls).
        self._await_delivery = True
        d.callback(response)
        if self._response is response:
            self._sync_reading()
        if rest and self._mode <= _M_CLOSE:
            self.dataReceived(rest)

    def _trailers(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        if buf[:2] == _CRLF:
            end = 2
        elif buf[:1] == b"\n":
            end = 1
        else:
            a = buf.find(b"\n\r\n")
            b = buf.find(b"\n\n")
            if a < 0 and b < 0:
                if len(buf) > _MAX_TRAILERS:
                    raise _ProtocolError("trailer section too long")
                self._buf = buf
                return
            end = a + 3 if a >= 0 and (b < 0 or a < b) else b + 2
        self._buf = b""
        self._body_complete(end < len(buf))

    # -- the end of a response ------------------------------------------------

    def _body_complete(self, extra: bool) -> None:
        """The whole body was read (and delivered or kept for delivery)."""
        response, self._response = self._response, None
        self._deliver = None
        self._mode = _M_NEW
        self._request_done(extra)
        if response is not None:
            response._finished(Failure(ResponseDone("Response body fully received")))

    def _request_done(self, extra: bool) -> None:
        """The response ended: pool the connection or close it."""
        writer, self._writer = self._writer, None
        if writer is not None:
            # The server answered before reading the whole request body.
            writer.stop()
            extra = True
        if self._keep_alive and not extra:
            self._mode = _M_IDLE
            self._user_paused = self._await_delivery = False
            self._sync_reading()
            self._agent._release(self)
        else:
            self._close()

    def _stop_body(self) -> None:
        """The body protocol stopped delivery: abort, never reuse."""
        if self._mode <= _M_CLOSE or self._mode == _M_TRAILERS:
            self._mode = _M_DISCARD
            self._deliver = None
            writer, self._writer = self._writer, None
            if writer is not None:
                writer.stop()
            self.transport.abortConnection()  # type: ignore[union-attr]

    def _broken(self, reason: Failure) -> None:
        """A parse error (or a failing body protocol): abort the connection."""
        mode = self._mode
        if mode == _M_DEAD:
            return
        self._mode = _M_DEAD
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.stop()
        self.transport.abortConnection()  # type: ignore[union-attr]
        if mode == _M_HEAD:
            request, self._request = self._request, None
            if request is not None:
                request.connection = None
                if not request.deferred.called:
                    request.deferred.errback(Failure(ResponseFailed([reason])))
        else:
            response, self._response = self._response, None
            self._deliver = None
            if response is not None:
                response._finished(Failure(ResponseFailed([reason], response)))  # type: ignore[no-untyped-call]

    def _close(self) -> None:
        self._mode = _M_DEAD
        self._cancel_idle()
        self.transport.loseConnection()  # type: ignore[union-attr]

    # -- pooling ------------------------------------------------------------------

    def _idle_expired(self) -> None:
        self._idle_call = None
        if self._mode != _M_IDLE:
            return  # in use: the next release arms the timer again
        agent = self._agent
        left = self._idle_since + agent.idle_timeout - agent._clock.seconds()
        if left > 0:
            # Taken and released again since the timer was armed.
            self._idle_call = agent._clock.callLater(left, self._idle_expired)
            return
        agent._forget(self)
        self._close()

    def _cancel_idle(self) -> None:
        call, self._idle_call = self._idle_call, None
        if call is not None and call.active():
            call.cancel()


def _read_directly(transport: TCPClient, protocol: _Connection, accelerate: bool = True) -> None:
    """
    Give a plain TCP connection a C{doRead} that hands each read straight to
    C{protocol}: the steps of Twisted's C{Connection.doRead} and
    C{_dataReceived} in one call instead of two, for every upstream read.
    With the C extension (L{aura_proxy._chunked_read}) built and
    C{accelerate}, reads of whole chunks of a chunked body go straight to
    the body's consumer as well.
    """
    if _ChunkedReader is not None and accelerate:
        reader = _ChunkedReader(
            transport.socket, protocol, CONNECTION_DONE, CONNECTION_LOST,
            min(transport.bufferSize, _C_READ_BUFFER),
        )
        internals.replace_do_read(transport, reader.do_read)
        return
    recv = transport.socket.recv
    size = transport.bufferSize
    data_received = protocol.dataReceived

    def doRead() -> object:
        try:
            data = recv(size)
        except OSError as e:
            if e.args[0] == EWOULDBLOCK:
                return None
            return CONNECTION_LOST
        if not data:
            return CONNECTION_DONE
        data_received(data)
        return None

    internals.replace_do_read(transport, doRead)


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, agent: "FastAgent", key: _Key) -> None:
        self._agent = agent
        self._key = key

    def buildProtocol(self, addr: object) -> _Connection:  # type: ignore[override]
        return _Connection(self._agent, self._key)


@implementer(IAgent)
class FastAgent:
    """
    An L{IAgent} for C{http://} with a persistent pool keyed by (host, port).

    @param connect_timeout: seconds for the TCP connection (name lookup
        included); then the request fails with L{error.TimeoutError}.
    @param max_idle_per_host: idle connections kept per (host, port); 0 for
        no reuse at all.
    @param idle_timeout: an idle connection is closed after this long.
    @param fallback: the agent for any other scheme (C{https://}); without
        one such requests fail with L{SchemeNotSupported}.
    @param fast_path: read plain TCP connections' sockets directly (whole
        chunks decoded in C where L{aura_proxy._chunked_read} is built) and
        send their writes at the end of the loop turn; C{False}: through
        Twisted's own transport, as stock code would (C{[gateway] fast_path}).
    """

    def __init__(
        self,
        reactor: Any,
        connect_timeout: float,
        max_idle_per_host: int,
        idle_timeout: float = 4.0,
        fallback: Optional[IAgent] = None,
        fast_path: bool = True,
        tls_policy: Optional[IPolicyForHTTPS] = None,
    ) -> None:
        self._reactor = reactor
        if tls_policy is None:
            from twisted.web.client import BrowserLikePolicyForHTTPS

            tls_policy = BrowserLikePolicyForHTTPS()
        self.tls_policy = tls_policy
        self._clock: IReactorTime = reactor
        self.connect_timeout = connect_timeout
        self.max_idle_per_host = max_idle_per_host
        self.idle_timeout = idle_timeout
        self.fallback = fallback
        self.fast_path = fast_path
        self._idle: dict[_Key, list[_Connection]] = {}
        self._factories: dict[_Key, _ConnectionFactory] = {}

    # -- IAgent ---------------------------------------------------------------

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Optional[Headers] = None,
        bodyProducer: Optional[IBodyProducer] = None,
    ) -> "Deferred[IResponse]":
        """Send a request; the Deferred fires with the response head."""
        scheme, sep, rest = uri.partition(b"://")
        scheme = scheme.lower()
        if not sep or scheme not in (b"http", b"https"):
            if self.fallback is not None:
                return self.fallback.request(method, uri, headers, bodyProducer)
            return fail(SchemeNotSupported("Unsupported scheme: %r" % (scheme,)))
        tls = scheme == b"https"
        try:
            host, port, host_value, target = _split_url(rest, 443 if tls else 80)
            if not _TOKEN.match(method):
                raise ValueError("invalid method %r" % (method,))
            if not _VALID_TARGET.match(target):
                raise ValueError("invalid request target %r" % (target,))
        except ValueError:
            return fail(Failure())
        if headers is None:
            headers = Headers()
        parts = [method, b" ", target, b" HTTP/1.1\r\n"]
        if not headers.hasHeader(b"host"):
            parts += (b"Host: ", host_value, _CRLF)
        for name, values in headers.getAllRawHeaders():
            if name.lower() in _FRAMING:
                continue
            for value in values:
                parts += (name, b": ", value, _CRLF)
        if self.max_idle_per_host <= 0:
            parts.append(b"Connection: close\r\n")
        key = (host, port, tls)
        request = _Request(self, method, uri, headers, key, b"".join(parts), bodyProducer)
        connection = self._take(key)
        if connection is not None:
            connection._send(request, reused=True)
        else:
            self._connect(request)
        return request.deferred

    # -- connections --------------------------------------------------------------

    def _connect(self, request: _Request) -> None:
        host, port, tls = request.key
        factory = self._factories.get(request.key)
        if factory is None:
            factory = self._factories[request.key] = _ConnectionFactory(self, request.key)
        timeout = self.connect_timeout
        text = host.decode("ascii")
        endpoint: Any
        if _is_ipv4(text):
            endpoint = TCP4ClientEndpoint(self._reactor, text, port, timeout=timeout + 1)
        elif ":" in text:
            endpoint = TCP6ClientEndpoint(self._reactor, text, port, timeout=timeout + 1)
        else:
            endpoint = HostnameEndpoint(self._reactor, host, port, timeout=timeout + 1)
        if tls:
            # Verified against the route's CAs (or the system's), with SNI:
            # the policy's creator for this host and port.
            endpoint = wrapClientTLS(self.tls_policy.creatorForNetloc(host, port), endpoint)
        request.timer = self._clock.callLater(timeout, request._connect_timed_out)
        d = endpoint.connect(factory)
        request.connecting = d
        d.addCallbacks(request._connected, request._connect_failed)

    def _take(self, key: _Key) -> Optional[_Connection]:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            # Its idle timer stays armed: when it fires, it finds the
            # connection in use, or idle since a later release, and does
            # nothing or waits for the rest (no timer per request).
            if connection._mode == _M_IDLE and connection.connected:
                if not idle:
                    del self._idle[key]
                return connection
        return None

    def _release(self, connection: _Connection) -> None:
        idle = self._idle.get(connection._key)
        if idle is None:
            if self.max_idle_per_host <= 0:
                connection._close()
                return
            idle = self._idle[connection._key] = []
        elif len(idle) >= self.max_idle_per_host:
            connection._close()
            return
        connection._idle_since = self._clock.seconds()
        if connection._idle_call is None:
            connection._idle_call = self._clock.callLater(self.idle_timeout, connection._idle_expired)
        idle.append(connection)

    def _forget(self, connection: _Connection) -> None:
        idle = self._idle.get(connection._key)
        if idle is not None and connection in idle:
            idle.remove(connection)
            if not idle:
                del self._idle[connection._key]

    def idle_connections(self) -> int:
        """How many connections wait in the pool."""
        return sum(len(v) for v in self._idle.values())

    def closeCachedConnections(self) -> "Deferred[object]":
        """Close every idle connection; fires once they are all closed."""
        waits = []
        for idle in list(self._idle.values()):
            for connection in list(idle):
                d: Deferred[None] = Deferred()
                connection._closed = d
                waits.append(d)
                connection._close()
        self._idle.clear()
        return gatherResults(waits)  # type: ignore[return-value]

    close = closeCachedConnections


# -- parsing helpers --------------------------------------------------------------


#: Chunk-size lines seen (b"30\r" -> 48): one dict lookup instead of parsing.
_SIZES: dict[bytes, int] = {}
_MAX_SIZES = 4096


def _chunk_size(line: bytes) -> int:
    """A chunk-size line not seen before: validate, parse, remember."""
    size = line.split(b";", 1)[0].strip(b" \t\r")
    if not size or len(size) > 16 or size.translate(None, _HEX):
        raise _ProtocolError("bad chunk-size line %r" % (line[:40],))
    n = int(size, 16)
    if n > _MAX_CHUNK_SIZE:
        raise _ProtocolError("chunk size %r above the maximum" % (size,))
    if len(_SIZES) < _MAX_SIZES and len(line) <= 17:
        _SIZES[line] = n
    return n


def _status_line(line: bytes) -> tuple[tuple[bytes, int, int], int, bytes]:
    parts = line.split(b" ", 2)
    if len(parts) < 2:
        raise ParseError("wrong number of parts", line)  # type: ignore[no-untyped-call]
    proto = parts[0]
    if proto[:5] != b"HTTP/":
        raise ParseError("not HTTP", line)  # type: ignore[no-untyped-call]
    major, dot, minor = proto[5:].partition(b".")
    if not (dot and major.isdigit() and minor.isdigit() and len(major) == 1 and len(minor) == 1):
        raise ParseError("bad version", line)  # type: ignore[no-untyped-call]
    code = parts[1]
    if len(code) != 3 or not code.isdigit():
        raise ParseError("bad status code", line)  # type: ignore[no-untyped-call]
    return (b"HTTP", int(major), int(minor)), int(code), parts[2] if len(parts) == 3 else b""


def _content_length(values: list[bytes]) -> int:
    seen: Optional[int] = None
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t")
            if not item.isdigit():
                raise _ProtocolError("bad Content-Length %r" % (value[:40],))
            n = int(item)
            if seen is not None and n != seen:
                raise _ProtocolError("conflicting Content-Length values")
            seen = n
    if seen is None:
        raise _ProtocolError("empty Content-Length")
    return seen


def _is_ipv4(host: str) -> bool:
    parts = host.split(".")
    return len(parts) == 4 and all(p.isdigit() and len(p) <= 3 and int(p) < 256 for p in parts)


def _split_url(rest: bytes, default_port: int = 80) -> tuple[bytes, int, bytes, bytes]:
    """
    (host, port, Host header value, request target) from what follows
    C{http://} (or C{https://}, with C{default_port} 443); the path and
    query are used as given, not re-encoded.
    """
    end = len(rest)
    for c in (b"/", b"?", b"#"):
        i = rest.find(c)
        if 0 <= i < end:
            end = i
    netloc, target = rest[:end], rest[end:]
    target = target.partition(b"#")[0]
    if not target or target[:1] == b"?":
        target = b"/" + target
    host, port, host_value = _authority(netloc, default_port)
    return host, port, host_value, target


@lru_cache(maxsize=64)
def _authority(netloc: bytes, default_port: int = 80) -> tuple[bytes, int, bytes]:
    """(host, port, Host header value) of a URL's authority; a gateway has few."""
    netloc = netloc.rpartition(b"@")[2]
    if netloc[:1] == b"[":
        close = netloc.find(b"]")
        if close < 0:
            raise ValueError("bad IPv6 address in %r" % (netloc,))
        host, port_text = netloc[1:close], netloc[close + 1:]
        if port_text and port_text[:1] != b":":
            raise ValueError("bad authority %r" % (netloc,))
        port_text = port_text[1:]
        host_value = b"[" + host + b"]"
    else:
        host, _, port_text = netloc.partition(b":")
        host_value = host
    if not host:
        raise ValueError("no host in URL")
    if port_text:
        if not port_text.isdigit():
            raise ValueError("bad port %r" % (port_text,))
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError("bad port %r" % (port_text,))
    else:
        port = default_port
    if port != default_port:
        host_value += b":%d" % (port,)
    return host, port, host_value


# -- the C reader -----------------------------------------------------------------


def _load_chunked_reader() -> tuple[Optional[type[_chunked_read.ChunkedReader]], Optional[str]]:
    """
    The C reader (L{aura_proxy._chunked_read}) if it is built with this
    module's constants and the connection attributes it uses exist; else
    None and why not.
    """
    module, reason = c_extensions.load("aura_proxy._chunked_read", {
        "MODE_CHUNKED": _M_CHUNKED,
        "MAX_READ": _C_READ_BUFFER,
        "MAX_CHUNK_SIZE": _MAX_CHUNK_SIZE,
    })
    if module is None:
        return None, reason
    missing = [name for name in module.CONNECTION_ATTRIBUTES if not hasattr(_Connection, name)]
    if missing:
        return None, "reads _Connection attributes that do not exist (%s): not used" % ", ".join(missing)
    return module.ChunkedReader, None  # type: ignore[no-any-return]


#: The C reader's type, or None (then the Python parser reads everything).
_ChunkedReader: Optional[type[_chunked_read.ChunkedReader]]
#: Why the C reader is not used (not built, or built with other constants), or None.
C_DISABLED_REASON: Optional[str]
_ChunkedReader, C_DISABLED_REASON = _load_chunked_reader()
