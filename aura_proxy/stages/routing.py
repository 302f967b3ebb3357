"""Route selection: the most specific C{[route:*]} pattern that matches the path."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from twisted.web.server import Request

from aura_proxy import errors
from aura_proxy.config import RouteConfig
from aura_proxy.routes import Router
from aura_proxy.stages import GO_ON, Answer, Stage

if TYPE_CHECKING:
    from aura_proxy.call import Call

__all__ = ["Route"]


class Route(Stage):
    """Sets C{call.route}; 404 C{no_route} when no pattern matches."""

    classifies = True

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self._router: Router[RouteConfig] = Router((r.pattern, r) for r in routes)

    def run(self, request: Request, call: "Call") -> Answer:
        """Choose the route, or refuse the request."""
        route = call.route = self._router.match(call.segments)
        if route is None:
            return errors.no_route(request.path.decode("utf-8", "replace"))
        return GO_ON
