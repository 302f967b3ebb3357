"""
Tests for L{aura_proxy.client_wire} and the client's wire as
L{aura_proxy.site.GatewayRequest} owns it: the client writer (C and Python
twins, on socket pairs), how a request's writes reach it or twisted.web's
own write, and the one path a client disconnect takes to the relay.

The writer tests run twice: with the C writer (L{aura_proxy._relay_core},
skipped when not built unless C{AURA_PROXY_REQUIRE_C=1}) and with its Python
reference.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Optional

from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.server import NOT_DONE_YET, Site

from aura_proxy import client_wire, twisted_internals
from aura_proxy.client_wire import ClientWriter, _PyClientWriter, end_response
from aura_proxy.config import parse_config
from aura_proxy.proxy import Gateway
from aura_proxy.relay import Relay
from aura_proxy.site import GatewayChannel, GatewayRequest, GatewaySite
from aura_proxy.upstream import UpstreamClient

from tests.test_proxy import CONFIG, ControlledAgent, History

_C_SKIP = (
    None if client_wire.ACCELERATED or os.environ.get("AURA_PROXY_REQUIRE_C") == "1"
    else "aura_proxy._relay_core is not built (no C compiler at install time?)"
)


class FakeTCP:
    """The parts of a client TCP connection a writer looks at."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.dataBuffer = b""
        self._tempDataBuffer: list[bytes] = []
        self.connected = 1
        self._writeDisconnected = False
        self.queued: list[bytes] = []

    def fileno(self) -> int:
        return self.socket.fileno()

    def write(self, data: bytes) -> None:
        self.queued.append(data)


def socket_pair(case: SynchronousTestCase, tcp: bool = False) -> tuple[socket.socket, socket.socket]:
    """
    Two connected non-blocking sockets, closed after the test: a Unix socket
    pair (a closed peer fails the next send at once), or TCP on the loopback.
    """
    if tcp:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            peer = socket.create_connection(listener.getsockname())
            ours, _ = listener.accept()
    else:
        ours, peer = socket.socketpair()
    for sock in (ours, peer):
        sock.setblocking(False)
        case.addCleanup(sock.close)
    return ours, peer


def received(peer: socket.socket) -> bytes:
    """Everything readable on C{peer} now."""
    out = b""
    while True:
        try:
            got = peer.recv(1 << 20)
        except BlockingIOError:
            return out
        if not got:
            return out
        out += got


