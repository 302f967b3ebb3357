"""The first stage: a tenant from a query parameter or a cookie becomes the request's X-Tenant-ID."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.server import Request

from aura_proxy.config import HeadersConfig
from aura_proxy.contract import TenantSources
from aura_proxy.stages import GO_ON, Answer, Stage

if TYPE_CHECKING:
    from aura_proxy.call import Call

__all__ = ["Tenant"]


class Tenant(Stage):
    """
    C{[headers] tenant_from}, applied before anything else: a tenant query
    parameter must not reach logs, history or upstream, whatever answer the
    request gets.
    """

    classifies = True

    def __init__(self, config: HeadersConfig) -> None:
        self._sources = TenantSources(config.tenant_from)

    def run(self, request: Request, call: "Call") -> Answer:
        """Resolve the request's tenant in place; never refuses."""
        self._sources.apply(request)
        return GO_ON
