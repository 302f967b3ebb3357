"""
C{[limits]}: a tenant over its request rate, or over its (or the gateway's)
open streams, gets 429 with C{Retry-After}.

A I{stream} is a request that asks for one (C{Accept: text/event-stream},
what C{EventSource} and fetch-based SSE clients send): it takes a slot here,
before it goes upstream, and gives it back when its call ends, for any
reason (the stream ended, the client left, the upstream failed, shutdown).
A plain request takes no slot.  The request rate counts every request of a
tenant (a token bucket).  A request without a tenant (a public path) counts
only towards C{max_streams_total}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from aura_proxy import errors
from aura_proxy.config import LimitsConfig
from aura_proxy.errors import GatewayError
from aura_proxy.header_store import canonical, store
from aura_proxy.limits import Decision, LimitStore, Slot, retry_after
from aura_proxy.stages import GO_ON, Answer, EndStage, Stage

if TYPE_CHECKING:
    from aura_proxy.call import Call

__all__ = ["Limits", "asks_for_stream"]

_log = Logger("aura_proxy.limits")
_TENANT = canonical(b"x-tenant-id")
_ACCEPT = canonical(b"accept")


def asks_for_stream(request: Request) -> bool:
    """Whether C{request} asks for an event stream (its Accept names text/event-stream)."""
    values = store(request.requestHeaders).get(_ACCEPT)
    return values is not None and any(b"text/event-stream" in v.lower() for v in values)


class Limits(Stage, EndStage):
    """
    Checks the tenant's request rate, then (for a stream) takes its slot; a
    stream's slot is freed when its call ends (L{ended}, run by the pipeline
    with its end stages).

    @param store: the counts, shared by every pipeline of the gateway (a
        reload changes the limits, not the counts); None: no limits.
    """

    def __init__(self, config: LimitsConfig, store: Optional[LimitStore]) -> None:
        self._off = not config.enabled or store is None
        if store is None:
            return
        self._store = store
        self._per_tenant = config.max_streams_per_tenant
        self._total = config.max_streams_total
        self._counts_streams = bool(self._per_tenant or self._total)
        self._rate = config.requests_per_second_per_tenant
        self._burst = config.bucket_size

    def run(self, request: Request, call: "Call") -> Answer:
        """Go on, refuse with 429, or (counting in Redis) answer once the counts have."""
        if self._off:
            return GO_ON
        values = store(request.requestHeaders).get(_TENANT)
        tenant = values[0].decode("utf-8", "replace") if values else ""
        if self._rate and tenant:
            rated = self._store.take_token(tenant, self._rate, self._burst)
            if isinstance(rated, Deferred):
                return self._later(call, rated.addCallback(self._then_stream, request, call, tenant))
            if rated is not None:
                return _too_many(request, "request_rate", rated)
        if not (self._counts_streams and asks_for_stream(request)):
            return GO_ON
        taken = self._store.open_stream(tenant, self._per_tenant if tenant else 0, self._total)
        if isinstance(taken, Deferred):
            return self._later(call, taken.addCallback(self._slot, request, call))
        return self._slot(taken, request, call)

    def _then_stream(self, rated: Decision, request: Request, call: "Call", tenant: str) -> Any:
        """After the token (from Redis): the stream slot, or the refusal."""
        if rated is not None:
            return _too_many(request, "request_rate", rated)
        if not (self._counts_streams and asks_for_stream(request)):
            return GO_ON
        taken = self._store.open_stream(tenant, self._per_tenant if tenant else 0, self._total)
        if isinstance(taken, Deferred):
            return taken.addCallback(self._slot, request, call)
        return self._slot(taken, request, call)

    def _slot(self, taken: tuple[Decision, Optional[Slot]], request: Request, call: "Call") -> Answer:
        wait, slot = taken
        if slot is None:
            assert wait is not None
            return _too_many(request, "streams", wait)
        if call.client_gone:
            slot.release()
            return GO_ON
        call.limit_slot = slot
        return GO_ON

    def _later(self, call: "Call", decided: "Deferred[Any]") -> "Deferred[None]":
        """The request waits for Redis's answer, then goes on or is refused."""
        finished = call.finished
        if finished is None:
            finished = call.finished = Deferred(call.cancel)
        decided.addCallbacks(self._decided, self._failed, callbackArgs=(call,), errbackArgs=(call,))
        return finished

    def _failed(self, failure: Failure, call: "Call") -> None:
        """The store failed unexpectedly: logged, and the request goes on (limits never stop traffic)."""
        _log.failure("limits: counting failed; the request goes on unlimited", failure)
        self._decided(None, call)

    def _decided(self, answer: Optional[GatewayError], call: "Call") -> None:
        request = call.request
        if call.client_gone:
            call.status = 499
            call.pipeline.end(request, call)
            return
        if answer is None:
            call.pipeline.go_on(request, call, after=self)
        else:
            call.pipeline.refuse(request, call, answer)

    def ended(self, request: Request, call: "Call") -> None:
        """The call has ended: its stream slot (if it took one) is free."""
        slot = call.limit_slot
        if slot is not None:
            call.limit_slot = None
            slot.release()


def _too_many(request: Request, what: str, seconds: float) -> GatewayError:
    """The 429, its C{Retry-After} set on the response."""
    request.responseHeaders.setRawHeaders(b"retry-after", [retry_after(seconds)])
    if what == "streams":
        return errors.too_many_streams()
    return errors.rate_limited()
