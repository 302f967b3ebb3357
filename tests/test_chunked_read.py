"""
Tests for the upstream connections' socket read (L{aura_proxy.fastclient}
C{_read_directly}) in both forms: the Python one and the C one
(L{aura_proxy._chunked_read}), which decodes whole chunks of a chunked body
itself and must deliver exactly what the Python parser delivers.

The C tests are skipped when the extension is not built, unless
C{AURA_PROXY_REQUIRE_C=1} (C{./dev test} sets it).
"""

from __future__ import annotations

import os
import socket
from typing import Any, List, Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from aura_proxy import fastclient
from aura_proxy.fastclient import FastAgent, _read_directly

reactor: Any = _reactor

C_BUILT = fastclient._ChunkedReader is not None
NO_C = None if C_BUILT or os.environ.get("AURA_PROXY_REQUIRE_C") == "1" else (
    "aura_proxy._chunked_read is not built (no C compiler at install time?)"
)


class Conn:
    """A stand-in for fastclient._Connection: its state and what reached it."""

    def __init__(self, mode: int = 0, buf: bytes = b"", left: int = 0, deliver: bool = True,
                 fail: Optional[Exception] = None) -> None:
        self._mode = mode
        self._buf = buf
        self._left = left
        self.raw: List[bytes] = []
        self.delivered: List[bytes] = []
        self.failed: List[BaseException] = []
        self._fail = fail
        self._deliver = self._take if deliver else None

    def _take(self, data: bytes) -> None:
        self.delivered.append(data)
        if self._fail is not None:
            raise self._fail

    def dataReceived(self, data: bytes) -> None:
        self.raw.append(data)

    def _delivery_failed(self, exc: BaseException) -> None:
        self.failed.append(exc)


class Transport:
    """What _read_directly needs of a TCP transport."""

    bufferSize = 65536

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


class ReadTestsMixin:
    """The socket-read behaviour both forms share."""

    accelerate: bool
    addCleanup: Any
    assertEqual: Any
    assertIs: Any
    assertIsNone: Any

    def pair(self, conn: Conn) -> tuple[socket.socket, Any]:
        """A socket pair; the reader's transport on one end, the other to write to."""
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        a.setblocking(False)
        t = Transport(a)
        _read_directly(t, conn, accelerate=self.accelerate)  # type: ignore[arg-type]
        return b, t

    def test_head_goes_to_data_received(self) -> None:
        """Outside a chunked body (here: waiting for the head) a read goes to dataReceived whole."""
        conn = Conn(mode=4)
        peer, t = self.pair(conn)
        peer.send(b"HTTP/1.1 200 OK\r\n")
        self.assertIsNone(t.doRead())
        self.assertEqual((conn.raw, conn.delivered), ([b"HTTP/1.1 200 OK\r\n"], []))

    def test_would_block(self) -> None:
        """Nothing to read is no reason to disconnect, and nothing is delivered."""
        conn = Conn()
        _, t = self.pair(conn)
        self.assertIsNone(t.doRead())
        self.assertEqual((conn.raw, conn.delivered), ([], []))

    def test_end_of_stream(self) -> None:
        """The peer's close is CONNECTION_DONE."""
        conn = Conn()
        peer, t = self.pair(conn)
        peer.close()
        self.assertIs(t.doRead(), CONNECTION_DONE)

    def test_socket_error(self) -> None:
        """A connection reset by the peer is CONNECTION_LOST."""
        import select
        import struct

        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        ours = socket.create_connection(listener.getsockname())
        self.addCleanup(ours.close)
        peer, _ = listener.accept()
        ours.setblocking(False)
        t = Transport(ours)
        _read_directly(t, Conn(), accelerate=self.accelerate)  # type: ignore[arg-type]
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # linger 0: the close is a reset
        select.select([ours], [], [], 5)
        self.assertIs(t.doRead(), CONNECTION_LOST)


class PythonReadTests(ReadTestsMixin, SynchronousTestCase):
    """The Python read: every read goes to dataReceived."""

    accelerate = False

    def test_chunks_go_to_data_received(self) -> None:
        """Whole chunks too are the Python parser's."""
        conn = Conn()
        peer, t = self.pair(conn)
        peer.send(b"3\r\nabc\r\n")
        t.doRead()
        self.assertEqual((conn.raw, conn.delivered), ([b"3\r\nabc\r\n"], []))


