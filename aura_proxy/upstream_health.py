"""
Is each route's upstream reachable?  A TCP connect every few seconds.

L{UpstreamProber} is a service of the admin site (it runs only while the
admin site does, L{aura_proxy.admin.admin_service}): every C{interval}
seconds it opens a TCP connection to each distinct upstream C{host:port} of
the configured routes, through Twisted endpoints on the reactor it is given,
closes it at once, and keeps the outcome per upstream: up or down, how long
the connect took, the last error.  It sends no request and does no TLS
handshake (an C{https} upstream is probed on its TCP port only), so an
upstream sees a connection that closes without a byte and nothing else.
The dashboard shows the result next to each route.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from twisted.application.service import Service
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from aura_proxy.config import RouteConfig

__all__ = ["ProbeResult", "UpstreamProber", "upstream_address"]

#: Seconds between two rounds of probes.
DEFAULT_INTERVAL = 5.0
#: Seconds a connect may take before the upstream counts as down.
DEFAULT_TIMEOUT = 2.0


def upstream_address(route: RouteConfig) -> tuple[str, int]:
    """The host and TCP port of C{route}'s upstream (80 or 443 by scheme when not given)."""
    url = route.upstream
    port = url.port if url.port is not None else (443 if url.scheme == "https" else 80)
    return url.host, port


@dataclass
class ProbeResult:
    """
    What the last probe of one upstream found.

    @ivar up: None before the first probe ended.
    @ivar connect_ms: the last successful connect's duration.
    @ivar last_error: the last failure's message (kept after a later success).
    @ivar checked_at: when the last probe ended (the prober's clock).
    @ivar last_up_at: when a probe last succeeded.
    """

    host: str
    port: int
    up: Optional[bool] = None
    connect_ms: Optional[float] = None
    last_error: Optional[str] = None
    checked_at: Optional[float] = None
    last_up_at: Optional[float] = None

    def as_dict(self) -> dict[str, object]:
        """The JSON form the dashboard shows."""
        return {
            "host": self.host,
            "port": self.port,
            "up": self.up,
            "connect_ms": self.connect_ms,
            "last_error": self.last_error,
            "checked_at": self.checked_at,
            "last_up_at": self.last_up_at,
        }


class _Hangup(Protocol):
    """Closes the probe's connection as soon as it is made."""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]


class UpstreamProber(Service):
    """
    Probes every route's upstream each C{interval} seconds while running.

    @ivar results: by C{(host, port)}, the last L{ProbeResult}.
    """

    name = "upstream-prober"

    def __init__(
        self,
        routes: Sequence[RouteConfig],
        reactor: Any,
        interval: float = DEFAULT_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """
        @param reactor: connects (C{IReactorTCP}) and keeps time
            (C{IReactorTime}); a C{MemoryReactorClock} in tests.
        """
        self.routes = tuple(routes)
        self.interval = interval
        self.timeout = timeout
        self._reactor = reactor
        self.results: dict[tuple[str, int], ProbeResult] = {}
        for route in self.routes:
            host, port = upstream_address(route)
            self.results.setdefault((host, port), ProbeResult(host, port))
        self._loop: Optional[LoopingCall] = None
        self._round: Optional[Deferred[Any]] = None

    def use_routes(self, routes: Sequence[RouteConfig]) -> None:
        """Probe C{routes} from now on (a reload); the results of upstreams kept are kept."""
        self.routes = tuple(routes)
        wanted = {upstream_address(route) for route in self.routes}
        for address in list(self.results):
            if address not in wanted:
                del self.results[address]
        for host, port in wanted:
            self.results.setdefault((host, port), ProbeResult(host, port))

    def startService(self) -> None:
        Service.startService(self)
        loop = self._loop = LoopingCall(self.probe_all)
        loop.clock = self._reactor
        loop.start(self.interval, now=True).addErrback(lambda f: None)

    def stopService(self) -> None:
        Service.stopService(self)
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        round_, self._round = self._round, None
        if round_ is not None:
            round_.cancel()

    def probe_all(self) -> None:
        """Start a round of probes, unless the last one has not ended yet."""
        if self._round is not None:
            return
        probes = [self._probe(result) for result in self.results.values()]
        done = self._round = DeferredList(probes, consumeErrors=True)

        def ended(_: object) -> None:
            if self._round is done:
                self._round = None

        done.addBoth(ended)

    def _endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        if isIPAddress(host):
            return TCP4ClientEndpoint(self._reactor, host, port, timeout=self.timeout)
        if isIPv6Address(host):
            return TCP6ClientEndpoint(self._reactor, host, port, timeout=self.timeout)
        return HostnameEndpoint(self._reactor, host, port, timeout=self.timeout)

    def _probe(self, result: ProbeResult) -> "Deferred[None]":
        started = self._reactor.seconds()
        connecting = self._endpoint(result.host, result.port).connect(Factory.forProtocol(_Hangup))
        connecting.addTimeout(self.timeout, self._reactor)

        def up(protocol: object) -> None:
            now = self._reactor.seconds()
            result.up = True
            result.connect_ms = round((now - started) * 1000.0, 3)
            result.checked_at = result.last_up_at = now

        def down(failure: Failure) -> None:
            if not self.running:
                return  # cancelled by stopService: no finding
            result.up = False
            result.checked_at = self._reactor.seconds()
            if failure.check(ConnectingCancelledError, CancelledError, defer.TimeoutError):
                # Our own timeout (addTimeout cancels the connect).
                result.last_error = f"TimeoutError: no connection within {self.timeout:g} s"
                return
            message = failure.getErrorMessage() or failure.type.__name__  # type: ignore[union-attr]
            result.last_error = f"{failure.type.__name__}: {message}"  # type: ignore[union-attr]

        return connecting.addCallbacks(up, down)

    def report(self) -> dict[str, dict[str, object]]:
        """The last result for each route, by route name."""
        out = {}
        for route in self.routes:
            out[route.name] = self.results[upstream_address(route)].as_dict()
        return out
