"""
The admin site (C{admin_listen}): health and readiness for load balancers
and operators, the Prometheus figures, and the live dashboard.

  - C{GET /healthz}: the process is alive and serving (liveness);
  - C{GET /readyz}: every readiness check passes (L{aura_proxy.readiness}),
    each named in the JSON body; 503 otherwise;
  - C{GET /metrics}: the Prometheus figures (L{aura_proxy.metrics}), 404
    with C{[metrics] enabled = false};
  - C{GET /}: the dashboard (L{aura_proxy.dashboard}), fed by C{/dashboard/events};
  - C{POST /reload}: read the configuration file again (L{aura_proxy.reload}).

Kept off the client-facing port so that probes never need a tenant and the
public can never see it.  Built here, and only here, for the single process
and for the supervisor parent of C{workers > 1}: each hands it its own
health report (L{gateway_health}, L{aura_proxy.workers.WorkerSupervisor.health})
and its own readiness checks (L{aura_proxy.readiness.gateway_readiness},
L{aura_proxy.readiness.supervisor_readiness}).  With C{[admin] token_file}
the whole site, whoever adds routes to it, is behind
L{aura_proxy.admin_token.TokenGuard}.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, Optional

from klein import Klein
from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from aura_proxy.admin_token import TokenGuard
from aura_proxy.errors import GatewayError, bad_request
from aura_proxy.readiness import Readiness

if TYPE_CHECKING:
    from aura_proxy.dashboard import Dashboard, DashboardService
    from aura_proxy.history import HistoryService
    from aura_proxy.proxy import Gateway
    from aura_proxy.reload import ReloadResult

__all__ = [
    "Admin", "AdminService", "HealthReport", "MetricsText", "admin_service", "admin_site", "gateway_health",
]

#: What C{GET /healthz} answers: a JSON object whose C{status} is C{"ok"}
#: while the process serves (anything else answers 503).
HealthReport = Callable[[], dict[str, object]]
#: What C{GET /metrics} answers: the Prometheus text, now or later.
MetricsText = Callable[[], "Deferred[bytes]"]

#: Reloads the configuration (L{aura_proxy.reload}); what C{POST /reload} calls.
Reload = Callable[[], "ReloadResult"]


class Admin:
    """Klein application of the admin port."""

    app = Klein()

    def __init__(
        self,
        report: HealthReport,
        dashboard: Optional["Dashboard"] = None,
        readiness: Optional[Readiness] = None,
        metrics: Optional[MetricsText] = None,
        reload: Optional[Reload] = None,
    ) -> None:
        self._report = report
        self._dashboard = dashboard
        self._readiness = readiness if readiness is not None else Readiness({})
        self._metrics = metrics
        self._reload = reload

    def resource(self) -> IResource:
        """The admin site's root resource."""
        return self.app.resource()

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: Request) -> bytes:
        """C{200} and the JSON health report while serving; C{503} otherwise."""
        body = self._report()
        if body.get("status") != "ok":
            request.setResponseCode(503)
        return _json(request, body)

    @app.route("/readyz", methods=["GET", "HEAD"])
    async def readyz(self, request: Request) -> bytes:
        """C{200} when every readiness check passes, else C{503}; the JSON body names each."""
        body = await self._readiness.report()
        if body["status"] != "ready":
            request.setResponseCode(503)
        return _json(request, body)

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: Request) -> "bytes | Deferred[bytes]":
        """The Prometheus figures (prometheus_client's text format); 404 when C{[metrics]} is off."""
        if self._metrics is None:
            return _error(request, GatewayError(404, "not_found", "[metrics] enabled = false"))
        from aura_proxy.metrics import metrics_resource_answer

        return self._metrics().addCallback(lambda body: metrics_resource_answer(request, body))

    @app.route("/reload", methods=["POST"])
    def reload(self, request: Request) -> bytes:
        """Reload the configuration file: C{200} and what changed, or C{400} and its problems."""
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        if self._reload is None:
            request.setResponseCode(404)
            return b'{"status":"unavailable"}'
        result = self._reload()
        if not result.ok:
            request.setResponseCode(400)
        return json.dumps(result.to_json()).encode("utf-8")

    # -- the dashboard (aura_proxy.dashboard) ----------------------------------

    @app.route("/", methods=["GET", "HEAD"])
    def dashboard_page(self, request: Request) -> bytes:
        """The dashboard's page."""
        return self._static(request, "index.html")

    @app.route("/dashboard/<name>", methods=["GET", "HEAD"])
    def dashboard_file(self, request: Request, name: str) -> bytes:
        """The page's script and style sheet."""
        return self._static(request, name)

    @app.route("/dashboard/snapshot", methods=["GET"])
    def dashboard_snapshot(self, request: Request) -> Any:
        """One snapshot as JSON (query parameters: the calls' filter)."""
        dashboard, where = self._dashboard_request(request)
        if dashboard is None:
            return where

        def answer(body: dict[str, object]) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            return json.dumps(body, default=str).encode("utf-8")

        return dashboard.snapshot(where).addCallback(answer)

    @app.route("/dashboard/events", methods=["GET"])
    def dashboard_events(self, request: Request) -> Any:
        """Snapshots as Server-Sent Events, every second, until the client leaves."""
        dashboard, where = self._dashboard_request(request)
        if dashboard is None:
            return where
        return dashboard.attach(request, where)

    def _dashboard_request(self, request: Request) -> Any:
        """(the dashboard, the calls' filter), or (None, the error's body) after setting its status."""
        from aura_proxy.history.recent import parse_call_filter

        if self._dashboard is None:
            return None, _error(request, GatewayError(404, "not_found", "the dashboard is not enabled"))
        try:
            where = parse_call_filter(request.args or {})
        except ValueError as e:
            return None, _error(request, bad_request(str(e)))
        return self._dashboard, where

    def _static(self, request: Request, name: str) -> bytes:
        from aura_proxy.dashboard import STATIC_FILES, static_file

        if self._dashboard is None or name not in STATIC_FILES:
            return _error(request, GatewayError(404, "not_found", "no such page on the admin site"))
        request.setHeader(b"content-type", STATIC_FILES[name])
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return static_file(name)


