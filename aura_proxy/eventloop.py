"""
A leaner epoll loop for the gateway's reactor.

Twisted's epoll reactor wraps every ready socket's read or write in
C{log.callWithLogger}, which pushes and pops a logging context (the "system"
prefix of log lines) around it.  With thousands of streams that wrapper is a
large share of the gateway's CPU per event.  L{use_lean_poll} replaces the
reactor's poll step with the same loop without the wrapper; an exception
escaping a read or write is still logged, as Twisted would.  The commonest
case, a socket that is only readable, is handled in the loop itself, as
Twisted's C{_doReadOrWrite} would handle it, saving a call per read.
"""

from __future__ import annotations

import errno
import sys
from select import EPOLLIN
from typing import Any, Optional

from twisted.internet.posixbase import _NO_FILEDESC
from twisted.logger import Logger

__all__ = ["use_lean_poll"]

log = Logger()


def use_lean_poll(reactor: Any) -> bool:
    """
    Switch an epoll reactor's poll step to the lean loop.

    @return: whether it was switched (only Twisted's EPollReactor is).
    """
    from twisted.internet.epollreactor import EPollReactor
    from twisted.python import log as legacy_log

    if not isinstance(reactor, EPollReactor):
        return False
    poller = reactor._poller
    selectables = reactor._selectables
    do_read_or_write = reactor._doReadOrWrite
    disconnect = reactor._disconnectSelectable

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
                if event != EPOLLIN:
                    do_read_or_write(selectable, fd, event)
                    continue
                # _doReadOrWrite's steps for a readable socket.
                why: Any
                try:
                    if selectable.fileno() == -1:
                        why, in_read = _NO_FILEDESC, False
                    else:
                        why, in_read = selectable.doRead(), True
                except BaseException:
                    why, in_read = sys.exc_info()[1], False
                    legacy_log.err()
                if why:
                    disconnect(selectable, why, in_read)
            except BaseException:
                log.failure("while handling a socket event of {selectable!r}", selectable=selectable)

    reactor.doIteration = do_poll  # type: ignore[method-assign]
    reactor.doPoll = do_poll  # type: ignore[method-assign]
    return True
