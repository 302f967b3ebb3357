"""The header contract's check: the headers every routed request must carry."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.server import Request

from aura_proxy import errors
from aura_proxy.config import HeadersConfig
from aura_proxy.contract import HeaderContract
from aura_proxy.stages import GO_ON, Answer, Stage

if TYPE_CHECKING:
    from aura_proxy.call import Call

__all__ = ["RequiredHeaders"]


class RequiredHeaders(Stage):
    """
    Each header in C{[headers] required} must be present and non-blank unless
    the path matches C{public_paths}: 400 C{missing_header} otherwise.
    """

    def __init__(self, config: HeadersConfig) -> None:
        self._contract = HeaderContract(config)

    def run(self, request: Request, call: "Call") -> Answer:
        """Refuse a request without a required header."""
        missing = self._contract.missing(request.requestHeaders, call.segments)
        if missing is not None:
            return errors.missing_header(missing)
        return GO_ON
