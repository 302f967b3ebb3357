"""
Tests for L{aura_proxy.site.GatewayResource}: how the client-facing site's
one resource hands a request to the gateway and finishes it.
"""

from __future__ import annotations

import json
import time
from typing import Union

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.internet.testing import StringTransport
from twisted.web.http import HTTPChannel, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.server import version as server_version
from twisted.web.test.requesthelper import DummyChannel

from aura_proxy import site as site_module
from aura_proxy.site import (
    MALFORMED_ANSWERED, GatewayChannel, GatewayRequest, GatewayResource, GatewaySite, StockGatewayChannel,
    _http_date, client_left, is_secure,
)


class _Transport(DummyChannel.TCP):
    """A client transport that records an abort."""

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnected = True


class _Gateway:
    """Stands in for L{aura_proxy.proxy.Gateway}: C{handle} answers as told."""

    def __init__(self, answer: Union["Deferred[None]", Exception]) -> None:
        self.answer = answer
        self.handled: list[Request] = []

    def handle(self, request: Request) -> "Deferred[None]":
        self.handled.append(request)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _request(factory: type[Request] = Request) -> tuple[Request, _Transport]:
    channel = DummyChannel()
    transport = channel.transport = _Transport()
    request = factory(channel)
    request.method, request.clientproto = b"GET", b"HTTP/1.1"
    request.uri = request.path = b"/api/aura/x"
    return request, transport


def _response(transport: _Transport) -> tuple[bytes, bytes]:
    head, _, body = transport.written.getvalue().partition(b"\r\n\r\n")
    return head, body


