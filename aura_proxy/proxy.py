"""
The request path, in order.

L{build_pipeline} lists every stage a request meets, top to bottom; each
stage is a small class in L{aura_proxy.stages} with one job.  L{Pipeline}
runs them: each request stage returns "go on", a refusal (a
L{GatewayError}, answered as JSON) or the answer it gave itself; the last
one forwards the request upstream, whose response goes to the response
stage; the end stages (call history) run once for every call when it ends,
however it was answered.

Before the first stage, while the body arrives, L{aura_proxy.site.GatewayRequest}
refuses a body over C{max_request_body} (413); L{Gateway.rejected_body}
records that call too.

A pipeline is built from one frozen L{Config}.  L{Gateway} holds the current
one; L{Gateway.use} swaps in a pipeline built from a new configuration while
the requests in flight finish on the one they started with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import IResource
from twisted.web.server import Request

from aura_proxy.answers import error_answer
from aura_proxy.call import Call, body_length
from aura_proxy.config import Config
from aura_proxy.contract import Cors
from aura_proxy.errors import GatewayError
from aura_proxy.limits import LimitStore, MemoryLimits
from aura_proxy.resume.log import ResumeLog
from aura_proxy.stages import EndStage, ResponseStage, Stage
from aura_proxy.stages.auth import Authenticate
from aura_proxy.stages.forwarding import Forward
from aura_proxy.stages.identity import Identity
from aura_proxy.stages.limits import Limits
from aura_proxy.stages.path import ParsePath
from aura_proxy.stages.preflight import Preflight
from aura_proxy.stages.recording import Record
from aura_proxy.stages.relaying import RelayResponse
from aura_proxy.stages.required_headers import RequiredHeaders
from aura_proxy.stages.resuming import Resume
from aura_proxy.stages.routing import Route
from aura_proxy.stages.tenant import Tenant
from aura_proxy.streams import OpenStreams
from aura_proxy.trusted_proxies import TrustedProxies
from aura_proxy.upstream import UpstreamClient

if TYPE_CHECKING:
    from aura_proxy.history import HistoryService

__all__ = ["Gateway", "Pipeline", "Services", "build_pipeline"]


def build_pipeline(config: Config, services: Services) -> "Pipeline":
    """The request path for C{config}: every stage, in the order a request meets it."""
    clock = services.clock
    return Pipeline(
        config,
        clock,
        request=[
            Tenant(config.headers),  # a query or cookie tenant becomes X-Tenant-ID, first of all
            Identity(config.headers),  # identity headers once, short, clean: or 400, nothing recorded
            ParsePath(),  # percent-decoded segments, or 400 bad_request
            Preflight(config.cors),  # a CORS preflight is answered here: 204, or 403
            Route(config.routes),  # the most specific route, or 404 no_route
            Authenticate(config, clock),  # [auth] JWT: identity from the token, or 401/403
            RequiredHeaders(config.headers),  # the header contract, or 400 missing_header
            Limits(config.limits, services.limits),  # [limits]: 429 over rate or open streams
            Resume(config, clock, services.resume),  # our Last-Event-ID: replayed from the log
            Forward(config, clock, services.client),  # upstream, within response_timeout: 502/504
        ],
        response=RelayResponse(config, clock, services.resume, services.streams),  # SSE, ids
        ended=[
            Record(config.headers, clock, services.history),  # one history row per call
        ],
    )


@dataclass(frozen=True)
class Services:
    """
    What every pipeline of a gateway shares, whatever its configuration.

    @ivar clock: time and timers (the reactor).
    @ivar client: the upstream connection pool.
    @ivar history: call history, or None when it is off.
    @ivar resume: the stream log, or None when C{[sse] resume = off}.
    @ivar streams: the responses being relayed, for shutdown.
    @ivar limits: the counts of C{[limits]} (open streams, token buckets).
    """

    clock: IReactorTime
    client: UpstreamClient
    history: Optional["HistoryService"]
    resume: Optional[ResumeLog]
    streams: OpenStreams
    limits: LimitStore


class Pipeline:
    """
    Runs requests through an ordered list of stages.

    @ivar config: the configuration the stages were built from.
    @ivar clock: the time source (call start and end times).
    @ivar stages: the request stages, in order.
    @ivar response: where an upstream response goes.
    @ivar ended: what runs when a call ends, in order (after the request
        stages that are end stages too, e.g. L{Limits}, freeing a stream slot).
    """

    def __init__(
        self,
        config: Config,
        clock: IReactorTime,
        request: Sequence[Stage],
        response: ResponseStage,
        ended: Sequence[EndStage],
    ) -> None:
        self.config = config
        self.clock = clock
        self.stages = tuple(request)
        self.response = response
        self.ended = tuple(ended)
        self._seconds = clock.seconds
        self._cors = Cors(config.cors)
        #: Whose X-Forwarded-* to believe (read by each L{Call}); None: nobody's.
        self.trusted_proxies = TrustedProxies.of(config.gateway.trusted_proxies)
        # Bound once: the per-request loops call these directly.
        self._runs = tuple(stage.run for stage in self.stages)
        self._classifying = tuple(stage.run for stage in self.stages if stage.classifies)
        self._end_runs = tuple(
            stage.ended for stage in (*(s for s in self.stages if isinstance(s, EndStage)), *self.ended)
        )
        self.respond = response.respond

    def handle(self, request: Request) -> "Deferred[None]":
        """
        Serve one request; the Deferred fires when the response is finished
        (for a stream: when the stream ends).  Cancelling it (L{GatewayResource}
        does, when the client disconnects) cancels or closes the upstream request.
        """
        call = Call(self, request, self._seconds(), body_length(request))
        request.defaultContentType = None
        for run in self._runs:
            answer = run(request, call)
            if answer is not None:
                if isinstance(answer, GatewayError):
                    return self._refused(request, call, answer)
                return answer
        raise RuntimeError("no stage answered the request")  # the last one always does

    def go_on(self, request: Request, call: Call, after: Stage) -> "Deferred[None]":
        """
        Run the stages after C{after} for a request C{after} took and then
        let go (a resumed stream that the log cannot replay).
        """
        for run in self._runs[self.stages.index(after) + 1:]:
            answer = run(request, call)
            if answer is not None:
                if isinstance(answer, GatewayError):
                    return self._refused(request, call, answer)
                return answer
        raise RuntimeError("no stage answered the request")

    def _refused(self, request: Request, call: Call, error: GatewayError) -> "Deferred[None]":
        self.refuse(request, call, error)
        return call.finished or succeed(None)

    def refuse(self, request: Request, call: Call, error: GatewayError, cors: bool = True) -> None:
        """Answer C{error} as JSON (with the gateway's CORS headers, unless C{cors} is false) and end the call."""
        error_answer(request, call, error, self._cors if cors else None)
        self.end(request, call)

    def end(self, request: Request, call: Call) -> None:
        """The call has ended: run the end stages, then fire C{call.finished}."""
        for ended in self._end_runs:
            ended(request, call)
        finished = call.finished
        if finished is not None and not finished.called:
            finished.callback(None)

    def rejected(self, request: Request, error: GatewayError) -> None:
        """
        Record a request refused before the path (a body over the limit,
        answered by the site): the stages that classify it tell its tenant,
        path and route.
        """
        # Its body is not the gateway's to measure: the site stopped reading it.
        call = Call(self, request, self._seconds())
        for run in self._classifying:
            if run(request, call) is not None:
                break
        call.status = error.status
        call.response_size = len(error.body())
        self.end(request, call)


class Gateway:
    """
    The gateway's request path, for the client-facing site: L{handle} serves
    one request on the current L{Pipeline}.

    @param reactor: provides time (timeouts, heartbeats) and is what
        L{UpstreamClient} connects with.
    @param resume: where streams are logged for C{Last-Event-ID} replay;
        None when C{[sse] resume = off}.
    @param limits: the counts of C{[limits]} (default: in this process).
    """

    def __init__(
        self,
        config: Config,
        reactor: IReactorTime,
        client: UpstreamClient,
        history: Optional["HistoryService"] = None,
        resume: Optional[ResumeLog] = None,
        limits: Optional[LimitStore] = None,
    ) -> None:
        self.streams = OpenStreams(reactor)
        self.limits = limits if limits is not None else MemoryLimits(reactor)
        self._services = Services(reactor, client, history, resume, self.streams, self.limits)
        self.pipeline = build_pipeline(config, self._services)

    @property
    def config(self) -> Config:
        """The configuration of the current pipeline."""
        return self.pipeline.config

    def use(self, config: Config) -> None:
        """
        Serve new requests on a pipeline built from C{config}; requests in
        flight finish on the pipeline they started on.  (The listeners,
        the upstream pool, history and the stream log stay as they are.)
        """
        self.pipeline = build_pipeline(config, self._services)

    def resource(self) -> IResource:
        """The resource that serves every path of the client-facing site."""
        from aura_proxy.site import GatewayResource

        return GatewayResource(self)

    def handle(self, request: Request) -> "Deferred[None]":
        """Serve one request (L{Pipeline.handle}), counted in flight until it ends."""
        served = self.pipeline.handle(request)
        if served.called:
            return served
        return self.streams.track(served)

    def rejected_body(self, request: Request, error: GatewayError) -> None:
        """Record a request refused for its body size before it was routed."""
        self.pipeline.rejected(request, error)

    def active_streams(self) -> int:
        """How many responses are being relayed now."""
        return len(self.streams)

    def drain(self, timeout: float) -> "Deferred[None]":
        """Let calls in flight finish for up to C{timeout} seconds (on SIGTERM); see L{OpenStreams.drain}."""
        return self.streams.drain(timeout)

    def shutdown(
        self, grace: float = 2.0, then: Optional[Callable[[], "Deferred[Any]"]] = None
    ) -> "Deferred[None]":
        """End every relayed response (on SIGTERM); see L{OpenStreams.shutdown}."""
        return self.streams.shutdown(grace, then)

