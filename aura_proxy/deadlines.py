"""
Many timeouts of one fixed length, kept with one reactor timer.

Every proxied request waits at most C{response_timeout} for the upstream's
response headers, and nearly every one gets them in milliseconds.  A
C{callLater} and a C{cancel} per request cost more than the rest of the
timeout's bookkeeping together (a L{DelayedCall} object, a heap push, and a
cancelled call left in the reactor's heap until it reaches the top).  With
one length for all, deadlines fall in the order they were set: an ordered
dict of the pending ones is the queue, and one timer, armed for the oldest,
serves them all.  The timer is cancelled whenever nothing is pending, so
none outlives the work.
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import count
from typing import Callable, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = ["Deadlines"]

log = Logger()


class Deadlines:
    """
    Timeouts of C{seconds} each: L{add} one, L{discard} it when what it
    guards is done first.

    @param clock: the time source and scheduler.
    @param seconds: how long each timeout runs.
    """

    def __init__(self, clock: IReactorTime, seconds: float) -> None:
        self._clock = clock
        self._seconds = seconds
        self._pending: OrderedDict[int, tuple[float, Callable[[], object]]] = OrderedDict()
        self._keys = count()
        self._timer: Optional[IDelayedCall] = None

    def add(self, expire: Callable[[], object]) -> int:
        """
        Call C{expire} C{seconds} from now unless discarded before.

        @return: the key to L{discard} it with.
        """
        key = next(self._keys)
        self._pending[key] = (self._clock.seconds() + self._seconds, expire)
        if self._timer is None:
            self._timer = self._clock.callLater(self._seconds, self._fire)
        return key

    def discard(self, key: int) -> None:
        """Forget timeout C{key}; nothing if it has fired or was discarded already."""
        pending = self._pending
        pending.pop(key, None)
        if not pending and self._timer is not None:
            # Nothing left to time: no timer outlives the work (nor a test).
            self._timer.cancel()
            self._timer = None

    def __len__(self) -> int:
        """How many timeouts are pending."""
        return len(self._pending)

    def _fire(self) -> None:
        self._timer = None
        pending = self._pending
        now = self._clock.seconds()
        while pending:
            key, (deadline, expire) = next(iter(pending.items()))
            if deadline > now:
                # The timer was armed for an older timeout, since discarded.
                self._timer = self._clock.callLater(deadline - now, self._fire)
                return
            del pending[key]
            try:
                expire()
            except Exception:
                log.failure("a timeout's handler failed")
