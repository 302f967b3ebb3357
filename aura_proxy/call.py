"""
What one request gathers on its way through the request path.

A L{Call} is the only object the pipeline makes for every request (besides
the Deferreds twisted.web and the upstream client need): each stage reads
what earlier stages put in it and adds its own part; the recording stage
turns it into a history row when the call ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from twisted.internet.defer import Deferred
from twisted.web.iweb import IResponse
from twisted.web.server import Request

from aura_proxy.config import RouteConfig
from aura_proxy.request_ids import new_request_id

if TYPE_CHECKING:
    from aura_proxy.auth.verify import Identity
    from aura_proxy.history.record import CallRecord
    from aura_proxy.limits import Slot
    from aura_proxy.proxy import Pipeline
    from aura_proxy.relay import Relay
    from aura_proxy.resume.replay import Replay

__all__ = ["Call", "body_length"]


class Call:
    """
    One request's state, from the first stage to the history row.

    @ivar pipeline: the pipeline the request started on; it finishes on it
        even when the gateway swaps in a new one meanwhile.
    @ivar finished: fires when the response is finished (for a stream: when
        it ends); made by the stage that takes the request, None before.
    @ivar status: the status the client got (499: the client left first).
    @ivar response_size: body bytes of a response answered whole (a JSON
        error, a body that came with its head); a relay counts its own.
    @ivar end_reason: why a relayed or replayed response ended.
    @ivar client_ip: the client's address: the TCP peer's or, when the peer
        is one of C{[gateway] trusted_proxies}, the one it forwarded.
    @ivar via: the TCP peer when it is a trusted proxy (its X-Forwarded-*
        headers are believed), else None.
    @ivar identity: who the request's verified token says the caller is
        (C{[auth]}); None without one.
    @ivar stream_id: the gateway's id of the SSE stream this call relays or
        replays, or None.
    @ivar resumed_after: a replayed stream's C{Last-Event-ID} sequence
        number, or None.
    @ivar row: the call's history row, made once when it ends, for every
        end stage that describes it (history, the access log).
    @ivar limit_slot: the stream slot the call holds (C{[limits]}), freed
        when it ends; None when it holds none.
    """

    __slots__ = (
        "pipeline", "request", "id", "started", "client_ip", "via", "request_size", "segments", "route",
        "finished", "upstream_call", "timeout", "timed_out", "relay", "replay", "client_gone",
        "status", "response_size", "is_sse", "end_reason", "identity", "stream_id", "resumed_after",
        "row", "limit_slot",
    )

    def __init__(
        self, pipeline: "Pipeline", request: Request, started: float, request_size: int = 0
    ) -> None:
        self.pipeline = pipeline
        self.request = request
        self.id = new_request_id()
        # Also on the request, for an answer made outside the path (a 500).
        request.request_id = self.id  # type: ignore[attr-defined]
        self.started = started
        peer: Optional[str] = getattr(request.getClientAddress(), "host", None)
        self.via: Optional[str] = None
        trusted = pipeline.trusted_proxies
        if trusted is not None and peer is not None and trusted.trusts(peer):
            self.via = peer
            peer = trusted.client_ip(request.requestHeaders, peer)
        self.client_ip = peer
        self.request_size = request_size
        self.segments: list[str] = []
        self.route: Optional[RouteConfig] = None
        self.finished: Optional[Deferred[None]] = None
        self.upstream_call: Optional[Deferred[IResponse]] = None
        #: The response timeout's key (L{aura_proxy.deadlines.Deadlines}).
        self.timeout = 0
        self.timed_out = False
        self.relay: Optional[Relay] = None
        self.replay: Optional[Replay] = None
        self.client_gone = False
        self.status = 0
        self.response_size: Optional[int] = None
        self.is_sse = False
        self.end_reason: Optional[str] = None
        self.identity: Optional[Identity] = None
        self.stream_id: Optional[str] = None
        self.resumed_after: Optional[int] = None
        #: The call's history row once it has ended (L{aura_proxy.stages.recording.Record.row_of}).
        self.row: Optional[CallRecord] = None
        self.limit_slot: Optional[Slot] = None

    def cancel(self, finished: "Deferred[None]") -> None:
        """
        The client went away (L{aura_proxy.site.GatewayResource} cancels
        L{finished}): stop whatever serves it now.
        """
        self.client_gone = True
        if self.relay is not None:
            self.relay.client_gone()
        elif self.replay is not None:
            self.replay.client_gone()
        elif self.upstream_call is not None:
            # Also once connected: the Agent's Deferred then waits on the
            # request in flight, and cancelling it aborts that connection.
            self.upstream_call.cancel()

    def expire(self) -> None:
        """The upstream did not answer within the response timeout: give up on it."""
        self.timed_out = True
        if self.upstream_call is not None:
            self.upstream_call.cancel()

    def describe(self) -> str:
        """The call's route and path, for log lines about its upstream."""
        route = self.route.name if self.route is not None else "-"
        return f"route {route} ({self.request.uri.decode('utf-8', 'replace')})"


def body_length(request: Request) -> int:
    """The size of the request body twisted.web has received (0 when none)."""
    content = getattr(request, "content", None)
    if content is None:
        return 0
    return content.seek(0, 2)  # type: ignore[no-any-return]
