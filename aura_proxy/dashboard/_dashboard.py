"""
The dashboard: a snapshot of the gateway every second, sent as Server-Sent
Events to the page the admin site serves at C{/}.

One L{Dashboard} per admin site.  While the admin site runs
(L{DashboardService}) it samples the metrics registry (L{Figures}: one
C{collect()}) on the clock it was given, every C{idle_interval} seconds
while no page is open (so that a page opened later gets the last minutes at
once), every C{interval} seconds while one is.  On each tick, for
every open page, it adds the routes with their upstream health
(L{aura_proxy.upstream_health.UpstreamProber}) and the health report, asks
call history for the last calls the page filters for (one query per
distinct filter per tick, skipped while the last one is still running), and
writes one C{snapshot} event.  A comment line goes out every C{heartbeat}
seconds as well.  When a page goes away its stream is dropped at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Optional, Sequence

from twisted.application.service import IService, MultiService
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from aura_proxy.config import Config, RouteConfig
from aura_proxy.dashboard.figures import Figures
from aura_proxy.history.reader import HistoryReader
from aura_proxy.history.recent import CallFilter
from aura_proxy.upstream_health import UpstreamProber

__all__ = ["STATIC_FILES", "Dashboard", "DashboardService", "dashboard_service", "static_file"]

log = Logger()

#: The page's files (package data of aura_proxy.dashboard), by name, with their content types.
STATIC_FILES = {
    "index.html": b"text/html; charset=utf-8",
    "dashboard.js": b"text/javascript; charset=utf-8",
    "dashboard.css": b"text/css; charset=utf-8",
}

#: Reads the last calls for a filter (L{aura_proxy.history.recent.HistoryReader.recent}).
CallReader = Callable[[CallFilter], "Deferred[list[dict[str, object]]]"]


def static_file(name: str) -> bytes:
    """The bytes of one of the page's L{STATIC_FILES}."""
    if name not in STATIC_FILES:
        raise KeyError(name)
    return resources.files("aura_proxy.dashboard").joinpath("static", name).read_bytes()


@implementer(IPushProducer)
@dataclass(eq=False)
class _Client:
    """
    One open page: its request, its filter, the stream it is sent.

    The producer of its response: while the page's connection cannot take
    more (C{paused}), its snapshots are skipped, not queued (the next one
    says it all).
    """

    request: Request
    where: CallFilter
    done: "Deferred[None]"
    calls: list[dict[str, object]] = field(default_factory=list)
    calls_error: Optional[str] = None
    sent: int = 0
    skipped: int = 0
    paused: bool = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        # The connection is going: notifyFinish drops the client.
        self.paused = True