class CReadTests(ReadTestsMixin, SynchronousTestCase):
    """The C read: whole chunks decoded in C, everything else to Python."""

    accelerate = True
    skip = NO_C

    def read(self, data: bytes, **state: Any) -> Conn:
        conn = Conn(**state)
        peer, t = self.pair(conn)
        peer.send(data)
        self.assertIsNone(t.doRead())
        return conn

    def test_whole_chunks_delivered(self) -> None:
        """A read of whole chunks reaches the consumer as their data, joined; dataReceived sees nothing."""
        conn = self.read(b"3\r\nabc\r\n5\r\nhello\r\nA\r\n0123456789\r\n")
        self.assertEqual((conn.raw, conn.delivered), ([], [b"abchello0123456789"]))

    def test_upper_and_lower_hex(self) -> None:
        """Chunk sizes in either case of hex, with leading zeros."""
        conn = self.read(b"0a\r\n0123456789\r\n0000000B\r\n0123456789x\r\n")
        self.assertEqual(conn.delivered, [b"01234567890123456789x"])

    def test_everything_else_goes_to_python(self) -> None:
        """Any read that is not whole non-last chunks goes to dataReceived unchanged."""
        for data in [
            b"3\r\nab",  # a chunk split across reads
            b"3\r\nabc\r\n3\r\n",  # whole, then a partial one
            b"3\r\nabc\r\n0\r\n\r\n",  # the last chunk
            b"0\r\n\r\n",
            b"3;ext=1\r\nabc\r\n",  # a chunk extension
            b"3 \r\nabc\r\n",
            b"3\nabc\r\n",  # bare LF
            b"3\r\nabcd\r\n",  # data longer than its size
            b"3\r\nab\r\n\r\n",
            b"123456789\r\n",  # more than 8 hex digits
            b"x\r\nabc\r\n",
            b"1\r\nx\r\n" * 65,  # more chunks than the C side takes at once
        ]:
            conn = self.read(data)
            self.assertEqual((conn.raw, conn.delivered), ([data], []), data)

    def test_not_at_a_chunk_boundary(self) -> None:
        """Mid-chunk, with a pending size line, or without a consumer: the read is Python's."""
        for state in ({"left": 5}, {"buf": b"3"}, {"deliver": False}, {"mode": 1}):
            conn = self.read(b"3\r\nabc\r\n", **state)
            self.assertEqual((conn.raw, conn.delivered), ([b"3\r\nabc\r\n"], []), state)

    def test_consumer_error(self) -> None:
        """A consumer that raises is reported to the connection's _delivery_failed."""
        boom = RuntimeError("consumer broke")
        conn = self.read(b"3\r\nabc\r\n", fail=boom)
        self.assertEqual(conn.failed, [boom])

    def test_closed_socket(self) -> None:
        """A closed socket (fileno -1) is CONNECTION_LOST, without a read."""
        conn = Conn()
        _, t = self.pair(conn)
        t.socket.close()
        self.assertIs(t.doRead(), CONNECTION_LOST)

    def test_huge_left_goes_to_python(self) -> None:
        """
        Inside a chunk whose remaining size does not fit a C long (a state only
        a parser without the chunk-size limit could leave), the read goes to
        dataReceived: doRead raises nothing and loses no byte.
        """
        conn = self.read(b"abc", left=2**63 + 5)
        self.assertEqual((conn.raw, conn.delivered), ([b"abc"], []))

    def test_state_error_leaves_the_bytes(self) -> None:
        """
        When the connection's state cannot be read, the error comes out of
        doRead before the socket is read: the bytes are still there for the
        next read, not lost.
        """

        class Broken(Conn):
            @property
            def _left(self) -> int:  # type: ignore[override]
                raise RuntimeError("no state")

            @_left.setter
            def _left(self, value: int) -> None:
                pass

        conn = Broken()
        peer, t = self.pair(conn)
        peer.send(b"3\r\nabc\r\n")
        with self.assertRaises(RuntimeError):
            t.doRead()
        self.assertEqual(t.socket.recv(100), b"3\r\nabc\r\n")

    def test_uninitialised(self) -> None:
        """A ChunkedReader that __init__ never ran on refuses do_read with RuntimeError (it crashed)."""
        from aura_proxy._chunked_read import ChunkedReader

        reader = ChunkedReader.__new__(ChunkedReader)
        with self.assertRaises(RuntimeError):
            reader.do_read()

    def test_reinitialised_during_read(self) -> None:
        """
        A consumer that re-initialises the reader in the middle of a read
        (dropping the last reference to the connection) does not disturb that
        read: its failure goes to the connection the read was for, and the
        next read uses the new connection.
        """
        from aura_proxy._chunked_read import ChunkedReader

        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        a.setblocking(False)
        boom = RuntimeError("consumer broke")
        failed: List[BaseException] = []
        other = Conn(mode=4)

        def take(data: bytes) -> None:
            # The reader held the only reference to its connection.
            reader.__init__(a, other, CONNECTION_DONE, CONNECTION_LOST)  # type: ignore[misc]
            raise boom

        class Reinitialising(Conn):
            def _delivery_failed(self, exc: BaseException) -> None:
                failed.append(exc)

        conn = Reinitialising()
        conn._deliver = take
        reader = ChunkedReader(a, conn, CONNECTION_DONE, CONNECTION_LOST)
        del conn
        b.send(b"3\r\nabc\r\n")
        self.assertIsNone(reader.do_read())
        self.assertEqual(failed, [boom])
        b.send(b"more")
        self.assertIsNone(reader.do_read())
        self.assertEqual(other.raw, [b"more"])

    def test_bad_size(self) -> None:
        """The read size is checked."""
        from aura_proxy._chunked_read import ChunkedReader

        with self.assertRaises(ValueError):
            ChunkedReader(socket.socket(), Conn(), None, None, 70000)


