"""
API call history: one row per finished call in C{sys_api_call_histories}.

The proxy builds a L{CallRecord} when a call ends and hands it to
L{HistoryService.record}, which never blocks and never raises; rows are
batched to SQLite or PostgreSQL, spooled to disk when the database cannot take
them, and replayed in order later.  See docs/history.md.
"""

from __future__ import annotations

from typing import Any, Optional

from aura_proxy.config import HistoryConfig
from aura_proxy.history.record import CallRecord
from aura_proxy.history.service import HistoryService

__all__ = ["CallRecord", "HistoryService", "make_history"]


def make_history(config: HistoryConfig, reactor: Any) -> Optional[HistoryService]:
    """The history service for C{config}, or None when history is disabled."""
    if not config.enabled:
        return None
    return HistoryService(config, reactor)
