"""
The client-facing HTTP site: twisted.web's side of the gateway.

L{GatewaySite} builds L{GatewayChannel}s and L{GatewayRequest}s; every path
is served by one leaf resource, L{GatewayResource}, which hands the request
to L{aura_proxy.proxy.Gateway}, where the request path is.
"""

from __future__ import annotations

from time import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES, RESPONSES, HTTPChannel, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.server import version as server_version
from zope.interface import implementer

from aura_proxy import errors
from aura_proxy.client_wire import ClientWriter, abort_client
from aura_proxy.eventloop import defer_writes
from aura_proxy.request_ids import new_request_id
from aura_proxy.twisted_internals import (
    answer_malformed_requests,
    channel_protocol_factory,
    direct_send_transport,
    hold_connection_timeout,
    request_line,
    stop_stream_body,
)

if TYPE_CHECKING:
    from aura_proxy.proxy import Gateway

__all__ = [
    "GatewayChannel", "GatewayRequest", "StockGatewayChannel", "GatewayResource", "GatewaySite", "client_left", "is_secure",
]

log = Logger()

class GatewayRequest(Request):
    """
    A request that refuses an oversized body while it arrives, instead of
    spooling all of it first, and that owns its client's wire after the
    response head: on the fast path, every body write goes through one
    L{ClientWriter} (L{client_writer}), which frames, sends and counts.

    @ivar client_gone: whether the client disconnected (set in
        L{connectionLost}, the one place a disconnect arrives).
    """

    too_large = False
    body_length = 0
    client_gone = False
    #: The request's id (its X-Request-ID and history row id), once the
    #: gateway has made its call (L{aura_proxy.call.Call}).
    request_id: Optional[str] = None
    #: What L{GatewayResource} serves this request with: cancelled if the
    #: connection is lost before the response is finished.
    serving: "Optional[Deferred[None]]" = None
    #: The body's writer once opened (L{client_writer}); None: twisted.web's write.
    _writer: Optional[ClientWriter] = None
    #: Whether L{client_writer} may still open one (it tries once, after the head).
    _writer_unasked = True
    #: Body bytes twisted.web's own write counted (the writer counts the rest).
    _sent_by_web = 0
    #: Gives an HTTP/2 connection its idle timeout back (L{process}).
    _release_idle: Optional[Callable[[], None]] = None

    @property
    def sentLength(self) -> int:  # type: ignore[override]
        """Body bytes written, however they went (twisted.web's C{Request.sentLength})."""
        writer = self._writer
        return self._sent_by_web + (writer.sent if writer is not None else 0)

    @sentLength.setter
    def sentLength(self, value: int) -> None:
        writer = self._writer
        self._sent_by_web = value - (writer.sent if writer is not None else 0)

    def client_writer(self) -> Optional[ClientWriter]:
        """
        The writer of this response's body, once its head is out, when the
        fast path is safe: the site's C{fast_path} on, HTTP/1.1 (not HTTP/2:
        an HTTP/2 stream's bytes go through Twisted's H2Connection, framed and
        flow-controlled per stream, by twisted.web's own C{write}),
        plain TCP (not TLS; L{direct_send_transport} decides, and says no when
        Twisted's write buffers are not as expected), a body to send (not
        C{HEAD}, 204 or 304), the client still there.  None: write through
        L{write}, which is then twisted.web's own.
        """
        if self._writer is None and self._writer_unasked and self.startedWriting:
            self._writer_unasked = False
            if (
                not self.finished
                and not self.client_gone
                and self.clientproto == b"HTTP/1.1"
                and self.method != b"HEAD"
                and self.code not in NO_BODY_CODES
                and getattr(getattr(self.channel, "site", None), "fast_path", True)
            ):
                tcp = direct_send_transport(self.channel.transport)  # type: ignore[union-attr]
                if tcp is not None:
                    self._writer = ClientWriter(tcp, bool(self.chunked))
        return self._writer

    def write(self, data: bytes) -> None:
        """
        Body bytes to the client: the head first (twisted.web writes it),
        then through the L{client_writer} when there is one.
        """
        writer = self._writer
        if writer is None and self.startedWriting and self._writer_unasked:
            writer = self.client_writer()
        if writer is not None:
            writer.write(data)
        else:
            Request.write(self, data)

    def _limit(self) -> int:
        return getattr(getattr(self.channel, "site", None), "max_request_body", 0) or 0

    def gotLength(self, length: Optional[int]) -> None:
        limit = self._limit()
        if length is not None and limit and length > limit:
            self.too_large = True
            # Answer before the body arrives; the connection closes after.
            self._reject()
            return
        Request.gotLength(self, length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self.body_length += len(data)
        limit = self._limit()
        if limit and self.body_length > limit:
            self.too_large = True
            self._reject()
            return
        Request.handleContentChunk(self, data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.too_large:
            return
        Request.requestReceived(self, command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        """
        The client is gone: the one path a disconnect takes.  Later writes are
        dropped, and what serves the request is cancelled (which stops the
        upstream request or the relay; see L{GatewayResource}).
        """
        self.client_gone = True
        self._idle_again()
        if self._writer is not None:
            self._writer.lose()
        Request.connectionLost(self, reason)
        serving, self.serving = self.serving, None
        if serving is not None:
            serving.cancel()

    def finish(self) -> None:
        """
        End the response: no body byte after this, and twisted.web's last
        chunk goes through the transport's queue, after every byte before it.
        """
        self.serving = None
        if self._writer is not None:
            self._writer.end()
        Request.finish(self)
        self._idle_again()

    def _idle_again(self) -> None:
        release = self._release_idle
        if release is not None:
            self._release_idle = None
            release()

    def process(self) -> None:
        """
        Hand the request to the site's one resource.

        twisted.web's own C{process} also splits and unquotes the path into
        C{postpath}, walks the resource tree and formats the C{Date} header
        anew for every request; the gateway's resource is a leaf that routes
        by its own patterns, so none of that is needed, and the date is
        formatted once a second.
        """
        self.site = site = self.channel.site  # type: ignore[union-attr,attr-defined]
        if self.clientproto == b"HTTP/2":
            # Not timed out while served, as twisted.web's HTTP/1.1 channel.
            self._release_idle = hold_connection_timeout(self.channel)
        headers = self.responseHeaders
        headers.setRawHeaders(b"server", _SERVER)
        # Wall-clock time, as twisted.web's own: the Date header tells the time of day.
        headers.setRawHeaders(b"date", [_http_date(int(time()))])
        self.prepath = []
        self.postpath = []
        try:
            self.render(site.resource)
        except BaseException:
            self.processingFailed(Failure())

    def _reject(self) -> None:
        channel = self.channel
        error = errors.body_too_large(self._limit())
        transport = channel.transport  # type: ignore[union-attr]
        if transport is None:
            # An HTTP/2 stream (its channel; no transport of its own): the
            # answer ends this stream, the connection's others go on.  The
            # stream is still being set up when gotLength refuses it: answer
            # on the next turn.
            channel.site.reactor.callLater(0, self._reject_stream, error)  # type: ignore[union-attr,attr-defined]
            return
        # The request line is known to the channel only until requestReceived.
        self.method, self.uri, self.clientproto = request_line(channel)
        self.path = self.uri.partition(b"?")[0]
        error, request_id = self._rejected(error)
        body = error.body(request_id)
        head = [
            b"HTTP/1.1 %d %s\r\n" % (error.status, RESPONSES.get(error.status, b"Error")),
            b"Content-Type: application/json\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"X-Request-ID: %s\r\n" % request_id.encode("ascii"),
            b"Connection: close\r\n",
        ]
        for name, values in self.responseHeaders.getAllRawHeaders():  # the gateway's CORS headers
            head += [b"%s: %s\r\n" % (name, value) for value in values]
        transport.write(b"".join(head) + b"\r\n" + body)
        transport.loseConnection()

    def _reject_stream(self, error: Any) -> None:
        """L{_reject} on an HTTP/2 stream: the answer on this stream alone."""
        channel: Any = self.channel
        if channel is None or self.client_gone:
            return
        self.method = channel.command or b""
        self.uri = channel.path or b""
        self.clientproto = b"HTTP/2"
        self.path = self.uri.partition(b"?")[0]
        error, request_id = self._rejected(error)
        body = error.body(request_id)
        headers = Headers({
            b"content-type": [b"application/json"],
            b"content-length": [b"%d" % len(body)],
            b"x-request-id": [request_id.encode("ascii")],
        })
        for name, values in self.responseHeaders.getAllRawHeaders():  # the gateway's CORS headers
            headers.setRawHeaders(name, values)
        channel.writeHeaders(
            b"HTTP/2", b"%d" % error.status, RESPONSES.get(error.status, b"Error"), headers
        )
        channel.write(body)
        channel.loseConnection()
        # The client may still be sending the body: have it stop.
        stop_stream_body(channel)

    def _rejected(self, error: Any) -> "tuple[Any, str]":
        """
        Record the refused call: the answer carries the id of its history
        row.  A check that comes before the body limit (an unrouted path's
        404) may answer instead of C{error}.
        """
        site = getattr(self.channel, "site", None)
        gateway = getattr(site, "gateway", None)
        if gateway is not None:
            return gateway.rejected_body(self, error)  # type: ignore[no-any-return]
        return error, new_request_id()

    def processingFailed(self, reason: Failure) -> Failure:
        """
        The site failed to serve the request (a bug): the gateway's JSON 500
        with a request id, as L{GatewayResource} answers it, never
        twisted.web's HTML page.
        """
        _failed(reason, self)
        return reason


_SERVER = [server_version]
_date_cache: list[Any] = [None, b""]


def _http_date(now: int) -> bytes:
    """The C{Date} header value for Unix time C{now}, formatted once per second."""
    cache = _date_cache
    if cache[0] != now:
        cache[1] = datetimeToString(now)
        cache[0] = now
    return cache[1]  # type: ignore[no-any-return]


class GatewayChannel(HTTPChannel):
    """
    An HTTP/1.1 channel that sends a response head as one piece.

    twisted.web's C{writeHeaders} hands the transport a list of four pieces
    per header, each of them checked on its own.

    @ivar secure: whether the connection is TLS, once a request asked
        (twisted.web adapts the transport to find out, for every request).
    """

    secure: Optional[bool] = None

    def lineLengthExceeded(self, line: bytes) -> None:
        """A request line or header longer than the channel reads: the gateway's 400."""
        _malformed(self)

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        if not isinstance(headers, Headers):
            HTTPChannel.writeHeaders(self, version, code, reason, headers)
            return
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        self.transport.write(b"".join(parts))  # type: ignore[union-attr]


class StockGatewayChannel(HTTPChannel):
    """
    twisted.web's own channel (C{fast_path = off}: every head and body byte
    is written by twisted.web) with the gateway's answer to malformed HTTP.
    """

    def lineLengthExceeded(self, line: bytes) -> None:
        """A request line or header longer than the channel reads: the gateway's 400."""
        _malformed(self)


def _malformed(channel: HTTPChannel) -> None:
    """
    Answer malformed HTTP (a bad request line or header, bad framing, a line
    too long) before any request was made of it: the gateway's JSON 400
    with a request id (body and X-Request-ID, named in a debug log line
    too), then close, as twisted.web's bare 400 does.  No history row:
    there is no request to record.
    """
    request_id = new_request_id()
    body = errors.malformed_http().body(request_id)
    transport = channel.transport
    if transport is not None:
        transport.write(
            b"HTTP/1.1 400 Bad Request\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n"
            b"X-Request-ID: %s\r\n"
            b"Connection: close\r\n\r\n%s" % (len(body), request_id.encode("ascii"), body)
        )
        log.debug(
            "malformed HTTP request from {peer}: 400 bad_request (request {request_id})",
            peer=getattr(transport.getPeer(), "host", "-"), request_id=request_id,
        )
    channel.loseConnection()


#: Whether malformed HTTP gets the gateway's JSON 400 (else twisted.web's bare one).
MALFORMED_ANSWERED = all([
    answer_malformed_requests(GatewayChannel, _malformed),
    answer_malformed_requests(StockGatewayChannel, _malformed),
])

_wrap_channel = channel_protocol_factory()


def _gateway_protocol(site: "GatewaySite") -> Any:
    # twisted.web's default wraps a new channel in the protocol that can
    # switch to HTTP/2 after TLS negotiation; the same, with GatewayChannel
    # (fast_path = off: twisted.web's own channel writes the heads).
    if _wrap_channel is None:
        return Site.protocol(site)  # type: ignore[call-arg]
    return _wrap_channel(GatewayChannel() if site.fast_path else StockGatewayChannel())


class GatewaySite(Site):
    """
    The client-facing site: L{GatewayRequest}s, the body limit, the gateway.

    @ivar fast_path: whether response bodies may go straight to the client's
        socket (L{GatewayRequest.client_writer}) and heads are written by
        L{GatewayChannel}; False: every write is twisted.web's own.
    """

    requestFactory = GatewayRequest
    fast_path = True
    protocol = _gateway_protocol  # type: ignore[assignment]

    def __init__(self, gateway: "Gateway", **kwargs: Any) -> None:
        Site.__init__(self, gateway.resource(), **kwargs)
        self.gateway = gateway
        self.max_request_body = gateway.config.gateway.max_request_body
        self.fast_path = gateway.config.gateway.fast_path
        # twisted.web's own access log (a combined-log line through the
        # logging system, a third of a plain request's CPU) is never used:
        # [log] access is the gateway's (aura_proxy.access_log).
        self.log = lambda request: None  # type: ignore[method-assign]

    def buildProtocol(self, addr: Any) -> Any:
        protocol = Site.buildProtocol(self, addr)
        make_connection = protocol.makeConnection

        def no_delay_first(transport: Any) -> None:
            # Responses are written in pieces (headers, then body or events):
            # Nagle would hold each small piece back for the client's ACK.
            set_no_delay = getattr(transport, "setTcpNoDelay", None)
            if set_no_delay is not None:
                try:
                    set_no_delay(True)
                except OSError:
                    pass
            defer_writes(self.reactor, transport)
            make_connection(transport)

        protocol.makeConnection = no_delay_first
        return protocol


@implementer(IResource)
class GatewayResource:
    """
    Every path of the client-facing site, served by L{Gateway.handle}.

    A plain twisted.web leaf rather than a Klein route: the gateway routes by
    its own patterns, and Klein's per-request routing (a werkzeug URL map bound
    and matched, and closures that leave each request in a reference cycle)
    cost more than twisted.web itself (C{bench/stack-floor}).  Klein serves
    the admin site.
    """

    isLeaf = True

    def __init__(self, gateway: "Gateway") -> None:
        self._gateway = gateway

    def getChildWithDefault(self, name: bytes, request: Request) -> IResource:
        raise RuntimeError("a leaf resource has no children")  # isLeaf: never called

    def putChild(self, path: bytes, child: IResource) -> None:
        raise NotImplementedError("the gateway resource routes by its own patterns")

    def render(self, request: Request) -> int:
        """Start serving C{request}; its response is finished when handle() ends."""
        try:
            served = self._gateway.handle(request)
        except Exception:
            _failed(Failure(), request)
            return NOT_DONE_YET
        # The client went away: stop the upstream request or the relay.
        if isinstance(request, GatewayRequest):
            # No notifyFinish Deferred to make and fire for every request.
            if not served.called:
                request.serving = served
        else:
            request.notifyFinish().addErrback(_cancel, served)
        served.addCallbacks(_served, _failed, callbackArgs=(request,), errbackArgs=(request,))
        return NOT_DONE_YET


def _cancel(reason: Failure, served: "Deferred[None]") -> None:
    served.cancel()


def _served(result: None, request: Request) -> None:
    # A GatewayRequest forgets what serves it in finish() or connectionLost().
    if not request.finished and not client_left(request):
        request.finish()


def _failed(failure: Failure, request: Request) -> None:
    if failure.check(CancelledError):
        return
    # The call's id (L{aura_proxy.call.Call} leaves it on the request), or a
    # new one when the failure came before there was a call: the client's
    # answer and the log line with the traceback name the same id.
    request_id = getattr(request, "request_id", None) or new_request_id()
    log.failure(
        "unhandled error serving {path} (request {request_id})", failure,
        path=_text(request.uri or b""), request_id=request_id,
    )
    if request.finished or client_left(request):
        return
    if request.startedWriting:
        # Half a response is out: the client must not take it for the whole.
        abort_client(request)
        return
    body = errors.internal_error().body(request_id)
    request.setResponseCode(500)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
    request.responseHeaders.setRawHeaders(b"x-request-id", [request_id.encode("ascii")])
    request.write(body)
    request.finish()



def client_left(request: Request) -> bool:
    """Whether the client of C{request}, a response not finished yet, disconnected."""
    if isinstance(request, GatewayRequest):
        return request.client_gone
    # twisted.web's Request.connectionLost lets go of its channel.
    return request.channel is None


def is_secure(request: Request) -> bool:
    """Whether C{request} came over TLS, found out once per L{GatewayChannel}."""
    channel = request.channel
    if type(channel) is not GatewayChannel:
        return request.isSecure()  # type: ignore[no-any-return]
    secure = channel.secure
    if secure is None:
        secure = channel.secure = request.isSecure()
    return secure


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")
