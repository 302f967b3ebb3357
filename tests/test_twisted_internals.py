"""
Tests for L{aura_proxy.twisted_internals}, the one seam to Twisted's private
names.

Two kinds: a canary per probe, which fails loudly when a tested Twisted no
longer has a private name in the shape a fast path expects (the fast path
would silently be off), and a fallback test per probe, which switches it off
and checks that stock Twisted then serves.
"""

from __future__ import annotations

import socket
from typing import Any
import sys


import twisted

from twisted.internet import tcp
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

from aura_proxy import header_store
from aura_proxy import twisted_internals as internals


#: The probes known to fail on a tested Twisted version (the floor of the
#: range in setup.py): their fast paths are off there, by design.
KNOWN_UNAVAILABLE = {
    # 24.3 keeps header values under lower-case names: header_store's public store serves.
    "24.3.0": {"raw_headers"},
}
_UNAVAILABLE_HERE = KNOWN_UNAVAILABLE.get(twisted.__version__, set())


def switched_off(case: SynchronousTestCase, key: str) -> None:
    """Make probe C{key} read as failed for the rest of C{case}."""
    probes = dict(internals.INTERNALS)
    probes[key] = probes[key]._replace(ok=False, why="switched off by a test")
    case.patch(internals, "INTERNALS", probes)


class CanaryTests(SynchronousTestCase):
    """Every private name each fast path relies on is there, as expected, on this Twisted."""

    def assertProbe(self, key: str) -> None:
        internal = internals.INTERNALS[key]
        if key in _UNAVAILABLE_HERE:
            self.assertFalse(internal.ok, f"{internal.name} is known to be unavailable on Twisted "
                             f"{twisted.__version__}, but was found: update KNOWN_UNAVAILABLE")
            return
        self.assertTrue(internal.ok, f"{internal.name} ({internal.serves}): {internal.why}")

    def test_raw_headers(self) -> None:
        """Headers keeps its values in _rawHeaders, by canonical name."""
        self.assertProbe("raw_headers")

    def test_poll(self) -> None:
        """The epoll reactor's poll step uses _poller, _selectables and _doReadOrWrite."""
        self.assertProbe("poll")

    def test_write_buffers(self) -> None:
        """TCP transports queue writes in dataBuffer/_tempDataBuffer and call startWriting."""
        self.assertProbe("write_buffers")

    def test_do_read(self) -> None:
        """A TCP connection's doRead reads self.socket and calls _dataReceived."""
        self.assertProbe("do_read")

    def test_wrapping_protocol(self) -> None:
        """A client endpoint's wrapper keeps its protocol in _wrappedProtocol."""
        self.assertProbe("wrapping_protocol")

    def test_client_errors(self) -> None:
        """twisted.web's private client errors can be imported."""
        self.assertProbe("client_errors")

    def test_channel_protocol(self) -> None:
        """twisted.web.http._GenericHTTPChannelProtocol wraps a channel in _channel."""
        self.assertProbe("channel_protocol")

    def test_channel_protocol_switches_to_http2(self) -> None:
        """
        The wrapper the gateway's site puts around its channel becomes
        Twisted's own H2Connection when TLS negotiated h2 by ALPN: HTTP/2
        needs no code of aura-proxy's, and GatewayChannel (HTTP/1.1 only)
        never sees an HTTP/2 byte.
        """
        import h2.config
        import h2.connection
        from twisted.internet.testing import StringTransport
        from twisted.web._http2 import H2Connection

        from aura_proxy.site import GatewayChannel

        wrap = internals.channel_protocol_factory()
        assert wrap is not None
        protocol = wrap(GatewayChannel())
        transport = StringTransport()
        transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
        protocol.makeConnection(transport)
        client = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        protocol.dataReceived(client.data_to_send())
        self.assertIsInstance(protocol._channel, H2Connection)
        protocol.connectionLost(Failure(ConnectionDone()))

    def test_h2_stream_done(self) -> None:
        """H2Connection keeps a cleanup Deferred per stream and its h2 connection in conn."""
        self.assertProbe("h2_stream_done")

    def test_h2_idle(self) -> None:
        """An H2Stream keeps its H2Connection, a TimeoutMixin, in _conn."""
        self.assertProbe("h2_idle")

    def test_request_line(self) -> None:
        """HTTPChannel keeps the request line in _command, _path and _version."""
        self.assertProbe("request_line")

    def test_endpoint_address(self) -> None:
        """A tcp: server endpoint keeps its port, interface and backlog."""
        self.assertProbe("endpoint_address")

    def test_accepts(self) -> None:
        """A listening TCP port accepts up to numberAccepts connections a turn."""
        self.assertProbe("accepts")

    def test_pool_factory(self) -> None:
        """HTTPConnectionPool builds its protocols with _factory."""
        self.assertProbe("pool_factory")

    def test_bad_request(self) -> None:
        """HTTPChannel answers malformed HTTP through _respondToBadRequestAndDisconnect."""
        self.assertProbe("bad_request")

    def test_nothing_else_unavailable(self) -> None:
        """On a tested Twisted every fast path is available but those known to be off there."""
        off = {key for key, internal in internals.INTERNALS.items() if not internal.ok}
        self.assertEqual(off, _UNAVAILABLE_HERE)


