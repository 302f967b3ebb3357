"""
Tests for L{aura_proxy.fastclient}: the lean HTTP/1.1 agent, driven over
L{StringTransport}s with a L{MemoryReactorClock} (no sockets).
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web._newclient import RequestGenerationFailed
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer
from zope.interface.verify import verifyObject

from aura_proxy.fastclient import FastAgent
from aura_proxy.upstream import BytesProducer

URL = b"http://127.0.0.1:8080/stream?x=1"
OK_CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
EVENT = b"id: 1\ndata: 1234567890 1 xxxxxxxxxxxxxxxxxxxxx\n\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Collector(Protocol):
    """A body protocol that keeps every dataReceived call and the end reason."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self.reason: Optional[Failure] = None

    def dataReceived(self, data: bytes) -> None:
        self.calls.append(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.reason = reason

    @property
    def body(self) -> bytes:
        return b"".join(self.calls)


class CountingTransport(StringTransport):
    """A StringTransport that counts write calls."""

    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        StringTransport.write(self, data)


class Harness:
    """An agent on a memory reactor, and the connections it opens."""

    def __init__(self, max_idle: int = 4, idle_timeout: float = 4.0,
                 fallback: Optional[IAgent] = None) -> None:
        self.reactor = MemoryReactorClock()
        self.agent = FastAgent(self.reactor, connect_timeout=5.0, max_idle_per_host=max_idle,
                               idle_timeout=idle_timeout, fallback=fallback)
        self.connected = 0

    def request(self, method: bytes = b"GET", url: bytes = URL, headers: Optional[Headers] = None,
                body: Optional[IBodyProducer] = None) -> "Deferred[IResponse]":
        return self.agent.request(method, url, headers, body)

    def connect(self) -> tuple[Any, CountingTransport]:
        """Complete the newest pending connection attempt."""
        assert len(self.reactor.tcpClients) > self.connected, "no new connection attempt"
        factory = self.reactor.tcpClients[self.connected][2]
        self.connected += 1
        protocol: Any = factory.buildProtocol(None)
        transport = CountingTransport()
        protocol.makeConnection(transport)
        return protocol, transport


class Results:
    """What a Deferred fired with."""

    def __init__(self, d: "Deferred[Any]") -> None:
        self.result: Any = None
        self.failure: Optional[Failure] = None
        d.addCallbacks(self._ok, self._fail)

    def _ok(self, result: Any) -> None:
        self.result = result

    def _fail(self, failure: Failure) -> None:
        self.failure = failure


@implementer(IBodyProducer)
class AsyncProducer:
    """A body producer that writes when told to and records pause/resume/stop."""

    def __init__(self, length: object = UNKNOWN_LENGTH) -> None:
        self.length = length
        self.consumer: Optional[IConsumer] = None
        self.finished: Deferred[None] = Deferred()
        self.events: list[str] = []

    def startProducing(self, consumer: IConsumer) -> "Deferred[None]":
        self.consumer = consumer
        return self.finished

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


class RequestSerializationTests(SynchronousTestCase):
    """What goes on the wire for a request."""

    def test_get_head(self) -> None:
        """
        A GET writes the method, the path and query as given (no
        re-encoding), Host from the URL, every header value in order, and no
        Content-Length, in one write.
        """
        h = Harness()
        headers = Headers()
        headers.addRawHeader(b"X-Multi", b"one")
        headers.addRawHeader(b"Accept", b"text/event-stream")
        headers.addRawHeader(b"X-Multi", b"two")
        h.request(b"GET", b"http://127.0.0.1:8080/a%2fb/%E2%82%AC?q=%41+b&z", headers)
        _, t = h.connect()
        self.assertEqual(
            t.value(),
            b"GET /a%2fb/%E2%82%AC?q=%41+b&z HTTP/1.1\r\n"
            b"Host: 127.0.0.1:8080\r\n"
            b"X-Multi: one\r\nX-Multi: two\r\n"
            b"Accept: text/event-stream\r\n\r\n",
        )
        self.assertEqual(t.writes, 1)

    def test_host_header_given(self) -> None:
        """A Host header in the request headers replaces the URL's; port 80 is implicit."""
        h = Harness()
        h.request(b"GET", b"http://127.0.0.1/", Headers({b"Host": [b"example.com"]}))
        _, t = h.connect()
        self.assertEqual(t.value(), b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n")
        self.assertEqual(h.reactor.tcpClients[0][:2], ("127.0.0.1", 80))

    def test_empty_path(self) -> None:
        """A URL without a path asks for C{/}; a fragment is not sent."""
        h = Harness()
        h.request(b"GET", b"http://127.0.0.1:81?a=1#frag")
        _, t = h.connect()
        self.assertTrue(t.value().startswith(b"GET /?a=1 HTTP/1.1\r\nHost: 127.0.0.1:81\r\n"))

    def test_body_known_length(self) -> None:
        """
        A producer with a length gets Content-Length; a synchronous producer's
        body goes out with the head in one write; framing headers given by the
        caller are not repeated.
        """
        h = Harness()
        h.request(b"POST", URL, Headers({b"content-length": [b"99"]}), BytesProducer(b"hello"))
        _, t = h.connect()
        self.assertEqual(
            t.value(),
            b"POST /stream?x=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
            b"Content-Length: 5\r\n\r\nhello",
        )
        self.assertEqual(t.writes, 1)
        self.assertIsNone(t.producer)

    def test_empty_body(self) -> None:
        """An empty body sends C{Content-Length: 0}."""
        h = Harness()
        h.request(b"PUT", URL, None, BytesProducer(b""))
        _, t = h.connect()
        self.assertTrue(t.value().endswith(b"Content-Length: 0\r\n\r\n"))

    def test_body_chunked_async(self) -> None:
        """
        A producer of unknown length is sent chunked; one still producing is
        registered with the transport (which pauses and resumes it) and
        unregistered once its Deferred fires.
        """
        h = Harness()
        producer = AsyncProducer()
        h.request(b"POST", URL, None, producer)
        _, t = h.connect()
        self.assertIn(b"Transfer-Encoding: chunked\r\n\r\n", t.value())
        self.assertIs(t.producer, producer)
        self.assertTrue(t.streaming)
        assert t.producer is not None
        t.producer.pauseProducing()
        t.producer.resumeProducing()
        self.assertEqual(producer.events, ["pause", "resume"])
        t.clear()
        assert producer.consumer is not None
        producer.consumer.write(b"abc")
        producer.consumer.write(b"0123456789abcdef")
        producer.finished.callback(None)
        self.assertEqual(t.value(), b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n")
        self.assertIsNone(t.producer)

    def test_body_too_short(self) -> None:
        """A producer writing less than its length fails the request and the connection."""
        h = Harness()
        producer = AsyncProducer(length=10)
        r = Results(h.request(b"POST", URL, None, producer))
        _, t = h.connect()
        assert producer.consumer is not None
        producer.consumer.write(b"abc")
        producer.finished.callback(None)
        assert r.failure is not None
        self.assertTrue(r.failure.check(RequestGenerationFailed))
        self.assertTrue(t.disconnected)

    def test_bad_method_and_target(self) -> None:
        """A method or target with spaces or control bytes is refused before connecting."""
        h = Harness()
        self.failureResultOf(h.request(b"GET X", URL), ValueError)
        self.failureResultOf(h.request(b"GET", b"http://127.0.0.1/a b"), ValueError)
        self.assertEqual(h.reactor.tcpClients, [])

    def test_fallback(self) -> None:
        """Schemes other than http and https go to the fallback agent; without one they fail."""

        @implementer(IAgent)
        class Fallback:
            def __init__(self) -> None:
                self.calls: list[bytes] = []

            def request(self, method: bytes, uri: bytes, headers: Any = None,
                        bodyProducer: Any = None) -> "Deferred[Any]":
                self.calls.append(uri)
                return succeed("fallback")

        fallback = Fallback()
        h = Harness(fallback=fallback)  # type: ignore[arg-type]
        self.assertEqual(self.successResultOf(h.request(b"GET", b"ftp://x/y")), "fallback")
        self.assertEqual(fallback.calls, [b"ftp://x/y"])
        from twisted.web.error import SchemeNotSupported
        self.failureResultOf(Harness().request(b"GET", b"ftp://x/y"), SchemeNotSupported)

    def test_https_connects_through_tls(self) -> None:
        """
        An https:// URL is the agent's own: a TCP connection to port 443 by
        default, wrapped in TLS with the policy's creator for that host and
        port, pooled apart from http:// (its Host header has no :443).
        """
        asked: list[tuple[bytes, int]] = []

        class Policy:
            def creatorForNetloc(self, hostname: bytes, port: int) -> object:
                asked.append((hostname, port))
                from twisted.internet.ssl import optionsForClientTLS

                return optionsForClientTLS(hostname.decode("ascii"))

        h = Harness()
        h.agent.tls_policy = Policy()  # type: ignore[assignment]
        h.request(b"GET", b"https://127.0.0.1/y")
        host, port, factory = h.reactor.tcpClients[0][:3]
        self.assertEqual((host, port), ("127.0.0.1", 443))
        self.assertEqual(asked, [(b"127.0.0.1", 443)])
        from twisted.protocols.tls import TLSMemoryBIOFactory

        self.assertIsInstance(getattr(factory, "_wrappedFactory", factory), TLSMemoryBIOFactory)

    def test_provides_iagent(self) -> None:
        """FastAgent provides IAgent."""
        self.assertTrue(verifyObject(IAgent, Harness().agent))


class ResponseTests(SynchronousTestCase):
    """Response heads and bodies."""

    def get(self, h: Optional[Harness] = None, method: bytes = b"GET") -> tuple[Any, CountingTransport, Results]:
        h = h or Harness()
        r = Results(h.request(method))
        p, t = h.connect()
        return p, t, r

    def test_content_length(self) -> None:
        """
        A Content-Length body arrives in pieces and ends with ResponseDone;
        the length is on the response, not in its headers.
        """
        p, t, r = self.get()
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-A: b\r\n\r\n0123")
        response = r.result
        verifyObject(IResponse, response)
        self.assertEqual((response.code, response.phrase, response.version), (200, b"OK", (b"HTTP", 1, 1)))
        self.assertEqual(response.length, 10)
        self.assertIsNone(response.headers.getRawHeaders(b"content-length"))
        self.assertEqual(response.headers.getRawHeaders(b"x-a"), [b"b"])
        body = Collector()
        response.deliverBody(body)
        self.assertEqual(body.calls, [b"0123"])
        p.dataReceived(b"456")
        p.dataReceived(b"789")
        self.assertEqual(body.body, b"0123456789")
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))

    def test_bare_lf_head(self) -> None:
        """A head with bare LF line ends is understood."""
        p, t, r = self.get()
        p.dataReceived(b"HTTP/1.1 201 Created\nContent-Length: 2\nX-A:  b \n\nok")
        self.assertEqual(r.result.code, 201)
        self.assertEqual(r.result.headers.getRawHeaders(b"x-a"), [b"b"])
        body = Collector()
        r.result.deliverBody(body)
        self.assertEqual(body.body, b"ok")

    def test_head_split_everywhere(self) -> None:
        """A response head is parsed whatever read boundaries it arrives in."""
        raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Y: z\r\n\r\nabc"
        for i in range(1, len(raw)):
            p, t, r = self.get()
            p.dataReceived(raw[:i])
            p.dataReceived(raw[i:])
            body = Collector()
            r.result.deliverBody(body)
            self.assertEqual(body.body, b"abc", i)
            assert body.reason is not None
            self.assertTrue(body.reason.check(ResponseDone))

    def test_chunked_split_at_every_byte(self) -> None:
        """
        A chunked body with several chunks, an extension and a trailer,
        split into two reads at every byte position, decodes to the same bytes
        and ends with ResponseDone.
        """
        body_raw = (chunk(b"hello ") + b"5;name=value\r\nworld\r\n" + chunk(EVENT)
                    + b"0\r\nX-Trailer: 1\r\n\r\n")
        for i in range(len(body_raw) + 1):
            p, t, r = self.get()
            p.dataReceived(OK_CHUNKED)
            body = Collector()
            r.result.deliverBody(body)
            self.assertIs(r.result.length, UNKNOWN_LENGTH)
            self.assertIsNone(r.result.headers.getRawHeaders(b"transfer-encoding"))
            p.dataReceived(body_raw[:i])
            p.dataReceived(body_raw[i:])
            self.assertEqual(body.body, b"hello world" + EVENT, i)
            self.assertNotIn(b"", body.calls)
            assert body.reason is not None, i
            self.assertTrue(body.reason.check(ResponseDone), i)

    def test_chunked_byte_by_byte(self) -> None:
        """A chunked body fed one byte per read decodes correctly."""
        p, t, r = self.get()
        p.dataReceived(OK_CHUNKED)
        body = Collector()
        r.result.deliverBody(body)
        for b in chunk(EVENT) + chunk(b"x") + b"0\r\n\r\n":
            p.dataReceived(bytes([b]))
        self.assertEqual(body.body, EVENT + b"x")
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))

    def test_many_chunks_one_delivery(self) -> None:
        """Several chunks in one read reach the body protocol in ONE dataReceived call."""
        p, t, r = self.get()
        p.dataReceived(OK_CHUNKED)
        body = Collector()
        r.result.deliverBody(body)
        p.dataReceived(chunk(EVENT) * 20)
        self.assertEqual(body.calls, [EVENT * 20])
        p.dataReceived(chunk(b"a") + chunk(b"b") + chunk(b"c")[:2])
        self.assertEqual(body.calls[1:], [b"ab"])
        p.dataReceived(chunk(b"c")[2:] + chunk(b"d"))
        self.assertEqual(body.calls[2:], [b"cd"])
        self.assertIsNone(body.reason)

    def test_body_before_deliver(self) -> None:
        """
        Body bytes that arrive with the head are kept until deliverBody; the
        socket is not read meanwhile.
        """
        p, t, r = self.get()
        p.dataReceived(OK_CHUNKED + chunk(b"early"))
        self.assertEqual(t.producerState, "paused")
        p.dataReceived(chunk(b" bird"))
        body = Collector()
        r.result.deliverBody(body)
        self.assertEqual(body.calls, [b"early bird"])
        self.assertEqual(t.producerState, "producing")

    def test_complete_before_deliver(self) -> None:
        """A body complete before deliverBody is delivered, then ResponseDone."""
        p, t, r = self.get()
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        body = Collector()
        r.result.deliverBody(body)
        self.assertEqual(body.calls, [b"hi"])
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))

    def test_close_delimited(self) -> None:
        """
        Without Content-Length or chunking the body ends with the connection,
        with PotentialDataLoss; the connection is not pooled.
        """
        h = Harness()
        p, t, r = self.get(h)
        p.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome")
        body = Collector()
        r.result.deliverBody(body)
        p.dataReceived(b" more")
        p.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(body.body, b"some more")
        assert body.reason is not None
        self.assertTrue(body.reason.check(PotentialDataLoss))
        self.assertTrue(body.reason.check(ResponseDone, PotentialDataLoss))
        self.assertEqual(h.agent.idle_connections(), 0)

    def test_informational_skipped(self) -> None:
        """1xx responses (100 Continue, 103) are skipped, whole or split."""
        raw = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n"
               b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n!")
        for i in (len(raw), 10, 26, 30):
            p, t, r = self.get()
            p.dataReceived(raw[:i])
            p.dataReceived(raw[i:])
            self.assertEqual(r.result.code, 200)
            body = Collector()
            r.result.deliverBody(body)
            self.assertEqual(body.body, b"!")

    def test_head_no_body(self) -> None:
        """
        A HEAD response has no body even with Content-Length, which stays in
        its headers; length is 0 and the connection is reused.
        """
        h = Harness()
        p, t, r = self.get(h, method=b"HEAD")
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 123\r\n\r\n")
        self.assertEqual(r.result.length, 0)
        self.assertEqual(r.result.headers.getRawHeaders(b"content-length"), [b"123"])
        body = Collector()
        r.result.deliverBody(body)
        self.assertEqual(body.calls, [])
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertEqual(h.agent.idle_connections(), 1)

    def test_204_304_no_body(self) -> None:
        """204 and 304 responses have no body; the connection is reused."""
        for code in (b"204 No Content", b"304 Not Modified"):
            h = Harness()
            p, t, r = self.get(h)
            p.dataReceived(b"HTTP/1.1 " + code + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
            self.assertEqual(r.result.length, 0)
            body = Collector()
            r.result.deliverBody(body)
            assert body.reason is not None
            self.assertTrue(body.reason.check(ResponseDone))
            self.assertEqual(h.agent.idle_connections(), 1)

    def test_parse_error(self) -> None:
        """A malformed status line fails the request with ResponseFailed and aborts."""
        p, t, r = self.get()
        p.dataReceived(b"HTTP/1.1 2000 OK\r\n\r\n")
        assert r.failure is not None
        self.assertTrue(r.failure.check(ResponseFailed))
        self.assertTrue(t.disconnected)

    def test_bad_chunk(self) -> None:
        """A bad chunk-size line ends the body with ResponseFailed and aborts."""
        p, t, r = self.get()
        p.dataReceived(OK_CHUNKED)
        body = Collector()
        r.result.deliverBody(body)
        p.dataReceived(b"0x5\r\nhello\r\n")
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseFailed))
        self.assertTrue(t.disconnected)

    def test_chunk_size_above_the_limit(self) -> None:
        """
        A chunk size above fastclient._MAX_CHUNK_SIZE (more than 15 significant
        hex digits: 2**63 is 16) is broken framing, like a bad chunk-size line:
        the body ends with ResponseFailed, nothing of that chunk is delivered,
        and the connection is aborted.
        """
        for size in (b"1000000000000000", b"8000000000000000", b"ffffffffffffffff"):
            p, t, r = self.get()
            p.dataReceived(OK_CHUNKED + chunk(b"abc"))
            body = Collector()
            r.result.deliverBody(body)
            p.dataReceived(size + b"\r\nxyz")
            self.assertEqual(body.body, b"abc", size)
            assert body.reason is not None
            self.assertTrue(body.reason.check(ResponseFailed), size)
            self.assertTrue(t.disconnected, size)

    def test_largest_chunk_size(self) -> None:
        """The largest size allowed (15 hex digits, leading zeros aside) is read as a chunk."""
        for size in (b"fffffffffffffff", b"0fffffffffffffff"):
            p, t, r = self.get()
            p.dataReceived(OK_CHUNKED)
            body = Collector()
            r.result.deliverBody(body)
            p.dataReceived(size + b"\r\nxyz")
            self.assertEqual(body.body, b"xyz", size)
            self.assertIsNone(body.reason, size)
            self.assertFalse(t.disconnected, size)

    def test_truncated_chunked(self) -> None:
        """A chunked body cut short ends with a failure that is not ResponseDone/PotentialDataLoss."""
        p, t, r = self.get()
        p.dataReceived(OK_CHUNKED + chunk(b"part"))
        body = Collector()
        r.result.deliverBody(body)
        p.dataReceived(b"10\r\nshort")
        p.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(body.body, b"partshort")
        assert body.reason is not None
        self.assertFalse(body.reason.check(ResponseDone, PotentialDataLoss))
        self.assertTrue(body.reason.check(ResponseFailed))

    def test_truncated_content_length(self) -> None:
        """A Content-Length body cut short ends with ResponseFailed."""
        p, t, r = self.get()
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        body = Collector()
        r.result.deliverBody(body)
        p.connectionLost(Failure(ConnectionDone()))
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseFailed))

    def test_lost_before_head(self) -> None:
        """A connection closed before a whole response head: ResponseNeverReceived."""
        for partial in (b"", b"HTTP/1.1 200 OK\r\n"):
            p, t, r = self.get()
            if partial:
                p.dataReceived(partial)
            p.connectionLost(Failure(ConnectionDone()))
            assert r.failure is not None
            self.assertTrue(r.failure.check(ResponseNeverReceived))


