"""
L{aura_proxy.fastclient.FastAgent} against a real L{twisted.web} server on
127.0.0.1 (in-process, real reactor, real sockets).
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from aura_proxy.fastclient import FastAgent
from aura_proxy.upstream import BytesProducer


class Echo(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        body = request.content.read()
        request.setHeader(b"x-method", request.method)
        request.setHeader(b"x-uri", request.uri)
        request.setHeader(b"x-length", request.requestHeaders.getRawHeaders(
            b"content-length", [b"none"])[0])
        return b"echo:" + body


class Stream(Resource):
    """Writes one event per step, when the test says so; chunked (no length)."""

    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)
        self.request: Optional[Request] = None
        self.started: Deferred[Request] = Deferred()

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        self.request = request
        request.write(b"data: 0\n\n")
        self.started.callback(request)
        return NOT_DONE_YET


class CountingSite(Site):
    noisy = False

    def __init__(self, resource: Resource) -> None:
        Site.__init__(self, resource)
        self.connections = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.connections += 1
        return Site.buildProtocol(self, addr)


class Incremental(Protocol):
    """Collects body pieces; each arrival fires the next waiter."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.waiter: Optional[Deferred[bytes]] = None
        self.done: Deferred[None] = Deferred()
        self.reason: Optional[Failure] = None

    def next(self) -> "Deferred[bytes]":
        self.waiter = Deferred()
        return self.waiter

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.callback(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self.reason = reason
        self.done.callback(None)


class LiveTests(TestCase):
    """Requests over real sockets to a twisted.web Site."""

    def setUp(self) -> None:
        root = Resource()
        root.putChild(b"echo", Echo())
        self.stream = Stream()
        root.putChild(b"stream", self.stream)
        self.site = CountingSite(root)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
        self.addCleanup(self.port.stopListening)
        self.agent = FastAgent(reactor, connect_timeout=5.0, max_idle_per_host=4)
        self.addCleanup(self.agent.closeCachedConnections)
        port = self.port.getHost().port  # type: ignore[attr-defined]
        self.base = b"http://127.0.0.1:%d" % (port,)

    @inlineCallbacks
    def test_get_and_post(self) -> Any:
        """A GET and a POST with a body get their echoes; query bytes arrive as sent."""
        response = yield self.agent.request(b"GET", self.base + b"/echo?a=%41&b")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"x-uri"), [b"/echo?a=%41&b"])
        self.assertEqual(response.headers.getRawHeaders(b"x-length"), [b"none"])
        self.assertEqual((yield readBody(response)), b"echo:")
        response = yield self.agent.request(
            b"POST", self.base + b"/echo", Headers({b"x-a": [b"1"]}), BytesProducer(b"payload" * 1000))
        self.assertEqual(response.headers.getRawHeaders(b"x-method"), [b"POST"])
        self.assertEqual(response.headers.getRawHeaders(b"x-length"), [b"7000"])
        self.assertEqual(response.length, 5 + 7000)
        self.assertEqual((yield readBody(response)), b"echo:" + b"payload" * 1000)

    @inlineCallbacks
    def test_reuse(self) -> Any:
        """Sequential requests to one host use one connection (counted by the server)."""
        for i in range(5):
            response = yield self.agent.request(b"GET", self.base + b"/echo?i=%d" % i)
            self.assertEqual((yield readBody(response)), b"echo:")
        self.assertEqual(self.site.connections, 1)
        self.assertEqual(self.agent.idle_connections(), 1)

    @inlineCallbacks
    def test_stream_incremental(self) -> Any:
        """A chunked stream is read event by event while the server writes, then completes."""
        response = yield self.agent.request(b"GET", self.base + b"/stream")
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        body = Incremental()
        first = body.next()
        response.deliverBody(body)
        self.assertEqual((yield first), b"data: 0\n\n")
        request = self.stream.request
        assert request is not None
        for i in range(1, 4):
            waiting = body.next()
            request.write(b"data: %d\n\n" % i)
            self.assertEqual((yield waiting), b"data: %d\n\n" % i)
        request.finish()
        yield body.done
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone))
        # The connection went back to the pool and is reused.
        response = yield self.agent.request(b"GET", self.base + b"/echo")
        yield readBody(response)
        self.assertEqual(self.site.connections, 1)

    @inlineCallbacks
    def test_stop_closes_upstream(self) -> Any:
        """stopProducing on a stream closes that connection; the next request connects anew."""
        response = yield self.agent.request(b"GET", self.base + b"/stream")
        body = Incremental()
        first = body.next()
        response.deliverBody(body)
        yield first
        lost: Deferred[None] = Deferred()
        assert self.stream.request is not None
        self.stream.request.notifyFinish().addBoth(lambda _: lost.callback(None))
        body.transport.stopProducing()  # type: ignore[union-attr]
        yield body.done
        assert body.reason is not None
        self.assertFalse(body.reason.check(ResponseDone))
        yield lost
        response = yield self.agent.request(b"GET", self.base + b"/echo")
        yield readBody(response)
        self.assertEqual(self.site.connections, 2)

    @inlineCallbacks
    def test_refused(self) -> Any:
        """A closed port: ConnectionRefusedError."""
        port = self.port.getHost().port  # type: ignore[attr-defined]
        yield self.port.stopListening()
        with self.assertRaises(ConnectionRefusedError):
            yield self.agent.request(b"GET", b"http://127.0.0.1:%d/" % port)