# -- the real thing: FastAgent over TCP, both forms -------------------------------


class _Upstream(Protocol):
    """Answers one request with a chunked body written in the given pieces, one per turn."""

    pieces: List[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" not in data:
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")  # type: ignore[union-attr]
        self.send(list(self.pieces))

    call: Any = None

    def send(self, rest: List[bytes]) -> None:
        self.call = None
        self.transport.write(rest[0])  # type: ignore[union-attr]
        if rest[1:]:
            # A pause so that each piece is most likely a read of its own.
            self.call = reactor.callLater(0.002, self.send, rest[1:])

    def connectionLost(self, reason: Any) -> None:
        if self.call is not None:
            self.call.cancel()


class _Body(Protocol):
    def __init__(self) -> None:
        self.data: List[bytes] = []
        self.done: Deferred[object] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(reason.type.__name__)


_chunk = st.binary(min_size=1, max_size=40).map(lambda d: b"%x\r\n%b\r\n" % (len(d), d))


class AgentBothWaysTests(TestCase):
    """FastAgent delivers the same body with and without the C read."""

    skip = NO_C

    @inlineCallbacks
    def fetch(self, pieces: List[bytes], accelerate: bool) -> Any:
        _Upstream.pieces = pieces
        port = reactor.listenTCP(0, Factory.forProtocol(_Upstream), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        saved = fastclient._ChunkedReader
        if not accelerate:
            fastclient._ChunkedReader = None
        try:
            agent = FastAgent(reactor, connect_timeout=5, max_idle_per_host=0, idle_timeout=5)
            url = b"http://127.0.0.1:%d/" % port.getHost().port
            response = yield agent.request(b"GET", url, Headers(), None)
        finally:
            fastclient._ChunkedReader = saved
        body = _Body()
        response.deliverBody(body)
        reason = yield body.done
        yield deferLater(reactor, 0, lambda: None)
        return b"".join(body.data), reason

    @inlineCallbacks
    def test_same_body(self) -> Any:
        """Whole chunks, split chunks, several per read, extensions: same bytes, same end."""
        chunks = [b"%x\r\n%b\r\n" % (len(d), d) for d in (b"abc", b"hello world", b"x" * 300, b"z")]
        wire = b"".join(chunks) + b"3;ext=1\r\nend\r\n0\r\n\r\n"
        for pieces in (
            chunks + [b"3;ext=1\r\nend\r\n", b"0\r\n\r\n"],
            [wire[i:i + 7] for i in range(0, len(wire), 7)],
            [wire],
            [chunks[0] + chunks[1], chunks[2][:5], chunks[2][5:] + chunks[3], wire[len(b"".join(chunks)):]],
        ):
            c = yield self.fetch(pieces, True)
            py = yield self.fetch(pieces, False)
            self.assertEqual(c, py)
            self.assertEqual(c, (b"abchello world" + b"x" * 300 + b"zend", "ResponseDone"))

    @inlineCallbacks
    def test_bad_framing(self) -> Any:
        """A chunk whose data is not followed by CRLF fails the body the same way in both."""
        # Each split sent as one write: under load two timed writes can arrive
        # as one read in one fetch and as two in the other.
        for pieces in ([b"3\r\nabc\r\n3\r\nabcX\r\n0\r\n\r\n"], [b"3\r\nabcX\r\n0\r\n\r\n"]):
            c = yield self.fetch(pieces, True)
            py = yield self.fetch(pieces, False)
            self.assertEqual(c, py)
            self.assertNotEqual(c[1], "ResponseDone")
            # Both parsers check a whole read before handing any of it on.
            self.assertEqual(c[0], b"")


class PropertyTests(SynchronousTestCase):
    """Random chunked bodies split at random points: C and Python deliver the same."""

    skip = NO_C

    @settings(max_examples=200, deadline=None)
    @given(st.lists(_chunk, min_size=1, max_size=12), st.lists(st.integers(0, 2000), max_size=6))
    def test_same_delivery(self, chunks: List[bytes], cuts: List[int]) -> None:
        """
        Feeding the same reads to a real _Connection through each form leaves
        the same delivered bytes and the same parser state.
        """
        wire = b"".join(chunks)
        bounds = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
        reads = [wire[a:b] for a, b in zip(bounds, bounds[1:])]
        results = []
        for accelerate in (True, False):
            conn = _chunked_connection()
            got: List[bytes] = []
            conn._deliver = got.append
            a, b = socket.socketpair()
            try:
                a.setblocking(False)
                t = Transport(a)
                _read_directly(t, conn, accelerate=accelerate)  # type: ignore[arg-type]
                for r in reads:
                    b.sendall(r)
                    while t.doRead() is None and _pending(a):
                        pass
            finally:
                a.close()
                b.close()
            results.append((b"".join(got), conn._mode, conn._left, conn._buf))
        self.assertEqual(results[0], results[1])
        self.assertEqual(results[0][0], b"".join(c.split(b"\r\n", 1)[1][:-2] for c in chunks))


class ChunkSizeLimitTests(SynchronousTestCase):
    """A chunk size above the limit ends the body the same way in both forms."""

    skip = NO_C

    def test_same_refusal(self) -> None:
        """
        After a chunk-size line above fastclient._MAX_CHUNK_SIZE (here 2**63,
        which the C reader could not hold in a C long), both forms deliver the
        chunks before it, nothing after it, and break the connection; doRead
        raises nothing on the reads that follow.
        """
        reads = [b"3\r\nabc\r\n", b"8000000000000000\r\nxyz", b"more"]
        results = []
        for accelerate in (True, False):
            conn = _chunked_connection()
            conn.transport = StringTransport()
            got: List[bytes] = []
            conn._deliver = got.append
            a, b = socket.socketpair()
            try:
                a.setblocking(False)
                t = Transport(a)
                _read_directly(t, conn, accelerate=accelerate)  # type: ignore[arg-type]
                for r in reads:
                    b.sendall(r)
                    self.assertIsNone(t.doRead())
            finally:
                a.close()
                b.close()
            results.append((b"".join(got), conn._mode, conn.transport.disconnecting))
        self.assertEqual(results[0], results[1])
        self.assertEqual(results[0], (b"abc", fastclient._M_DEAD, True))


def _pending(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False


def _chunked_connection() -> Any:
    """A real fastclient._Connection in the middle of a chunked body."""
    agent = FastAgent(reactor, connect_timeout=5, max_idle_per_host=0, idle_timeout=5)
    conn = fastclient._Connection(agent, (b"127.0.0.1", 1))
    conn._mode = fastclient._M_CHUNKED
    return conn
