"""
The request path, in order.

L{build_pipeline} lists every stage a request meets, top to bottom; each
stage is a small class in L{aura_proxy.stages} with one job.  L{Pipeline}
runs them: each request stage returns "go on", a refusal (a
L{GatewayError}, answered as JSON) or the answer it gave itself; the last
one forwards the request upstream, whose response goes to the response
stage; the end stages (call history, the access log) run once for every
call when it ends, however it was answered.

Before the first stage, while the body arrives, L{aura_proxy.site.GatewayRequest}
refuses a body over C{max_request_body}: L{Gateway.rejected_body} runs the
stages that classify a request (tenant, identity, path, route) first, so an
unrouted path is a 404 whatever its body, then answers 413, and records the call.

A pipeline is built from one frozen L{Config}.  L{Gateway} holds the current
one; L{Gateway.use} swaps in a pipeline built from a new configuration while
the requests in flight finish on the one they started with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import IResource
from twisted.web.server import Request

from aura_proxy.access_log import line_format
from aura_proxy.answers import error_answer
from aura_proxy.call import Call, body_length
from aura_proxy.config import Config
from aura_proxy.contract import Cors
from aura_proxy.detached import DetachedStreams
from aura_proxy.errors import GatewayError
from aura_proxy.limits import LimitStore, MemoryLimits
from aura_proxy.resume.log import MemoryResumeLog, ResumeLog
from aura_proxy.stages import EndStage, ResponseStage, Stage
from aura_proxy.stages.access_log import AccessLog
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
    from aura_proxy.metrics import GatewayMetrics

__all__ = ["Gateway", "Pipeline", "Services", "build_pipeline"]


def build_pipeline(config: Config, services: Services) -> "Pipeline":
    """The request path for C{config}: every stage, in the order a request meets it."""
    clock = services.clock
    # [metrics] enabled = false: no stage gets it, nothing is counted.
    metrics = services.metrics if config.metrics.enabled else None
    record = Record(config.headers, clock, services.history)
    access = services.access_log
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
            Resume(config, clock, services.resume, metrics),  # our Last-Event-ID: replayed from the log
            Forward(config, clock, services.client, metrics),  # upstream, within response_timeout: 502/504
        ],
        response=RelayResponse(config, clock, services.resume, services.streams, services.detached, metrics),  # SSE, ids
        ended=[
            record,  # one history row per call
            # one access-log line per call, from the same row ([log] access = off: none)
            *([AccessLog(record, line_format(config.log.format), access)] if access is not None else []),
            *([metrics] if metrics is not None else []),  # [metrics]: every call counted
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
    @ivar access_log: takes each access-log line (the writer's C{write}),
        or None when C{[log] access = off}.
    @ivar detached: the relayed streams whose client left, and their caps.
    @ivar metrics: the process's figures (L{aura_proxy.metrics}), or None
        when C{[metrics] enabled = false}.
    @ivar limits: the counts of C{[limits]} (open streams, token buckets);
        the gateway always gives one.
    """

    clock: IReactorTime
    client: UpstreamClient
    history: Optional["HistoryService"]
    resume: Optional[ResumeLog]
    streams: OpenStreams
    access_log: Optional[Callable[[str], None]] = None
    detached: DetachedStreams = field(default_factory=DetachedStreams)
    metrics: Optional["GatewayMetrics"] = None
    limits: Optional[LimitStore] = None


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

    def rejected(self, request: Request, error: GatewayError) -> tuple[GatewayError, str]:
        """
        Answer for, and record, a request refused before the path (a body
        over the limit, answered by the site): the stages that classify it
        (tenant, identity, path, route) run first, so that their refusal
        (an unrouted path's 404, a bad path's 400) is the answer rather than
        C{error}; they also tell its tenant, path and route.  The gateway's
        CORS headers are set on C{request.responseHeaders}.

        @return: the error to answer and the call's request id (the id of its
            history row), for the site to write.
        """
        # Its body is not the gateway's to measure: the site stopped reading it.
        call = Call(self, request, self._seconds())
        for run in self._classifying:
            answer = run(request, call)
            if answer is not None:
                if isinstance(answer, GatewayError):
                    error = answer
                break
        call.status = error.status
        call.response_size = len(error.body(call.id))
        self._cors.apply(request.requestHeaders, request.responseHeaders)
        self.end(request, call)
        return error, call.id


class Gateway:
    """
    The gateway's request path, for the client-facing site: L{handle} serves
    one request on the current L{Pipeline}.

    @param reactor: provides time (timeouts, heartbeats) and is what
        L{UpstreamClient} connects with.
    @param resume: where streams are logged for C{Last-Event-ID} replay;
        None when C{[sse] resume = off}.
    @param access_log: takes each access-log line; None when C{[log] access = off}.
    @param limits: the counts of C{[limits]} (default: in this process).
    """

    def __init__(
        self,
        config: Config,
        reactor: IReactorTime,
        client: UpstreamClient,
        history: Optional["HistoryService"] = None,
        resume: Optional[ResumeLog] = None,
        access_log: Optional[Callable[[str], None]] = None,
        metrics: Optional["GatewayMetrics"] = None,
        limits: Optional[LimitStore] = None,
    ) -> None:
        """@param metrics: the process's figures; None: none are kept."""
        self.streams = OpenStreams(reactor)
        self.metrics = metrics
        #: The relayed streams whose client left (L{DetachedStreams}).
        self.detached = DetachedStreams()
        if isinstance(resume, MemoryResumeLog):
            # The memory log's global cap drops detached streams' logs before open ones'.
            resume.detached = self.detached
        self.limits = limits if limits is not None else MemoryLimits(reactor)
        self._services = Services(
            reactor, client, history, resume, self.streams, access_log, self.detached, metrics, self.limits
        )
        self.pipeline = build_pipeline(config, self._services)

    @property
    def config(self) -> Config:
        """The configuration of the current pipeline."""
        return self.pipeline.config

    def use(self, config: Config) -> None:
        """
        Serve new requests on a pipeline built from C{config}; requests in
        flight finish on the pipeline they started on.  (The listeners,
        the upstream pool, history, the stream log and where the access log
        goes stay as they are; its format follows C{config}.)
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

    def rejected_body(self, request: Request, error: GatewayError) -> tuple[GatewayError, str]:
        """
        A request refused for its body size while it arrived: the error to
        answer (C{error}, or the refusal of a check that comes before the
        body limit: L{Pipeline.rejected}) and the call's request id, both
        for the site's answer (body and X-Request-ID); the call is recorded.
        """
        return self.pipeline.rejected(request, error)

    def active_streams(self) -> int:
        """How many responses are being relayed now."""
        return len(self.streams)

    def drain(self, timeout: float) -> "Deferred[None]":
        """Let calls in flight finish for up to C{timeout} seconds (on SIGTERM); see L{OpenStreams.drain}."""
        return self.streams.drain(timeout)

    def bounds(self) -> dict[str, object]:
        """
        The figures of C{[sse]}'s memory bounds: detached streams and their
        caps' cancellations (L{DetachedStreams.stats}), and with C{resume =
        memory} the stream logs' bytes (L{MemoryResumeLog.stats}).
        """
        figures: dict[str, object] = dict(self.detached.stats())
        resume = self._services.resume
        if isinstance(resume, MemoryResumeLog):
            figures["resume"] = resume.stats()
        return figures

    def shutdown(
        self, grace: float = 2.0, then: Optional[Callable[[], "Deferred[Any]"]] = None
    ) -> "Deferred[None]":
        """End every relayed response (on SIGTERM); see L{OpenStreams.shutdown}."""
        return self.streams.shutdown(grace, then)

