"""The request path, split into percent-decoded segments; a malformed one is refused."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.server import Request

from aura_proxy import errors
from aura_proxy.routes import MalformedPath, split_path
from aura_proxy.stages import GO_ON, Answer, Stage

if TYPE_CHECKING:
    from aura_proxy.call import Call

__all__ = ["ParsePath"]


class ParsePath(Stage):
    """Sets C{call.segments}; 400 C{bad_request} for a path it cannot route (L{split_path})."""

    classifies = True

    def run(self, request: Request, call: "Call") -> Answer:
        """Split the path, or refuse it."""
        try:
            call.segments = split_path(request.path)
        except MalformedPath as e:
            return errors.bad_request(str(e))
        return GO_ON
