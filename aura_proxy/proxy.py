"""
The request path, in order.

    parse the path -> CORS preflight -> match a route -> body limit ->
    header contract -> forward upstream -> relay the response -> record the call

Each stage lives in its own module (L{aura_proxy.routes},
L{aura_proxy.contract}, L{aura_proxy.upstream}, L{aura_proxy.relay},
L{aura_proxy.history}); the order lives here.  Any stage can end the request
with a L{GatewayError}, answered as JSON and recorded like any other call.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any, Optional

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectingCancelledError, ConnectError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.resource import IResource
from twisted.web.server import Request, Site
from werkzeug.exceptions import NotFound

from aura_proxy import errors
from aura_proxy.config import Config, RouteConfig
from aura_proxy.contract import Cors, HeaderContract, end_to_end
from aura_proxy.errors import GatewayError
from aura_proxy.relay import Relay
from aura_proxy.routes import MalformedPath, Router, split_path, strip_segments
from aura_proxy.upstream import UpstreamClient, body_producer

if TYPE_CHECKING:
    from aura_proxy.history import HistoryService
    from aura_proxy.history.record import CallRecord

__all__ = ["Gateway", "GatewayRequest", "GatewaySite"]

log = Logger()

# The gateway owns CORS: an upstream's own Access-Control-* headers would
# contradict (or duplicate) the gateway's.
_RESPONSE_DROP = frozenset(
    (
        b"access-control-allow-origin",
        b"access-control-allow-credentials",
        b"access-control-allow-methods",
        b"access-control-allow-headers",
        b"access-control-expose-headers",
        b"access-control-max-age",
    )
)
_SSE_DROP = _RESPONSE_DROP | {b"content-length", b"cache-control"}


class GatewayRequest(Request):
    """
    A request that refuses an oversized body while it arrives, instead of
    spooling all of it first.
    """

    too_large = False
    body_length = 0

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

    def _reject(self) -> None:
        channel = self.channel
        # The request line is known to the channel only until requestReceived.
        self.method = getattr(channel, "_command", b"")
        self.uri = getattr(channel, "_path", b"")
        self.path = self.uri.partition(b"?")[0]
        self.clientproto = getattr(channel, "_version", b"HTTP/1.1")
        error = errors.body_too_large(self._limit())
        body = error.body()
        transport = self.channel.transport  # type: ignore[union-attr]
        assert transport is not None
        transport.write(
            b"HTTP/1.1 413 Payload Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(body), body)
        )
        transport.loseConnection()
        site = getattr(self.channel, "site", None)
        gateway = getattr(site, "gateway", None)
        if gateway is not None:
            gateway.rejected_body(self, error)


class GatewaySite(Site):
    """The client-facing site: L{GatewayRequest}s, the body limit, the gateway."""

    requestFactory = GatewayRequest

    def __init__(self, gateway: "Gateway", **kwargs: Any) -> None:
        Site.__init__(self, gateway.resource(), **kwargs)
        self.gateway = gateway
        self.max_request_body = gateway.config.gateway.max_request_body


class _Call:
    """What one request has gathered on its way through the path."""

    __slots__ = ("id", "started", "segments", "route", "relay", "upstream_call", "request_size")

    def __init__(self, started: float) -> None:
        self.id = str(uuid.uuid4())
        self.started = started
        self.segments: list[str] = []
        self.route: Optional[RouteConfig] = None
        self.relay: Optional[Relay] = None
        self.upstream_call: Optional[Deferred[IResponse]] = None
        self.request_size = 0


class Gateway:
    """
    The gateway's request path, as a Klein application.

    @param reactor: provides time (timeouts, heartbeats) and is what
        L{UpstreamClient} connects with.
    """

    app = Klein()

    def __init__(
        self,
        config: Config,
        reactor: IReactorTime,
        client: UpstreamClient,
        history: Optional["HistoryService"] = None,
    ) -> None:
        self.config = config
        self._clock = reactor
        self._client = client
        self._history = history
        self._router: Router[RouteConfig] = Router((r.pattern, r) for r in config.routes)
        self._contract = HeaderContract(config.headers)
        self._cors = Cors(config.cors)
        g = config.gateway
        self._response_timeout = g.response_timeout
        self._connect_timeout = g.connect_timeout
        self._idle_timeout = g.idle_timeout
        self._heartbeat = g.heartbeat_interval
        self._active: set[Relay] = set()

    def resource(self) -> IResource:
        """The Klein resource that serves every path."""
        return self.app.resource()

    # Klein dispatches on the instance: every path, every method.
    @app.route("/", branch=True, strict_slashes=False)
    def _route(self, request: Request) -> "Deferred[None]":
        return self.handle(request)

    @app.handle_errors(NotFound)  # type: ignore[arg-type]
    def _unroutable_by_klein(self, request: Request, failure: Failure) -> "Deferred[None]":
        # werkzeug's path converter refuses paths such as "//x"; the gateway's
        # own router decides about those too.
        return self.handle(request)

    # -- the request path ---------------------------------------------------------

    def handle(self, request: Request) -> "Deferred[None]":
        """
        Serve one request; the Deferred fires when the response is finished
        (for a stream: when the stream ends).  Cancelling it (Klein does, when
        the client disconnects) cancels or closes the upstream request.
        """
        call = _Call(self._clock.seconds())
        call.request_size = _body_length(request)
        request.defaultContentType = None
        headers = request.requestHeaders
        try:
            path = request.path
            call.segments = split_path(path)
        except MalformedPath as e:
            return self._fail(request, call, errors.bad_request(str(e)))

        if Cors.is_preflight(request.method, headers):
            return self._preflight(request, call)

        route = call.route = self._router.match(call.segments)
        if route is None:
            return self._fail(request, call, errors.no_route(_text(path)))

        missing = self._contract.missing(headers, call.segments)
        if missing is not None:
            return self._fail(request, call, errors.missing_header(missing))

        return self._forward(request, call, route)

    def _forward(self, request: Request, call: _Call, route: RouteConfig) -> "Deferred[None]":
        url = _upstream_url(route, request.uri)
        client = request.getClientAddress()
        outgoing = self._contract.upstream_headers(
            request.requestHeaders,
            client_ip=getattr(client, "host", None),
            proto=b"https" if request.isSecure() else b"http",
            host=request.getHeader(b"host"),
            extra=() if request.requestHeaders.hasHeader(b"x-request-id")
            else ((b"x-request-id", call.id.encode("ascii")),),
        )
        content: IO[bytes] = request.content  # type: ignore[assignment]
        body = body_producer(content, call.request_size, request.method, self._client.cooperator)

        finished: Deferred[None] = Deferred(lambda d: self._cancel(call))
        timeout: list[Optional[IDelayedCall]] = [None]
        timed_out = [False]

        def expire() -> None:
            timed_out[0] = True
            assert call.upstream_call is not None
            call.upstream_call.cancel()

        call.upstream_call = self._client.request(request.method, url, outgoing, body)
        timeout[0] = self._clock.callLater(self._response_timeout, expire)

        def got_response(response: IResponse) -> None:
            if timeout[0] is not None and timeout[0].active():
                timeout[0].cancel()
            self._relay(request, call, route, response, finished)

        def got_error(failure: Failure) -> None:
            if timeout[0] is not None and timeout[0].active():
                timeout[0].cancel()
            if finished.called:
                return
            error = self._upstream_error(route, failure, timed_out[0])
            if error is None:  # the client went away first
                self._record(request, call, 499)
                finished.callback(None)
                return
            self._fail(request, call, error).chainDeferred(finished)

        call.upstream_call.addCallbacks(got_response, got_error)
        return finished

    def _relay(
        self,
        request: Request,
        call: _Call,
        route: RouteConfig,
        response: IResponse,
        finished: "Deferred[None]",
    ) -> None:
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        is_sse = content_type.lower().startswith(b"text/event-stream")
        request.setResponseCode(response.code, response.phrase)
        out = request.responseHeaders
        for name, values in end_to_end(response.headers, _SSE_DROP if is_sse else _RESPONSE_DROP):
            out.setRawHeaders(name, values)
        if is_sse:
            out.setRawHeaders(b"cache-control", [b"no-cache"])
            out.setRawHeaders(b"x-accel-buffering", [b"no"])
            if request.clientproto == b"HTTP/1.1":
                out.setRawHeaders(b"connection", [b"keep-alive"])
        elif response.length is not UNKNOWN_LENGTH and request.method != b"HEAD":
            # The client parser keeps Content-Length to itself; pass it on so
            # the client gets the same framing (no chunking) as from upstream.
            out.setRawHeaders(b"content-length", [b"%d" % response.length])
        self._add_cors(request)
        out.setRawHeaders(b"x-request-id", [call.id.encode("ascii")])

        relay = call.relay = Relay(
            request,
            self._clock,
            idle_timeout=self._idle_timeout,
            heartbeat_interval=self._heartbeat if is_sse else 0.0,
            clean_end=is_sse,
            describe=lambda: f"route {route.name} ({_text(request.uri)})",
        )
        self._active.add(relay)
        if is_sse or response.length != 0:
            # Headers go out now, before the first event (a client must see
            # the stream open even when the agent is slow to speak).
            request.write(b"")
        response.deliverBody(relay)

        def ended(reason: str) -> None:
            self._active.discard(relay)
            self._record(request, call, response.code, relay=relay, is_sse=is_sse, end_reason=reason)
            if not finished.called:
                finished.callback(None)

        relay.done.addCallback(ended)

    def _cancel(self, call: _Call) -> None:
        # Klein cancels the handler's Deferred when the client disconnects.
        if call.relay is not None:
            call.relay.client_gone()
        elif call.upstream_call is not None and not call.upstream_call.called:
            call.upstream_call.cancel()

    def _upstream_error(
        self, route: RouteConfig, failure: Failure, timed_out: bool
    ) -> Optional[GatewayError]:
        if timed_out:
            return errors.upstream_timeout(route.name, "send response headers", self._response_timeout)
        if failure.check(ConnectTimeoutError):
            return errors.upstream_timeout(route.name, "accept the connection", self._connect_timeout)
        if failure.check(CancelledError, ConnectingCancelledError):
            return None
        if failure.check(ResponseNeverReceived):
            return errors.upstream_unavailable(route.name, "connection closed before a response")
        if failure.check(DNSLookupError):
            return errors.upstream_unavailable(route.name, "host name not found")
        if failure.check(ConnectError):
            return errors.upstream_unavailable(route.name, "connection refused")
        log.failure("upstream of route {route} failed", failure, route=route.name)
        return errors.upstream_unavailable(route.name, failure.getErrorMessage())

    # -- answers the gateway gives itself ---------------------------------------

    def _preflight(self, request: Request, call: _Call) -> "Deferred[None]":
        allowed = self._cors.preflight(request.requestHeaders)
        if allowed is None:
            return self._fail(request, call, errors.cors_forbidden(), cors=False)
        request.setResponseCode(204)
        for name, value in allowed:
            request.responseHeaders.setRawHeaders(name, [value])
        request.finish()
        self._record(request, call, 204)
        return succeed(None)

    def _fail(
        self, request: Request, call: _Call, error: GatewayError, cors: bool = True
    ) -> "Deferred[None]":
        if error.status >= 500:
            log.warn("{method} {path}: {error}", method=_text(request.method),
                     path=_text(request.path), error=str(error))
        body = error.body(call.id)
        request.setResponseCode(error.status)
        out = request.responseHeaders
        out.setRawHeaders(b"content-type", [b"application/json"])
        out.setRawHeaders(b"content-length", [b"%d" % len(body)])
        out.setRawHeaders(b"x-request-id", [call.id.encode("ascii")])
        if cors:
            self._add_cors(request)
        request.write(body)
        request.finish()
        self._record(request, call, error.status, response_size=len(body))
        return succeed(None)

    def rejected_body(self, request: Request, error: GatewayError) -> None:
        """Record a request refused for its body size before it was routed."""
        call = _Call(self._clock.seconds())
        try:
            call.segments = split_path(request.path)
            call.route = self._router.match(call.segments)
        except MalformedPath:
            pass
        self._record(request, call, error.status, response_size=len(error.body()))

    def _add_cors(self, request: Request) -> None:
        origin = request.getHeader(b"origin")
        for name, value in self._cors.response_headers(origin):
            request.responseHeaders.addRawHeader(name, value)

    # -- history ------------------------------------------------------------------

    def _record(
        self,
        request: Request,
        call: _Call,
        status: int,
        relay: Optional[Relay] = None,
        is_sse: bool = False,
        end_reason: Optional[str] = None,
        response_size: Optional[int] = None,
    ) -> None:
        if self._history is None:
            return
        from aura_proxy.history.record import CallRecord

        now = self._clock.seconds()
        headers = request.requestHeaders
        path, _, query = (request.uri or b"").partition(b"?")
        if relay is not None and not is_sse:
            response_size = relay.sent
        record: CallRecord = CallRecord(
            id=call.id,
            created_at=datetime.fromtimestamp(call.started, timezone.utc),
            tenant_id=_header(headers, b"x-tenant-id"),
            user_id=_header(headers, b"x-user-id"),
            agent_id=_header(headers, b"x-agent-id"),
            source=_header(headers, b"x-dwp-source") or self._contract.default_for(b"x-dwp-source"),
            caller_type=_header(headers, b"x-dwp-caller-type")
            or self._contract.default_for(b"x-dwp-caller-type"),
            method=_text(request.method or b""),
            path=_text(path),
            route=call.route.name if call.route is not None else None,
            query_string=None if is_sse else (_text(query) or None),
            status_code=status,
            latency_ms=round((now - call.started) * 1000.0, 3),
            request_size_bytes=None if is_sse else call.request_size,
            response_size_bytes=None if is_sse else response_size,
            client_ip=getattr(request.getClientAddress(), "host", None),
            user_agent=_header(headers, b"user-agent"),
            trace_id=_trace_id(headers),
            is_stream=is_sse,
            first_event_ms=(
                round((relay.first_write_at - call.started) * 1000.0, 3)
                if is_sse and relay is not None and relay.first_write_at is not None
                else None
            ),
            event_count=relay.events if is_sse and relay is not None else None,
            end_reason=end_reason if is_sse else None,
        )
        self._history.record(record)

    # -- shutdown ---------------------------------------------------------------

    def active_streams(self) -> int:
        """How many responses are being relayed now."""
        return len(self._active)

    def shutdown(self) -> None:
        """End every relayed response (on SIGTERM): each is recorded as C{shutdown}."""
        for relay in list(self._active):
            relay.stop("shutdown")


def _upstream_url(route: RouteConfig, uri: bytes) -> bytes:
    path, sep, query = uri.partition(b"?")
    path = strip_segments(path, route.strip_prefix)
    base = route.upstream
    origin = f"{base.scheme}://{base.to_uri().host}"
    if base.port is not None and base.port != {"http": 80, "https": 443}.get(base.scheme):
        origin += f":{base.port}"
    prefix = "/".join(base.to_uri().path).rstrip("/")
    if prefix:
        origin += "/" + prefix
    return origin.encode("ascii") + path + sep + query


def _body_length(request: Request) -> int:
    content = getattr(request, "content", None)
    if content is None:
        return 0
    return content.seek(0, 2)


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def _header(headers: Headers, name: bytes) -> Optional[str]:
    values = headers.getRawHeaders(name)
    return _text(values[0]) if values else None


def _trace_id(headers: Headers) -> Optional[str]:
    # W3C traceparent: version-traceid-parentid-flags
    traceparent = headers.getRawHeaders(b"traceparent")
    if traceparent:
        parts = traceparent[0].split(b"-")
        if len(parts) >= 4 and len(parts[1]) == 32:
            return _text(parts[1])
    return _header(headers, b"x-trace-id")
