"""
A leaner epoll loop for the gateway's reactor.

Twisted's epoll reactor wraps every ready socket's read or write in
C{log.callWithLogger}, which pushes and pops a logging context (the "system"
prefix of log lines) around it.  With thousands of streams that wrapper is a
large share of the gateway's CPU per event.  L{use_lean_poll} replaces the
reactor's poll step with the same loop without the wrapper; an exception
escaping a read or write is still logged, as Twisted would.
"""

from __future__ import annotations

import errno
from typing import Any, Optional

from twisted.logger import Logger

__all__ = ["use_lean_poll"]

log = Logger()


def use_lean_poll(reactor: Any) -> bool:
    """
    Switch an epoll reactor's poll step to the lean loop.

    @return: whether it was switched (only Twisted's EPollReactor is).
    """
    from twisted.internet.epollreactor import EPollReactor

    if not isinstance(reactor, EPollReactor):
        return False
    poller = reactor._poller
    selectables = reactor._selectables
    do_read_or_write = reactor._doReadOrWrite

    def do_poll(timeout: Optional[float]) -> None:
        if timeout is None:
            timeout = -1
        try:
            ready = poller.poll(timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        for fd, event in ready:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                do_read_or_write(selectable, fd, event)
            except BaseException:
                log.failure("while handling a socket event of {selectable!r}", selectable=selectable)

    reactor.doIteration = do_poll  # type: ignore[method-assign]
    reactor.doPoll = do_poll  # type: ignore[method-assign]
    return True