class ProducerTests(SynchronousTestCase):
    """The body protocol's transport."""

    def start(self, h: Harness) -> tuple[Any, CountingTransport, Collector]:
        r = Results(h.request())
        p, t = h.connect()
        p.dataReceived(OK_CHUNKED)
        body = Collector()
        r.result.deliverBody(body)
        return p, t, body

    def test_pause_resume(self) -> None:
        """pauseProducing/resumeProducing pause and resume reading the socket."""
        p, t, body = self.start(Harness())
        assert body.transport is not None
        body.transport.pauseProducing()  # type: ignore[attr-defined]
        self.assertEqual(t.producerState, "paused")
        body.transport.resumeProducing()  # type: ignore[attr-defined]
        self.assertEqual(t.producerState, "producing")

    def test_no_pause_when_delivered_in_callback(self) -> None:
        """
        A caller that asks for the body in the response's callback (as the
        gateway does) costs no pause and resume of the socket; one that asks
        later gets the socket paused meanwhile.
        """
        for in_callback in (True, False):
            h = Harness()
            r = h.request()
            p, t = h.connect()
            calls: list[str] = []
            t.pauseProducing = lambda: calls.append("pause")  # type: ignore[method-assign]
            t.resumeProducing = lambda: calls.append("resume")  # type: ignore[method-assign]
            body = Collector()
            got: list[Any] = []
            r.addCallback(lambda response: response.deliverBody(body) if in_callback else got.append(response))
            p.dataReceived(OK_CHUNKED + chunk(b"x"))
            if not in_callback:
                got[0].deliverBody(body)
            p.dataReceived(chunk(b"y") + b"0\r\n\r\n")
            self.assertEqual(body.body, b"xy")
            self.assertEqual(calls, [] if in_callback else ["pause", "resume"], in_callback)

    def test_paused_in_make_connection(self) -> None:
        """A protocol that pauses in makeConnection is not resumed by deliverBody."""
        h = Harness()
        r = Results(h.request())
        p, t = h.connect()
        p.dataReceived(OK_CHUNKED)

        class Pausing(Collector):
            def connectionMade(self) -> None:
                self.transport.pauseProducing()  # type: ignore[union-attr]

        r.result.deliverBody(Pausing())
        self.assertEqual(t.producerState, "paused")

    def test_stop_aborts(self) -> None:
        """
        stopProducing aborts the connection, later bytes are dropped, and the
        connection is never pooled: the next request connects anew.
        """
        h = Harness()
        p, t, body = self.start(h)
        p.dataReceived(chunk(b"a"))
        body.transport.stopProducing()  # type: ignore[union-attr]
        self.assertTrue(t.disconnected)
        p.dataReceived(chunk(b"b") + b"0\r\n\r\n")
        self.assertEqual(body.calls, [b"a"])
        p.connectionLost(Failure(ConnectionDone()))
        assert body.reason is not None
        self.assertFalse(body.reason.check(ResponseDone))
        self.assertEqual(h.agent.idle_connections(), 0)
        h.request()
        self.assertEqual(len(h.reactor.tcpClients), 2)

    def test_stop_inside_data_received(self) -> None:
        """A protocol stopping in dataReceived gets no more data even from the same read."""
        h = Harness()
        r = Results(h.request())
        p, t = h.connect()
        p.dataReceived(OK_CHUNKED)

        class Stopper(Collector):
            def dataReceived(self, data: bytes) -> None:
                Collector.dataReceived(self, data)
                self.transport.stopProducing()  # type: ignore[union-attr]

        body = Stopper()
        r.result.deliverBody(body)
        p.dataReceived(chunk(b"a") + b"0\r\n\r\n")
        self.assertEqual(body.calls, [b"a"])
        self.assertTrue(t.disconnected)
        self.assertEqual(h.agent.idle_connections(), 0)

    def test_transport_inert_after_end(self) -> None:
        """After the body ended (connection pooled), the protocol's transport does nothing."""
        h = Harness()
        p, t, body = self.start(h)
        p.dataReceived(b"0\r\n\r\n")
        self.assertEqual(h.agent.idle_connections(), 1)
        body.transport.pauseProducing()  # type: ignore[union-attr]
        body.transport.stopProducing()  # type: ignore[union-attr]
        self.assertEqual(t.producerState, "producing")
        self.assertFalse(t.disconnected)
        self.assertEqual(h.agent.idle_connections(), 1)

    def test_protocol_error_in_data_received(self) -> None:
        """A body protocol raising in dataReceived fails the body and aborts."""
        h = Harness()
        r = Results(h.request())
        p, t = h.connect()
        p.dataReceived(OK_CHUNKED)

        class Raiser(Collector):
            def dataReceived(self, data: bytes) -> None:
                raise ZeroDivisionError()

        body = Raiser()
        r.result.deliverBody(body)
        p.dataReceived(chunk(b"a"))
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseFailed))
        self.assertTrue(t.disconnected)


