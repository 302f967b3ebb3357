"""
The admin site (C{admin_listen}): health for load balancers and operators.

Kept off the client-facing port so that probes never need a tenant and the
public can never see it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Optional

from klein import Klein
from twisted.web.resource import IResource
from twisted.web.server import Request

if TYPE_CHECKING:
    from aura_proxy.history import HistoryService
    from aura_proxy.proxy import Gateway

__all__ = ["Admin"]


class Admin:
    """Klein application of the admin port."""

    app = Klein()

    def __init__(self, gateway: "Gateway", history: Optional["HistoryService"] = None) -> None:
        self._gateway = gateway
        self._history = history

    def resource(self) -> IResource:
        """The admin site's root resource."""
        return self.app.resource()

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: Request) -> bytes:
        """C{200} and a JSON summary while the gateway serves requests."""
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        body: dict[str, object] = {
            "status": "ok",
            "active_streams": self._gateway.active_streams(),
        }
        if self._history is not None:
            body["history"] = self._history.stats()
        return json.dumps(body).encode("utf-8")
