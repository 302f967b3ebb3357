"""
Tests for L{aura_proxy.eventloop}: the lean epoll loop does what Twisted's
poll step does for ready sockets.
"""

from __future__ import annotations

import socket
from typing import List, Optional

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone
from twisted.internet.main import CONNECTION_DONE
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from aura_proxy.eventloop import use_lean_poll


class _Reader:
    """A selectable reading one end of a socket pair."""

    def __init__(self, sock: socket.socket, result: object = None, error: Optional[Exception] = None) -> None:
        self.sock = sock
        self.result = result
        self.error = error
        self.reads: List[bytes] = []
        self.lost: List[Failure] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> object:
        self.reads.append(self.sock.recv(100))
        if self.error is not None:
            raise self.error
        return self.result

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)

    def logPrefix(self) -> str:
        return "reader"


class LeanPollTests(SynchronousTestCase):
    """The lean loop reads ready sockets and disconnects as Twisted would."""

    def setUp(self) -> None:
        self.reactor = EPollReactor()
        self.addCleanup(self.reactor._poller.close)
        self.assertTrue(use_lean_poll(self.reactor))
        self.a, self.b = socket.socketpair()
        self.addCleanup(self.a.close)
        self.addCleanup(self.b.close)
        self.a.setblocking(False)

    def test_readable_socket_is_read(self) -> None:
        """A readable socket's doRead runs; it stays registered."""
        reader = _Reader(self.a)
        self.reactor.addReader(reader)
        self.b.send(b"hello")
        self.reactor.doIteration(0)
        self.assertEqual(reader.reads, [b"hello"])
        self.assertEqual(reader.lost, [])
        self.assertIn(reader, self.reactor.getReaders())

    def test_read_returning_a_reason_disconnects(self) -> None:
        """doRead returning a reason removes the reader and calls connectionLost with it."""
        reader = _Reader(self.a, result=CONNECTION_DONE)
        self.reactor.addReader(reader)
        self.b.send(b"x")
        self.reactor.doIteration(0)
        self.assertNotIn(reader, self.reactor.getReaders())
        self.assertEqual(len(reader.lost), 1)
        self.assertIsInstance(reader.lost[0].value, ConnectionDone)

    def test_read_raising_is_logged_and_disconnects(self) -> None:
        """An exception from doRead is logged and the reader disconnected with it."""
        reader = _Reader(self.a, error=ValueError("bad read"))
        self.reactor.addReader(reader)
        self.b.send(b"x")
        self.reactor.doIteration(0)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertNotIn(reader, self.reactor.getReaders())
        self.assertEqual(len(reader.lost), 1)
        self.assertIsInstance(reader.lost[0].value, ValueError)

    def test_closed_socket_disconnects(self) -> None:
        """A reader whose socket is gone (fileno -1) is disconnected without a read."""
        reader = _Reader(self.a)
        self.reactor.addReader(reader)
        self.b.send(b"x")
        reader.fileno = lambda: -1  # type: ignore[method-assign]
        self.reactor.doIteration(0)
        self.assertEqual(reader.reads, [])
        self.assertEqual(len(reader.lost), 1)

    def test_not_epoll(self) -> None:
        """Other reactors are left alone."""
        from twisted.internet.selectreactor import SelectReactor

        self.assertFalse(use_lean_poll(SelectReactor()))
