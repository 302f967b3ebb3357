"""
A leaner epoll loop for the gateway's reactor.

Twisted's epoll reactor wraps every ready socket's read or write in
C{log.callWithLogger}, which pushes and pops a logging context (the "system"
prefix of log lines) around it.  With thousands of streams that wrapper is a
large share of the gateway's CPU per event.  L{use_lean_poll} replaces the
reactor's poll step with the same loop without the wrapper; an exception
escaping a read or write is still logged, as Twisted would.  The commonest
case, a socket that is only readable, is handled in the loop itself, as
Twisted's own read-or-write dispatch would handle it, saving a call per read.

It also sends what plain TCP connections were given to write at the end of
the loop turn (L{defer_writes}), where Twisted registers the socket for
writability with epoll, waits for the next poll to report it writable,
sends, and unregisters it: two C{epoll_ctl} calls and an event per write,
four per proxied request.  Sends still go out together after the turn's
events are handled; a send that does not take everything registers the
socket as Twisted would.
"""

from __future__ import annotations

import errno
import sys
from select import EPOLLIN
from typing import Any, Optional

from functools import partial

from twisted.internet.abstract import FileDescriptor
from twisted.logger import Logger

from aura_proxy import twisted_internals as internals

__all__ = ["use_lean_poll", "defer_writes"]

#: Flushes of one turn before the rest is left to epoll (a producer that
#: writes again every time its transport drains could keep a flush going).
_FLUSH_ROUNDS = 4

log = Logger()


def use_lean_poll(reactor: Any) -> bool:
    """
    Switch an epoll reactor's poll step to the lean loop.

    @return: whether it was switched (only Twisted's EPollReactor is, and
        only where L{aura_proxy.twisted_internals} finds its poll step as
        expected).
    """
    from twisted.internet.epollreactor import EPollReactor
    from twisted.python import log as legacy_log

    if not isinstance(reactor, EPollReactor):
        return False
    parts = internals.poll_parts(reactor)
    if parts is None:
        return False
    poller, selectables, do_read_or_write, disconnect = parts
    no_filedesc = internals.NO_FILEDESC
    unsent = internals.unsent_bytes
    # Deferred writes need Twisted's write buffers as expected too.
    pending: set[Any] = set()
    if internals.available("write_buffers"):
        reactor._aura_pending_writes = pending  # type: ignore[attr-defined]

    def flush() -> None:
        for _ in range(_FLUSH_ROUNDS):
            if not pending:
                return
            batch = list(pending)
            pending.clear()
            for transport in batch:
                if transport.disconnected:
                    continue
                try:
                    why = transport.doWrite()
                except BaseException:
                    why = sys.exc_info()[1]
                    legacy_log.err()
                if why:
                    disconnect(transport, why, False)
                elif unsent(transport):
                    # The socket took only part: wait for it as Twisted would.
                    FileDescriptor.startWriting(transport)
        for transport in pending:
            if not transport.disconnected:
                FileDescriptor.startWriting(transport)
        pending.clear()

    def do_poll(timeout: Optional[float]) -> None:
        if pending:
            # Written outside the poll step (timed calls, callFromThread).
            flush()
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
                # Twisted's read-or-write dispatch, for a readable socket.
                why: Any
                try:
                    if selectable.fileno() == -1:
                        why, in_read = no_filedesc, False
                    else:
                        why, in_read = selectable.doRead(), True
                except BaseException:
                    why, in_read = sys.exc_info()[1], False
                    legacy_log.err()
                if why:
                    disconnect(selectable, why, in_read)
            except BaseException:
                log.failure("while handling a socket event of {selectable!r}", selectable=selectable)
        if pending:
            flush()

    reactor.doIteration = do_poll  # type: ignore[method-assign]
    reactor.doPoll = do_poll  # type: ignore[method-assign]
    return True


def defer_writes(reactor: Any, transport: Any) -> bool:
    """
    Have the lean loop of C{reactor} send what C{transport}, a connected
    plain TCP connection, is given to write at the end of each loop turn.

    @return: whether it will (only with L{use_lean_poll} on C{reactor}, and
        only for Twisted's own TCP connections, once connected).
    """
    pending: Optional[set[Any]] = getattr(reactor, "_aura_pending_writes", None)
    if pending is None or not getattr(transport, "connected", False):
        return False
    return internals.intercept_start_writing(transport, partial(pending.add, transport))
