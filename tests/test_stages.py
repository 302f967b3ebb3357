"""
Tests for each stage of L{aura_proxy.stages}, one at a time: a bare request,
a L{Call}, and a pipeline that only notes what the stage asked of it.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from aura_proxy.call import Call, body_length
from aura_proxy.config import parse_config
from aura_proxy.errors import GatewayError
from aura_proxy.fastclient import _Response
from aura_proxy.history.record import CallRecord
from aura_proxy.resume.log import FOREIGN
from aura_proxy.sse import SseRewriter, make_stream_id
from aura_proxy.stages.forwarding import Forward, upstream_url
from aura_proxy.stages.path import ParsePath
from aura_proxy.stages.preflight import Preflight
from aura_proxy.stages.recording import Record, recorded_headers, trace_id
from aura_proxy.stages.relaying import RelayResponse, stream_owner
from aura_proxy.stages.required_headers import RequiredHeaders
from aura_proxy.stages.resuming import Resume
from aura_proxy.stages.routing import Route
from aura_proxy.stages.tenant import Tenant
from aura_proxy.streams import OpenStreams
from aura_proxy.upstream import UpstreamClient
from tests.test_proxy import CONFIG, ControlledAgent

C = parse_config(CONFIG, "test.ini")


class NotingPipeline:
    """Stands in for L{aura_proxy.proxy.Pipeline}: notes what a stage asks of it."""

    trusted_proxies = None

    def __init__(self) -> None:
        self.asked: list[tuple[Any, ...]] = []
        self.then: Deferred[None] = Deferred()

    def refuse(self, request: Request, call: Call, error: GatewayError, cors: bool = True) -> None:
        self.asked.append(("refuse", error.code, cors))

    def end(self, request: Request, call: Call) -> None:
        self.asked.append(("end", call.status))
        if call.finished is not None and not call.finished.called:
            call.finished.callback(None)

    def respond(self, request: Request, call: Call, response: Any) -> None:
        self.asked.append(("respond", response.code))

    def go_on(self, request: Request, call: Call, after: Any) -> Deferred[None]:
        self.asked.append(("go_on", type(after).__name__))
        return self.then


def make_call(uri: bytes = b"/api/aura/x", method: bytes = b"GET", **headers: str) -> Call:
    """A call for a request as twisted.web hands it over, with C{headers} (underscores for dashes)."""
    channel = DummyChannel()
    request = Request(channel)
    # finish() forgets the channel: keep what the client got.
    request.client_wire = channel.transport  # type: ignore[attr-defined]
    request.method, request.clientproto = method, b"HTTP/1.1"
    request.uri = uri
    request.path = uri.partition(b"?")[0]
    request.content = BytesIO(b"body")
    for name, value in headers.items():
        request.requestHeaders.addRawHeader(name.replace("_", "-").encode(), value.encode())
    return Call(NotingPipeline(), request, 100.0, body_length(request))  # type: ignore[arg-type]


def asked(call: Call) -> list[tuple[Any, ...]]:
    return call.pipeline.asked  # type: ignore[attr-defined,no-any-return]


def written(call: Call) -> bytes:
    return call.request.client_wire.written.getvalue()  # type: ignore[attr-defined,no-any-return]


def whole(code: int, body: bytes, content_type: bytes = b"application/json") -> _Response:
    """An upstream response whose whole body came with its head."""
    response = _Response((b"HTTP", 1, 1), code, b"OK", Headers({b"content-type": [content_type]}),
                         len(body), None)
    response.complete_body = body
    response._pending.append(body)
    response._reason = Failure(ResponseDone())
    return response


class TenantTests(SynchronousTestCase):
    """L{Tenant}."""

    def test_query_tenant_becomes_the_header(self) -> None:
        """A tenant query parameter becomes X-Tenant-ID and leaves the URI; the request goes on."""
        stage = Tenant(parse_config(CONFIG.replace(
            "required = X-Tenant-ID", "required = X-Tenant-ID\ntenant_from = query:tenant_id"), "t.ini").headers)
        call = make_call(b"/api/aura/x?tenant_id=t5&a=1")
        self.assertIsNone(stage.run(call.request, call))
        self.assertEqual(call.request.requestHeaders.getRawHeaders(b"x-tenant-id"), [b"t5"])
        self.assertEqual(call.request.uri, b"/api/aura/x?a=1")


class ParsePathTests(SynchronousTestCase):
    """L{ParsePath}."""

    def test_segments(self) -> None:
        """The path's decoded segments are the call's; the request goes on."""
        call = make_call(b"/api/%61ura/x?q=1")
        self.assertIsNone(ParsePath().run(call.request, call))
        self.assertEqual(call.segments, ["api", "aura", "x"])

    def test_malformed(self) -> None:
        """A dot-dot segment is refused with 400 bad_request."""
        call = make_call(b"/api/../x")
        answer = ParsePath().run(call.request, call)
        assert isinstance(answer, GatewayError)
        self.assertEqual((answer.status, answer.code), (400, "bad_request"))


    def test_control_character(self) -> None:
        """A percent-encoded control character in the path is refused with 400 bad_request."""
        call = make_call(b"/api/aura/a%01b")
        answer = ParsePath().run(call.request, call)
        assert isinstance(answer, GatewayError)
        self.assertEqual((answer.status, answer.code), (400, "bad_request"))


class PreflightTests(SynchronousTestCase):
    """L{Preflight}."""

    def preflight(self, origin: str) -> Call:
        return make_call(method=b"OPTIONS", Origin=origin, Access_Control_Request_Method="POST")

    def test_other_requests_go_on(self) -> None:
        """An OPTIONS without Access-Control-Request-Method is not a preflight."""
        call = make_call(method=b"OPTIONS", Origin="http://localhost:3000")
        self.assertIsNone(Preflight(C.cors).run(call.request, call))
        self.assertEqual(asked(call), [])

    def test_allowed(self) -> None:
        """An allowed preflight is answered 204 here, and the call ends."""
        call = self.preflight("http://localhost:3000")
        answer = Preflight(C.cors).run(call.request, call)
        assert isinstance(answer, Deferred)
        self.assertIsNone(self.successResultOf(answer))
        self.assertTrue(written(call).startswith(b"HTTP/1.1 204 "))
        self.assertIn(b"Access-Control-Allow-Origin: http://localhost:3000", written(call))
        self.assertEqual(asked(call), [("end", 204)])

    def test_denied(self) -> None:
        """A preflight from another origin is refused 403 cors_forbidden, without CORS headers."""
        call = self.preflight("http://evil.example")
        answer = Preflight(C.cors).run(call.request, call)
        assert isinstance(answer, Deferred)
        self.assertEqual(asked(call), [("refuse", "cors_forbidden", False)])


class RouteTests(SynchronousTestCase):
    """L{Route}."""

    def test_most_specific(self) -> None:
        """The call gets the matching route; the request goes on."""
        call = make_call(b"/api/svc/items")
        call.segments = ["api", "svc", "items"]
        self.assertIsNone(Route(C.routes).run(call.request, call))
        assert call.route is not None
        self.assertEqual(call.route.name, "svc")

    def test_no_route(self) -> None:
        """No matching pattern is a 404 no_route naming the path."""
        call = make_call(b"/nowhere")
        call.segments = ["nowhere"]
        answer = Route(C.routes).run(call.request, call)
        assert isinstance(answer, GatewayError)
        self.assertEqual((answer.status, answer.code), (404, "no_route"))
        self.assertIn("/nowhere", answer.message)


class RequiredHeadersTests(SynchronousTestCase):
    """L{RequiredHeaders}."""

    def test_missing(self) -> None:
        """A routed request without the tenant is a 400 missing_header."""
        call = make_call()
        call.segments = ["api", "aura", "x"]
        answer = RequiredHeaders(C.headers).run(call.request, call)
        assert isinstance(answer, GatewayError)
        self.assertEqual((answer.status, answer.code), (400, "missing_header"))

    def test_public_path(self) -> None:
        """A public path goes on without the tenant."""
        call = make_call(b"/api/aura/public/x")
        call.segments = ["api", "aura", "public", "x"]
        self.assertIsNone(RequiredHeaders(C.headers).run(call.request, call))


class PendingLog:
    """A stream log whose attach answers when the test says."""

    def __init__(self) -> None:
        self.attaching: list[tuple[str, str, int, Deferred[Any]]] = []

    def attach(self, stream_id: str, owner: str, seq: int, subscriber: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.attaching.append((stream_id, owner, seq, d))
        return d


class Attachment:
    """An attachment that notes being detached."""

    detached = False

    def detach(self) -> None:
        self.detached = True


def gateway_id(stream_id: str, upstream: Optional[bytes] = None) -> str:
    """The id the gateway stamps on the first event of stream C{stream_id}."""
    event = (b"id: " + upstream + b"\n" if upstream else b"") + b"data: x\n\n"
    out = SseRewriter.for_stream(stream_id, carry_upstream=True).feed(event)
    [line] = [line for line in out.split(b"\n") if line.startswith(b"id: ")]
    return line[4:].decode()


class ResumeTests(SynchronousTestCase):
    """L{Resume}."""

    def setUp(self) -> None:
        self.log = PendingLog()
        self.stage = Resume(C, Clock(), self.log)  # type: ignore[arg-type]
        self.stream = make_stream_id()

    def test_no_last_event_id(self) -> None:
        """A request without Last-Event-ID goes on."""
        call = make_call(X_Tenant_ID="t1")
        self.assertIsNone(self.stage.run(call.request, call))

    def test_upstream_id_goes_on(self) -> None:
        """A Last-Event-ID that is not the gateway's goes on unchanged."""
        call = make_call(X_Tenant_ID="t1", Last_Event_ID="41")
        self.assertIsNone(self.stage.run(call.request, call))
        self.assertEqual(call.request.requestHeaders.getRawHeaders(b"last-event-id"), [b"41"])
        self.assertEqual(self.log.attaching, [])

    def test_resume_off_hands_upstream_its_id(self) -> None:
        """With no stream log, a gateway id goes on as the upstream's own id it carries."""
        stage = Resume(C, Clock(), None)
        call = make_call(X_Tenant_ID="t1", Last_Event_ID=gateway_id(self.stream, b"up-7"))
        self.assertIsNone(stage.run(call.request, call))
        self.assertEqual(call.request.requestHeaders.getRawHeaders(b"last-event-id"), [b"up-7"])

    def test_takes_the_request_while_the_log_looks(self) -> None:
        """A gateway id is looked up for its tenant; the stage answers (a Deferred) meanwhile."""
        call = make_call(X_Tenant_ID="t1", Last_Event_ID=gateway_id(self.stream))
        answer = self.stage.run(call.request, call)
        self.assertIsInstance(answer, Deferred)
        self.assertIs(answer, call.finished)
        [(stream_id, owner, seq, _)] = self.log.attaching
        self.assertEqual((stream_id, owner, seq), (self.stream, stream_owner(call.request, call), 1))
        self.assertIn('"t1"', owner)

    def test_unknown_stream_goes_on_after_this_stage(self) -> None:
        """When the log does not know the stream, the stages after Resume take the request, with no id."""
        call = make_call(X_Tenant_ID="t1", Last_Event_ID=gateway_id(self.stream))
        self.stage.run(call.request, call)
        self.log.attaching[0][3].callback(None)
        self.assertEqual(asked(call), [("go_on", "Resume")])
        self.assertIsNone(call.request.requestHeaders.getRawHeaders(b"last-event-id"))
        self.assertIsNone(call.replay)

    def test_foreign_stream_drops_the_upstream_id(self) -> None:
        """Another tenant's stream goes on without even the upstream id the gateway id carries."""
        call = make_call(X_Tenant_ID="t2", Last_Event_ID=gateway_id(self.stream, b"up-7"))
        self.stage.run(call.request, call)
        self.log.attaching[0][3].callback(FOREIGN)
        self.assertEqual(asked(call), [("go_on", "Resume")])
        self.assertIsNone(call.request.requestHeaders.getRawHeaders(b"last-event-id"))

    def test_replayed_stream_is_recorded_when_it_ends(self) -> None:
        """A replay that ends ends the call: status 200, its end reason."""
        call = make_call(X_Tenant_ID="t1", Last_Event_ID=gateway_id(self.stream))
        self.stage.run(call.request, call)
        self.log.attaching[0][3].callback(Attachment())
        assert call.replay is not None
        call.replay.replay_event(2, b"id: x\ndata: 2\n\n")
        call.replay.replay_end()
        self.assertEqual(asked(call), [("end", 200)])
        self.assertEqual((call.end_reason, call.replay.events), ("completed", 1))
        self.assertIn(b"text/event-stream", written(call))

    def test_cut_log_replay_ends_with_retry_hint(self) -> None:
        """
        A replay of a log cut short (its gateway stopped or died) writes the
        missed events, then a C{retry:} hint, and ends the call as
        C{shutdown}: the client reconnects and goes upstream from there.
        """
        from aura_proxy.relay import RETRY_HINT

        call = make_call(X_Tenant_ID="t1", Last_Event_ID=gateway_id(self.stream))
        self.stage.run(call.request, call)
        self.log.attaching[0][3].callback(Attachment())
        assert call.replay is not None
        call.replay.replay_event(2, b"id: x\ndata: 2\n\n")
        call.replay.replay_cut()
        self.assertEqual(asked(call), [("end", 200)])
        self.assertEqual(call.end_reason, "shutdown")
        out = written(call)
        self.assertLess(out.index(b"data: 2\n\n"), out.index(RETRY_HINT))

    def test_cut_log_with_nothing_missed_goes_upstream_with_its_id(self) -> None:
        """When the log refuses (cut, nothing missed), the request goes on with the upstream's own id."""
        call = make_call(X_Tenant_ID="t1", Last_Event_ID=gateway_id(self.stream, b"21"))
        self.stage.run(call.request, call)
        self.log.attaching[0][3].callback(None)
        self.assertEqual(asked(call), [("go_on", "Resume")])
        self.assertEqual(call.request.requestHeaders.getRawHeaders(b"last-event-id"), [b"21"])

    def test_client_gone_while_the_log_looks(self) -> None:
        """
        A client that leaves before the log answers is neither replayed to
        nor sent upstream, and its attachment is let go.
        """
        call = make_call(X_Tenant_ID="t1", Last_Event_ID=gateway_id(self.stream))
        finished = self.stage.run(call.request, call)
        assert isinstance(finished, Deferred)
        finished.cancel()
        attachment = Attachment()
        self.log.attaching[0][3].callback(attachment)
        self.assertTrue(attachment.detached)
        self.assertEqual(asked(call), [("end", 200)])
        self.assertEqual(call.end_reason, "client_disconnect")
        self.assertEqual(written(call), b"")


