"""
The live dashboard of the admin site (C{GET /}): one page, no build step,
fed by Server-Sent Events from C{GET /dashboard/events}.

The page's files are package data in C{static/}; the figures come from the
gateway's metrics registry (L{Figures}), call history
(L{aura_proxy.history.recent.HistoryReader}) and the upstream prober
(L{aura_proxy.upstream_health.UpstreamProber}).  docs/operations.md,
"Dashboard", says what it shows.
"""

from aura_proxy.dashboard._dashboard import (
    STATIC_FILES,
    Dashboard,
    DashboardService,
    dashboard_service,
    static_file,
)
from aura_proxy.dashboard.figures import END_REASONS, Figures, Sample, histogram_quantile, read_registry

__all__ = [
    "END_REASONS",
    "STATIC_FILES",
    "Dashboard",
    "DashboardService",
    "Figures",
    "Sample",
    "histogram_quantile",
    "dashboard_service",
    "read_registry",
    "static_file",
]