class GatewayResourceTests(SynchronousTestCase):
    """L{GatewayResource.render}, with any twisted.web request."""

    request_factory: type[Request] = Request

    def render(self, answer: Union["Deferred[None]", Exception]) -> tuple[Request, _Transport, _Gateway]:
        gateway = _Gateway(answer)
        request, transport = _request(self.request_factory)
        result = GatewayResource(gateway).render(request)  # type: ignore[arg-type]
        self.assertIs(result, NOT_DONE_YET)
        self.assertEqual(gateway.handled, [request])
        return request, transport, gateway

    def test_every_path_is_the_gateways(self) -> None:
        """The resource is a leaf: twisted.web hands it every path, unsplit."""
        self.assertTrue(GatewayResource(_Gateway(Deferred())).isLeaf)  # type: ignore[arg-type]

    def test_finished_when_handled(self) -> None:
        """The response is finished once the gateway's Deferred fires, not before."""
        served: Deferred[None] = Deferred()
        request, _, _ = self.render(served)
        self.assertFalse(request.finished)
        served.callback(None)
        self.assertTrue(request.finished)

    def test_finished_by_the_gateway(self) -> None:
        """A response the gateway finished itself is not finished twice."""
        served: Deferred[None] = Deferred()
        request, transport, _ = self.render(served)
        request.write(b"x")
        request.finish()
        served.callback(None)
        self.assertEqual(self.flushWarnings(), [])
        self.assertTrue(request.finished)

    def test_client_gone_cancels(self) -> None:
        """A client that disconnects cancels the gateway's Deferred (which stops the upstream)."""
        cancelled: list[Deferred[None]] = []
        served: Deferred[None] = Deferred(cancelled.append)
        request, _, _ = self.render(served)
        request.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(cancelled, [served])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_finished_request_not_cancelled(self) -> None:
        """A connection lost after the response was finished cancels nothing."""
        cancelled: list[Deferred[None]] = []
        served: Deferred[None] = Deferred(cancelled.append)
        request, _, _ = self.render(served)
        request.finish()
        request.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(cancelled, [])

    def test_client_gone_not_finished(self) -> None:
        """
        A response whose client left is not finished, nor answered with a 500,
        when the gateway's Deferred fires (as it does from its canceller when
        a relay ends at once).
        """
        outcomes = {"served": lambda d: d.callback(None),
                    "failed": lambda d: d.errback(ZeroDivisionError("boom"))}
        for outcome, fire in outcomes.items():
            served: Deferred[None] = Deferred(fire)
            request, transport, _ = self.render(served)
            request.connectionLost(Failure(ConnectionDone()))
            self.assertTrue(served.called, outcome)
            self.assertTrue(client_left(request), outcome)
            self.assertFalse(request.finished, outcome)
            self.assertEqual(transport.written.getvalue(), b"", outcome)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def assertInternalError(self, transport: _Transport) -> str:
        """
        The client got a C{500} with the gateway's JSON error body, whose
        request id is the X-Request-ID; return it.
        """
        head, body = _response(transport)
        self.assertTrue(head.startswith(b"HTTP/1.1 500 "), head)
        self.assertIn(b"content-type: application/json", head.lower())
        error = json.loads(body)["error"]
        self.assertEqual(error["code"], "internal_error")
        self.assertIn(f"x-request-id: {error['request_id']}\r\n".encode(), head.lower() + b"\r\n")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        return error["request_id"]  # type: ignore[no-any-return]

    def test_internal_error_names_the_call(self) -> None:
        """
        A 500 for a request the gateway had made a call of carries that
        call's request id (the id of its history row, if it has one).
        """
        served: Deferred[None] = Deferred()
        request, transport, _ = self.render(served)
        request.request_id = "0190a0b0-0000-7000-8000-000000000001"  # type: ignore[attr-defined]
        served.errback(ZeroDivisionError("boom"))
        self.assertEqual(self.assertInternalError(transport), "0190a0b0-0000-7000-8000-000000000001")

    def test_raised(self) -> None:
        """A gateway that raises gives a JSON 500, and the traceback is logged."""
        request, transport, _ = self.render(ZeroDivisionError("boom"))
        self.assertInternalError(transport)
        self.assertTrue(request.finished)

    def test_failed_before_writing(self) -> None:
        """A gateway Deferred that fails before any byte was sent gives a JSON 500."""
        served: Deferred[None] = Deferred()
        request, transport, _ = self.render(served)
        served.errback(ZeroDivisionError("boom"))
        self.assertInternalError(transport)
        self.assertFalse(transport.aborted)

    def test_failed_after_writing(self) -> None:
        """
        A failure after part of the response went out aborts the connection:
        the client must not take half a response for a whole one.
        """
        served: Deferred[None] = Deferred()
        request, transport, _ = self.render(served)
        request.write(b"part")
        served.errback(ZeroDivisionError("boom"))
        self.assertTrue(transport.aborted)
        self.assertNotIn(b"500", _response(transport)[0])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class GatewayRequestResourceTests(GatewayResourceTests):
    """
    The same with the gateway's own requests, which cancel what serves them
    without a notifyFinish Deferred.
    """

    request_factory = GatewayRequest

    def test_no_finish_notification(self) -> None:
        """A gateway request is served without a notifyFinish Deferred."""
        request, _, _ = self.render(Deferred())
        self.assertEqual(request.notifications, [])  # type: ignore[attr-defined]

    def test_served_forgotten(self) -> None:
        """Once the response is finished, the request no longer holds what served it."""
        served: Deferred[None] = Deferred()
        request, _, _ = self.render(served)
        self.assertIs(request.serving, served)  # type: ignore[attr-defined]
        served.callback(None)
        self.assertIsNone(request.serving)  # type: ignore[attr-defined]


class _Recorder:
    """A leaf resource that records the requests it renders."""

    isLeaf = True

    def __init__(self) -> None:
        self.rendered: list[Request] = []

    def render(self, request: Request) -> object:
        self.rendered.append(request)
        return NOT_DONE_YET


class ProcessTests(SynchronousTestCase):
    """L{GatewayRequest.process}: the site's one resource, without traversal."""

    def test_renders_the_site_resource(self) -> None:
        """
        Every path, however deep or percent-encoded, goes to the site's
        resource itself, with the C{Server} and C{Date} headers set.
        """
        resource = _Recorder()
        channel = DummyChannel()
        channel.site = Site(resource)  # type: ignore[arg-type]
        request = GatewayRequest(channel)
        request.method, request.clientproto = b"GET", b"HTTP/1.1"
        request.uri = request.path = b"/api/aura/%61/b/c"
        before = int(time.time())
        request.process()
        after = int(time.time())
        self.assertEqual(resource.rendered, [request])
        self.assertIs(request.site, channel.site)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"server"), [server_version])
        [date] = request.responseHeaders.getRawHeaders(b"date")
        self.assertIn(date, {datetimeToString(t) for t in range(before, after + 1)})

    def test_render_error(self) -> None:
        """
        A resource that raises gives the gateway's JSON 500 with a request
        id (body and X-Request-ID), not twisted.web's HTML page, and the
        error is logged.
        """

        class Broken(_Recorder):
            def render(self, request: Request) -> object:
                raise ZeroDivisionError("boom")

        channel = DummyChannel()
        channel.site = Site(Broken())  # type: ignore[arg-type]
        request = GatewayRequest(channel)
        request.method, request.clientproto = b"GET", b"HTTP/1.1"
        request.uri = request.path = b"/x"
        request.process()
        self.assertEqual(request.code, 500)
        head, _, body = channel.transport.written.getvalue().partition(b"\r\n\r\n")
        error = json.loads(body)["error"]
        self.assertEqual(error["code"], "internal_error")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"x-request-id"), [error["request_id"].encode()])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_date_once_a_second(self) -> None:
        """The C{Date} value is formatted once per second and is right for each."""
        self.assertEqual(_http_date(784111777), b"Sun, 06 Nov 1994 08:49:37 GMT")
        self.assertIs(_http_date(784111777), _http_date(784111777))
        self.assertEqual(_http_date(784111778), b"Sun, 06 Nov 1994 08:49:38 GMT")