def _json(request: Request, body: object) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8")


def _error(request: Request, error: GatewayError) -> bytes:
    """Set C{error}'s status and content type on C{request}; its JSON body."""
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return error.body()


def gateway_health(gateway: "Gateway", history: Optional["HistoryService"] = None) -> HealthReport:
    """
    The health report of a gateway process: open streams, the figures of
    C{[sse]}'s memory bounds, and call history's state.
    """

    def report() -> dict[str, object]:
        body: dict[str, object] = {"status": "ok", "active_streams": gateway.active_streams()}
        # Detached streams and (resume = memory) the stream logs' bytes: Gateway.bounds.
        body["sse"] = gateway.bounds()
        if history is not None:
            body["history"] = history.stats()
        return body

    return report


def admin_site(
    report: HealthReport,
    reactor: Any,
    dashboard: Optional["Dashboard"] = None,
    *,
    readiness: Optional[Readiness] = None,
    token: Optional[bytes] = None,
    metrics: Optional[MetricsText] = None,
    reload: Optional[Reload] = None,
) -> Site:
    """
    The admin site serving C{report} at C{/healthz}, C{readiness} at
    C{/readyz}, C{metrics} at C{/metrics}, C{dashboard} at C{/} and C{reload}
    at C{POST /reload}, without
    an access log; behind C{token} (L{TokenGuard}) when given.
    """
    resource = Admin(report, dashboard, readiness, metrics, reload).resource()
    if token is not None:
        resource = TokenGuard(resource, token)
    site = Site(resource, reactor=reactor)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # health probes are not news
    return site


class AdminService(MultiService):
    """
    The admin site's services: the dashboard's (its upstream prober, its open
    streams), when there is one, and the listener.

    @ivar site: the admin site.
    """

    name = "admin"

    def __init__(
        self,
        listen: str,
        report: HealthReport,
        reactor: Any,
        dashboard: Optional["DashboardService"],
        readiness: Optional[Readiness] = None,
        token: Optional[bytes] = None,
        metrics: Optional[MetricsText] = None,
        reload: Optional[Reload] = None,
    ) -> None:
        super().__init__()
        self.site = admin_site(
            report,
            reactor,
            dashboard.dashboard if dashboard is not None else None,
            readiness=readiness,
            token=token,
            metrics=metrics,
            reload=reload,
        )
        if dashboard is not None:
            dashboard.setServiceParent(self)
        strports.service(listen, self.site, reactor=reactor).setServiceParent(self)


def admin_service(
    listen: str,
    report: HealthReport,
    reactor: Any,
    dashboard: Optional["DashboardService"] = None,
    *,
    readiness: Optional[Readiness] = None,
    token: Optional[bytes] = None,
    metrics: Optional[MetricsText] = None,
    reload: Optional[Reload] = None,
) -> IService:
    """
    The admin site listening on C{listen} (an endpoint description) while
    running; with C{dashboard}, serving it, which runs (and probes the
    upstreams) while the site does; with C{metrics}, C{GET /metrics}; with C{reload}, C{POST /reload}.
    """
    return AdminService(listen, report, reactor, dashboard, readiness, token, metrics, reload)
