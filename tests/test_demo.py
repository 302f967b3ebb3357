"""
Tests for L{aura_proxy.demo}: the demo agent upstream.

Most tests drive a real L{twisted.web.server.Site} over a L{StringTransport},
so what is checked is the bytes a client (or the gateway) would receive; the
token timers run on a L{Clock} of their own, so the only delayed calls on it
are the demo's.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from aura_proxy.demo import (
    DemoAgentResource,
    answer_tokens,
    demo_resource,
    demo_service,
    format_event,
)
from aura_proxy.upstream_trust import TrustKey, signature_header

INTERVAL = 0.1


class Response:
    """A parsed HTTP/1.1 response, possibly still incomplete."""

    def __init__(self, raw: bytes) -> None:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            raise AssertionError(f"no complete response head in {raw!r}")
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split(b" ")[1])
        self.headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers.setdefault(name.decode().lower(), []).append(value.strip().decode())
        self.complete = False
        if self.header("transfer-encoding") == "chunked":
            self.body = self._dechunk(rest)
        else:
            self.body = rest
            length = self.header("content-length")
            self.complete = length is not None and len(rest) >= int(length)

    def header(self, name: str) -> Optional[str]:
        values = self.headers.get(name)
        return values[-1] if values else None

    def _dechunk(self, data: bytes) -> bytes:
        body = b""
        while data:
            size_line, sep, data = data.partition(b"\r\n")
            if not sep:
                break
            size = int(size_line, 16)
            if size == 0:
                self.complete = True
                break
            body += data[:size]
            data = data[size + 2 :]
        return body

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[dict[str, str]]:
        """The complete SSE events of the body, each as a dict of its fields."""
        events = []
        for block in self.body.decode("utf-8").split("\n\n")[:-1]:
            fields: dict[str, str] = {}
            for line in block.split("\n"):
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(": ")
                fields[name] = value
            if fields:
                events.append(fields)
        return events


def dummy_request(uri: bytes, method: bytes = b"GET") -> Any:
    """A L{DummyRequest} with the attributes the demo resource reads."""
    request: Any = DummyRequest([])
    request.method = method
    request.uri = uri
    request.path = uri.partition(b"?")[0]
    request.content = None
    return request


class DemoServer:
    """A demo agent L{Site} with one client connection over a L{StringTransport}."""

    def __init__(self, interval: float = INTERVAL, trusted_keys: Sequence[TrustKey] = ()) -> None:
        # Any: without mypy-zope, Clock is not seen as "an IReactorTime".
        self.clock: Any = cast(Any, Clock())
        self.site = Site(demo_resource(self.clock, interval, trusted_keys), reactor=MemoryReactorClock())
        self.transport = StringTransport()
        self.channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.channel.makeConnection(self.transport)

    def request(
        self,
        method: str,
        target: str,
        headers: Optional[list[tuple[str, str]]] = None,
        body: bytes = b"",
    ) -> None:
        lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1:9000"]
        for name, value in headers or []:
            lines.append(f"{name}: {value}")
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body
        self.channel.dataReceived(raw)

    def response(self) -> Response:
        return Response(self.transport.value())

    def disconnect(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone("client went away")))


class StreamTests(SynchronousTestCase):
    """C{/api/aura/chat/stream}: SSE token streaming on the injected clock."""

    def test_headersBeforeFirstToken(self) -> None:
        """
        The response head (200, text/event-stream, no-cache) is sent at once,
        before any token, and no token is written until the clock advances.
        """
        server = DemoServer()
        server.request("GET", "/api/aura/chat/stream?q=hello")
        response = server.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-type"), "text/event-stream")
        self.assertEqual(response.header("cache-control"), "no-cache")
        self.assertEqual(response.events(), [])
        self.assertFalse(response.complete)

    def test_oneTokenPerInterval(self) -> None:
        """
        Each clock advance of one interval writes exactly one more token event
        (written as it is produced, not buffered).
        """
        server = DemoServer()
        server.request("GET", "/api/aura/chat/stream?q=hello")
        for expected in range(1, 4):
            server.clock.advance(INTERVAL)
            events = server.response().events()
            self.assertEqual(len(events), expected)
        server.clock.advance(INTERVAL / 2)
        self.assertEqual(len(server.response().events()), 3)

    def test_eventFormat(self) -> None:
        """
        Token events carry C{id: N} (1-based), C{event: token} and JSON
        C{data} with the token and its index; the stream ends with
        C{event: done} / C{{"tokens": N}} and the response is finished.
        """
        server = DemoServer()
        server.request("GET", "/api/aura/chat/stream?q=what+is+twisted")
        tokens = answer_tokens("what is twisted")
        server.clock.pump([INTERVAL] * (len(tokens) + 1))
        response = server.response()
        self.assertTrue(response.complete)
        events = response.events()
        self.assertEqual(len(events), len(tokens) + 1)
        for n, (event, token) in enumerate(zip(events, tokens), start=1):
            self.assertEqual(event["id"], str(n))
            self.assertEqual(event["event"], "token")
            self.assertEqual(json.loads(event["data"]), {"token": token, "index": n})
        self.assertEqual(events[-1]["event"], "done")
        self.assertNotIn("id", events[-1])
        self.assertEqual(json.loads(events[-1]["data"]), {"tokens": len(tokens)})
        self.assertEqual(server.clock.getDelayedCalls(), [])

    def test_answerEchoesQuestion(self) -> None:
        """
        The joined tokens echo the question's words and add a canned
        sentence, 20-40 tokens in all, the same for the same question.
        """
        text = "".join(answer_tokens("what is twisted?"))
        self.assertIn("what is twisted", text)
        self.assertIn("aura-proxy demo agent", text)
        for question in ["", "hi", " ".join(["word"] * 100)]:
            self.assertTrue(20 <= len(answer_tokens(question)) <= 40, question)
        self.assertEqual(answer_tokens("same"), answer_tokens("same"))

    def test_lastEventIdHeaderResumes(self) -> None:
        """
        A C{Last-Event-ID: 5} header makes the first event id 6, with the
        same token 6 as a fresh stream, and done still counts all tokens.
        """
        tokens = answer_tokens("resume me")
        server = DemoServer()
        server.request(
            "GET", "/api/aura/chat/stream?q=resume+me", headers=[("Last-Event-ID", "5")]
        )
        server.clock.pump([INTERVAL] * len(tokens))
        events = server.response().events()
        self.assertEqual(events[0]["id"], "6")
        self.assertEqual(json.loads(events[0]["data"]), {"token": tokens[5], "index": 6})
        self.assertEqual(len(events), len(tokens) - 5 + 1)
        self.assertEqual(json.loads(events[-1]["data"]), {"tokens": len(tokens)})

    def test_lastEventIdQueryResumes(self) -> None:
        """
        Without the header, the C{last_event_id} query parameter resumes the
        stream the same way.
        """
        server = DemoServer()
        server.request("GET", "/api/aura/chat/stream?q=x&last_event_id=3")
        server.clock.advance(INTERVAL)
        self.assertEqual(server.response().events()[0]["id"], "4")

    def test_lastEventIdHeaderWinsOverQuery(self) -> None:
        """The C{Last-Event-ID} header takes precedence over the query parameter."""
        server = DemoServer()
        server.request(
            "GET",
            "/api/aura/chat/stream?q=x&last_event_id=3",
            headers=[("Last-Event-ID", "7")],
        )
        server.clock.advance(INTERVAL)
        self.assertEqual(server.response().events()[0]["id"], "8")

    def test_badLastEventIdStartsOver(self) -> None:
        """An unparseable C{Last-Event-ID} is ignored: the stream starts at id 1."""
        server = DemoServer()
        server.request("GET", "/api/aura/chat/stream?q=x", headers=[("Last-Event-ID", "abc")])
        server.clock.advance(INTERVAL)
        self.assertEqual(server.response().events()[0]["id"], "1")

    def test_lastEventIdAtEndSendsOnlyDone(self) -> None:
        """
        Resuming after the last token sends only the done event, at once,
        and finishes the response without scheduling a timer.
        """
        tokens = answer_tokens("x")
        server = DemoServer()
        server.request(
            "GET", "/api/aura/chat/stream?q=x", headers=[("Last-Event-ID", str(len(tokens)))]
        )
        response = server.response()
        self.assertTrue(response.complete)
        self.assertEqual([e["event"] for e in response.events()], ["done"])
        self.assertEqual(server.clock.getDelayedCalls(), [])

    def test_postJsonMessage(self) -> None:
        """A POST with a JSON body streams the answer to its C{message}."""
        server = DemoServer()
        body = json.dumps({"message": "tell me about klein"}).encode()
        server.request(
            "POST",
            "/api/aura/chat/stream",
            headers=[("Content-Type", "application/json")],
            body=body,
        )
        tokens = answer_tokens("tell me about klein")
        server.clock.pump([INTERVAL] * len(tokens))
        got = [json.loads(e["data"])["token"] for e in server.response().events()[:-1]]
        self.assertEqual(got, tokens)
        self.assertIn("tell me about klein", "".join(got))

    def test_postPlainBody(self) -> None:
        """A POST whose body is not JSON uses the body text as the question."""
        server = DemoServer()
        server.request("POST", "/api/aura/chat/stream", body=b"plain words here")
        server.clock.advance(INTERVAL)
        first = json.loads(server.response().events()[0]["data"])["token"]
        self.assertEqual(first, answer_tokens("plain words here")[0])
        server.clock.pump([INTERVAL] * 40)
        text = "".join(json.loads(e["data"])["token"] for e in server.response().events()[:-1])
        self.assertIn("plain words here", text)

    def test_disconnectStopsTimer(self) -> None:
        """
        When the client disconnects mid-stream the pending timer is cancelled
        and advancing the clock writes nothing more.
        """
        server = DemoServer()
        server.request("GET", "/api/aura/chat/stream?q=bye")
        server.clock.advance(INTERVAL)
        self.assertEqual(len(server.clock.getDelayedCalls()), 1)
        server.disconnect()
        self.assertEqual(server.clock.getDelayedCalls(), [])
        written = server.transport.value()
        server.clock.advance(INTERVAL * 10)
        self.assertEqual(server.transport.value(), written)

    def test_configurableInterval(self) -> None:
        """The interval between tokens is the one given to L{demo_resource}."""
        server = DemoServer(interval=2.0)
        server.request("GET", "/api/aura/chat/stream?q=slow")
        server.clock.advance(1.9)
        self.assertEqual(server.response().events(), [])
        server.clock.advance(0.1)
        self.assertEqual(len(server.response().events()), 1)

    def test_concurrentStreamsIndependent(self) -> None:
        """
        Two concurrent requests get their own timers and ids; one going away
        cancels only its own timer.
        """
        clock: Any = Clock()
        resource: Any = demo_resource(clock, INTERVAL)
        requests = []
        for q in (b"one", b"two"):
            request = dummy_request(b"/api/aura/chat/stream?q=" + q)
            resource.render(request)
            requests.append(request)
        clock.advance(INTERVAL)
        self.assertEqual(len(clock.getDelayedCalls()), 2)
        for request in requests:
            data = b"".join(request.written)
            self.assertEqual(data.count(b"event: token"), 1)
            self.assertIn(b"id: 1\n", data)
        requests[0].processingFailed(Failure(ConnectionDone()))
        self.assertEqual(len(clock.getDelayedCalls()), 1)

    def test_dummyRequestWritesEachEvent(self) -> None:
        """
        With a L{DummyRequest}, render returns NOT_DONE_YET and every tick is
        one C{request.write} of exactly one whole event.
        """
        from twisted.web.server import NOT_DONE_YET

        clock: Any = Clock()
        request = dummy_request(b"/api/aura/chat/stream?q=hi")
        resource: Any = demo_resource(clock, INTERVAL)
        self.assertIs(resource.render(request), NOT_DONE_YET)
        before = len(request.written)
        clock.advance(INTERVAL)
        self.assertEqual(len(request.written), before + 1)
        self.assertEqual(
            request.written[-1],
            format_event({"token": answer_tokens("hi")[0], "index": 1}, "token", 1),
        )

    def test_headHasNoBody(self) -> None:
        """A HEAD on the stream answers the SSE headers and starts no timer."""
        server = DemoServer()
        server.request("HEAD", "/api/aura/chat/stream")
        response = server.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-type"), "text/event-stream")
        self.assertEqual(server.clock.getDelayedCalls(), [])

    def test_wrongMethod(self) -> None:
        """A DELETE on the stream is a 405 JSON error with an Allow header."""
        server = DemoServer()
        server.request("DELETE", "/api/aura/chat/stream")
        response = server.response()
        self.assertEqual(response.status, 405)
        self.assertIn("POST", response.header("allow") or "")
        self.assertIn("error", response.json())


class OtherEndpointTests(SynchronousTestCase):
    """Health, echo and 404."""

    def test_health(self) -> None:
        """C{GET /api/aura/health} is 200 JSON C{{"status": "ok"}}."""
        server = DemoServer()
        server.request("GET", "/api/aura/health")
        response = server.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("content-type"), "application/json")
        self.assertEqual(response.json(), {"status": "ok"})

    def test_echoGet(self) -> None:
        """
        C{/api/aura/echo} returns the method, path, query (dict of lists,
        repeats kept) and the headers it received (lower-cased names, dict of
        lists, repeats kept).
        """
        server = DemoServer()
        server.request(
            "GET",
            "/api/aura/echo?a=1&a=2&b=",
            headers=[("X-Trace", "t1"), ("X-Trace", "t2"), ("Accept", "*/*")],
        )
        response = server.response()
        self.assertEqual(response.status, 200)
        echoed = response.json()
        self.assertEqual(echoed["method"], "GET")
        self.assertEqual(echoed["path"], "/api/aura/echo")
        self.assertEqual(echoed["query"], {"a": ["1", "2"], "b": [""]})
        self.assertEqual(echoed["headers"]["x-trace"], ["t1", "t2"])
        self.assertEqual(echoed["headers"]["accept"], ["*/*"])
        self.assertEqual(echoed["headers"]["host"], ["127.0.0.1:9000"])
        self.assertEqual(echoed["body"], "")

    def test_echoAnyMethodWithBody(self) -> None:
        """C{/api/aura/echo} accepts any method and echoes the body as text."""
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            server = DemoServer()
            server.request(method, "/api/aura/echo", body=b"hello \xc3\xa9")
            echoed = server.response().json()
            self.assertEqual(echoed["method"], method)
            self.assertEqual(echoed["body"], "hello \u00e9")

    def test_echoFormBodyNotInQuery(self) -> None:
        """A form-encoded body is echoed as body, never merged into the query."""
        server = DemoServer()
        server.request(
            "POST",
            "/api/aura/echo?x=1",
            headers=[("Content-Type", "application/x-www-form-urlencoded")],
            body=b"y=2",
        )
        echoed = server.response().json()
        self.assertEqual(echoed["query"], {"x": ["1"]})
        self.assertEqual(echoed["body"], "y=2")

    def test_notFound(self) -> None:
        """Any other path is a 404 with a JSON C{error}, even outside /api/aura."""
        for path in ("/", "/api/aura", "/api/aura/nope", "/chat/stream"):
            server = DemoServer()
            server.request("GET", path)
            response = server.response()
            self.assertEqual(response.status, 404, path)
            self.assertEqual(response.header("content-type"), "application/json")
            self.assertIn("error", response.json())

    def test_trailingSlashTolerated(self) -> None:
        """A trailing slash on a known path is served like the path without it."""
        server = DemoServer()
        server.request("GET", "/api/aura/health/")
        self.assertEqual(server.response().json(), {"status": "ok"})


class ServiceTests(SynchronousTestCase):
    """L{demo_service} and L{demo_resource}."""

    def test_serviceListensOnEndpoint(self) -> None:
        """
        L{demo_service} listens on the given endpoint with the injected
        reactor (127.0.0.1:9000 by default), serving the demo resource.
        """
        reactor = MemoryReactorClock()
        service = demo_service(reactor)
        self.assertIsInstance(service, StreamServerEndpointService)
        service.startService()
        self.addCleanup(service.stopService)
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (9000, "127.0.0.1"))
        self.assertIsInstance(factory, Site)
        self.assertIsInstance(factory.resource, DemoAgentResource)

    def test_serviceCustomEndpointAndInterval(self) -> None:
        """L{demo_service} honours another endpoint description and interval."""
        reactor = MemoryReactorClock()
        service = demo_service(reactor, "tcp:9123:interface=127.0.0.2", interval=0.5)
        service.startService()
        self.addCleanup(service.stopService)
        [(port, factory, _, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (9123, "127.0.0.2"))
        self.assertEqual(factory.resource.interval, 0.5)

    def test_serviceTimersUseInjectedReactor(self) -> None:
        """Token timers of the served site are scheduled on the injected reactor."""
        reactor = MemoryReactorClock()
        service = demo_service(reactor)
        service.startService()
        self.addCleanup(service.stopService)
        factory: Any = reactor.tcpServers[0][1]
        channel = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(b"GET /api/aura/chat/stream?q=x HTTP/1.1\r\nHost: h\r\n\r\n")
        reactor.advance(0.1)
        self.assertIn(b"id: 1\n", transport.value())
        channel.connectionLost(Failure(ConnectionDone()))


class SignedOnlyTests(SynchronousTestCase):
    """With the gateway's keys, the demo agent serves only what the gateway signed."""

    KEY = TrustKey.of(b"d" * 32)

    def test_unsigned_refused(self) -> None:
        """A direct call without a signature is answered 401 with a JSON body."""
        server = DemoServer(trusted_keys=[self.KEY])
        server.request("GET", "/api/aura/health")
        response = server.response()
        self.assertEqual(response.status, 401)
        self.assertEqual(response.json()["error"]["code"], "invalid_gateway_signature")

    def test_signed_served(self) -> None:
        """A request signed for its method, path, query and tenant is served; another path is not."""
        header = signature_header(self.KEY, 0, b"GET", b"/api/aura/chat/stream", b"q=hi", b"t1", b"")
        server = DemoServer(trusted_keys=[self.KEY])
        server.request("GET", "/api/aura/chat/stream?q=hi",
                       [("X-Tenant-ID", "t1"), ("X-DWP-Gateway-Signature", header.decode())])
        self.assertEqual(server.response().status, 200)
        other = DemoServer(trusted_keys=[self.KEY])
        other.request("GET", "/api/aura/echo?q=hi",
                      [("X-Tenant-ID", "t1"), ("X-DWP-Gateway-Signature", header.decode())])
        self.assertEqual(other.response().status, 401)

    def test_too_old(self) -> None:
        """A signature older than the clock skew is refused."""
        header = signature_header(self.KEY, 0, b"GET", b"/api/aura/health", b"", b"", b"")
        server = DemoServer(trusted_keys=[self.KEY])
        server.clock.advance(31)
        server.request("GET", "/api/aura/health", [("X-DWP-Gateway-Signature", header.decode())])
        self.assertEqual(server.response().status, 401)
