"""
Resume: a C{Last-Event-ID} that is one of the gateway's own event ids is
answered from the stream log (the events the client missed, then the live
rest), without asking the upstream again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from aura_proxy.config import Config
from aura_proxy.contract import Cors
from aura_proxy.header_store import canonical, store
from aura_proxy.resume.log import FOREIGN, Attachment, ResumeLog
from aura_proxy.resume.replay import Replay
from aura_proxy.sse import parse_gateway_id
from aura_proxy.stages import GO_ON, Answer, Stage
from aura_proxy.stages.relaying import sse_head, stream_owner

if TYPE_CHECKING:
    from aura_proxy.call import Call
    from aura_proxy.metrics import GatewayMetrics

__all__ = ["Resume"]

_LAST_EVENT_ID = canonical(b"last-event-id")


class Resume(Stage):
    """
    Replays a stream from the log for a C{Last-Event-ID} of the gateway's.

    When the log cannot (expired, evicted, unknown, cut short) the request
    goes on upstream as a fresh one, with the upstream's own last id (which
    the gateway id carries) or none; another owner's stream id (another
    tenant, another verified user, another route or method: L{stream_owner})
    goes on with no id at all.  Any other C{Last-Event-ID} goes upstream unchanged.

    @param log: the stream log; None when C{[sse] resume = off}.
    @param metrics: told when a replay starts and ends; None: no figures.
    """

    def __init__(
        self,
        config: Config,
        clock: IReactorTime,
        log: Optional[ResumeLog],
        metrics: Optional["GatewayMetrics"] = None,
    ) -> None:
        self._metrics = metrics
        self._clock = clock
        self._cors = Cors(config.cors)
        self._heartbeat = config.gateway.heartbeat_interval
        self._inject_ids = config.sse.inject_ids
        self._log = log if config.sse.inject_ids else None

    def run(self, request: Request, call: "Call") -> Answer:
        """Replay, or go on (the Last-Event-ID header rewritten for the upstream)."""
        last_id = store(request.requestHeaders).get(_LAST_EVENT_ID)
        if not last_id or not self._inject_ids:
            return GO_ON
        resumed = parse_gateway_id(last_id[0].decode("utf-8", "replace"))
        if resumed is None:
            return GO_ON
        stream_id, seq, upstream_id = resumed
        log = self._log
        if log is None:
            _upstream_again(request, upstream_id)
            return GO_ON
        call.stream_id, call.resumed_after = stream_id, seq
        finished = call.finished
        if finished is None:  # (an earlier stage that waited, e.g. for JWKS keys, made one)
            finished = call.finished = Deferred(call.cancel)
        replay = call.replay = Replay(
            request, self._clock, self._heartbeat,
            lambda: sse_head(request, call, self._cors, None),
        )
        replay.done.addCallback(self._replay_ended, call)
        log.attach(stream_id, stream_owner(request, call), seq, replay).addCallback(
            self._attached, call, upstream_id
        )
        return finished

    def _attached(
        self, attachment: Optional[Attachment], call: "Call", upstream_id: Optional[bytes]
    ) -> None:
        replay = call.replay
        assert replay is not None
        if call.client_gone:
            # The client left while the log looked: nobody to replay to, nor
            # to send upstream for.
            if attachment is not None:
                attachment.detach()
            return
        if attachment is not None and attachment is not FOREIGN:
            if self._metrics is not None:
                self._metrics.replay_started(call, replay)
            replay.attached(attachment)
            return
        # Not replayable: upstream after all, through the stages after this one
        # (as a new stream, with an id of its own).
        call.replay = None
        call.stream_id = call.resumed_after = None
        # Another tenant's stream: nothing of it, not even its upstream id,
        # goes with this request.
        _upstream_again(call.request, None if attachment is FOREIGN else upstream_id)
        call.pipeline.go_on(call.request, call, after=self)

    def _replay_ended(self, reason: str, call: "Call") -> None:
        if self._metrics is not None and call.replay is not None:
            self._metrics.replay_ended(call.replay, reason)
        call.status = 200
        call.end_reason = reason
        call.pipeline.end(call.request, call)


def _upstream_again(request: Request, upstream_id: Optional[bytes]) -> None:
    """The request's Last-Event-ID for the upstream: its own last id, or none."""
    if upstream_id is None:
        request.requestHeaders.removeHeader(b"last-event-id")
    else:
        request.requestHeaders.setRawHeaders(b"last-event-id", [upstream_id])