class ChannelTests(SynchronousTestCase):
    """L{GatewayChannel}: the client-facing site's HTTP/1.1 channel."""

    def test_site_builds_it(self) -> None:
        """Connections to a L{GatewaySite} get a L{GatewayChannel}, inside twisted.web's wrapper."""
        site = GatewaySite.__new__(GatewaySite)
        Site.__init__(site, _Recorder())  # type: ignore[arg-type]
        protocol = site.buildProtocol(None)
        self.assertIsInstance(protocol._channel, GatewayChannel)
        self.assertIs(protocol._channel.site, site)
        self.assertIs(protocol._channel.requestFactory, site.requestFactory)

    def test_stock_channel_without_fast_path(self) -> None:
        """
        With fast_path off the site's channels write as twisted.web's own
        (only their answer to malformed HTTP is the gateway's); without
        twisted.web's wrapper as expected, they are twisted.web's own.
        """
        from twisted.web.http import HTTPChannel

        from tests.test_twisted_internals import switched_off

        site = GatewaySite.__new__(GatewaySite)
        Site.__init__(site, _Recorder())  # type: ignore[arg-type]
        site.fast_path = False
        channel = site.buildProtocol(None)._channel
        self.assertIs(type(channel), StockGatewayChannel)
        self.assertIs(StockGatewayChannel.writeHeaders, HTTPChannel.writeHeaders)
        self.assertIs(channel.site, site)
        site.fast_path = True
        switched_off(self, "channel_protocol")
        self.patch(site_module, "_wrap_channel", None)
        self.assertIs(type(site.buildProtocol(None)._channel), HTTPChannel)

    def test_head_in_one_write(self) -> None:
        """A response head is the same bytes as twisted.web's, handed over in one write."""
        headers = Headers()
        headers.addRawHeader(b"Content-Type", b"application/json")
        headers.addRawHeader(b"Set-Cookie", b"a=1")
        headers.addRawHeader(b"Set-Cookie", b"b=2")
        stock = StringTransport()
        stock_channel = HTTPChannel()
        stock_channel.makeConnection(stock)
        try:
            stock_channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", headers)
        except TypeError:  # an older Twisted's writeHeaders takes (name, value) pairs
            pairs = [(name, value) for name, values in headers.getAllRawHeaders() for value in values]
            stock_channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", pairs)  # type: ignore[arg-type]
        ours = StringTransport()
        writes: list[bytes] = []
        ours.write = writes.append  # type: ignore[method-assign]
        channel = GatewayChannel()
        channel.makeConnection(ours)
        channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", headers)
        self.assertEqual(writes, [stock.value()])
        self.assertTrue(writes[0].endswith(b"Set-Cookie: b=2\r\n\r\n"))
        for channel in (stock_channel, channel):
            channel.connectionLost(Failure(ConnectionDone()))

    def test_pairs_sanitized(self) -> None:
        """Headers given as pairs (twisted.web's older form) go through twisted.web's own writer."""
        ours = StringTransport()
        channel = GatewayChannel()
        channel.makeConnection(ours)
        channel.writeHeaders(b"HTTP/1.1", b"200", b"OK", [(b"X-A", b"1\r\nX-Evil: 1")])
        self.assertIn(b"X-A: 1 X-Evil: 1\r\n", ours.value())
        channel.connectionLost(Failure(ConnectionDone()))

    def test_secure_asked_once(self) -> None:
        """Whether a connection is TLS is found out once per connection, and right."""
        for transport, secure in ((StringTransport(), False), (DummyChannel.SSL(), True)):
            channel = GatewayChannel()
            channel.site = Site(_Recorder())  # type: ignore[arg-type]
            channel.makeConnection(transport)
            first = Request(channel)
            self.assertIs(is_secure(first), secure)
            self.assertIs(channel.secure, secure)
            second = Request(channel)
            second.isSecure = lambda: not secure  # type: ignore[method-assign]
            self.assertIs(is_secure(second), secure)
            channel.connectionLost(Failure(ConnectionDone()))

    def test_secure_other_channels(self) -> None:
        """Requests on other channels ask twisted.web every time."""
        request = Request(DummyChannel())
        self.assertFalse(is_secure(request))
        request.isSecure = lambda: True  # type: ignore[method-assign]
        self.assertTrue(is_secure(request))


