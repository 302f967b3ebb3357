"""CORS preflights, answered by the gateway itself: 204 or 403, never upstream."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import succeed
from twisted.logger import Logger
from twisted.web.server import Request

from aura_proxy import errors
from aura_proxy.answers import preflight_answer
from aura_proxy.config import CorsConfig
from aura_proxy.contract import Cors
from aura_proxy.stages import GO_ON, Answer, Stage

if TYPE_CHECKING:
    from aura_proxy.call import Call

__all__ = ["Preflight"]

log = Logger()


class Preflight(Stage):
    """
    An C{OPTIONS} with C{Origin} and C{Access-Control-Request-Method} is
    answered here, without a tenant: 204 with the allowed methods and headers,
    or 403 C{cors_forbidden} without any CORS header (an origin that is not
    allowed is never reflected), saying whether the origin, the method or
    which header was refused (in the body, and in the log at debug level).
    """

    def __init__(self, config: CorsConfig) -> None:
        self._cors = Cors(config)

    def run(self, request: Request, call: "Call") -> Answer:
        """Answer a preflight; any other request goes on."""
        if not Cors.is_preflight(request.method, request.requestHeaders):
            return GO_ON
        allowed = self._cors.preflight(request.requestHeaders)
        if isinstance(allowed, str):
            log.debug("CORS preflight for {path} refused: {refused}",
                      path=request.path.decode("utf-8", "replace"), refused=allowed)
            call.pipeline.refuse(request, call, errors.cors_forbidden(allowed), cors=False)
        else:
            preflight_answer(request, call, allowed)
            call.pipeline.end(request, call)
        return succeed(None)