class ProbeTests(SynchronousTestCase):
    """How a probe reports."""

    def test_failing_check_is_unavailable(self) -> None:
        """A check that raises makes its probe unavailable, with the error as the reason."""
        self.patch(internals, "INTERNALS", dict(internals.INTERNALS))

        def broken() -> None:
            raise AttributeError("no such thing")

        internals._probe("test", "Thing._x", "a test", broken)  # type: ignore[arg-type]
        self.assertFalse(internals.available("test"))
        self.assertEqual(internals.INTERNALS["test"].why, "AttributeError: no such thing")
        self.assertIn(internals.INTERNALS["test"], internals.unavailable())

    def test_uses(self) -> None:
        """_uses names the attributes a method no longer reads."""
        def f(self: object) -> object:
            return self.a  # type: ignore[attr-defined]

        self.assertIsNone(internals._uses(f, "a"))
        self.assertIn("no longer uses b", internals._uses(f, "a", "b") or "")


class FallbackTests(SynchronousTestCase):
    """With a probe failed, each fast path steps aside for stock Twisted."""

    def test_headers_public_store(self) -> None:
        """Without the header layout, the store goes through Headers' public methods."""
        self.patch(header_store, "DIRECT", False)
        h = Headers({b"x-a": [b"1"]})
        raw = header_store.store(h)
        self.assertNotIsInstance(raw, dict)
        raw[b"X-B"] = [b"2"]
        self.assertEqual(h.getRawHeaders(b"x-b"), [b"2"])

    def test_no_poll_parts(self) -> None:
        """Without the poll step's names, the lean loop is not installed."""
        from twisted.internet.epollreactor import EPollReactor

        from aura_proxy.eventloop import use_lean_poll

        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.assertIsNotNone(internals.poll_parts(reactor))
        switched_off(self, "poll")
        self.assertIsNone(internals.poll_parts(reactor))
        original = reactor.doIteration
        self.assertFalse(use_lean_poll(reactor))
        self.assertEqual(reactor.doIteration, original)

    def test_no_direct_send(self) -> None:
        """Without the write buffers' layout, nothing is sent to a socket directly."""
        transport = _tcp_server(self)
        self.assertIs(internals.direct_send_transport(transport), transport)
        switched_off(self, "write_buffers")
        self.assertIsNone(internals.direct_send_transport(transport))
        self.assertFalse(internals.intercept_start_writing(transport, lambda: None))

    def test_direct_send_only_plain_tcp(self) -> None:
        """Only a connected plain TCP connection is sent to directly."""
        self.assertIsNone(internals.direct_send_transport(object()))
        transport = _tcp_server(self)
        transport.TLS = True
        self.assertIsNone(internals.direct_send_transport(transport))
        transport.TLS = False
        transport.connected = False
        self.assertIsNone(internals.direct_send_transport(transport))

    def test_send_queue(self) -> None:
        """send_queue_empty and unsent_bytes see what a transport's write queued."""
        transport = _tcp_server(self)
        self.assertTrue(internals.send_queue_empty(transport))
        self.assertFalse(internals.unsent_bytes(transport))
        transport.write(b"queued")
        self.assertFalse(internals.send_queue_empty(transport))
        self.assertTrue(internals.unsent_bytes(transport))

    def test_start_writing_intercepted(self) -> None:
        """With the layout as expected, a write asks the given function, not the reactor."""
        transport = _tcp_server(self)
        asked: list[bool] = []
        self.assertTrue(internals.intercept_start_writing(transport, lambda: asked.append(True)))
        transport.write(b"x")
        self.assertEqual(asked, [True])
        self.assertFalse(transport.reactor.writers)  # type: ignore[attr-defined]

    def test_no_do_read_replacement(self) -> None:
        """Without doRead's expected shape, a transport keeps its own."""
        transport = _tcp_server(self)
        switched_off(self, "do_read")
        self.assertFalse(internals.replace_do_read(transport, lambda: None))
        self.assertEqual(transport.doRead.__func__, tcp.Connection.doRead)  # type: ignore[attr-defined]

    def test_no_unwrapping(self) -> None:
        """Without the wrapper's layout, the endpoint's wrapper stays in between."""
        from twisted.internet.defer import Deferred
        from twisted.internet.endpoints import _WrappingProtocol

        protocol = Protocol()

        class Transport:
            pass

        unwrapped, wrapped = Transport(), Transport()
        for transport in (unwrapped, wrapped):
            transport.protocol = _WrappingProtocol(Deferred(), protocol)  # type: ignore[attr-defined]
        self.assertTrue(internals.unwrap_endpoint_protocol(unwrapped, protocol))
        self.assertIs(unwrapped.protocol, protocol)  # type: ignore[attr-defined]
        switched_off(self, "wrapping_protocol")
        self.assertFalse(internals.unwrap_endpoint_protocol(wrapped, protocol))
        self.assertIsInstance(wrapped.protocol, _WrappingProtocol)  # type: ignore[attr-defined]

    def test_client_errors_fallback(self) -> None:
        """Without twisted.web's private client errors, equivalents of aura-proxy's own are used."""
        saved = sys.modules["twisted.web._newclient"]
        self.addCleanup(sys.modules.__setitem__, "twisted.web._newclient", saved)
        sys.modules["twisted.web._newclient"] = None  # type: ignore[assignment]  # import fails
        parse_error, wrong_length, data_loss, problem = internals._client_errors()
        self.assertIsNotNone(problem)
        for error in (parse_error, wrong_length, data_loss):
            self.assertTrue(issubclass(error, Exception))
            self.assertTrue(error.__module__.startswith("aura_proxy"))

    def test_no_channel_protocol(self) -> None:
        """Without the generic channel protocol, the site keeps twisted.web's default."""
        self.assertIsNotNone(internals.channel_protocol_factory())
        switched_off(self, "channel_protocol")
        self.assertIsNone(internals.channel_protocol_factory())

    def test_malformed_answer(self) -> None:
        """
        A channel class gets the gateway's answer to malformed HTTP; without
        the private name, it keeps twisted.web's bare 400.
        """
        from twisted.internet.testing import StringTransport

        answered: list[object] = []

        def answer(channel: HTTPChannel) -> None:
            answered.append(channel)
            channel.loseConnection()

        class Ours(HTTPChannel):
            pass

        self.assertTrue(internals.answer_malformed_requests(Ours, answer))
        channel = Ours()
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"NOT HTTP\r\n\r\n")
        self.assertEqual(answered, [channel])

        class Stock(HTTPChannel):
            pass

        switched_off(self, "bad_request")
        self.assertFalse(internals.answer_malformed_requests(Stock, answer))
        transport = StringTransport()
        channel = Stock()
        channel.makeConnection(transport)
        channel.dataReceived(b"NOT HTTP\r\n\r\n")
        self.assertEqual(transport.value(), b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.assertEqual(len(answered), 1)
    def test_hold_connection_timeout(self) -> None:
        """
        An HTTP/2 connection's idle timeout is off while any of its requests
        is held and back (its old value) when the last is released, unless
        the connection is being lost; a release counts once; without the
        names nothing is held.
        """
        from twisted.internet.testing import StringTransport
        from twisted.protocols.policies import TimeoutMixin

        class Conn(TimeoutMixin):
            def __init__(self) -> None:
                self.timeouts: list[Any] = []
                self.transport = StringTransport()
                self.timeOut = 60

            def setTimeout(self, period: Any) -> Any:
                self.timeouts.append(period)
                previous, self.timeOut = self.timeOut, period
                return previous

        class Stream:
            def __init__(self, conn: Conn) -> None:
                self._conn = conn

        conn = Conn()
        first = internals.hold_connection_timeout(Stream(conn))
        second = internals.hold_connection_timeout(Stream(conn))
        assert first is not None and second is not None
        self.assertEqual(conn.timeouts, [None])
        first()
        first()
        self.assertEqual(conn.timeouts, [None])
        second()
        self.assertEqual(conn.timeouts, [None, 60])
        lost = Conn()
        release = internals.hold_connection_timeout(Stream(lost))
        assert release is not None
        lost.transport.connected = False
        release()
        self.assertEqual(lost.timeouts, [None], "a timer re-armed on a lost connection")
        switched_off(self, "h2_idle")
        self.assertIsNone(internals.hold_connection_timeout(Stream(Conn())))

    def test_stop_stream_body(self) -> None:
        """
        An HTTP/2 stream whose response is done is reset with NO_ERROR once
        Twisted has cleaned it up; without the names nothing is scheduled
        (the stream just ends, as stock Twisted ends it).
        """
        from twisted.internet.defer import Deferred

        class H2:
            def __init__(self) -> None:
                self.resets: list[tuple[int, int]] = []
                self.flushed = 0

            def reset_stream(self, stream_id: int, error_code: int) -> None:
                self.resets.append((stream_id, error_code))

        class Conn:
            def __init__(self) -> None:
                self.conn = H2()
                self._streamCleanupCallbacks = {3: Deferred()}

            def _tryToWriteControlData(self) -> None:
                self.conn.flushed += 1

        class Stream:
            streamID = 3

            def __init__(self) -> None:
                self._conn = Conn()

        stream = Stream()
        self.assertTrue(internals.stop_stream_body(stream))
        self.assertEqual(stream._conn.conn.resets, [])
        stream._conn._streamCleanupCallbacks[3].callback(3)
        self.assertEqual((stream._conn.conn.resets, stream._conn.conn.flushed), ([(3, 0)], 1))
        switched_off(self, "h2_stream_done")
        self.assertFalse(internals.stop_stream_body(Stream()))

    def test_request_line(self) -> None:
        """The request line a channel is reading; defaults without the names."""
        channel = HTTPChannel()
        channel._command, channel._path, channel._version = b"POST", b"/a?b", b"HTTP/1.0"
        self.assertEqual(internals.request_line(channel), (b"POST", b"/a?b", b"HTTP/1.0"))
        switched_off(self, "request_line")
        self.assertEqual(internals.request_line(channel), (b"", b"", b"HTTP/1.1"))

    def test_endpoint_address_parsed_alike(self) -> None:
        """aura-proxy's own parse of a tcp: description agrees with the endpoint's."""
        for description in (
            "tcp:8080", "tcp:0:interface=127.0.0.1:backlog=7", r"tcp:8080:interface=\:\:1",
            "tcp:port=9000:backlog=3",
        ):
            endpoint = serverFromString(MemoryReactor(), description)
            expected = internals.tcp_endpoint_address(endpoint, description)
            self.assertEqual(internals._parse_tcp_description(description), expected, description)

    def test_no_endpoint_address(self) -> None:
        """Without the endpoint's names, the description itself is parsed."""
        switched_off(self, "endpoint_address")
        self.assertEqual(
            internals.tcp_endpoint_address(object(), "tcp:81:interface=127.0.0.3:backlog=9"),
            (81, "127.0.0.3", 9),
        )

    def test_accept_one_at_a_time(self) -> None:
        """A port made to accept one at a time keeps numberAccepts at 1; without the name, unchanged."""
        port = tcp.Port(0, Factory(), reactor=MemoryReactor())
        self.assertTrue(internals.accept_one_at_a_time(port))
        port.numberAccepts = 120
        self.assertEqual(port.numberAccepts, 1)
        self.assertTrue(internals.accept_one_at_a_time(port))  # twice: the same class
        self.assertEqual(type(port).__mro__[1], tcp.Port)
        other = tcp.Port(0, Factory(), reactor=MemoryReactor())
        switched_off(self, "accepts")
        self.assertFalse(internals.accept_one_at_a_time(other))
        self.assertIs(type(other), tcp.Port)

    def test_quiet_pool(self) -> None:
        """The pool's connections are quiet; without the name the pool is left alone."""
        pool = HTTPConnectionPool(MemoryReactor())
        self.assertTrue(internals.quiet_pool(pool))
        self.assertFalse(pool._factory.noisy)
        other = HTTPConnectionPool(MemoryReactor())
        factory = other._factory
        switched_off(self, "pool_factory")
        self.assertFalse(internals.quiet_pool(other))
        self.assertIs(other._factory, factory)


def _tcp_server(self) -> tcp.Server:
    """A TCP server connection over one end of a socket pair, on a memory reactor."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    reactor = MemoryReactor()
    transport = tcp.Server(ours, Protocol(), ("127.0.0.1", 1), None, 1, reactor)  # type: ignore[arg-type]

    def close() -> None:
        ours.close()
        theirs.close()

    import atexit

    atexit.register(close)
    return transport
