"""
A read-only connection to call history: the dashboard's last calls.

L{HistoryReader} is a connection of its own, apart from the writer's (the
history service's): with C{workers = N} the parent process, which serves the
admin site and writes no history, reads every worker's rows through it.
The query is L{aura_proxy.history.recent}'s.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from aura_proxy.config import HistoryConfig
from aura_proxy.history.recent import CallFilter, recent_rows
from aura_proxy.history.service import backend_for

__all__ = ["HistoryReader"]


class HistoryReader:
    """
    A read-only connection to the call history database of C{config}, apart
    from the writer's; it connects when first asked and again after a failure.
    Never blocks the reactor: SQLite in a thread of its own, PostgreSQL
    through txpostgres.
    """

    def __init__(self, config: HistoryConfig, reactor: Any) -> None:
        self.config = config
        self._backend: Any = backend_for(config, reactor, reactor)
        self._connected = False

    def recent(self, where: CallFilter) -> "Deferred[list[dict[str, object]]]":
        """The newest calls matching C{where}, newest first (L{recent_rows}'s dicts)."""
        return Deferred.fromCoroutine(self._recent(where))

    async def _recent(self, where: CallFilter) -> list[dict[str, object]]:
        try:
            if not self._connected:
                await self._backend.connect()
                self._connected = True
            rows = await self._backend.recent(where)
        except BaseException:
            self._connected = False
            raise
        return recent_rows(rows)

    def close(self) -> "Deferred[None]":
        """Close the connection (and SQLite's thread)."""
        self._connected = False
        return self._backend.close()  # type: ignore[no-any-return]
