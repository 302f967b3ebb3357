"""
The upstream exchange: the request goes to its route's upstream, and the
response (or the reason there is none) comes back within the response timeout.
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING, Optional

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError, ConnectError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.iweb import IResponse
from twisted.web.server import Request

from aura_proxy import errors
from aura_proxy.config import Config, RouteConfig
from aura_proxy.contract import HeaderContract
from aura_proxy.deadlines import Deadlines
from aura_proxy.errors import GatewayError
from aura_proxy.header_store import canonical, store
from aura_proxy.routes import strip_segments
from aura_proxy.site import is_secure
from aura_proxy.stages import Answer, Stage
from aura_proxy.upstream import UpstreamClient, body_producer
from aura_proxy.upstream_signing import UpstreamSigner

if TYPE_CHECKING:
    from aura_proxy.call import Call
    from aura_proxy.metrics import GatewayMetrics

__all__ = ["Forward", "upstream_url"]

log = Logger()

_HOST = canonical(b"host")
_REQUEST_ID = canonical(b"x-request-id")


class Forward(Stage):
    """
    Sends the request to C{call.route}'s upstream and hands the response to
    the pipeline's response stage; an upstream that fails, or sends no
    response headers within C{response_timeout}, is answered 502 or 504.
    This stage always answers: it ends the request stages.
    """

    def __init__(
        self,
        config: Config,
        clock: IReactorTime,
        client: UpstreamClient,
        metrics: Optional["GatewayMetrics"] = None,
    ) -> None:
        self._metrics = metrics
        self._contract = HeaderContract(config.headers)
        self._client = client
        g = config.gateway
        self._response_timeout = g.response_timeout
        self._connect_timeout = g.connect_timeout
        self._deadlines = Deadlines(clock, g.response_timeout)
        self._signer = UpstreamSigner.from_config(config.upstream_trust, clock)

    def run(self, request: Request, call: "Call") -> Answer:
        """Start the upstream request; the answer fires when the client's response is finished."""
        route = call.route
        assert route is not None, "Forward runs after Route"
        incoming = store(request.requestHeaders)
        outgoing = self._contract.upstream_headers(
            request.requestHeaders,
            client_ip=call.via or call.client_ip,  # the hop appended to X-Forwarded-For
            proto=b"https" if is_secure(request) else b"http",
            host=(incoming.get(_HOST) or (None,))[-1],
            trusted=call.via is not None,
            extra=() if _REQUEST_ID in incoming else ((_REQUEST_ID, call.id.encode("ascii")),),
        )
        content: IO[bytes] = request.content  # type: ignore[assignment]
        body = body_producer(content, call.request_size, request.method, self._client.cooperator)
        finished = call.finished
        if finished is None:  # (a resumed stream that could not be replayed has one already)
            finished = call.finished = Deferred(call.cancel)
        url = upstream_url(route, request.uri)
        if self._signer is not None:  # [upstream_trust]: X-DWP-Gateway-Signature
            self._signer.sign(request.method, url, outgoing)
        upstream = call.upstream_call = self._client.request(request.method, url, outgoing, body)
        if self._metrics is not None:
            self._metrics.upstream_started()
        call.timeout = self._deadlines.add(call.expire)
        upstream.addCallbacks(
            self._got_response, self._got_error, callbackArgs=(call,), errbackArgs=(call,)
        )
        return finished

    def _got_response(self, response: IResponse, call: "Call") -> None:
        self._deadlines.discard(call.timeout)
        call.pipeline.respond(call.request, call, response)

    def _got_error(self, failure: Failure, call: "Call") -> None:
        self._deadlines.discard(call.timeout)
        if call.finished is not None and call.finished.called:
            return
        assert call.route is not None
        error = None if call.client_gone else self._upstream_error(call.route, failure, call.timed_out)
        if error is not None and self._metrics is not None:
            self._metrics.upstream_error(call, _error_kind(failure, call.timed_out))
        if error is None:  # the client went away first
            call.status = 499
            call.pipeline.end(call.request, call)
        else:
            call.pipeline.refuse(call.request, call, error)

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


def _error_kind(failure: Failure, timed_out: bool) -> str:
    """What went wrong upstream, as the metrics name it (L{aura_proxy.metrics.UPSTREAM_ERROR_KINDS})."""
    if timed_out:
        return "response_timeout"
    if failure.check(ConnectTimeoutError):
        return "connect_timeout"
    if failure.check(DNSLookupError, ConnectError):
        return "connect_error"
    return "protocol_error"


def upstream_url(route: RouteConfig, uri: bytes) -> bytes:
    """The upstream URL of request target C{uri}: prefix stripped, base path in front, query kept."""
    path, sep, query = uri.partition(b"?")
    return route.upstream_base + strip_segments(path, route.strip_prefix) + sep + query