class WriterTests(SynchronousTestCase):
    """The client writer: framing, direct sends, and what falls back to the transport."""

    writer_class: Any = ClientWriter
    skip = _C_SKIP

    def setUp(self) -> None:
        self.ours, self.peer = socket_pair(self)

    def writer(self, chunked: bool) -> tuple[Any, FakeTCP]:
        tcp = FakeTCP(self.ours)
        return self.writer_class(tcp, chunked), tcp

    def test_chunked_frames(self) -> None:
        """A chunked response gets each write as one chunk, sent straight to the socket."""
        writer, tcp = self.writer(chunked=True)
        writer.write(b"data: 1\n\n")
        writer.write(b"x" * 5000)
        self.assertEqual(received(self.peer), b"9\r\ndata: 1\n\n\r\n1388\r\n" + b"x" * 5000 + b"\r\n")
        self.assertEqual(tcp.queued, [])
        self.assertEqual(writer.sent, 5009)
        self.assertTrue(writer.chunked)

    def test_plain_body(self) -> None:
        """A response that is not chunked gets the bytes as they are."""
        writer, tcp = self.writer(chunked=False)
        writer.write(b"abc")
        self.assertEqual((received(self.peer), tcp.queued, writer.sent), (b"abc", [], 3))

    def test_empty_write_writes_nothing(self) -> None:
        """An empty write sends nothing: an empty chunk would end the client's body."""
        for chunked in (True, False):
            writer, tcp = self.writer(chunked)
            writer.write(b"")
            self.assertEqual((received(self.peer), tcp.queued, writer.sent), (b"", [], 0))

    def test_queued_bytes_go_first(self) -> None:
        """With bytes queued in the transport (or it closing), a write is queued after them."""
        for attribute, value in (("dataBuffer", b"q"), ("_tempDataBuffer", [b"q"]),
                                 ("connected", 0), ("_writeDisconnected", True)):
            writer, tcp = self.writer(chunked=True)
            setattr(tcp, attribute, value)
            writer.write(b"data: 2\n\n")
            writer.write(b"z" * 5000)
            self.assertEqual(tcp.queued, [b"9\r\ndata: 2\n\n\r\n", b"1388\r\n" + b"z" * 5000 + b"\r\n"],
                             attribute)
            plain, tcp = self.writer(chunked=False)
            setattr(tcp, attribute, value)
            plain.write(b"z" * 5000)
            self.assertEqual(tcp.queued, [b"z" * 5000], attribute)
        self.assertEqual(received(self.peer), b"")

    def test_full_socket_queues_the_rest(self) -> None:
        """When the kernel takes only part of a frame, the rest goes to the transport, in order."""
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        for chunked in (True, False):
            writer, tcp = self.writer(chunked)
            body = bytes(range(256)) * 4096
            writer.write(body)
            self.assertEqual(len(tcp.queued), 1)
            got = received(self.peer)
            self.assertTrue(got)
            frame = b"100000\r\n" + body + b"\r\n" if chunked else body
            self.assertEqual(got + tcp.queued[0], frame)
            # The fake transport reports nothing queued: the next write goes
            # straight to the (now drained) socket.
            writer.write(b"more")
            self.assertEqual(len(tcp.queued), 1)
            self.assertEqual(received(self.peer), b"4\r\nmore\r\n" if chunked else b"more")

    def test_dead_peer_goes_to_the_transport(self) -> None:
        """A socket the kernel refuses (the peer is gone) leaves the write to the transport."""
        self.peer.close()
        writer, tcp = self.writer(chunked=True)
        writer.write(b"abc")
        self.assertEqual(tcp.queued, [b"3\r\nabc\r\n"])

    def test_write_after_end_raises(self) -> None:
        """After the response is finished a write raises, as twisted.web's does."""
        writer, tcp = self.writer(chunked=True)
        self.assertTrue(writer.open)
        writer.end()
        writer.lose()  # the connection lost later changes nothing
        self.assertFalse(writer.open)
        self.assertIsNone(writer.tcp)
        self.assertRaises(RuntimeError, writer.write, b"x")
        self.assertEqual((received(self.peer), tcp.queued), (b"", []))

    def test_write_after_lose_dropped(self) -> None:
        """After the client is gone writes are dropped, as twisted.web drops them."""
        writer, tcp = self.writer(chunked=True)
        writer.lose()
        writer.end()
        writer.write(b"x")
        self.assertEqual((received(self.peer), tcp.queued, writer.sent), (b"", [], 0))


class PyWriterTests(WriterTests):
    """L{WriterTests} with the Python writer."""

    writer_class = _PyClientWriter
    skip = None


class CWriterTests(SynchronousTestCase):
    """The C writer's own guards."""

    skip = _C_SKIP

    def test_is_the_c_writer_when_built(self) -> None:
        """The client writer is the C one when the extension is built."""
        self.assertTrue(client_wire.ACCELERATED)
        self.assertEqual(ClientWriter.__module__, "aura_proxy._relay_core")

    def test_closed_connection_not_written_directly(self) -> None:
        """
        A connection that has no socket any more (its fileno is -1 or fails)
        gets every write through its own write, framed all the same.
        """

        class Closed(FakeTCP):
            def fileno(self) -> int:
                return -1

        class Broken(FakeTCP):
            def fileno(self) -> int:
                raise OSError("gone")

        ours, peer = socket_pair(self)
        for cls in (Closed, Broken):
            tcp = cls(ours)
            writer = ClientWriter(tcp, True)
            writer.write(b"data: 1\n\n")
            self.assertEqual(tcp.queued, [b"9\r\ndata: 1\n\n\r\n"])
        self.assertEqual(received(peer), b"")

    def test_uninitialised_and_bad_input(self) -> None:
        """A writer made without __init__, or given text, raises instead of crashing."""
        bare = ClientWriter.__new__(ClientWriter)
        self.assertRaises(RuntimeError, bare.write, b"x")
        ours, _ = socket_pair(self)
        self.assertRaises(TypeError, ClientWriter(FakeTCP(ours), True).write, "text")


class _Connection(tcp.Connection):
    """Twisted's TCP connection, with the addresses a server connection has."""

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 40000)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 8080)


def _tcp_client(case: SynchronousTestCase, protocol: Any = None) -> tuple[tcp.Connection, socket.socket]:
    """A real, connected Twisted TCP connection over a socket pair, and its peer."""
    ours, peer = socket_pair(case, tcp=True)
    conn = _Connection(ours, protocol, MemoryReactorClock())
    conn.connected = 1
    return conn, peer


