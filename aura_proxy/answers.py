"""
The answers the gateway gives itself: JSON errors and CORS preflights.

Each writes and finishes the client's response and notes on the L{Call}
what the client got, for its history row; ending the call (recording it)
is the pipeline's part.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from twisted.logger import Logger
from twisted.web.server import Request

from aura_proxy.contract import Cors
from aura_proxy.errors import GatewayError
from aura_proxy.site import client_left

if TYPE_CHECKING:
    from aura_proxy.call import Call

__all__ = ["error_answer", "preflight_answer"]

log = Logger()


def error_answer(request: Request, call: "Call", error: GatewayError, cors: Optional[Cors]) -> None:
    """
    Answer C{error} as JSON (docs/errors.md), with the call's request id.

    @param cors: the CORS rules whose response headers the answer gets, or
        None for none (a refused preflight).
    """
    if error.status >= 500:
        log.warn("{method} {path}: {error}", method=_text(request.method),
                 path=_text(request.path), error=str(error))
    if client_left(request):
        # Nobody to answer: the client left while the gateway waited.
        call.status = 499
        return
    body = error.body(call.id)
    request.setResponseCode(error.status)
    out = request.responseHeaders
    out.setRawHeaders(b"content-type", [b"application/json"])
    out.setRawHeaders(b"content-length", [b"%d" % len(body)])
    out.setRawHeaders(b"x-request-id", [call.id.encode("ascii")])
    if cors is not None:
        cors.apply(request.requestHeaders, out)
    request.write(body)
    request.finish()
    call.status = error.status
    call.response_size = len(body)


def preflight_answer(request: Request, call: "Call", allowed: list[tuple[bytes, bytes]]) -> None:
    """Answer an allowed CORS preflight: 204 with the C{allowed} headers (L{Cors.preflight})."""
    request.setResponseCode(204)
    for name, value in allowed:
        request.responseHeaders.setRawHeaders(name, [value])
    request.finish()
    call.status = 204


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")