class ForwardTests(SynchronousTestCase):
    """L{Forward}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.agent = ControlledAgent()
        self.stage = Forward(C, self.clock, UpstreamClient(self.clock, 5, 10, agent=self.agent))
        self.call = make_call(b"/api/svc/items?x=1", X_Tenant_ID="t1")
        self.call.route = C.routes[1]

    def test_url(self) -> None:
        """The upstream URL: prefix segments stripped, the upstream's base path in front, query kept."""
        self.assertEqual(upstream_url(C.routes[1], b"/api/svc/a/b?x=1"), b"http://svc.internal:9100/base/a/b?x=1")

    def test_response_goes_to_the_response_stage(self) -> None:
        """The upstream's response is handed to the pipeline's response stage, with the request id upstream."""
        finished = self.stage.run(self.call.request, self.call)
        self.assertIs(finished, self.call.finished)
        [(method, uri, d)] = self.agent.requests
        self.assertEqual((method, uri), (b"GET", b"http://svc.internal:9100/base/items?x=1"))
        d.callback(whole(200, b"{}"))
        self.assertEqual(asked(self.call), [("respond", 200)])

    def test_refused_connection(self) -> None:
        """A refused connection is refused 502 upstream_unavailable."""
        self.stage.run(self.call.request, self.call)
        self.agent.requests[0][2].errback(ConnectionRefusedError())
        self.assertEqual(asked(self.call), [("refuse", "upstream_unavailable", True)])

    def test_response_timeout(self) -> None:
        """No response headers within response_timeout: the upstream request is cancelled, 504."""
        self.stage.run(self.call.request, self.call)
        self.clock.advance(29)
        self.assertEqual(asked(self.call), [])
        self.clock.advance(1)
        self.assertEqual(self.agent.cancelled, 1)
        self.assertEqual(asked(self.call), [("refuse", "upstream_timeout", True)])

    def test_client_gone(self) -> None:
        """A client that leaves first cancels the upstream request; the call ends as 499."""
        finished = self.stage.run(self.call.request, self.call)
        assert isinstance(finished, Deferred)
        finished.cancel()
        self.assertEqual(self.agent.cancelled, 1)
        self.assertEqual(asked(self.call), [("end", 499)])
        self.assertIsNone(self.successResultOf(finished))