def _flush(conn: tcp.Connection) -> None:
    """Send what the transport queued, as the reactor would when the socket is writable."""
    conn.doWrite()


class GatewayRequestWireTests(SynchronousTestCase):
    """L{GatewayRequest.write}: twisted.web writes the head, its client writer the body."""

    def request(self, fast_path: bool = True, method: bytes = b"GET", proto: bytes = b"HTTP/1.1",
                transport: Any = None) -> tuple[GatewayRequest, Any, Optional[socket.socket]]:
        """A request read by a L{GatewayChannel} from C{transport} (else real TCP), not answered yet."""
        peer = None
        if transport is None:
            transport, peer = _tcp_client(self)
        resource = _Recorder()
        channel = GatewayChannel()
        channel.site = Site(resource)  # type: ignore[arg-type]
        channel.site.fast_path = fast_path  # type: ignore[attr-defined]
        channel.requestFactory = GatewayRequest  # type: ignore[assignment]
        channel.timeOut = None
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, Failure(ConnectionDone()))
        channel.dataReceived(method + b" /x " + proto + b"\r\nHost: gw\r\n\r\n")
        [request] = resource.rendered
        return request, transport, peer

    def test_body_through_the_writer_in_order(self) -> None:
        """
        After the head, body writes go through one client writer: the head
        (still queued in the transport) first, then each chunk, then
        finish()'s last chunk; sentLength counts every body byte.
        """
        request, conn, peer = self.request()
        assert peer is not None
        request.write(b"")
        self.assertIsNone(request._writer)
        writer = request.client_writer()
        self.assertIsInstance(writer, ClientWriter)
        request.write(b"one")  # queued: the head is not sent yet
        _flush(conn)
        request.write(b"two")  # straight to the socket
        self.assertFalse(conn.dataBuffer or conn._tempDataBuffer)
        request.write(b"")
        request.finish()
        _flush(conn)
        head, _, body = received(peer).partition(b"\r\n\r\n")
        self.assertIn(b"Transfer-Encoding: chunked", head)
        self.assertEqual(body, b"3\r\none\r\n3\r\ntwo\r\n0\r\n\r\n")
        self.assertEqual(request.sentLength, 6)
        self.assertFalse(writer.open)  # type: ignore[union-attr]

    def test_second_write_opens_the_writer(self) -> None:
        """A response written in pieces gets its writer on the first write after the head."""
        request, conn, peer = self.request()
        assert peer is not None
        request.write(b"head and first")
        self.assertIsNone(request._writer)
        request.write(b"second")
        self.assertIsNotNone(request._writer)
        request.finish()
        _flush(conn)
        self.assertTrue(received(peer).endswith(b"e\r\nhead and first\r\n6\r\nsecond\r\n0\r\n\r\n"))
        self.assertEqual(request.sentLength, 20)

    def test_fast_path_off(self) -> None:
        """With the site's fast_path off every write is twisted.web's own: queued in the transport."""
        request, conn, peer = self.request(fast_path=False)
        assert peer is not None
        request.write(b"")
        self.assertIsNone(request.client_writer())
        _flush(conn)
        request.write(b"one")
        self.assertEqual(b"".join(conn._tempDataBuffer), b"3\r\none\r\n")
        request.finish()
        _flush(conn)
        self.assertTrue(received(peer).endswith(b"\r\n\r\n3\r\none\r\n0\r\n\r\n"))
        self.assertEqual(request.sentLength, 3)

    def test_no_writer_where_unsafe(self) -> None:
        """HEAD, 204, 304, HTTP/1.0, TLS and a finished or lost request get no writer."""
        cases: list[tuple[str, dict[str, Any], int]] = [
            ("HEAD", {"method": b"HEAD"}, 200), ("204", {}, 204), ("304", {}, 304),
            ("HTTP/1.0", {"proto": b"HTTP/1.0"}, 200),
            ("not TCP (TLS, HTTP/2)", {"transport": StringTransport()}, 200),
        ]
        for name, kw, code in cases:
            request, _, _ = self.request(**kw)
            request.setResponseCode(code)
            request.write(b"")
            self.assertIsNone(request.client_writer(), name)
        request, _, _ = self.request()
        request.write(b"")
        request.finish()
        self.assertIsNone(request.client_writer(), "finished")
        request, _, _ = self.request()
        request.write(b"")
        request.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(request.client_writer(), "lost")

    def test_no_writer_when_twisted_changed(self) -> None:
        """When Twisted's write buffers are not as expected, twisted.web's write serves."""
        self.patch(twisted_internals, "INTERNALS", dict(
            twisted_internals.INTERNALS,
            write_buffers=twisted_internals.Internal("x", "y", False, "renamed"),
        ))
        request, _, _ = self.request()
        request.write(b"")
        self.assertIsNone(request.client_writer())

    def test_writes_after_disconnect_dropped(self) -> None:
        """After the client is gone, writes are dropped and the request says it is gone."""
        request, conn, peer = self.request()
        assert peer is not None
        request.write(b"")
        writer = request.client_writer()
        assert writer is not None
        request.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(request.client_gone)
        request.write(b"late")
        self.assertEqual(writer.sent, 0)

    def test_end_response(self) -> None:
        """end_response unregisters the producer and finishes, or aborts a truncated body."""
        request, conn, peer = self.request()
        request.registerProducer(_Producer(), True)
        request.write(b"part")
        end_response(request, complete=True)
        self.assertTrue(request.finished)
        self.assertIsNone(request.producer)
        aborted, transport, _ = self.request(transport=StringTransport())
        aborted.write(b"part")
        end_response(aborted, complete=False)
        self.assertFalse(aborted.finished)
        self.assertTrue(transport.disconnecting)

    def test_abort_http2_stream(self) -> None:
        """
        A truncated body on an HTTP/2 stream (a request without a transport:
        its channel is the stream) resets that stream, through the
        channel's abortConnection, not the whole connection.
        """
        class Stream:
            transport = None
            aborted = 0

            def abortConnection(self) -> None:
                self.aborted += 1

        stream = Stream()
        request = GatewayRequest.__new__(GatewayRequest)
        request.channel = stream  # type: ignore[assignment]
        request.transport = None
        client_wire.abort_client(request)
        self.assertEqual(stream.aborted, 1)