class _RejectingGateway:
    """Stands in for L{aura_proxy.proxy.Gateway} at the site's body limit: records, gives the call's id."""

    def __init__(self) -> None:
        self.rejected: list[tuple[Request, object]] = []

    def rejected_body(self, request: Request, error: object) -> tuple[object, str]:
        self.rejected.append((request, error))
        request.responseHeaders.setRawHeaders(b"access-control-allow-origin", [b"http://app.example"])
        return error, "0190a0b0-0000-7000-8000-000000000413"

    def handle(self, request: Request) -> "Deferred[None]":
        raise AssertionError("a refused request never reaches the path")


def _head_and_error(transport: StringTransport) -> tuple[bytes, dict[str, object]]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    return head, json.loads(body)["error"]  # type: ignore[no-any-return]


class SiteErrorTests(SynchronousTestCase):
    """Errors the site answers before the request path: each carries a request id (docs/errors.md)."""

    def connect(self, fast_path: bool = True, limit: int = 0) -> tuple[object, StringTransport, _RejectingGateway]:
        gateway = _RejectingGateway()
        site = GatewaySite.__new__(GatewaySite)
        Site.__init__(site, GatewayResource(gateway))  # type: ignore[arg-type]
        site.gateway = gateway  # type: ignore[assignment]
        site.fast_path, site.max_request_body = fast_path, limit
        protocol = site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.addCleanup(protocol.connectionLost, Failure(ConnectionDone()))
        return protocol, transport, gateway

    def test_body_too_large_has_the_rows_request_id(self) -> None:
        """
        A body over max_request_body is a 413 whose body and X-Request-ID
        carry the request id of the call's history row, with the CORS
        headers the gateway set.
        """
        protocol, transport, gateway = self.connect(limit=10)
        protocol.dataReceived(  # type: ignore[attr-defined]
            b"POST /api/aura/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 11\r\n\r\n")
        head, error = _head_and_error(transport)
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)
        self.assertEqual((error["code"], error["request_id"]),
                         ("body_too_large", "0190a0b0-0000-7000-8000-000000000413"))
        self.assertIn(b"\r\nX-Request-ID: 0190a0b0-0000-7000-8000-000000000413\r\n", head + b"\r\n")
        self.assertIn(b"\r\nAccess-Control-Allow-Origin: http://app.example\r\n", head + b"\r\n")
        self.assertEqual(len(gateway.rejected), 1)
        self.assertTrue(transport.disconnecting)

    def test_malformed_http_answered_as_json(self) -> None:
        """
        A bad request line, a bad header and a line too long are each a JSON
        400 bad_request with a request id (body and X-Request-ID), then the
        connection closes; with fast_path off too.
        """
        self.assertTrue(MALFORMED_ANSWERED)
        for fast_path in (True, False):
            for data in (b"NOT HTTP AT ALL\r\n\r\n",
                         b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
                         b"GET /" + b"a" * 70000):
                protocol, transport, gateway = self.connect(fast_path)
                protocol.dataReceived(data)  # type: ignore[attr-defined]
                head, error = _head_and_error(transport)
                self.assertTrue(head.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (fast_path, data[:20], head))
                self.assertEqual(error["code"], "bad_request")
                self.assertIn(f"\r\nX-Request-ID: {error['request_id']}\r\n".encode(), head + b"\r\n")
                self.assertTrue(transport.disconnecting)
                self.assertEqual(gateway.rejected, [])
