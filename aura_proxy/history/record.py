"""
One row of C{sys_api_call_histories}: what the request path hands to history.

The proxy fills a L{CallRecord} when a call ends (for a stream: when the stream
ends, as one summary) and passes it to L{aura_proxy.history.HistoryService.record},
which never blocks and never raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["CallRecord", "END_REASONS"]

#: Why a stream ended, as stored in C{end_reason}.
END_REASONS = ("completed", "client_disconnect", "upstream_error", "idle_timeout", "shutdown")


# Not frozen: a frozen dataclass sets each of its 26 fields through
# object.__setattr__, several microseconds per call on the reactor thread.
# Treat it as a value all the same.
@dataclass(slots=True)
class CallRecord:
    """
    A finished call.

    For a stream (C{is_stream}), C{query_string} and C{request_size_bytes}
    are None and C{first_event_ms}, C{event_count} and C{end_reason} are set
    (C{stream_id} too when the gateway stamps ids); for any other call it is
    the other way round.  A stream's C{event_count}, C{response_size_bytes},
    C{first_event_ms} and C{latency_ms} are what its client got, until it
    left; what the gateway read after that (a detached stream) is in
    C{detached_event_count} and C{detached_ms} alone.
    Client-supplied strings arrive here unbounded: the history layer bounds
    them before storing.
    """

    id: str
    #: When the call started: Unix time in seconds (the reactor's clock).
    created_at: float
    tenant_id: Optional[str]
    user_id: Optional[str]
    agent_id: Optional[str]
    source: Optional[str]
    caller_type: Optional[str]
    method: str
    path: str
    route: Optional[str]
    query_string: Optional[str]
    status_code: int
    latency_ms: float
    request_size_bytes: Optional[int]
    response_size_bytes: Optional[int]
    client_ip: Optional[str]
    user_agent: Optional[str]
    trace_id: Optional[str]
    is_stream: bool
    first_event_ms: Optional[float] = None
    event_count: Optional[int] = None
    end_reason: Optional[str] = None
    #: The gateway's id of the stream whose events this connection got (the
    #: part before the dot of each event id): the same on a stream's first
    #: connection and on every connection that resumed it.
    stream_id: Optional[str] = None
    #: A resumed connection: the sequence number of the C{Last-Event-ID} it
    #: continued after; None for a stream's first connection.
    resumed_after: Optional[int] = None
    #: A detached stream (the client left, the gateway kept reading into the
    #: stream log): events read after the client left; None when not detached.
    detached_event_count: Optional[int] = None
    #: A detached stream: how long the gateway read after the client left.
    detached_ms: Optional[float] = None