class _Recorder:
    """A leaf resource that keeps the requests it renders, unanswered."""

    isLeaf = True

    def __init__(self) -> None:
        self.rendered: list[GatewayRequest] = []

    def render(self, request: GatewayRequest) -> object:
        self.rendered.append(request)
        return NOT_DONE_YET


class _Producer:
    """A push producer that does nothing."""

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Upstream:
    """An upstream body transport that records what the relay asks of it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class _StreamResponse:
    """An upstream SSE response whose body the test feeds."""

    code = 200
    phrase = b"OK"
    length = UNKNOWN_LENGTH

    def __init__(self) -> None:
        self.headers = Headers({b"content-type": [b"text/event-stream"]})
        self.transport = _Upstream()
        self.relay: Optional[Relay] = None

    def deliverBody(self, protocol: Relay) -> None:
        self.relay = protocol
        protocol.makeConnection(self.transport)  # type: ignore[arg-type]


class DisconnectTests(SynchronousTestCase):
    """A client that goes away reaches the relay once, whichever way Twisted reports it."""

    def test_disconnect_reaches_the_relay_once(self) -> None:
        """
        A client's connection lost mid-stream (Twisted stops the registered
        producer, then tells the protocol) ends the relay once: the upstream
        is stopped, and the call is recorded once, as client_disconnect.
        """
        calls: list[Relay] = []
        client_gone = Relay.client_gone

        def counted(relay: Relay) -> None:
            calls.append(relay)
            client_gone(relay)

        self.patch(Relay, "client_gone", counted)
        clock = MemoryReactorClock()
        agent = ControlledAgent()
        history = History()
        gateway = Gateway(parse_config(CONFIG, "test.ini"), clock,
                          UpstreamClient(clock, 5, 10, agent=agent), history)  # type: ignore[arg-type]
        site = GatewaySite(gateway, reactor=clock)
        protocol = site.buildProtocol(None)
        conn, peer = _tcp_client(self, protocol)
        protocol.makeConnection(conn)
        protocol.dataReceived(b"GET /api/aura/s HTTP/1.1\r\nHost: gw\r\nX-Tenant-ID: t\r\n\r\n")
        response = _StreamResponse()
        [(_, _, answer)] = agent.requests
        answer.callback(response)
        relay = response.relay
        assert relay is not None
        relay.dataReceived(b"data: 1\n\n")
        _flush(conn)
        self.assertIn(b"data: 1\n\n", received(peer))

        conn.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(calls, [relay])
        self.assertEqual(response.transport.calls, ["pause", "stop"])
        relay.connectionLost(Failure(ResponseFailed([Failure(ConnectionDone())])))
        self.assertEqual([r.end_reason for r in history.records], ["client_disconnect"])
        self.assertEqual(gateway.active_streams(), 0)
