"""
Tests for L{aura_proxy.eventloop}: the lean epoll loop does what Twisted's
poll step does for ready sockets.
"""

from __future__ import annotations

import socket
import time
from typing import Callable, List, Optional

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone
from twisted.internet.main import CONNECTION_DONE
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from aura_proxy.eventloop import defer_writes, use_lean_poll


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


class _Collect(Protocol):
    """Keeps what it receives and how its connection ended."""

    def __init__(self) -> None:
        self.data = b""
        self.lost: List[Failure] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost.append(reason)


class DeferredWriteTests(SynchronousTestCase):
    """
    L{defer_writes}: a TCP connection's writes go out at the end of the loop
    turn, without registering the socket for writability when the socket
    takes them.
    """

    def setUp(self) -> None:
        self.reactor = EPollReactor()
        self.addCleanup(self.reactor._poller.close)
        self.assertTrue(use_lean_poll(self.reactor))
        self.server_side = _Collect()
        factory = Factory.forProtocol(lambda: self.server_side)
        port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.client_side = _Collect()
        client_factory = ClientFactory.forProtocol(lambda: self.client_side)
        self.reactor.connectTCP("127.0.0.1", port.getHost().port, client_factory)
        self.turn_until(lambda: self.server_side.transport is not None
                        and self.client_side.transport is not None)
        self.transport = self.server_side.transport
        self.addCleanup(self.close)
        self.assertTrue(defer_writes(self.reactor, self.transport))

    def close(self) -> None:
        for side in (self.server_side, self.client_side):
            if side.transport is not None and not side.transport.disconnected:
                side.transport.abortConnection()
        self.turn_until(lambda: True)

    def turn(self) -> None:
        self.reactor.runUntilCurrent()
        self.reactor.doIteration(0)

    def turn_until(self, done: Callable[[], bool], turns: int = 200) -> None:
        for _ in range(turns):
            self.turn()
            if done():
                return
        self.fail("the condition did not come true")

    def test_sent_at_end_of_turn_without_epoll(self) -> None:
        """A write is sent by the loop, and the socket is never registered for writing."""
        added: List[object] = []
        add_writer = self.reactor.addWriter
        self.reactor.addWriter = lambda w: (added.append(w), add_writer(w))  # type: ignore[method-assign]
        self.transport.write(b"head ")
        self.transport.write(b"body")
        self.turn_until(lambda: self.client_side.data == b"head body")
        self.assertEqual(added, [])
        self.assertNotIn(self.transport, self.reactor.getWriters())

    def test_written_outside_poll(self) -> None:
        """
        A write made by a timed call goes out before the loop waits on epoll,
        not after the wait.
        """
        self.reactor.callLater(0, self.transport.write, b"later")
        self.reactor.runUntilCurrent()
        started = time.monotonic()
        self.reactor.doIteration(2.0)  # returns as soon as the peer's socket is readable
        self.assertLess(time.monotonic() - started, 1.0)
        self.turn_until(lambda: self.client_side.data == b"later", turns=5)

    def test_full_socket_waits_for_epoll(self) -> None:
        """What the socket does not take is sent when epoll reports it writable, in order."""
        self.client_side.transport.pauseProducing()  # the peer stops reading
        big = bytes(range(256)) * 40_000  # 10 MB: more than the socket buffers hold
        self.transport.write(big)
        self.turn()
        self.assertIn(self.transport, self.reactor.getWriters())
        self.client_side.transport.resumeProducing()
        self.turn_until(lambda: len(self.client_side.data) == len(big), turns=5000)
        self.assertEqual(self.client_side.data, big)
        self.turn()
        self.assertNotIn(self.transport, self.reactor.getWriters())

    def test_lose_connection_after_write(self) -> None:
        """loseConnection after a write sends the write, then closes."""
        self.transport.write(b"bye")
        self.transport.loseConnection()
        self.turn_until(lambda: bool(self.client_side.lost) and bool(self.server_side.lost))
        self.assertEqual(self.client_side.data, b"bye")
        self.assertIsInstance(self.server_side.lost[0].value, ConnectionDone)

    def test_peer_gone(self) -> None:
        """A write to a connection whose peer has gone ends the connection, as Twisted would."""
        self.client_side.transport.abortConnection()
        self.turn_until(lambda: bool(self.client_side.lost))
        for _ in range(50):
            if self.server_side.lost:
                break
            self.transport.write(b"x" * 65536)
            self.turn()
        self.assertEqual(len(self.server_side.lost), 1)
        self.assertTrue(self.transport.disconnected)

    def test_only_lean_reactors_and_tcp(self) -> None:
        """Without the lean loop, or for anything but a connected TCP connection, nothing changes."""
        from twisted.internet.selectreactor import SelectReactor

        self.assertFalse(defer_writes(SelectReactor(), self.transport))
        self.assertFalse(defer_writes(self.reactor, object()))