class Dashboard:
    """
    The figures the page shows, and the stream that carries them.

    @ivar figures: the registry's samples.
    """

    def __init__(
        self,
        registry: Any,
        clock: Any,
        *,
        routes: Sequence[RouteConfig] = (),
        prober: Any = None,
        calls: Optional[CallReader] = None,
        health: Optional[Callable[[], dict[str, object]]] = None,
        interval: float = 1.0,
        heartbeat: float = 15.0,
        idle_interval: float = 5.0,
    ) -> None:
        """
        @param registry: the gateway's metrics (C{prometheus_client}
            C{CollectorRegistry}, or anything with its C{collect()}).
        @param clock: C{IReactorTime}: the ticks, and the snapshot's C{time}.
        @param prober: the routes' upstream health (C{report()} by route
            name), or None.
        @param calls: reads the last calls, or None when history is off.
        @param health: the admin site's health report, or None.
        @param idle_interval: seconds between samples while no page is open
            (a C{collect()} of a gateway's registry takes milliseconds on
            the reactor thread: not every second for nobody).
        """
        self.figures = Figures(registry)
        self.routes = tuple(routes)
        self.interval = interval
        self.heartbeat = heartbeat
        self.idle_interval = idle_interval
        self._clock = clock
        self._prober = prober
        self._calls = calls
        self._health = health
        self._clients: list[_Client] = []
        self._ticker: Optional[LoopingCall] = None
        self._beater: Optional[LoopingCall] = None
        #: Whether the ticker runs without pages too (L{start}).
        self._always = False
        self._pending: dict[CallFilter, Deferred[Any]] = {}
        self._last: dict[str, Any] = {}

    # -- the snapshot ----------------------------------------------------------

    def _base(self, sample: Optional[bool] = None) -> dict[str, Any]:
        """
        Every figure but the calls, of a sample taken now when C{sample}
        (default: unless the ticker samples continuously, L{start}, and has
        one), else of the last one.
        """
        now = self._clock.seconds()
        if sample is None:
            sample = not self._always
        if sample or self.figures.latest is None:
            self.figures.sample(now)
        body = self.figures.snapshot()
        body["time"] = now
        body["interval"] = self.interval
        health = self._prober.report() if self._prober is not None else {}
        by_route = body.get("by_route", {})
        body["routes"] = [
            {
                "name": route.name,
                "path": route.pattern.text,
                "upstream": route.upstream.to_text(),
                "upstream_health": health.get(route.name),
                **by_route.get(route.name, {"open_streams": 0, "events": 0, "requests": 0, "errors": 0}),
            }
            for route in self.routes
        ]
        body["history"] = self._calls is not None
        if self._health is not None:
            try:
                body["health"] = self._health()
            except Exception as e:
                body["health"] = {"status": "unavailable", "error": str(e)}
        return body

    def snapshot(self, where: CallFilter) -> "Deferred[dict[str, Any]]":
        """A snapshot now, with the calls C{where} selects (C{GET /dashboard/snapshot})."""
        body = self._base()
        body["filter"] = where.as_dict()
        if self._calls is None:
            body["calls"] = []
            return succeed(body)

        def calls(rows: list[dict[str, object]]) -> dict[str, Any]:
            body["calls"] = rows
            return body

        def failed(failure: Failure) -> dict[str, Any]:
            body["calls"] = []
            body["calls_error"] = failure.getErrorMessage()
            return body

        return self._calls(where).addCallbacks(calls, failed)

    # -- the stream ------------------------------------------------------------

    def attach(self, request: Request, where: CallFilter) -> "Deferred[None]":
        """
        Stream snapshots to C{request} (an SSE response) until the client
        leaves or L{stop}; the Deferred fires then (cancelling it drops the
        client, as Klein does when the connection is lost).
        """
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        client: _Client

        def cancel(d: "Deferred[None]") -> None:
            self._drop(client)

        client = _Client(request, where, Deferred(cancel))
        self._clients.append(client)
        request.notifyFinish().addBoth(lambda _: self._drop(client))
        request.registerProducer(client, True)
        # Reconnect soon after the gateway restarts; then the first figures at once.
        request.write(b"retry: 2000\n\n")
        self._send_all([client], self._base())
        self._start()
        return client.done

    def start(self) -> None:
        """Sample every C{interval} seconds from now on, pages open or not (the admin site runs)."""
        self._always = True
        self._start(pages=False)

    def _start(self, pages: bool = True) -> None:
        if self._ticker is None:
            ticker = self._ticker = LoopingCall(self.tick)
            ticker.clock = self._clock
            ticker.start(self.interval, now=False).addErrback(
                lambda f: log.failure("dashboard tick failed", f)
            )
        if pages and self._beater is None:
            beater = self._beater = LoopingCall(self._beat)
            beater.clock = self._clock
            beater.start(self.heartbeat, now=False)

    def _stop_ticking(self) -> None:
        """Stop the heartbeats, and the ticker unless it samples continuously."""
        loops = [self._beater] + ([] if self._always else [self._ticker])
        for loop in loops:
            if loop is not None and loop.running:
                loop.stop()
        self._beater = None
        if not self._always:
            self._ticker = None

    def tick(self) -> None:
        """
        Sample once and send every open page its snapshot; with no page
        open, sample only every C{idle_interval} seconds.
        """
        latest = self.figures.latest
        if not self._clients and latest is not None:
            if self._clock.seconds() - latest.t < self.idle_interval - self.interval / 2:
                return
        base = self._base(sample=True)
        if self._clients:
            self._send_all(list(self._clients), base)

    def _send_all(self, clients: list[_Client], base: dict[str, Any]) -> None:
        """Send C{base} plus each client's calls; one history query per filter."""
        groups: dict[CallFilter, list[_Client]] = {}
        for client in clients:
            groups.setdefault(client.where, []).append(client)
        for where, group in groups.items():
            if self._calls is None or where in self._pending:
                # No history, or the last query has not answered: the calls shown last.
                for client in group:
                    self._write(client, base)
                continue
            d = self._pending[where] = self._calls(where)

            def answered(rows: list[dict[str, object]], group: list[_Client] = group) -> None:
                for client in group:
                    client.calls, client.calls_error = rows, None

            def failed(failure: Failure, group: list[_Client] = group) -> None:
                if failure.check(CancelledError):
                    return
                for client in group:
                    client.calls_error = failure.getErrorMessage() or failure.type.__name__  # type: ignore[union-attr]

            def send(_: object, where: CallFilter = where, group: list[_Client] = group) -> None:
                self._pending.pop(where, None)
                for client in group:
                    self._write(client, base)

            d.addCallbacks(answered, failed).addCallback(send)

    def _write(self, client: _Client, base: dict[str, Any]) -> None:
        if client not in self._clients:
            return
        if client.paused:
            client.skipped += 1
            return
        body = dict(base)
        body["filter"] = client.where.as_dict()
        body["calls"] = client.calls
        if client.calls_error is not None:
            body["calls_error"] = client.calls_error
        client.sent += 1
        data = json.dumps(body, separators=(",", ":"), default=str).encode("utf-8")
        client.request.write(b"event: snapshot\nid: %d\ndata: %s\n\n" % (client.sent, data))

    def _beat(self) -> None:
        for client in list(self._clients):
            if not client.paused:
                client.request.write(b": heartbeat\n\n")

    def _drop(self, client: _Client) -> None:
        """Forget C{client} (it left, or was cancelled); stop ticking when none is left."""
        if client in self._clients:
            self._clients.remove(client)
        if not self._clients:
            self._stop_ticking()
        request = client.request
        if request.producer is not None and request.channel is not None:
            request.unregisterProducer()
        if not client.done.called:
            client.done.callback(None)

    def stop(self) -> None:
        """End every open stream and stop ticking (the admin site is stopping)."""
        for client in list(self._clients):
            self._drop(client)
        self._always = False
        self._stop_ticking()

    @property
    def clients(self) -> int:
        """How many pages are open."""
        return len(self._clients)


