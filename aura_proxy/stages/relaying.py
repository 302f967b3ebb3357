"""
The upstream's response on its way to the client: status and headers shaped
(SSE headers, the gateway's CORS, the request id), the body written at once
when it came whole with the head, else relayed by a L{Relay}, SSE events
stamped with the gateway's ids (and logged for resume).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request

from aura_proxy.config import Config
from aura_proxy.contract import Cors, copy_end_to_end, dropping
from aura_proxy.detached import DetachedStreams
from aura_proxy.header_store import canonical, store
from aura_proxy.relay import PyRelay, Relay
from aura_proxy.resume.log import ResumeLog
from aura_proxy.sse import SseRewriter, make_stream_id
from aura_proxy.site import client_left
from aura_proxy.stages import ResponseStage
from aura_proxy.streams import OpenStreams

if TYPE_CHECKING:
    from aura_proxy.call import Call
    from aura_proxy.metrics import GatewayMetrics

__all__ = ["RelayResponse", "sse_head", "stream_owner"]

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
_REQUEST_ID = canonical(b"x-request-id")
_CONTENT_TYPE = canonical(b"content-type")
_CONTENT_LENGTH = canonical(b"content-length")
_TENANT = canonical(b"x-tenant-id")


class RelayResponse(ResponseStage):
    """
    The response stage: an upstream response to the client.

    @param resume: where stamped events are logged for C{Last-Event-ID}
        replay; None when C{[sse] resume = off}.
    @param streams: where each relay is registered while it runs (for
        C{active_streams} and shutdown).
    @param detached: where a relay whose client left is counted against
        C{[sse] max_detached_streams} and C{max_detached_streams_per_tenant}.
    @param metrics: told when an SSE stream starts (its relay then meters
        it) and ends; None: no figures.
    """

    def __init__(
        self,
        config: Config,
        clock: IReactorTime,
        resume: Optional[ResumeLog],
        streams: OpenStreams,
        detached: Optional[DetachedStreams] = None,
        metrics: Optional["GatewayMetrics"] = None,
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self._cors = Cors(config.cors)
        self._streams = streams
        self._detached = detached if detached is not None else DetachedStreams()
        self._max_detached = config.sse.max_detached_streams
        self._max_detached_per_tenant = config.sse.max_detached_streams_per_tenant
        g = config.gateway
        self._idle_timeout = g.idle_timeout
        self._heartbeat = g.heartbeat_interval
        # fast_path = off: the Python SSE rewriter and relay step, not the C ones.
        self._accelerate = g.fast_path
        self._relay_class = Relay if g.fast_path else PyRelay
        self._inject_ids = config.sse.inject_ids
        self._resume = resume if config.sse.inject_ids else None
        # How long a stream's upstream is still read after its client left.
        self._detach = (
            config.sse.resume_ttl
            if self._resume is not None and config.sse.on_client_disconnect == "detach"
            else 0.0
        )

    def respond(self, request: Request, call: "Call", response: IResponse) -> None:
        """Status and headers now; the body whole, or relayed as it arrives."""
        content_type = (store(response.headers).get(_CONTENT_TYPE) or (b"",))[0]
        is_sse = call.is_sse = content_type.lower().startswith(b"text/event-stream")
        call.status = response.code
        request.setResponseCode(response.code, response.phrase)
        if is_sse:
            sse_head(request, call, self._cors, response)
            stream_id = call.stream_id = make_stream_id() if self._inject_ids else None
            self._relay(request, call, response, stream_id)
            return
        copy_end_to_end(response.headers, request.responseHeaders, _RESPONSE_DROP)
        out = store(request.responseHeaders)
        if response.length is not UNKNOWN_LENGTH and request.method != b"HEAD":
            # The client parser keeps Content-Length to itself; pass it on
            # so the client gets the same framing as from upstream.
            out[_CONTENT_LENGTH] = [b"%d" % response.length]
        self._cors.apply(request.requestHeaders, request.responseHeaders)
        out[_REQUEST_ID] = [call.id.encode("ascii")]
        body: Optional[bytes] = getattr(response, "complete_body", None)
        if body is None:
            self._relay(request, call, response, None)
            return
        # The whole body came with the head (FastAgent, a small response):
        # nothing to relay, time or pace.
        request.write(body)
        if not client_left(request):
            request.finish()
        call.response_size = len(body)
        call.pipeline.end(request, call)

    def _relay(
        self, request: Request, call: "Call", response: IResponse, stream_id: Optional[str]
    ) -> None:
        """The body as it arrives: the one place a L{Relay} is made, started and waited for."""
        is_sse = call.is_sse
        transform = self._stamper(stream_id, request, call) if stream_id is not None else None
        relay = call.relay = self._relay_class(
            request,
            self._clock,
            idle_timeout=self._idle_timeout,
            heartbeat_interval=self._heartbeat if is_sse else 0.0,
            transform=transform,
            clean_end=is_sse,
            detach_seconds=self._detach if stream_id is not None else 0.0,
            describe=call.describe,
            on_detach=(
                self._detaching(request, stream_id) if stream_id is not None and self._detach else None
            ),
        )
        self._streams.add(relay)
        if is_sse and self._metrics is not None:
            self._metrics.stream_started(call, relay, transform.counter if transform is not None else None)
        if is_sse or response.length != 0:
            # Headers go out now, before the first event (a client must see
            # the stream open even when the agent is slow to speak).
            request.write(b"")
        response.deliverBody(relay)
        relay.done.addCallback(self._relay_ended, call, stream_id)

    def _detaching(self, request: Request, stream_id: str) -> "Callable[[Relay], None]":
        """What a relay calls when it detaches: counted against the caps, per tenant."""
        values = store(request.requestHeaders).get(_TENANT)
        tenant = values[0].decode("utf-8", "replace") if values else ""
        detached, max_total, max_per_tenant = self._detached, self._max_detached, self._max_detached_per_tenant

        def detach(relay: Relay) -> None:
            detached.add(relay, tenant, stream_id, max_total, max_per_tenant)

        return detach

    def _relay_ended(self, reason: str, call: "Call", stream_id: Optional[str]) -> None:
        relay = call.relay
        assert relay is not None
        self._streams.discard(relay)
        if self._metrics is not None:
            self._metrics.stream_ended(relay, reason)
        self._detached.discard(relay)
        if stream_id is not None and self._resume is not None:
            cut = getattr(self._resume, "cut", None) if self._streams.draining else None
            if relay.upstream_complete:
                self._resume.close(stream_id)
            elif cut is not None:
                # Cut by this instance's shutdown, not by its upstream: the
                # log stays, marked cut, so that a client resuming on another
                # instance gets what it missed, then goes upstream.
                cut(stream_id)
            else:
                self._resume.abandon(stream_id)
        call.end_reason = reason
        call.pipeline.end(call.request, call)

    def _stamper(self, stream_id: str, request: Request, call: "Call") -> "_Counted":
        """The SSE rewriter of a new stream, logging each event when resume is on."""
        if self._resume is None:
            rewriter = SseRewriter.for_stream(stream_id, carry_upstream=True, accelerate=self._accelerate)
        else:
            self._resume.open(stream_id, stream_owner(request, call))
            rewriter = SseRewriter.for_stream(
                stream_id, carry_upstream=True, on_event=self._resume.appender(stream_id),
                accelerate=self._accelerate,
            )
        return _Counted(rewriter)


def sse_head(request: Request, call: "Call", cors: Cors, response: Optional[IResponse]) -> None:
    """
    Status and headers of an SSE response: relayed (C{response}'s own, less
    Content-Length and Cache-Control) or replayed from a stream log (None).
    """
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
    cors.apply(request.requestHeaders, out)
    out.setRawHeaders(b"x-request-id", [call.id.encode("ascii")])


def stream_owner(request: Request, call: "Call") -> str:
    """
    Who may resume a stream, as one opaque string the stream logs compare:
    its tenant, its verified user (C{[auth]}; none without a token), its
    route and its method.  A C{Last-Event-ID} sent by another user of the
    tenant, or to another route or with another method, replays nothing.
    """
    # The header contract guarantees a tenant outside public paths; with a
    # token, the auth stage has made X-Tenant-ID the token's.
    values = store(request.requestHeaders).get(_TENANT)
    identity = call.identity
    route = call.route
    # JSON: unambiguous whatever characters a tenant or user holds.
    return json.dumps((
        values[0].decode("utf-8", "replace") if values else "",
        identity.user if identity is not None else None,
        route.name if route is not None else None,
        request.method.decode("latin-1"),
    ), separators=(",", ":"))


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

    @property
    def counter(self) -> object:
        """What the relay's metering reads C{seq} from (L{SseRewriter.counter})."""
        return self._rewriter.counter

    @property
    def at_block_end(self) -> bool:
        return self._rewriter.at_block_end
