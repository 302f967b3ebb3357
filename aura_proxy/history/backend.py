"""
What the history service needs from a database, whatever it is.

A backend is driven from the reactor thread and never blocks it: each method
returns a Deferred.  The service never runs two calls at once.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from aura_proxy.history.schema import Row

__all__ = ["Backend", "Clock", "DelayedCall"]


class Backend(Protocol):
    """A store for call rows (see L{aura_proxy.history.sqlite} and L{aura_proxy.history.postgres})."""

    #: Short name for logs, e.g. "sqlite" or "postgresql".
    name: str

    def connect(self) -> "Deferred[None]":
        """
        (Re)connect and bring the schema up to date (idempotent).  Called again
        after any failure that is not a row error.
        """

    def insert(self, rows: Sequence[Row]) -> "Deferred[int]":
        """
        Insert C{rows} in one transaction, C{ON CONFLICT (id) DO NOTHING}; fire
        with how many were new.  All or nothing: on failure none is stored.
        """

    def is_row_error(self, failure: Failure) -> bool:
        """
        True when C{failure} (from L{insert}) is caused by the data (constraint,
        range, encoding) rather than by the database being unavailable.
        """

    def close(self) -> "Deferred[None]":
        """Release connections and threads; the backend may be connected again later."""


class DelayedCall(Protocol):
    """The part of C{IDelayedCall} used here (a Protocol: mypy has no zope plugin)."""

    def active(self) -> bool:
        """Whether the call is still pending."""

    def cancel(self) -> None:
        """Cancel the pending call."""


class Clock(Protocol):
    """The part of C{IReactorTime} used here: a reactor or L{twisted.internet.task.Clock}."""

    def callLater(self, delay: float, callable: Any, *args: Any, **kw: Any) -> DelayedCall:
        """Call C{callable} after C{delay} seconds."""

    def seconds(self) -> float:
        """The current time."""