class Body:
    """An upstream response whose body the test delivers."""

    def __init__(self, content_type: bytes, length: Any = None) -> None:
        from twisted.web.iweb import UNKNOWN_LENGTH

        self.code, self.phrase = 200, b"OK"
        self.headers = Headers({b"content-type": [content_type], b"access-control-allow-origin": [b"*"]})
        self.length = UNKNOWN_LENGTH if length is None else length
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol


class RelayResponseTests(SynchronousTestCase):
    """L{RelayResponse}."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.streams = OpenStreams(self.clock)
        self.stage = RelayResponse(C, self.clock, None, self.streams)

    def test_whole_body(self) -> None:
        """A body that came with its head is written and finished at once; the call ends with its size."""
        call = make_call(X_Tenant_ID="t1", Origin="http://localhost:3000")
        self.stage.respond(call.request, call, whole(201, b'{"a":1}'))
        out = written(call)
        self.assertTrue(out.startswith(b"HTTP/1.1 201 "))
        self.assertIn(b"Content-Length: 7", out)
        self.assertIn(b"X-Request-Id: " + call.id.encode(), out)
        self.assertIn(b"Access-Control-Allow-Origin: http://localhost:3000", out)
        self.assertTrue(out.endswith(b'{"a":1}'))
        self.assertEqual((call.status, call.response_size, call.relay), (201, 7, None))
        self.assertEqual(asked(call), [("end", 201)])

    def test_rewriter_follows_fast_path(self) -> None:
        """Streams are stamped by the C rewriter where built, and by the Python one with fast_path = off."""
        import os

        from aura_proxy import sse

        for fast_path, python in (("on", not sse.ACCELERATED), ("off", True)):
            config = parse_config(CONFIG.replace("[gateway]", f"[gateway]\nfast_path = {fast_path}", 1), "t.ini")
            stage = RelayResponse(config, self.clock, None, self.streams)
            call = make_call()
            counted = stage._stamper("s1", call.request, call)
            state = counted._rewriter._st  # type: ignore[attr-defined]
            self.assertEqual(type(state).__module__ == "aura_proxy.sse", python, fast_path)
            if os.environ.get("AURA_PROXY_REQUIRE_C"):
                self.assertEqual(python, fast_path == "off")

    def test_relay_step_follows_fast_path(self) -> None:
        """Bodies are relayed by the C per-read step where built, and by the Python one with fast_path = off."""
        from aura_proxy import relay as relay_module

        for fast_path, cls in (("on", relay_module.Relay), ("off", relay_module.PyRelay)):
            config = parse_config(CONFIG.replace("[gateway]", f"[gateway]\nfast_path = {fast_path}", 1), "t.ini")
            stage = RelayResponse(config, self.clock, None, self.streams)
            call = make_call(X_Tenant_ID="t1")
            stage.respond(call.request, call, Body(b"text/event-stream"))
            self.assertIs(type(call.relay), cls, fast_path)
        self.assertEqual(relay_module.PyRelay.dataReceived.__qualname__, "_PyRelayCore.dataReceived")

    def test_sse_relayed_and_registered(self) -> None:
        """
        An SSE response opens with the SSE headers, is relayed with stamped
        ids while registered as an open stream, and ends the call when the
        relay ends.
        """
        call = make_call(X_Tenant_ID="t1")
        response = Body(b"text/event-stream")
        self.stage.respond(call.request, call, response)
        self.assertEqual(len(self.streams), 1)
        self.assertTrue(call.is_sse)
        head = written(call)
        self.assertIn(b"Cache-Control: no-cache", head)
        self.assertIn(b"X-Accel-Buffering: no", head)
        self.assertNotIn(b"Access-Control-Allow-Origin: *", head)
        relay = response.protocol
        self.assertIs(relay, call.relay)
        relay.makeConnection(DummyChannel.TCP())
        relay.dataReceived(b"data: 1\n\n")
        self.assertIn(b"id: ", written(call))
        relay.connectionLost(Failure(ResponseDone()))
        self.assertEqual(len(self.streams), 0)
        self.assertEqual(call.end_reason, "completed")
        self.assertEqual(asked(call), [("end", 200)])
        self.assertEqual(relay.events, 1)

    def test_drained_stream_log_is_cut(self) -> None:
        """
        A stream that ends unfinished while the gateway drains is marked cut
        in the log (a client resumes elsewhere from it); outside a drain it
        is abandoned, and a whole stream is closed.
        """
        class Log:
            def __init__(self) -> None:
                self.calls: list[str] = []

            def open(self, stream_id: str, owner: str) -> None:
                pass

            def appender(self, stream_id: str) -> Any:
                return lambda seq, block: None

            def close(self, stream_id: str) -> None:
                self.calls.append("close")

            def abandon(self, stream_id: str) -> None:
                self.calls.append("abandon")

            def cut(self, stream_id: str) -> None:
                self.calls.append("cut")

        log = Log()
        stage = RelayResponse(C, self.clock, log, self.streams)  # type: ignore[arg-type]
        for draining, error in ((False, None), (False, Exception("boom")), (True, Exception("cut"))):
            self.streams.draining = draining
            call = make_call(X_Tenant_ID="t1")
            response = Body(b"text/event-stream")
            stage.respond(call.request, call, response)
            relay = response.protocol
            relay.makeConnection(DummyChannel.TCP())
            if error is None:
                relay.connectionLost(Failure(ResponseDone()))
            else:
                relay._stopped = True  # as stop("shutdown") leaves it
                relay.connectionLost(Failure(error))
        self.assertEqual(log.calls, ["close", "abandon", "cut"])

    def test_stream_owner(self) -> None:
        """
        A stream belongs to its tenant, its verified user, its route and its
        method: a change in any one is another owner; the same request is the
        same owner.
        """
        from aura_proxy.auth.verify import Identity

        def owner(method: bytes = b"GET", route: int = 0, user: Optional[str] = None,
                  **headers: str) -> str:
            call = make_call(method=method, **headers)
            call.route = C.routes[route]
            if user is not None:
                call.identity = Identity("t1", user, None, 0.0)
            return stream_owner(call.request, call)

        base = owner(X_Tenant_ID="t1")
        self.assertEqual(base, owner(X_Tenant_ID="t1"))
        others = [
            owner(X_Tenant_ID="t2"),
            owner(),  # a public stream: no tenant
            owner(b"POST", X_Tenant_ID="t1"),
            owner(route=1, X_Tenant_ID="t1"),
            owner(user="u1", X_Tenant_ID="t1"),
            owner(user="u2", X_Tenant_ID="t1"),
            owner(X_Tenant_ID='t1",null'),  # no separator can be forged
        ]
        self.assertEqual(len(set(others + [base])), len(others) + 1)


class History:
    def __init__(self) -> None:
        self.records: list[CallRecord] = []

    def record(self, record: CallRecord) -> None:
        self.records.append(record)


class RecordTests(SynchronousTestCase):
    """L{Record} and the row it builds."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(100.5)
        self.history = History()
        self.stage = Record(C.headers, self.clock, self.history)  # type: ignore[arg-type]

    def test_plain_call(self) -> None:
        """A forwarded plain call's row: identity, sizes, query, status, latency and the defaults it went upstream with."""
        call = make_call(b"/api/aura/x?q=1", method=b"POST", X_Tenant_ID="t1", User_Agent="ua",
                         X_Trace_ID="tr")
        call.route, call.status, call.response_size = C.routes[0], 201, 7
        call.upstream_call = Deferred()  # it went upstream
        self.stage.ended(call.request, call)
        [row] = self.history.records
        self.assertEqual(
            (row.id, row.created_at, row.tenant_id, row.source, row.caller_type, row.method, row.path,
             row.route, row.query_string, row.status_code, row.latency_ms, row.request_size_bytes,
             row.response_size_bytes, row.user_agent, row.trace_id, row.is_stream, row.end_reason),
            (call.id, 100.0, "t1", "FRONTEND", "USER", "POST", "/api/aura/x", "aura", "q=1", 201, 500.0,
             4, 7, "ua", "tr", False, None),
        )

    def test_relayed_stream(self) -> None:
        """
        A relayed stream's row has no query nor request size, but the bytes
        and events delivered, first event time, end reason and stream id;
        no detached tail.
        """
        class Relay:
            first_write_at, delivered, sent, left_at, detached_at = 100.25, 3, 99, None, None

        call = make_call(b"/api/aura/s?q=1", X_Tenant_ID="t1")
        call.status, call.is_sse, call.end_reason = 200, True, "idle_timeout"
        call.stream_id = "S1"
        call.relay = Relay()  # type: ignore[assignment]
        row = self.stage.row(call.request, call)
        self.assertEqual(
            (row.is_stream, row.query_string, row.request_size_bytes, row.response_size_bytes,
             row.first_event_ms, row.event_count, row.end_reason, row.latency_ms),
            (True, None, None, 99, 250.0, 3, "idle_timeout", 500.0),
        )
        self.assertEqual(
            (row.stream_id, row.resumed_after, row.detached_event_count, row.detached_ms),
            ("S1", None, None, None),
        )

    def test_detached_stream(self) -> None:
        """
        A detached stream's row says what the client got until it left
        (events, bytes, latency to the moment it left) and the tail the
        gateway read after that as figures of their own.
        """
        class Relay:
            first_write_at, delivered, sent = 100.25, 3, 99
            left_at = detached_at = 102.0
            detached_events = 61

        call = make_call(b"/api/aura/s", X_Tenant_ID="t1")
        call.status, call.is_sse, call.end_reason = 200, True, "client_disconnect"
        call.stream_id = "S1"
        call.relay = Relay()  # type: ignore[assignment]
        self.clock.advance(30)  # the tail ends at resume_ttl
        row = self.stage.row(call.request, call)
        self.assertEqual(
            (row.event_count, row.response_size_bytes, row.latency_ms, row.first_event_ms,
             row.detached_event_count, row.detached_ms, row.end_reason, row.stream_id),
            (3, 99, 2000.0, 250.0, 61, 28500.0, "client_disconnect", "S1"),
        )

    def test_replayed_stream(self) -> None:
        """A replayed (resumed) stream's row names the stream it continues and the id it resumed after."""
        class Replay:
            first_write_at, events, sent = 100.25, 6, 120

        call = make_call(b"/api/aura/s", X_Tenant_ID="t1")
        call.status, call.end_reason = 200, "completed"
        call.stream_id, call.resumed_after = "S1", 4
        call.replay = Replay()  # type: ignore[assignment]
        row = self.stage.row(call.request, call)
        self.assertEqual(
            (row.is_stream, row.event_count, row.response_size_bytes, row.stream_id, row.resumed_after,
             row.detached_event_count),
            (True, 6, 120, "S1", 4, None),
        )

    def test_refused_call_records_what_the_client_sent(self) -> None:
        """
        A call refused before it went upstream records source and caller
        type as the client sent them, and no default in their place.
        """
        call = make_call(b"/api/aura/x", X_DWP_Source="MOBILE")
        call.status = 400
        row = self.stage.row(call.request, call)
        self.assertEqual((row.source, row.caller_type), ("MOBILE", None))

    def test_forwarded_call_records_what_went_upstream(self) -> None:
        """
        A forwarded call records the client's source and caller type where
        it sent them (even blank), and the configured default where it did not.
        """
        call = make_call(b"/api/aura/x", X_DWP_Source="MOBILE")
        call.upstream_call = Deferred()
        row = self.stage.row(call.request, call)
        self.assertEqual((row.source, row.caller_type), ("MOBILE", "USER"))
        call = make_call(b"/api/aura/x", X_DWP_Caller_Type="")
        call.upstream_call = Deferred()
        row = self.stage.row(call.request, call)
        self.assertEqual((row.source, row.caller_type), ("FRONTEND", ""))

    def test_relayed_body(self) -> None:
        """A relayed plain body's size is what its relay sent."""
        class Relay:
            first_write_at, delivered, sent, left_at, detached_at = 100.25, None, 99, None, None

        call = make_call()
        call.relay = Relay()  # type: ignore[assignment]
        self.assertEqual(self.stage.row(call.request, call).response_size_bytes, 99)

    def test_history_off(self) -> None:
        """With history off nothing is recorded, and nothing fails."""
        call = make_call()
        Record(C.headers, self.clock, None).ended(call.request, call)
        self.assertEqual(self.history.records, [])

    def test_trace_id(self) -> None:
        """traceparent's trace id wins over X-Trace-ID; a malformed traceparent does not count."""
        headers = Headers({b"traceparent": [b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"],
                           b"x-trace-id": [b"other"]})
        self.assertEqual(trace_id(recorded_headers(headers)), "0af7651916cd43dd8448eb211c80319c")
        headers.setRawHeaders(b"traceparent", [b"garbage"])
        self.assertEqual(trace_id(recorded_headers(headers)), "other")
