"""
Tests for L{aura_proxy.proxy}: the request path end to end in memory.

The client is treq's L{StubTreq} over the gateway's resource; the
upstream is either a twisted.web resource behind treq's
L{RequestTraversalAgent} or a fake agent whose answers the test controls.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any, Optional

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionRefusedError, TimeoutError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.test.requesthelper import DummyChannel
from treq.testing import RequestTraversalAgent, StubTreq
from zope.interface import implementer

from aura_proxy.access_log import text_line
from aura_proxy.config import parse_config
from aura_proxy.fastclient import _Response
from aura_proxy.history.record import CallRecord
from aura_proxy.proxy import Gateway
from aura_proxy.resume.log import MemoryResumeLog
from aura_proxy.stages import relaying
from aura_proxy.upstream import UpstreamClient

CONFIG = """
[gateway]
response_timeout = 30
connect_timeout = 5
heartbeat_interval = 15
[route:aura]
path = /api/aura/**
upstream = http://aura.internal:9000
[route:svc]
path = /api/svc/**
upstream = http://svc.internal:9100/base
strip_prefix = 2
[headers]
required = X-Tenant-ID
public_paths = /api/aura/public/**
default.X-DWP-Source = FRONTEND
default.X-DWP-Caller-Type = USER
[cors]
allowed_origins = http://localhost:3000
allowed_headers = X-Tenant-ID, Content-Type
"""

TENANT = {"X-Tenant-ID": "t1"}


class Echo(Resource):
    """An upstream that answers every request with what it received, as JSON."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render(self, request: Request) -> bytes:
        self.requests.append(request)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"access-control-allow-origin", b"*")
        return json.dumps({
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "headers": [[k.decode(), v.decode()] for k, vs in request.requestHeaders.getAllRawHeaders()
                        for v in vs],
            "body": request.content.read().decode(),
        }).encode()


class Stream(Resource):
    """An upstream SSE endpoint the test writes events to."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.request: Optional[Request] = None

    def render(self, request: Request) -> object:
        self.request = request
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"")
        return NOT_DONE_YET


def without_ids(data: bytes) -> bytes:
    return b"".join(line for line in data.splitlines(True) if not line.startswith(b"id:"))


def ids(data: bytes) -> list[str]:
    return [line[4:].strip().decode() for line in data.splitlines() if line.startswith(b"id:")]


class History:
    """Collects records like the history service would."""

    def __init__(self) -> None:
        self.records: list[CallRecord] = []

    def record(self, record: CallRecord) -> None:
        self.records.append(record)


@implementer(IAgent)
class ControlledAgent:
    """An agent whose requests the test answers (or never answers)."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes, Deferred[Any]]] = []
        self.cancelled = 0

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        d: Deferred[Any] = Deferred(cancel)
        self.requests.append((method, uri, d))
        return d


class Harness:
    """A gateway over an in-memory upstream, with a fake clock and history."""

    def __init__(self, upstream: Any, config: str = CONFIG, resume: bool = False, access: bool = False) -> None:
        self.clock = Clock()
        self.history = History()
        self.log = MemoryResumeLog(self.clock, 60, 100, 100000) if resume else None
        self.agent = upstream if IAgent.providedBy(upstream) else RequestTraversalAgent(upstream)
        client = UpstreamClient(self.clock, 5, 10, agent=self.agent)
        #: The access-log lines, with C{access}.
        self.lines: list[str] = []
        self.gateway = Gateway(
            parse_config(config, "test.ini"), self.clock, client, self.history, self.log,  # type: ignore[arg-type]
            self.lines.append if access else None)
        self.client = StubTreq(self.gateway.resource())

    def flush(self) -> None:
        for _ in range(5):
            if isinstance(self.agent, RequestTraversalAgent):
                self.agent.flush()
            self.client.flush()

    def request(self, method: str, url: str, **kw: Any) -> Any:
        d = self.client.request(method, "http://gw.example" + url, **kw)
        self.flush()
        return self.successResultOf(d)

    def successResultOf(self, d: Deferred[Any]) -> Any:
        result: list[Any] = []
        d.addBoth(result.append)
        self.flush()
        assert result, "no result"
        if hasattr(result[0], "raiseException"):
            result[0].raiseException()
        return result[0]

    def json(self, response: Any) -> Any:
        return json.loads(self.successResultOf(self.client.content(response)))


class ErrorTests(TestCase):
    """Requests the gateway answers itself, as JSON with stable codes."""

    def test_no_route(self) -> None:
        """An unrouted path is a 404 no_route with a request id, recorded in history."""
        h = Harness(Echo())
        response = h.request("GET", "/nowhere", headers=TENANT)
        self.assertEqual(response.code, 404)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        body = h.json(response)
        self.assertEqual(body["error"]["code"], "no_route")
        self.assertEqual(body["error"]["request_id"], response.headers.getRawHeaders("x-request-id")[0])
        self.assertEqual([r.status_code for r in h.history.records], [404])

    def test_missing_tenant(self) -> None:
        """A routed request without X-Tenant-ID is a 400 missing_header and never reaches upstream."""
        upstream = Echo()
        h = Harness(upstream)
        response = h.request("GET", "/api/aura/chat")
        self.assertEqual(response.code, 400)
        self.assertEqual(h.json(response)["error"]["code"], "missing_header")
        self.assertEqual(upstream.requests, [])

    def test_public_path_without_tenant(self) -> None:
        """A public path is forwarded without a tenant."""
        h = Harness(Echo())
        self.assertEqual(h.request("GET", "/api/aura/public/info").code, 200)

    def test_malformed_path(self) -> None:
        """A path with a dot-dot segment is a 400 bad_request."""
        h = Harness(Echo())
        response = h.request("GET", "/api/aura/x/%2e%2e/y", headers=TENANT)
        self.assertEqual(response.code, 400)
        self.assertEqual(h.json(response)["error"]["code"], "bad_request")

    def test_upstream_refused(self) -> None:
        """A refused upstream connection is a 502 upstream_unavailable."""
        agent = ControlledAgent()
        h = Harness(agent)
        d = h.client.get("http://gw.example/api/aura/x", headers=TENANT)
        agent.requests[0][2].errback(ConnectionRefusedError())
        response = h.successResultOf(d)
        self.assertEqual(response.code, 502)
        self.assertEqual(h.json(response)["error"]["code"], "upstream_unavailable")

    def test_connect_timeout(self) -> None:
        """An upstream that does not accept the connection in time is a 504."""
        agent = ControlledAgent()
        h = Harness(agent)
        d = h.client.get("http://gw.example/api/aura/x", headers=TENANT)
        agent.requests[0][2].errback(TimeoutError())
        response = h.successResultOf(d)
        self.assertEqual(response.code, 504)
        self.assertIn("accept the connection", h.json(response)["error"]["message"])

    def test_response_timeout(self) -> None:
        """Upstream headers later than response_timeout give a 504 and cancel the upstream request."""
        agent = ControlledAgent()
        h = Harness(agent)
        d = h.client.get("http://gw.example/api/aura/x", headers=TENANT)
        h.flush()
        h.clock.advance(29.9)
        self.assertNoResult(d)
        h.clock.advance(0.1)
        response = h.successResultOf(d)
        self.assertEqual(response.code, 504)
        self.assertEqual(h.json(response)["error"]["code"], "upstream_timeout")
        self.assertEqual(agent.cancelled, 1)


class AccessLogTests(TestCase):
    """The access log's end stage in the pipeline."""

    def test_one_line_per_call_from_its_row(self) -> None:
        """Every call, answered upstream or refused, gives one line: the same row as its history record."""
        h = Harness(Echo(), access=True)
        self.assertEqual(h.request("GET", "/api/aura/x?a=1", headers=TENANT).code, 200)
        self.assertEqual(h.request("GET", "/nowhere", headers=TENANT).code, 404)
        self.assertEqual(len(h.lines), 2)
        for line, row in zip(h.lines, h.history.records):
            self.assertEqual(line, text_line(row))
        self.assertIn('"GET /api/aura/x?a=1" 200 ', h.lines[0])

    def test_stream_line_when_it_ends(self) -> None:
        """A stream's line comes when it ends, not per event."""
        upstream = Stream()
        h = Harness(upstream, access=True)
        response = h.request("GET", "/api/aura/stream", headers=TENANT, unbuffered=True)
        h.client.collect(response, lambda data: None)
        assert upstream.request is not None
        for _ in range(3):
            upstream.request.write(b"data: x\n\n")
            h.flush()
        self.assertEqual(h.lines, [])
        upstream.request.finish()
        h.flush()
        [line] = h.lines
        self.assertIn(" stream first_event=", line)
        self.assertIn(" events=3 end=completed ", line)

    def test_off(self) -> None:
        """Without an access log (access = off) there is no such end stage."""
        h = Harness(Echo())
        self.assertEqual([type(s).__name__ for s in h.gateway.pipeline.ended], ["Record"])
        self.assertEqual(
            [type(s).__name__ for s in Harness(Echo(), access=True).gateway.pipeline.ended], ["Record", "AccessLog"])

    def test_format(self) -> None:
        """[log] format = json gives JSON lines."""
        h = Harness(Echo(), config=CONFIG + "\n[log]\nformat = json\n", access=True)
        h.request("GET", "/api/aura/x", headers=TENANT)
        [line] = h.lines
        self.assertEqual(json.loads(line)["request_id"], h.history.records[0].id)


class ForwardTests(TestCase):
    """Requests that go upstream."""

    def test_forwarded_request(self) -> None:
        """Method, path, query, body and end-to-end headers reach the upstream; defaults are added."""
        h = Harness(Echo())
        response = h.request(
            "POST", "/api/aura/chat/stream?x=1&y=%20", data=b'{"message":"hi"}',
            headers={"X-Tenant-ID": "t1", "X-User-ID": "u1", "Last-Event-ID": "7",
                     "Content-Type": "application/json"},
        )
        self.assertEqual(response.code, 200)
        seen = h.json(response)
        self.assertEqual(seen["method"], "POST")
        self.assertEqual(seen["uri"], "/api/aura/chat/stream?x=1&y=%20")
        self.assertEqual(seen["body"], '{"message":"hi"}')
        headers = {k.lower(): v for k, v in seen["headers"]}
        self.assertEqual(headers["x-user-id"], "u1")
        self.assertEqual(headers["last-event-id"], "7")
        self.assertEqual(headers["x-dwp-source"], "FRONTEND")
        self.assertEqual(headers["x-dwp-caller-type"], "USER")
        self.assertEqual(headers["host"], "aura.internal:9000")
        self.assertEqual(headers["x-forwarded-host"], "gw.example")
        self.assertEqual(headers["content-length"], "16")

    def test_whole_body_with_head(self) -> None:
        """
        A response whose whole body came with its head (FastAgent's
        complete_body) is answered at once, without a relay: same status,
        headers, body and history row as a relayed one.
        """
        def no_relay(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a complete body needs no relay")

        self.patch(relaying, "Relay", no_relay)
        h = Harness(ControlledAgent())
        d = h.client.get("http://gw.example/api/aura/x", headers={
            "X-Tenant-ID": "t1", "Origin": "http://localhost:3000"})
        h.flush()
        upstream = _Response((b"HTTP", 1, 1), 201, b"Created", Headers({
            b"content-type": [b"application/json"], b"x-up": [b"1"],
            b"access-control-allow-origin": [b"*"]}), 7, None)
        upstream.complete_body = b'{"a":1}'
        upstream._pending.append(upstream.complete_body)
        upstream._reason = Failure(ResponseDone())
        h.agent.requests[0][2].callback(upstream)
        response = h.successResultOf(d)
        self.assertEqual(response.code, 201)
        self.assertEqual(h.successResultOf(h.client.content(response)), b'{"a":1}')
        got = response.headers
        self.assertEqual(got.getRawHeaders("x-up"), ["1"])
        self.assertEqual(got.getRawHeaders("access-control-allow-origin"), ["http://localhost:3000"])
        [row] = h.history.records
        self.assertEqual((row.status_code, row.response_size_bytes, row.is_stream), (201, 7, False))
        self.assertEqual(got.getRawHeaders("x-request-id"), [row.id])
        self.assertEqual(h.gateway.active_streams(), 0)

    def test_strip_prefix_and_base_path(self) -> None:
        """strip_prefix drops leading segments; the upstream's base path goes in front."""
        agent = ControlledAgent()
        h = Harness(agent)
        h.client.get("http://gw.example/api/svc/items/42?full=1", headers=TENANT)
        self.assertEqual(agent.requests[0][1], b"http://svc.internal:9100/base/items/42?full=1")

    def test_gateway_owns_cors(self) -> None:
        """An upstream's own Access-Control-* headers are replaced by the gateway's."""
        h = Harness(Echo())
        response = h.request("GET", "/api/aura/x",
                             headers={"X-Tenant-ID": "t", "Origin": "http://localhost:3000"})
        self.assertEqual(response.headers.getRawHeaders("access-control-allow-origin"),
                         ["http://localhost:3000"])

    def test_preflight_answered_by_gateway(self) -> None:
        """A preflight is answered 204 without a tenant and never reaches upstream."""
        upstream = Echo()
        h = Harness(upstream)
        response = h.request("OPTIONS", "/api/aura/x", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-tenant-id"})
        self.assertEqual(response.code, 204)
        self.assertEqual(upstream.requests, [])

    def test_preflight_denied(self) -> None:
        """A preflight from another origin is a 403 that does not echo the origin."""
        h = Harness(Echo())
        response = h.request("OPTIONS", "/api/aura/x", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
        self.assertEqual(response.code, 403)
        for _, values in response.headers.getAllRawHeaders():
            for value in values:
                self.assertNotIn(b"evil", value)

    def test_plain_call_recorded(self) -> None:
        """A plain call is one history row with sizes, query and identity."""
        h = Harness(Echo())
        response = h.request("POST", "/api/aura/x?q=1", data=b"abc", headers={
            "X-Tenant-ID": "t1", "X-User-ID": "u1", "X-Agent-ID": "a1", "User-Agent": "ua",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
        [row] = h.history.records
        self.assertEqual(
            (row.tenant_id, row.user_id, row.agent_id, row.source, row.caller_type, row.method,
             row.path, row.route, row.query_string, row.status_code, row.request_size_bytes,
             row.user_agent, row.trace_id, row.is_stream, row.end_reason),
            ("t1", "u1", "a1", "FRONTEND", "USER", "POST", "/api/aura/x", "aura", "q=1", 200, 3,
             "ua", "0af7651916cd43dd8448eb211c80319c", False, None),
        )
        self.assertGreater(row.response_size_bytes or 0, 0)
        # The columns the request does not set, each in its place.
        self.assertEqual(
            (row.created_at, row.latency_ms, row.first_event_ms, row.event_count),
            (h.clock.seconds(), 0.0, None, None),
        )
        self.assertEqual(row.id, response.headers.getRawHeaders("x-request-id")[0])
        self.assertIsInstance(row.client_ip, str)


class StreamTests(TestCase):
    """SSE responses through the in-memory path."""

    def open(self) -> tuple[Harness, Stream, Any, list[bytes]]:
        upstream = Stream()
        h = Harness(upstream)
        response = h.request("GET", "/api/aura/stream?q=1", headers=TENANT, unbuffered=True)
        received: list[bytes] = []
        h.client.collect(response, received.append)
        return h, upstream, response, received

    def test_sse_headers(self) -> None:
        """An SSE response carries the SSE headers and no Content-Length."""
        h, upstream, response, _ = self.open()
        headers = response.headers
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/event-stream"])
        self.assertEqual(headers.getRawHeaders("cache-control"), ["no-cache"])
        self.assertEqual(headers.getRawHeaders("x-accel-buffering"), ["no"])
        self.assertIsNone(headers.getRawHeaders("content-length"))

    def test_events_flow_at_once(self) -> None:
        """Each event reaches the client as soon as the upstream writes it, stamped with an id."""
        h, upstream, _, received = self.open()
        assert upstream.request is not None
        upstream.request.write(b"data: one\n\n")
        h.flush()
        self.assertEqual(without_ids(b"".join(received)), b"data: one\n\n")
        upstream.request.write(b"data: two\n\n")
        h.flush()
        self.assertEqual(without_ids(b"".join(received)), b"data: one\n\ndata: two\n\n")

    def test_stream_summary_row(self) -> None:
        """A stream is one history row when it ends: no query nor request size, the bytes and events delivered."""
        h, upstream, _, _ = self.open()
        assert upstream.request is not None
        upstream.request.write(b"data: one\n\n")
        h.flush()
        self.assertEqual(h.history.records, [])
        upstream.request.finish()
        h.flush()
        [row] = h.history.records
        self.assertTrue(row.is_stream)
        self.assertEqual((row.query_string, row.request_size_bytes), (None, None))
        self.assertEqual(row.end_reason, "completed")
        # What the client got: the event (with its gateway id), whole.
        self.assertEqual(row.event_count, 1)
        self.assertGreater(row.response_size_bytes or 0, len(b"data: one\n\n"))
        self.assertIsNone(row.detached_event_count)
        self.assertIsNotNone(row.stream_id)

    def test_cancel_before_headers(self) -> None:
        """
        Cancelling the request (client gone) before upstream headers cancels
        the upstream request; the call is recorded as 499 (nginx's "client
        closed request").
        """
        agent = ControlledAgent()
        h = Harness(agent)
        request = Request(DummyChannel())
        request.method, request.clientproto = b"GET", b"HTTP/1.1"
        request.uri = request.path = b"/api/aura/x"
        request.content = BytesIO()
        request.requestHeaders.addRawHeader(b"x-tenant-id", b"t")
        d = h.gateway.handle(request)  # type: ignore[arg-type]
        d.cancel()
        self.assertEqual(agent.cancelled, 1)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual([r.status_code for r in h.history.records], [499])


class Streams(Resource):
    """An upstream SSE endpoint that keeps every request, for several streams."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render(self, request: Request) -> object:
        self.requests.append(request)
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"")
        return NOT_DONE_YET


class ResumeTests(TestCase):
    """Last-Event-ID replay from the gateway's stream log (memory)."""

    def setUp(self) -> None:
        self.upstream = Streams()
        self.h = Harness(self.upstream, CONFIG + "[sse]\nresume = memory\nresume_ttl = 60\n", resume=True)
        assert self.h.log is not None
        self.log = self.h.log

    def get(self, headers: dict[str, str], url: str = "/api/aura/stream") -> tuple[Any, list[bytes]]:
        response = self.h.request("GET", url, headers=headers, unbuffered=True)
        received: list[bytes] = []
        response.done = self.h.client.collect(response, received.append)
        self.h.flush()
        return response, received

    def emit(self, data: bytes, index: int = 0) -> None:
        self.upstream.requests[index].write(data)
        self.h.flush()

    def test_resume_replays_then_tails_then_ends(self) -> None:
        """
        A reconnect with the id of event 1 gets events 2 and 3 from the log,
        then the live event 4, then the end, and the upstream is asked once.
        """
        _, first = self.get(TENANT)
        for n in (1, 2, 3):
            self.emit(b"data: %d\n\n" % n)
        seen = ids(b"".join(first))
        self.assertEqual(len(seen), 3)
        self.assertEqual(len(set(seen)), 3)
        response, second = self.get({"X-Tenant-ID": "t1", "Last-Event-ID": seen[0]})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        self.assertEqual(without_ids(b"".join(second)), b"data: 2\n\ndata: 3\n\n")
        self.assertEqual(ids(b"".join(second)), seen[1:])
        self.emit(b"data: 4\n\n")
        self.assertEqual(without_ids(b"".join(second)), b"data: 2\n\ndata: 3\n\ndata: 4\n\n")
        self.upstream.requests[0].finish()
        self.h.flush()
        self.assertEqual(len(self.upstream.requests), 1)
        self.assertIsNone(self.h.successResultOf(response.done))
        rows = [r for r in self.h.history.records if r.is_stream]
        self.assertEqual(sorted(r.event_count or 0 for r in rows), [3, 4])

    def test_other_tenant_gets_a_fresh_stream(self) -> None:
        """Another tenant's Last-Event-ID is not replayed: the request goes upstream, without the gateway id."""
        _, first = self.get(TENANT)
        self.emit(b"data: 1\n\n")
        stolen = ids(b"".join(first))[0]
        self.get({"X-Tenant-ID": "t2", "Last-Event-ID": stolen})
        self.assertEqual(len(self.upstream.requests), 2)
        self.assertIsNone(self.upstream.requests[1].requestHeaders.getRawHeaders(b"last-event-id"))

    def test_unknown_id_goes_upstream(self) -> None:
        """A well-formed gateway id the log does not know is a fresh request upstream."""
        self.get({"X-Tenant-ID": "t1", "Last-Event-ID": "AAAAAAAAAAAAAAAAAAAAAA.5"})
        self.assertEqual(len(self.upstream.requests), 1)

    def test_unreplayable_id_hands_upstream_its_own_id(self) -> None:
        """
        When the log cannot replay (here: the stream was forgotten), the
        upstream gets its own last id, which the gateway id carries.
        """
        _, first = self.get(TENANT)
        self.emit(b"id: up-7\ndata: 1\n\n")
        gateway_id = ids(b"".join(first))[0]
        self.assertNotIn("up-7", gateway_id)
        self.log.abandon(gateway_id.split(".")[0])
        self.get({"X-Tenant-ID": "t1", "Last-Event-ID": gateway_id})
        self.assertEqual(
            self.upstream.requests[1].requestHeaders.getRawHeaders(b"last-event-id"), [b"up-7"])

    def test_foreign_stream_leaks_nothing(self) -> None:
        """Another tenant's gateway id is dropped entirely, carried upstream id included."""
        _, first = self.get(TENANT)
        self.emit(b"id: up-7\ndata: 1\n\n")
        gateway_id = ids(b"".join(first))[0]
        self.get({"X-Tenant-ID": "t2", "Last-Event-ID": gateway_id})
        self.assertIsNone(self.upstream.requests[1].requestHeaders.getRawHeaders(b"last-event-id"))

    def test_upstream_ids_pass_through(self) -> None:
        """A Last-Event-ID that is not the gateway's goes upstream unchanged."""
        self.get({"X-Tenant-ID": "t1", "Last-Event-ID": "41"})
        self.assertEqual(self.upstream.requests[0].requestHeaders.getRawHeaders(b"last-event-id"), [b"41"])

    def test_detached_stream_keeps_reading(self) -> None:
        """
        With on_client_disconnect = detach, a client that leaves does not stop
        the upstream: what it sends meanwhile is replayed on reconnect.
        """
        request = Request(DummyChannel())
        request.method, request.clientproto = b"GET", b"HTTP/1.1"
        request.uri = request.path = b"/api/aura/stream"
        request.content = BytesIO()
        request.requestHeaders.addRawHeader(b"x-tenant-id", b"t1")
        d = self.h.gateway.handle(request)
        self.h.flush()
        self.emit(b"data: 1\n\n")
        written = request.channel.transport.written.getvalue()  # type: ignore[union-attr]
        [first_id] = ids(written.partition(b"\r\n\r\n")[2].replace(b"\r\n", b"\n"))
        d.cancel()  # what GatewayResource does when the client disconnects
        self.failureResultOf(d, CancelledError)
        self.emit(b"data: 2\n\n")
        self.emit(b"data: 3\n\n")
        self.assertFalse(self.upstream.requests[0]._disconnected)
        _, second = self.get({"X-Tenant-ID": "t1", "Last-Event-ID": first_id})
        self.assertEqual(without_ids(b"".join(second)), b"data: 2\n\ndata: 3\n\n")
        self.assertEqual(len(self.upstream.requests), 1)

    def raw_stream(self) -> tuple[Request, Deferred[None]]:
        """A stream request served without a treq client, so that the test can make it leave."""
        request = Request(DummyChannel())
        request.method, request.clientproto = b"GET", b"HTTP/1.1"
        request.uri = request.path = b"/api/aura/stream"
        request.content = BytesIO()
        request.requestHeaders.addRawHeader(b"x-tenant-id", b"t1")
        d = self.h.gateway.handle(request)
        self.h.flush()
        return request, d

    def test_detached_stream_row_says_what_the_client_got(self) -> None:
        """
        A client that reads one event and leaves: its row, written when the
        detached tail ends, counts the one event delivered, the time and
        bytes until it left, and the two events read after it left as the
        detached tail; a resume of it is a second row of the same stream
        with the other two, so the stream's rows sum to its three events.
        """
        request, d = self.raw_stream()
        self.emit(b"data: 1\n\n")
        written = request.channel.transport.written.getvalue()  # type: ignore[union-attr]
        [first_id] = ids(written.partition(b"\r\n\r\n")[2].replace(b"\r\n", b"\n"))
        self.h.clock.advance(2)
        d.cancel()  # the client leaves
        self.failureResultOf(d, CancelledError)
        self.h.clock.advance(3)
        self.emit(b"data: 2\n\n")
        self.emit(b"data: 3\n\n")
        self.assertEqual(self.h.history.records, [])  # not before the tail ends
        self.h.clock.advance(1)
        self.upstream.requests[0].finish()
        self.h.flush()
        [first] = self.h.history.records
        self.assertEqual(
            (first.event_count, first.latency_ms, first.end_reason, first.detached_event_count,
             first.detached_ms, first.resumed_after),
            (1, 2000.0, "client_disconnect", 2, 4000.0, None),
        )
        self.assertEqual(first.stream_id, first_id.split(".")[0])
        self.assertGreater(first.response_size_bytes or 0, len(b"data: 1\n\n"))
        self.assertLess(first.response_size_bytes or 0, 2 * len(first_id.encode()) + 30)
        _, second = self.get({"X-Tenant-ID": "t1", "Last-Event-ID": first_id})
        self.assertEqual(without_ids(b"".join(second)), b"data: 2\n\ndata: 3\n\n")
        _, again = self.h.history.records
        self.assertEqual(
            (again.stream_id, again.resumed_after, again.event_count, again.detached_event_count,
             again.response_size_bytes),
            (first.stream_id, 1, 2, None, len(b"".join(second))),
        )
        self.assertEqual(first.event_count + again.event_count, 3)

    def test_tail_ends_at_resume_ttl(self) -> None:
        """
        A detached stream whose upstream goes on is closed at resume_ttl: its
        one row is written then, with the tail read until that moment.
        """
        request, d = self.raw_stream()
        self.emit(b"data: 1\n\n")
        self.emit(b"data: 2\n\n")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        for n in range(3, 8):
            self.emit(b"data: %d\n\n" % n)
        self.h.clock.advance(60)
        self.h.flush()
        [row] = self.h.history.records
        self.assertEqual(
            (row.event_count, row.detached_event_count, row.detached_ms, row.latency_ms),
            (2, 5, 60000.0, 0.0),
        )

    def test_closed_on_disconnect_has_no_tail(self) -> None:
        """With on_client_disconnect = cancel, a client that leaves ends the stream: no tail figure."""
        h = Harness(self.upstream, CONFIG + "[sse]\nresume = memory\non_client_disconnect = cancel\n",
                    resume=True)
        request = Request(DummyChannel())
        request.method, request.clientproto = b"GET", b"HTTP/1.1"
        request.uri = request.path = b"/api/aura/stream"
        request.content = BytesIO()
        request.requestHeaders.addRawHeader(b"x-tenant-id", b"t1")
        d = h.gateway.handle(request)
        h.flush()
        self.upstream.requests[0].write(b"data: 1\n\n")
        h.flush()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        h.flush()
        [row] = h.history.records
        self.assertEqual((row.event_count, row.detached_event_count, row.detached_ms, row.end_reason),
                         (1, None, None, "client_disconnect"))

    def test_tenant_from_query(self) -> None:
        """
        With tenant_from = header, query:tenant_id, an EventSource's tenant
        query parameter meets the contract and never reaches upstream or history.
        """
        harness = Harness(Echo(), CONFIG.replace(
            "required = X-Tenant-ID", "required = X-Tenant-ID\ntenant_from = header, query:tenant_id"))
        response = harness.request("GET", "/api/aura/x?a=1&tenant_id=t9&b=2")
        self.assertEqual(response.code, 200)
        seen = harness.json(response)
        self.assertEqual(seen["uri"], "/api/aura/x?a=1&b=2")
        self.assertIn(["X-Tenant-Id", "t9"], seen["headers"])
        [row] = harness.history.records
        self.assertEqual((row.tenant_id, row.query_string), ("t9", "a=1&b=2"))


class TenantSourceTests(TestCase):
    """[headers] tenant_from beyond the header."""

    CONFIG = CONFIG.replace(
        "required = X-Tenant-ID", "required = X-Tenant-ID\ntenant_from = header, query:tenant_id, cookie:dwp_tenant")

    def test_query_tenant_never_recorded_even_on_errors(self) -> None:
        """A tenant query parameter is removed even when the gateway answers itself (404)."""
        h = Harness(Echo(), self.CONFIG)
        self.assertEqual(h.request("GET", "/nowhere?tenant_id=secret&x=1").code, 404)
        [row] = h.history.records
        self.assertEqual(row.query_string, "x=1")

    def test_cookie_tenant(self) -> None:
        """A dwp_tenant cookie meets the contract when no header is sent."""
        h = Harness(Echo(), self.CONFIG)
        response = h.request("GET", "/api/aura/x", headers={"Cookie": "a=1; dwp_tenant=t7"})
        self.assertEqual(response.code, 200)
        self.assertIn(["X-Tenant-Id", "t7"], h.json(response)["headers"])

    def test_header_wins_when_listed_first(self) -> None:
        """The first source found wins: the header before the query parameter."""
        h = Harness(Echo(), self.CONFIG)
        response = h.request("GET", "/api/aura/x?tenant_id=q", headers={"X-Tenant-ID": "h"})
        seen = h.json(response)
        self.assertIn(["X-Tenant-Id", "h"], seen["headers"])
        self.assertEqual(seen["uri"], "/api/aura/x")
