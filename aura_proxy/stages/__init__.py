"""
The stages of the request path, one job each; L{aura_proxy.proxy} puts them
in order.

A request stage is an object with a C{run(request, call)} method (see
L{Stage}), made once per pipeline from the frozen configuration: nothing is
allocated per stage per request.  C{run} returns one of:

  - L{GO_ON} (None): the next stage takes over;
  - a L{aura_proxy.errors.GatewayError}: the pipeline answers it as JSON,
    records the call and stops;
  - a C{Deferred}: the stage took the request and answers it; the Deferred
    fires when the response is finished.  A stage that answers calls
    C{call.pipeline.end(request, call)} once the response is finished (which
    records it and fires C{call.finished}).

An end stage (L{EndStage}) runs once for every call when it ends, whatever
answered it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

from twisted.internet.defer import Deferred
from twisted.web.iweb import IResponse
from twisted.web.server import Request

from aura_proxy.errors import GatewayError

if TYPE_CHECKING:
    from aura_proxy.call import Call

__all__ = ["Answer", "EndStage", "GO_ON", "ResponseStage", "Stage"]

#: What a request stage returns (see the module's docstring).
Answer = Optional[Union[GatewayError, "Deferred[None]"]]

#: "The next stage takes over."
GO_ON: Answer = None


class Stage:
    """
    A request stage.

    @cvar classifies: whether the stage only tells what the request is
        (tenant, path segments, route) and answers nothing but refusals.
        Those stages also run, their answers ignored after the first, for a
        request refused before it reached the path (a body over the limit),
        so that its history row names its route.
    """

    classifies = False

    def run(self, request: Request, call: "Call") -> Answer:
        """Do this stage's part for C{request}; see the module docstring for the answer."""
        raise NotImplementedError()


class ResponseStage:
    """What the upstream's response goes through on its way to the client."""

    def respond(self, request: Request, call: "Call", response: IResponse) -> None:
        """
        Send C{response} to the client; call C{call.pipeline.end(request,
        call)} when the client's response is finished.
        """
        raise NotImplementedError()


class EndStage:
    """A stage that runs when a call ends (the response is finished, or the client is gone)."""

    def ended(self, request: Request, call: "Call") -> None:
        """Do this stage's part for a call that has ended; must not raise."""
        raise NotImplementedError()
