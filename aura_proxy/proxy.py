"""
The request path, in order.

    (body limit, while the body arrives: GatewayRequest) ->
    tenant sources -> parse the path -> CORS preflight -> match a route ->
    header contract -> resume from the stream log, or forward upstream ->
    relay the response (stamping SSE event ids) -> record the call

Each stage lives in its own module (L{aura_proxy.contract},
L{aura_proxy.routes}, L{aura_proxy.resume}, L{aura_proxy.upstream},
L{aura_proxy.relay}, L{aura_proxy.sse}, L{aura_proxy.history}); the order
lives here, in L{Gateway.handle}.  Any stage can end the request
with a L{GatewayError}, answered as JSON and recorded like any other call.
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING, Optional

from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.error import ConnectingCancelledError, ConnectError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.resource import IResource
from twisted.web.server import Request

from aura_proxy import errors
from aura_proxy.config import Config, RouteConfig
from aura_proxy.contract import Cors, HeaderContract, TenantSources, copy_end_to_end, dropping
from aura_proxy.deadlines import Deadlines
from aura_proxy.header_store import canonical, store
from aura_proxy.errors import GatewayError
from aura_proxy.relay import Relay, StreamTransform
from aura_proxy.request_ids import new_request_id
from aura_proxy.resume.log import FOREIGN, Attachment, ResumeLog
from aura_proxy.resume.replay import Replay
from aura_proxy.sse import SseRewriter, make_stream_id, parse_gateway_id
from aura_proxy.routes import MalformedPath, Router, split_path, strip_segments
from aura_proxy.upstream import UpstreamClient, body_producer
from aura_proxy.site import client_left, is_secure

from aura_proxy.history.record import CallRecord

if TYPE_CHECKING:
    from aura_proxy.history import HistoryService

__all__ = ["Gateway"]

log = Logger()

# The gateway owns CORS: an upstream's own Access-Control-* headers would
# contradict (or duplicate) the gateway's.
_CORS_HEADERS = (
    b"access-control-allow-origin",
    b"access-control-allow-credentials",
    b"access-control-allow-methods",
    b"access-control-allow-headers",
    b"access-control-expose-headers",
    b"access-control-max-age",
)
_RESPONSE_DROP = dropping(_CORS_HEADERS)
_SSE_DROP = dropping(_CORS_HEADERS + (b"content-length", b"cache-control"))
# Names as Headers stores them (header_store).
_LAST_EVENT_ID = canonical(b"last-event-id")
_HOST = canonical(b"host")
_REQUEST_ID = canonical(b"x-request-id")
_CONTENT_TYPE = canonical(b"content-type")
_CONTENT_LENGTH = canonical(b"content-length")
_ORIGIN = canonical(b"origin")


class _Call:
    """What one request has gathered on its way through the path."""

    __slots__ = (
        "id", "started", "client_ip", "segments", "route", "relay", "replay", "upstream_call",
        "request_size", "client_gone",
    )

    def __init__(self, started: float, request: Request) -> None:
        self.id = new_request_id()
        self.started = started
        self.client_ip: Optional[str] = getattr(request.getClientAddress(), "host", None)
        self.segments: list[str] = []
        self.route: Optional[RouteConfig] = None
        self.relay: Optional[Relay] = None
        self.replay: Optional[Replay] = None
        self.upstream_call: Optional[Deferred[IResponse]] = None
        self.request_size = 0
        self.client_gone = False


class Gateway:
    """
    The gateway's request path: L{handle} serves one request.

    @param reactor: provides time (timeouts, heartbeats) and is what
        L{UpstreamClient} connects with.
    """

    def __init__(
        self,
        config: Config,
        reactor: IReactorTime,
        client: UpstreamClient,
        history: Optional["HistoryService"] = None,
        resume: Optional[ResumeLog] = None,
    ) -> None:
        """
        @param resume: where streams are logged for C{Last-Event-ID} replay;
            None when C{[sse] resume = off}.
        """
        self.config = config
        self._clock = reactor
        self._client = client
        self._history = history
        self._router: Router[RouteConfig] = Router((r.pattern, r) for r in config.routes)
        self._contract = HeaderContract(config.headers)
        self._cors = Cors(config.cors)
        self._tenants = TenantSources(config.headers.tenant_from)
        self._inject_ids = config.sse.inject_ids
        self._resume = resume if config.sse.inject_ids else None
        self._detach = config.sse.resume_ttl if config.sse.on_client_disconnect == "detach" else 0.0
        g = config.gateway
        self._response_timeout = g.response_timeout
        self._response_deadlines = Deadlines(reactor, g.response_timeout)
        self._connect_timeout = g.connect_timeout
        self._idle_timeout = g.idle_timeout
        self._heartbeat = g.heartbeat_interval
        self._active: set[Relay] = set()
        self._default_source = self._contract.default_for(b"x-dwp-source")
        self._default_caller_type = self._contract.default_for(b"x-dwp-caller-type")

    def resource(self) -> IResource:
        """The resource that serves every path of the client-facing site."""
        from aura_proxy.site import GatewayResource

        return GatewayResource(self)

    # -- the request path ---------------------------------------------------------

    def handle(self, request: Request) -> "Deferred[None]":
        """
        Serve one request; the Deferred fires when the response is finished
        (for a stream: when the stream ends).  Cancelling it (L{GatewayResource}
        does, when the client disconnects) cancels or closes the upstream request.
        """
        call = _Call(self._clock.seconds(), request)
        call.request_size = _body_length(request)
        request.defaultContentType = None
        # First of all: a tenant query parameter must not reach logs or
        # history, whatever answer the request gets.
        self._tenants.apply(request)
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

        last_id = store(headers).get(_LAST_EVENT_ID)
        if last_id and self._inject_ids:
            resumed = parse_gateway_id(_text(last_id[0]))
            if resumed is not None:
                return self._resume_or_forward(request, call, route, resumed)

        return self._forward(request, call, route)

    def _resume_or_forward(
        self,
        request: Request,
        call: _Call,
        route: RouteConfig,
        resumed: tuple[str, int, Optional[bytes]],
    ) -> "Deferred[None]":
        """
        Answer a C{Last-Event-ID} of the gateway's own from the stream's log.
        If the log cannot (expired, evicted, unknown, cut short), the request
        goes upstream as a fresh one with the upstream's own last id (which
        the gateway id carries), or none; another tenant's stream id goes
        upstream as a fresh request with no id at all.
        """
        stream_id, seq, upstream_id = resumed

        def upstream_again(foreign: bool = False) -> "Deferred[None]":
            # Another tenant's stream: nothing of it, not even its upstream
            # id, goes with this request.
            if upstream_id is None or foreign:
                request.requestHeaders.removeHeader(b"last-event-id")
            else:
                request.requestHeaders.setRawHeaders(b"last-event-id", [upstream_id])
            return self._forward(request, call, route)

        if self._resume is None:
            return upstream_again()
        finished: Deferred[None] = Deferred(lambda d: self._cancel(call))
        replay = call.replay = Replay(
            request, self._clock, self._heartbeat, lambda: self._open_sse(request, call, None)
        )

        def attached(attachment: Optional[Attachment]) -> None:
            if attachment is None or attachment is FOREIGN:
                call.replay = None
                upstream_again(foreign=attachment is FOREIGN).chainDeferred(finished)
                return
            replay.attached(attachment)

        def ended(reason: str) -> None:
            self._record(request, call, 200, replay=replay, end_reason=reason)
            if not finished.called:
                finished.callback(None)

        replay.done.addCallback(ended)
        self._resume.attach(stream_id, _owner(request), seq, replay).addCallback(attached)
        return finished

    def _forward(self, request: Request, call: _Call, route: RouteConfig) -> "Deferred[None]":
        url = _upstream_url(route, request.uri)
        incoming = store(request.requestHeaders)
        outgoing = self._contract.upstream_headers(
            request.requestHeaders,
            client_ip=call.client_ip,
            proto=b"https" if is_secure(request) else b"http",
            host=(incoming.get(_HOST) or (None,))[-1],
            extra=() if _REQUEST_ID in incoming else ((_REQUEST_ID, call.id.encode("ascii")),),
        )
        content: IO[bytes] = request.content  # type: ignore[assignment]
        body = body_producer(content, call.request_size, request.method, self._client.cooperator)

        finished: Deferred[None] = Deferred(lambda d: self._cancel(call))
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            assert call.upstream_call is not None
            call.upstream_call.cancel()

        call.upstream_call = self._client.request(request.method, url, outgoing, body)
        timeout = self._response_deadlines.add(expire)

        def got_response(response: IResponse) -> None:
            self._response_deadlines.discard(timeout)
            self._relay(request, call, route, response, finished)

        def got_error(failure: Failure) -> None:
            self._response_deadlines.discard(timeout)
            if finished.called:
                return
            error = None if call.client_gone else self._upstream_error(route, failure, timed_out)
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
        content_type = (store(response.headers).get(_CONTENT_TYPE) or (b"",))[0]
        is_sse = content_type.lower().startswith(b"text/event-stream")
        request.setResponseCode(response.code, response.phrase)
        if is_sse:
            self._open_sse(request, call, response)
        else:
            copy_end_to_end(response.headers, request.responseHeaders, _RESPONSE_DROP)
            out = store(request.responseHeaders)
            if response.length is not UNKNOWN_LENGTH and request.method != b"HEAD":
                # The client parser keeps Content-Length to itself; pass it on
                # so the client gets the same framing as from upstream.
                out[_CONTENT_LENGTH] = [b"%d" % response.length]
            self._add_cors(request)
            out[_REQUEST_ID] = [call.id.encode("ascii")]
            body: Optional[bytes] = getattr(response, "complete_body", None)
            if body is not None:
                # The whole body came with the head (FastAgent, a small
                # response): nothing to relay, time or pace.
                request.write(body)
                if not client_left(request):
                    request.finish()
                self._record(request, call, response.code, response_size=len(body))
                finished.callback(None)
                return

        transform: Optional[StreamTransform] = None
        stream_id: Optional[str] = None
        if is_sse and self._inject_ids:
            stream_id = make_stream_id()
            transform = self._stamper(stream_id, request)

        relay = call.relay = Relay(
            request,
            self._clock,
            idle_timeout=self._idle_timeout,
            heartbeat_interval=self._heartbeat if is_sse else 0.0,
            transform=transform,
            clean_end=is_sse,
            detach_seconds=self._detach if stream_id is not None and self._resume is not None else 0.0,
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
            if stream_id is not None and self._resume is not None:
                if relay.upstream_complete:
                    self._resume.close(stream_id)
                else:
                    self._resume.abandon(stream_id)
            self._record(request, call, response.code, relay=relay, is_sse=is_sse, end_reason=reason)
            if not finished.called:
                finished.callback(None)

        relay.done.addCallback(ended)

    def _stamper(self, stream_id: str, request: Request) -> StreamTransform:
        """The SSE rewriter of a new stream, logging each event when resume is on."""
        if self._resume is None:
            rewriter = SseRewriter.for_stream(stream_id, carry_upstream=True)
        else:
            self._resume.open(stream_id, _owner(request))
            rewriter = SseRewriter.for_stream(
                stream_id, carry_upstream=True, on_event=self._resume.appender(stream_id)
            )
        return _Counted(rewriter)

    def _open_sse(self, request: Request, call: _Call, response: Optional[IResponse]) -> None:
        """Status and headers of an SSE response, relayed or replayed."""
        out = request.responseHeaders
        if response is None:
            request.setResponseCode(200)
            out.setRawHeaders(b"content-type", [b"text/event-stream"])
        else:
            copy_end_to_end(response.headers, out, _SSE_DROP)
        out.setRawHeaders(b"cache-control", [b"no-cache"])
        out.setRawHeaders(b"x-accel-buffering", [b"no"])
        if request.clientproto == b"HTTP/1.1":
            out.setRawHeaders(b"connection", [b"keep-alive"])
        self._add_cors(request)
        out.setRawHeaders(b"x-request-id", [call.id.encode("ascii")])

    def _cancel(self, call: _Call) -> None:
        # GatewayResource cancels handle()'s Deferred when the client disconnects.
        call.client_gone = True
        if call.relay is not None:
            call.relay.client_gone()
        elif call.replay is not None:
            call.replay.client_gone()
        elif call.upstream_call is not None:
            # Also once connected: the Agent's Deferred then waits on the
            # request in flight, and cancelling it aborts that connection.
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
        if client_left(request):
            # Nobody to answer: the client left while the gateway waited.
            self._record(request, call, 499)
            return succeed(None)
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
        self._tenants.apply(request)
        call = _Call(self._clock.seconds(), request)
        try:
            call.segments = split_path(request.path)
            call.route = self._router.match(call.segments)
        except MalformedPath:
            pass
        self._record(request, call, error.status, response_size=len(error.body()))

    def _add_cors(self, request: Request) -> None:
        origin = (store(request.requestHeaders).get(_ORIGIN) or (None,))[-1]
        for name, value in self._cors.response_headers(origin):
            request.responseHeaders.addRawHeader(name, value)

    # -- history ------------------------------------------------------------------

    def _record(
        self,
        request: Request,
        call: _Call,
        status: int,
        relay: Optional[Relay] = None,
        replay: Optional[Replay] = None,
        is_sse: bool = False,
        end_reason: Optional[str] = None,
        response_size: Optional[int] = None,
    ) -> None:
        if self._history is None:
            return
        now = self._clock.seconds()
        found = _recorded_headers(request.requestHeaders)
        path, _, query = (request.uri or b"").partition(b"?")
        if relay is not None and not is_sse:
            response_size = relay.sent
        first_write_at: Optional[float] = None
        events: Optional[int] = None
        if replay is not None:
            is_sse, first_write_at, events = True, replay.first_write_at, replay.events
        elif relay is not None and is_sse:
            first_write_at, events = relay.first_write_at, relay.events
        # Positional, in field order: matching 22 keyword names cost three
        # times as much as building the record (about 1% of a plain request).
        record = CallRecord(
            call.id,  # id
            call.started,  # created_at
            found.get(b"x-tenant-id"),  # tenant_id
            found.get(b"x-user-id"),  # user_id
            found.get(b"x-agent-id"),  # agent_id
            found.get(b"x-dwp-source") or self._default_source,  # source
            found.get(b"x-dwp-caller-type") or self._default_caller_type,  # caller_type
            _text(request.method or b""),  # method
            _text(path),  # path
            call.route.name if call.route is not None else None,  # route
            None if is_sse else (_text(query) or None),  # query_string
            status,  # status_code
            round((now - call.started) * 1000.0, 3),  # latency_ms
            None if is_sse else call.request_size,  # request_size_bytes
            None if is_sse else response_size,  # response_size_bytes
            call.client_ip,  # client_ip
            found.get(b"user-agent"),  # user_agent
            _trace_id(found),  # trace_id
            is_sse,  # is_stream
            (  # first_event_ms
                round((first_write_at - call.started) * 1000.0, 3)
                if first_write_at is not None
                else None
            ),
            events,  # event_count
            end_reason if is_sse else None,  # end_reason
        )
        self._history.record(record)

    # -- shutdown ---------------------------------------------------------------

    def active_streams(self) -> int:
        """How many responses are being relayed now."""
        return len(self._active)

    def shutdown(self, grace: float = 2.0) -> "Deferred[None]":
        """
        End every relayed response (on SIGTERM), each recorded as C{shutdown}.

        SSE clients get a clean end of stream.  The Deferred fires once every
        relay has ended and the clients' connections have drained (or after
        C{grace} seconds), so that the reactor does not cut the last bytes.
        """
        relays = list(self._active)
        transports = [relay.client_transport() for relay in relays]
        for relay in relays:
            relay.stop("shutdown")
        ended = gatherResults([relay.done for relay in relays])

        def drain(_: object) -> "Deferred[None]":
            open_transports = [t for t in transports if t is not None]
            for transport in open_transports:
                transport.loseConnection()
            deadline = self._clock.seconds() + grace
            done: Deferred[None] = Deferred()

            def check() -> None:
                if self._clock.seconds() >= deadline or all(
                    getattr(t, "disconnected", True) for t in open_transports
                ):
                    done.callback(None)
                else:
                    self._clock.callLater(0.05, check)

            check()
            return done

        return ended.addCallback(drain)


class _Counted:
    """An SSE rewriter, with its stamped-event count for the relay to report."""

    __slots__ = ("_rewriter", "feed", "flush")

    def __init__(self, rewriter: SseRewriter) -> None:
        self._rewriter = rewriter
        self.feed = rewriter.feed
        self.flush = rewriter.flush

    @property
    def count(self) -> int:
        return self._rewriter.seq



def _owner(request: Request) -> str:
    # Who may resume a stream: its tenant (the header contract guarantees
    # one outside public paths; public streams share the empty owner).
    return _header(request.requestHeaders, b"x-tenant-id") or ""


def _upstream_url(route: RouteConfig, uri: bytes) -> bytes:
    path, sep, query = uri.partition(b"?")
    return route.upstream_base + strip_segments(path, route.strip_prefix) + sep + query


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


#: The request headers a history row takes values from.
_RECORDED = frozenset(
    (
        b"x-tenant-id", b"x-user-id", b"x-agent-id", b"x-dwp-source", b"x-dwp-caller-type",
        b"user-agent", b"traceparent", b"x-trace-id",
    )
)


def _recorded_headers(headers: Headers) -> dict[bytes, str]:
    """The first value of each of L{_RECORDED} that C{headers} has, as text."""
    # One pass over the few headers a request has: a getRawHeaders() per
    # wanted name cost a quarter of what history adds to a call.
    found = {}
    for name, values in headers.getAllRawHeaders():
        name = name.lower()
        if name in _RECORDED and values:
            found[name] = values[0].decode("utf-8", "replace")
    return found


def _trace_id(found: dict[bytes, str]) -> Optional[str]:
    # W3C traceparent: version-traceid-parentid-flags
    traceparent = found.get(b"traceparent")
    if traceparent:
        parts = traceparent.split("-")
        if len(parts) >= 4 and len(parts[1]) == 32:
            return parts[1]
    return found.get(b"x-trace-id")