class DashboardService(MultiService):
    """
    What the dashboard runs beside the admin site: its sampling of the
    registry, the upstream prober (a child), and on stop the end of every
    open page's stream and of the history reader's connection.

    @ivar dashboard: the L{Dashboard} the admin site serves.
    """

    name = "dashboard"

    def __init__(self, dashboard: Dashboard, prober: Optional[IService] = None, reader: Any = None) -> None:
        super().__init__()
        self.dashboard = dashboard
        self._reader = reader
        self._prober = prober
        if prober is not None:
            prober.setServiceParent(self)

    def use_routes(self, routes: Sequence[RouteConfig]) -> None:
        """Show (and probe) C{routes} from now on: the gateway reloaded its configuration."""
        self.dashboard.routes = tuple(routes)
        use = getattr(self._prober, "use_routes", None)
        if use is not None:
            use(routes)

    def startService(self) -> None:
        super().startService()
        self.dashboard.start()

    def stopService(self) -> "Deferred[None]":
        self.dashboard.stop()
        stopped = maybeDeferred(super().stopService)
        reader = self._reader
        if reader is not None:
            stopped.addCallback(lambda _: reader.close())
        return stopped.addCallback(lambda _: None)


def dashboard_service(
    config: Config, registry: Any, reactor: Any, health: Optional[Callable[[], dict[str, object]]] = None
) -> DashboardService:
    """
    The dashboard of the gateway that C{config} describes: C{registry} its
    metrics, its routes probed by an L{UpstreamProber}, the last calls read
    from C{[history]} (when enabled) by a L{HistoryReader} of its own, and
    C{health} the admin site's health report.
    """
    prober = UpstreamProber(config.routes, reactor)
    reader = HistoryReader(config.history, reactor) if config.history.enabled else None
    dashboard = Dashboard(
        registry, reactor, routes=config.routes, prober=prober,
        calls=reader.recent if reader is not None else None, health=health,
    )
    return DashboardService(dashboard, prober, reader)
