"""
The admin site (C{admin_listen}): health for load balancers and operators,
and C{POST /reload} (L{aura_proxy.reload}).

Kept off the client-facing port so that probes never need a tenant and the
public can never see it.  Built here, and only here, for the single process
and for the supervisor parent of C{workers > 1}: each hands it its own
health report (L{gateway_health}, L{aura_proxy.workers.WorkerSupervisor.health}).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable, Optional

from klein import Klein
from twisted.application import strports
from twisted.application.service import IService
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

if TYPE_CHECKING:
    from aura_proxy.history import HistoryService
    from aura_proxy.proxy import Gateway
    from aura_proxy.reload import ReloadResult

__all__ = ["Admin", "HealthReport", "admin_service", "admin_site", "gateway_health"]

#: What C{GET /healthz} answers: a JSON object whose C{status} is C{"ok"}
#: while the process serves (anything else answers 503).
HealthReport = Callable[[], dict[str, object]]

#: Reloads the configuration (L{aura_proxy.reload}); what C{POST /reload} calls.
Reload = Callable[[], "ReloadResult"]


class Admin:
    """Klein application of the admin port."""

    app = Klein()

    def __init__(self, report: HealthReport, reload: Optional[Reload] = None) -> None:
        self._report = report
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
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode("utf-8")

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


def gateway_health(gateway: "Gateway", history: Optional["HistoryService"] = None) -> HealthReport:
    """The health report of a gateway process: open streams, and call history's state."""

    def report() -> dict[str, object]:
        body: dict[str, object] = {"status": "ok", "active_streams": gateway.active_streams()}
        if history is not None:
            body["history"] = history.stats()
        return body

    return report


def admin_site(report: HealthReport, reactor: Any, reload: Optional[Reload] = None) -> Site:
    """The admin site serving C{report} at C{/healthz} (and C{reload}), without an access log."""
    site = Site(Admin(report, reload).resource(), reactor=reactor)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # health probes are not news
    return site


def admin_service(listen: str, report: HealthReport, reactor: Any, reload: Optional[Reload] = None) -> IService:
    """The admin site listening on C{listen} (an endpoint description) while running."""
    return strports.service(listen, admin_site(report, reactor, reload), reactor=reactor)
