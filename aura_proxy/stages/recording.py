"""
The last stage: every call, when it ends, becomes one row of call history
(L{CallRecord}; a stream is one summary row).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from aura_proxy.config import HeadersConfig
from aura_proxy.contract import HeaderContract
from aura_proxy.history.record import CallRecord
from aura_proxy.stages import EndStage

if TYPE_CHECKING:
    from aura_proxy.call import Call
    from aura_proxy.history import HistoryService

__all__ = ["Record", "recorded_headers", "trace_id"]


class Record(EndStage):
    """
    Hands each ended call to call history, which never blocks nor raises.

    @param history: None when C{[history] enabled = false}: nothing is recorded.
    """

    def __init__(
        self, config: HeadersConfig, clock: IReactorTime, history: Optional["HistoryService"]
    ) -> None:
        self._seconds = clock.seconds
        self._history = history
        contract = HeaderContract(config)
        # What a row says when the request had none and went upstream (the
        # default it went with).
        self._default_source = contract.default_for(b"x-dwp-source")
        self._default_caller_type = contract.default_for(b"x-dwp-caller-type")

    def ended(self, request: Request, call: "Call") -> None:
        """Record C{call}."""
        if self._history is not None:
            self._history.record(self.row_of(request, call))

    def row_of(self, request: Request, call: "Call") -> CallRecord:
        """
        The history row of an ended call, made once: kept on C{call} for the
        other end stages (the access log) that describe the call.
        """
        row = call.row
        if row is None:
            row = call.row = self.row(request, call)
        return row

    def row(self, request: Request, call: "Call") -> CallRecord:
        """
        The history row of an ended call.

        A stream's figures are what its client got: events and bytes written
        to it, and the time, until it left; a relay that went on reading
        into the stream log after that (detached) adds its tail as
        C{detached_event_count} and C{detached_ms}.  The row is made once,
        when the call ends: for a detached stream, when its tail ends.
        """
        now = self._seconds()
        found = recorded_headers(request.requestHeaders)
        path, _, query = (request.uri or b"").partition(b"?")
        is_sse = call.is_sse
        response_size = call.response_size
        first_write_at: Optional[float] = None
        events: Optional[int] = None
        ended = now
        tail_events: Optional[int] = None
        tail_ms: Optional[float] = None
        replay = call.replay
        relay = call.relay
        if replay is not None:
            is_sse, first_write_at, events = True, replay.first_write_at, replay.events
            response_size = replay.sent
        elif relay is not None:
            response_size = relay.sent
            left_at = relay.left_at
            if left_at is not None:
                ended = left_at
            if is_sse:
                first_write_at, events = relay.first_write_at, relay.delivered
                detached_at = relay.detached_at
                if detached_at is not None:
                    tail_events = relay.detached_events
                    tail_ms = round((now - detached_at) * 1000.0, 3)
        started = call.started
        identity = call.identity
        # What went upstream: the client's header, else the configured default;
        # a call that never went upstream records only what the client sent.
        forwarded = call.upstream_call is not None
        # Positional, in field order: matching 26 keyword names cost three
        # times as much as building the record (about 1% of a plain request).
        return CallRecord(
            call.id,  # id
            started,  # created_at
            # A verified token's identity, not what a later stage or the
            # client left in the headers.
            found.get(b"x-tenant-id") if identity is None or identity.tenant is None
            else identity.tenant,  # tenant_id
            found.get(b"x-user-id") if identity is None else identity.user,  # user_id
            found.get(b"x-agent-id") if identity is None or identity.agent is None
            else identity.agent,  # agent_id
            found.get(b"x-dwp-source", self._default_source if forwarded else None),  # source
            found.get(
                b"x-dwp-caller-type", self._default_caller_type if forwarded else None
            ),  # caller_type
            (request.method or b"").decode("utf-8", "replace"),  # method
            path.decode("utf-8", "replace"),  # path
            call.route.name if call.route is not None else None,  # route
            None if is_sse else (query.decode("utf-8", "replace") or None),  # query_string
            call.status,  # status_code
            round((ended - started) * 1000.0, 3),  # latency_ms
            None if is_sse else call.request_size,  # request_size_bytes
            response_size,  # response_size_bytes
            call.client_ip,  # client_ip
            found.get(b"user-agent"),  # user_agent
            trace_id(found),  # trace_id
            is_sse,  # is_stream
            (  # first_event_ms
                round((first_write_at - started) * 1000.0, 3)
                if first_write_at is not None
                else None
            ),
            events,  # event_count
            call.end_reason if is_sse else None,  # end_reason
            call.stream_id if is_sse else None,  # stream_id
            call.resumed_after if is_sse else None,  # resumed_after
            tail_events,  # detached_event_count
            tail_ms,  # detached_ms
        )


#: The request headers a history row takes values from.
_RECORDED = frozenset(
    (
        b"x-tenant-id", b"x-user-id", b"x-agent-id", b"x-dwp-source", b"x-dwp-caller-type",
        b"user-agent", b"traceparent", b"x-trace-id",
    )
)


def recorded_headers(headers: Headers) -> dict[bytes, str]:
    """The first value of each header a history row uses that C{headers} has, as text."""
    # One pass over the few headers a request has: a getRawHeaders() per
    # wanted name cost a quarter of what history adds to a call.
    found = {}
    for name, values in headers.getAllRawHeaders():
        name = name.lower()
        if name in _RECORDED and values:
            found[name] = values[0].decode("utf-8", "replace")
    return found


def trace_id(found: dict[bytes, str]) -> Optional[str]:
    """The W3C C{traceparent}'s trace id, else C{X-Trace-ID}, from L{recorded_headers}."""
    # traceparent: version-traceid-parentid-flags
    traceparent = found.get(b"traceparent")
    if traceparent:
        parts = traceparent.split("-")
        if len(parts) >= 4 and len(parts[1]) == 32:
            return parts[1]
    return found.get(b"x-trace-id")