class PoolTests(SynchronousTestCase):
    """Connection reuse."""

    def complete(self, p: Any, r: Results, raw: bytes) -> Collector:
        p.dataReceived(raw)
        body = Collector()
        r.result.deliverBody(body)
        return body

    def test_whole_body_with_head(self) -> None:
        """
        A body that arrives in the same read as the head is on the response
        (complete_body) when the Deferred fires, the connection is back in the
        pool by then, and deliverBody still gives the body and a clean end.
        """
        h = Harness()
        seen: list[tuple[Optional[bytes], int]] = []
        d = h.request()
        d.addCallback(lambda response: seen.append(
            (response.complete_body, h.agent.idle_connections())) or response)
        r = Results(d)
        p, t = h.connect()
        body = self.complete(p, r, b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"a\":1}")
        self.assertEqual(seen, [(b'{"a":1}', 1)])
        self.assertEqual(body.calls, [b'{"a":1}'])
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertFalse(t.disconnecting)

    def test_body_after_head(self) -> None:
        """A body still to come when the head is read is not a complete_body."""
        h = Harness()
        r = Results(h.request())
        p, t = h.connect()
        body = self.complete(p, r, b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"a\"")
        self.assertIsNone(r.result.complete_body)
        p.dataReceived(b":1}")
        self.assertEqual(body.body, b'{"a":1}')
        self.assertEqual(h.agent.idle_connections(), 1)

    def test_whole_body_and_more(self) -> None:
        """Bytes after a complete body (the server is out of step) close the connection."""
        h = Harness()
        r = Results(h.request())
        p, t = h.connect()
        body = self.complete(p, r, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokXX")
        self.assertEqual(r.result.complete_body, b"ok")
        self.assertEqual(body.body, b"ok")
        self.assertTrue(t.disconnecting)
        self.assertEqual(h.agent.idle_connections(), 0)

    def test_reuse_after_complete_body(self) -> None:
        """A connection is reused once its chunked body was fully read."""
        h = Harness()
        r = Results(h.request())
        p, t = h.connect()
        body = self.complete(p, r, OK_CHUNKED + chunk(b"x") + b"0\r\n\r\n")
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))
        self.assertEqual(h.agent.idle_connections(), 1)
        t.clear()
        r2 = Results(h.request(b"GET", b"http://127.0.0.1:8080/again"))
        self.assertEqual(len(h.reactor.tcpClients), 1)
        self.assertTrue(t.value().startswith(b"GET /again HTTP/1.1\r\n"))
        body2 = self.complete(p, r2, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(body2.body, b"ok")

    def test_no_reuse_while_body_unread(self) -> None:
        """A connection whose body is still being read is not used for another request."""
        h = Harness()
        r = Results(h.request())
        p, t = h.connect()
        self.complete(p, r, OK_CHUNKED + chunk(b"x"))
        h.request()
        self.assertEqual(len(h.reactor.tcpClients), 2)

    def test_no_reuse_connection_close(self) -> None:
        """Connection: close or an HTTP/1.0 response: the connection is closed, not pooled."""
        for head in (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx",
                     b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx"):
            h = Harness()
            r = Results(h.request())
            p, t = h.connect()
            body = self.complete(p, r, head)
            assert body.reason is not None
            self.assertTrue(body.reason.check(ResponseDone))
            self.assertIsNone(r.result.headers.getRawHeaders(b"connection"))
            self.assertTrue(t.disconnecting)
            self.assertEqual(h.agent.idle_connections(), 0)

    def test_connection_named_headers_removed(self) -> None:
        """
        Headers a response names in Connection (hop-by-hop) are not in
        response.headers; the others are, and the connection is still reused.
        """
        h = Harness()
        r = Results(h.request())
        p, t = h.connect()
        self.complete(p, r, b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\n"
                            b"X-Secret: 1\r\nX-Kept: 2\r\nContent-Length: 1\r\n\r\nx")
        headers = r.result.headers
        self.assertIsNone(headers.getRawHeaders(b"x-secret"))
        self.assertEqual(headers.getRawHeaders(b"x-kept"), [b"2"])
        self.assertEqual(h.agent.idle_connections(), 1)

    def test_no_reuse_extra_bytes(self) -> None:
        """Bytes after a complete response make the connection unusable."""
        h = Harness()
        r = Results(h.request())
        p, t = h.connect()
        self.complete(p, r, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxJUNK")
        self.assertTrue(t.disconnecting)
        self.assertEqual(h.agent.idle_connections(), 0)

    def test_max_idle(self) -> None:
        """No more than max_idle_per_host connections wait per host; 0 disables reuse."""
        h = Harness(max_idle=1)
        rs = [Results(h.request()) for _ in range(2)]
        conns = [h.connect() for _ in range(2)]
        for (p, t), r in zip(conns, rs):
            self.complete(p, r, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(h.agent.idle_connections(), 1)
        self.assertTrue(conns[1][1].disconnecting)

        h = Harness(max_idle=0)
        r = Results(h.request())
        p, t = h.connect()
        self.assertIn(b"Connection: close\r\n", t.value())
        self.complete(p, r, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(t.disconnecting)

    def test_idle_timeout(self) -> None:
        """An idle connection is closed after idle_timeout; the next request connects anew."""
        h = Harness(idle_timeout=4.0)
        r = Results(h.request())
        p, t = h.connect()
        self.complete(p, r, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        h.reactor.advance(3.9)
        self.assertFalse(t.disconnecting)
        h.reactor.advance(0.2)
        self.assertTrue(t.disconnecting)
        self.assertEqual(h.agent.idle_connections(), 0)
        h.request()
        self.assertEqual(len(h.reactor.tcpClients), 2)

    def test_idle_timeout_counts_from_last_release(self) -> None:
        """
        A connection reused and released again is closed idle_timeout after
        its last release, not its first; one timer serves all its requests,
        and a connection busy when the timer fires stays open.
        """
        h = Harness(idle_timeout=4.0)
        r = Results(h.request())
        p, t = h.connect()
        self.complete(p, r, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        h.reactor.advance(3.0)
        r = Results(h.request())
        self.assertEqual(len(h.reactor.tcpClients), 1)
        h.reactor.advance(1.5)  # the first timer fires while the connection is busy
        self.assertFalse(t.disconnecting)
        self.complete(p, r, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(len(h.reactor.getDelayedCalls()), 1)
        scheduled: list[float] = []
        call_later = h.reactor.callLater
        h.reactor.callLater = lambda delay, *a, **kw: (  # type: ignore[method-assign]
            scheduled.append(delay) or call_later(delay, *a, **kw))
        for _ in range(3):  # three quick requests on the same connection: no new timers
            r = Results(h.request())
            self.complete(p, r, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(scheduled, [])
        self.assertEqual(len(h.reactor.getDelayedCalls()), 1)
        h.reactor.advance(3.9)
        self.assertFalse(t.disconnecting)
        h.reactor.advance(0.2)
        self.assertTrue(t.disconnecting)
        self.assertEqual(h.agent.idle_connections(), 0)

    def test_idle_closed_by_server(self) -> None:
        """An idle connection the server closes leaves the pool."""
        h = Harness()
        r = Results(h.request())
        p, t = h.connect()
        self.complete(p, r, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        p.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(h.agent.idle_connections(), 0)
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_retry_stale_get(self) -> None:
        """
        A GET on a pooled connection that the server had closed (lost before
        any response byte) is retried once on a new connection.
        """
        h = Harness()
        r = Results(h.request())
        p, t = h.connect()
        self.complete(p, r, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        r2 = Results(h.request())
        self.assertIn(b"GET", t.value())
        p.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(r2.failure)
        self.assertEqual(len(h.reactor.tcpClients), 2)
        p2, t2 = h.connect()
        self.assertTrue(t2.value().startswith(b"GET /stream?x=1 HTTP/1.1\r\n"))
        p2.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(r2.result.code, 200)

    def test_retry_only_once(self) -> None:
        """A retried request whose new connection also closes fails with ResponseNeverReceived."""
        h = Harness()
        r = Results(h.request())
        p, t = h.connect()
        self.complete(p, r, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        r2 = Results(h.request())
        p.connectionLost(Failure(ConnectionDone()))
        p2, t2 = h.connect()
        p2.connectionLost(Failure(ConnectionDone()))
        assert r2.failure is not None
        self.assertTrue(r2.failure.check(ResponseNeverReceived))

    def test_no_retry_with_body(self) -> None:
        """A POST with a body on a stale pooled connection is not retried."""
        h = Harness()
        r = Results(h.request())
        p, t = h.connect()
        self.complete(p, r, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        r2 = Results(h.request(b"POST", URL, None, BytesProducer(b"data")))
        p.connectionLost(Failure(ConnectionDone()))
        assert r2.failure is not None
        self.assertTrue(r2.failure.check(ResponseNeverReceived))
        self.assertEqual(len(h.reactor.tcpClients), 1)

    def test_close_cached(self) -> None:
        """closeCachedConnections closes idle connections and fires when they are gone."""
        h = Harness()
        r = Results(h.request())
        p, t = h.connect()
        self.complete(p, r, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        d = h.agent.closeCachedConnections()
        self.assertTrue(t.disconnecting)
        self.assertNoResult(d)
        p.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(d)


class ConnectAndCancelTests(SynchronousTestCase):
    """Connecting, its failures, and cancellation."""

    def test_connect_timeout(self) -> None:
        """A connection not made within connect_timeout fails with TimeoutError."""
        h = Harness()
        d = h.request()
        h.reactor.advance(4.9)
        self.assertNoResult(d)
        h.reactor.advance(0.2)
        self.failureResultOf(d, ConnectTimeoutError)
        self.assertTrue(h.reactor.connectors[0].stoppedConnecting)

    def test_connection_refused(self) -> None:
        """A refused connection fails the request with ConnectionRefusedError."""
        h = Harness()
        d = h.request()
        factory = h.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(h.reactor.connectors[0], Failure(ConnectionRefusedError()))
        self.failureResultOf(d, ConnectionRefusedError)
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_cancel_before_connect(self) -> None:
        """Cancelling while connecting stops the attempt and fails with CancelledError."""
        h = Harness()
        d = h.request()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(h.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_cancel_waiting_for_head(self) -> None:
        """
        Cancelling after the request was sent aborts the connection (never
        pooled) and fails with CancelledError; a late response is ignored.
        """
        h = Harness()
        d = h.request()
        p, t = h.connect()
        p.dataReceived(b"HTTP/1.1 200 OK\r\n")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(t.disconnected)
        p.dataReceived(b"Content-Length: 0\r\n\r\n")
        p.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(h.agent.idle_connections(), 0)

    def test_cancel_on_reused_connection(self) -> None:
        """Cancelling a request on a pooled connection aborts that connection."""
        h = Harness()
        r = Results(h.request())
        p, t = h.connect()
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        d = h.request()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(t.disconnected)

    def test_cancel_stops_body_producer(self) -> None:
        """Cancelling while the body is produced stops the producer."""
        h = Harness()
        producer = AsyncProducer()
        d = h.request(b"POST", URL, None, producer)
        p, t = h.connect()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertIn("stop", producer.events)
        self.assertTrue(t.disconnected)

    def test_cancel_after_response_is_noop(self) -> None:
        """Cancelling once the response arrived changes nothing."""
        h = Harness()
        d = h.request()
        p, t = h.connect()
        p.dataReceived(OK_CHUNKED)
        response = self.successResultOf(d)
        d.cancel()
        self.assertFalse(t.disconnected)
        self.assertEqual(response.code, 200)

