"""
Tests for L{aura_proxy.proxy.Pipeline} and L{aura_proxy.proxy.Gateway}: the
request path as an ordered list of stages, built from one configuration.
"""

from __future__ import annotations

from io import BytesIO
from typing import Optional

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from aura_proxy import errors
from aura_proxy.call import Call
from aura_proxy.config import parse_config
from aura_proxy.errors import GatewayError
from aura_proxy.fastclient import _Response
from aura_proxy.proxy import Pipeline
from aura_proxy.stages import GO_ON, Answer, Stage
from aura_proxy.stages.forwarding import Forward
from aura_proxy.stages.required_headers import RequiredHeaders
from tests.test_proxy import CONFIG, TENANT, ControlledAgent, Echo, Harness


class Limit(Stage):
    """A stage a later feature could add (a rate limit): refuses tenant C{t-over}."""

    def __init__(self) -> None:
        self.seen: list[tuple[Optional[str], int]] = []
        self.agent: Optional[ControlledAgent] = None

    def run(self, request: Request, call: Call) -> Answer:
        asked = len(self.agent.requests) if self.agent is not None else -1
        self.seen.append((call.route.name if call.route is not None else None, asked))
        if request.requestHeaders.getRawHeaders(b"x-tenant-id") == [b"t-over"]:
            return GatewayError(429, "rate_limited", "too many requests")
        return GO_ON


def with_stage(pipeline: Pipeline, stage: Stage, after: type) -> Pipeline:
    """C{pipeline} with C{stage} inserted after its stage of class C{after}: the one-line change."""
    stages = list(pipeline.stages)
    index = next(i for i, s in enumerate(stages) if isinstance(s, after))
    stages.insert(index + 1, stage)
    return Pipeline(pipeline.config, pipeline.clock, stages, pipeline.response, pipeline.ended)


def whole(code: int, body: bytes) -> _Response:
    """An upstream response whose whole body came with its head (FastAgent's complete_body)."""
    response = _Response((b"HTTP", 1, 1), code, b"OK", Headers({b"content-type": [b"application/json"]}),
                         len(body), None)
    response.complete_body = body
    response._pending.append(body)
    response._reason = Failure(ResponseDone())
    return response


class AddedStageTests(TestCase):
    """A new stage is one class and one more entry in the list."""

    def setUp(self) -> None:
        self.agent = ControlledAgent()
        self.h = Harness(self.agent)
        self.limit = Limit()
        self.limit.agent = self.agent
        self.h.gateway.pipeline = with_stage(self.h.gateway.pipeline, self.limit, after=RequiredHeaders)

    def test_runs_in_its_place(self) -> None:
        """
        An added stage runs after the stages before it (the route is known)
        and before the ones after it (the upstream was not asked yet).
        """
        self.h.client.get("http://gw.example/api/aura/x", headers=TENANT)
        self.h.flush()
        self.assertEqual(self.limit.seen, [("aura", 0)])
        self.assertEqual(len(self.agent.requests), 1)

    def test_not_run_when_an_earlier_stage_answers(self) -> None:
        """A request refused before it (here: missing tenant) never reaches the added stage."""
        response = self.h.request("GET", "/api/aura/x")
        self.assertEqual(response.code, 400)
        self.assertEqual(self.limit.seen, [])

    def test_can_refuse(self) -> None:
        """
        A GatewayError from the added stage is the client's JSON answer;
        the upstream is never asked, and the call is recorded like any other.
        """
        response = self.h.request("GET", "/api/aura/x", headers={"X-Tenant-ID": "t-over"})
        self.assertEqual(response.code, 429)
        self.assertEqual(self.h.json(response)["error"]["code"], "rate_limited")
        self.assertEqual(self.agent.requests, [])
        [row] = self.h.history.records
        self.assertEqual((row.status_code, row.route, row.tenant_id), (429, "aura", "t-over"))


NEW_CONFIG = CONFIG.replace("response_timeout = 30", "response_timeout = 5") + """
[route:new]
path = /api/new/**
upstream = http://new.internal:9200
"""


class SwapTests(TestCase):
    """Gateway.use: a new configuration, a new pipeline; requests in flight keep theirs."""

    def test_in_flight_request_finishes_on_the_old_pipeline(self) -> None:
        """
        A request started before the swap keeps the old configuration's
        response timeout and route, and finishes normally; a request after
        it gets the new route and the new timeout.
        """
        agent = ControlledAgent()
        h = Harness(agent)
        old = h.client.get("http://gw.example/api/aura/x", headers=TENANT)
        h.flush()
        h.gateway.use(parse_config(NEW_CONFIG, "new.ini"))
        self.assertEqual(h.gateway.config.gateway.response_timeout, 5)
        new = h.client.get("http://gw.example/api/new/y", headers=TENANT)
        h.flush()
        self.assertEqual([uri for _, uri, _ in agent.requests],
                         [b"http://aura.internal:9000/api/aura/x", b"http://new.internal:9200/api/new/y"])
        h.clock.advance(5)
        self.assertEqual(h.successResultOf(new).code, 504)
        self.assertNoResult(old)
        agent.requests[0][2].callback(whole(200, b'{"ok":1}'))
        response = h.successResultOf(old)
        self.assertEqual(response.code, 200)
        self.assertEqual(h.successResultOf(h.client.content(response)), b'{"ok":1}')
        self.assertEqual([(r.route, r.status_code) for r in h.history.records],
                         [("new", 504), ("aura", 200)])

    def test_new_route_after_the_swap(self) -> None:
        """Before the swap the new route's path is 404 no_route; after it, it goes to the new upstream."""
        agent = ControlledAgent()
        h = Harness(agent)
        self.assertEqual(h.request("GET", "/api/new/y", headers=TENANT).code, 404)
        h.gateway.use(parse_config(NEW_CONFIG, "new.ini"))
        h.client.get("http://gw.example/api/new/y", headers=TENANT)
        h.flush()
        self.assertEqual([uri for _, uri, _ in agent.requests], [b"http://new.internal:9200/api/new/y"])

    def test_relays_of_every_pipeline_are_counted(self) -> None:
        """Streams opened on the old pipeline and on the new one share one registry (shutdown ends both)."""
        from tests.test_proxy import Streams

        upstream = Streams()
        h = Harness(upstream)
        h.request("GET", "/api/aura/s", headers=TENANT, unbuffered=True)
        h.gateway.use(parse_config(NEW_CONFIG, "new.ini"))
        h.request("GET", "/api/aura/s", headers=TENANT, unbuffered=True)
        self.assertEqual(h.gateway.active_streams(), 2)
        ended = h.gateway.shutdown(grace=0)
        h.flush()
        self.successResultOf(ended)
        self.assertEqual(h.gateway.active_streams(), 0)
        self.assertEqual([r.end_reason for r in h.history.records], ["shutdown", "shutdown"])


def bare_request(path: bytes, tenant: bytes = b"t1") -> Request:
    """A request as twisted.web hands it over, without a client."""
    request = Request(DummyChannel())
    request.method, request.clientproto = b"GET", b"HTTP/1.1"
    request.uri = request.path = path
    request.content = BytesIO()
    request.requestHeaders.addRawHeader(b"x-tenant-id", tenant)
    return request


class PipelineTests(TestCase):
    """The pipeline itself."""

    def test_built_in_order(self) -> None:
        """The request stages of a gateway, in the order docs/request-path.md gives."""
        h = Harness(Echo())
        self.assertEqual(
            [type(s).__name__ for s in h.gateway.pipeline.stages],
            ["Tenant", "Identity", "ParsePath", "Preflight", "Route", "Authenticate", "RequiredHeaders", "Limits",
             "Resume", "Forward"],
        )
        self.assertEqual([type(s).__name__ for s in h.gateway.pipeline.ended], ["Record"])

    def test_stages_are_built_once(self) -> None:
        """Requests reuse the pipeline's stage objects: none is made per request."""
        h = Harness(Echo())
        before = h.gateway.pipeline.stages
        h.request("GET", "/api/aura/x", headers=TENANT)
        h.request("GET", "/nowhere", headers=TENANT)
        self.assertIs(h.gateway.pipeline.stages, before)

    def test_a_path_nobody_answers_is_an_error(self) -> None:
        """A pipeline whose stages all go on (no Forward at the end) raises: GatewayResource answers 500."""
        h = Harness(Echo())
        p = h.gateway.pipeline
        h.gateway.pipeline = Pipeline(
            p.config, h.clock, [s for s in p.stages if not isinstance(s, Forward)], p.response, p.ended)
        self.assertRaises(RuntimeError, h.gateway.handle, bare_request(b"/api/aura/x"))
        response = h.request("GET", "/api/aura/x", headers=TENANT)
        self.assertEqual(response.code, 500)
        self.assertEqual(h.json(response)["error"]["code"], "internal_error")
        self.flushLoggedErrors(RuntimeError)

    def test_rejected_body_recorded_with_route(self) -> None:
        """
        A request the site refused for its body size is recorded with the
        tenant, path and route the classifying stages find, and the size of
        the 413 answer; the part of the body that arrived is not counted (as
        before).  Its request id, for the answer, is the row's.
        """
        h = Harness(Echo())
        error = errors.body_too_large(10)
        request = bare_request(b"/api/aura/x?q=1")
        request.content = BytesIO(b"the part that came before the limit")
        answer, request_id = h.gateway.rejected_body(request, error)
        self.assertIs(answer, error)
        [row] = h.history.records
        self.assertEqual(
            (row.status_code, row.route, row.tenant_id, row.path, row.query_string,
             row.request_size_bytes, row.response_size_bytes),
            (413, "aura", "t1", "/api/aura/x", "q=1", 0, len(error.body(request_id))),
        )
        self.assertEqual(row.id, request_id)

    def test_rejected_body_on_a_malformed_path(self) -> None:
        """
        A request with a body over the limit whose path is malformed is
        refused for its path (400 bad_request, the earlier check), recorded
        without a route.
        """
        h = Harness(Echo(), CONFIG + "[route:all]\npath = /**\nupstream = http://all.internal\n")
        answer, _ = h.gateway.rejected_body(bare_request(b"/a/../b"), errors.body_too_large(10))
        self.assertEqual((answer.status, answer.code), (400, "bad_request"))
        [row] = h.history.records
        self.assertEqual((row.status_code, row.route), (400, None))

    def test_unrouted_path_is_404_whatever_its_body(self) -> None:
        """
        The routing check comes before the body limit: a body over the limit
        to a path no route matches is 404 no_route, recorded so, not 413.
        """
        h = Harness(Echo())
        answer, request_id = h.gateway.rejected_body(bare_request(b"/nowhere"), errors.body_too_large(10))
        self.assertEqual((answer.status, answer.code), (404, "no_route"))
        [row] = h.history.records
        self.assertEqual((row.id, row.status_code, row.response_size_bytes),
                         (request_id, 404, len(answer.body(request_id))))

    def test_rejected_body_gets_the_cors_headers(self) -> None:
        """An allowed origin's refused body gets the gateway's CORS headers, so that a browser can read the 413."""
        h = Harness(Echo())
        request = bare_request(b"/api/aura/x")
        request.requestHeaders.setRawHeaders(b"origin", [b"http://localhost:3000"])
        h.gateway.rejected_body(request, errors.body_too_large(10))
        self.assertEqual(request.responseHeaders.getRawHeaders(b"access-control-allow-origin"),
                         [b"http://localhost:3000"])

    def test_only_classifying_stages_run_for_a_rejected_body(self) -> None:
        """The stages marked as classifying are tenant, identity, path and route."""
        h = Harness(Echo())
        classifying = [type(s) for s in h.gateway.pipeline.stages if s.classifies]
        self.assertEqual([c.__name__ for c in classifying], ["Tenant", "Identity", "ParsePath", "Route"])

    def test_end_records_then_fires_finished(self) -> None:
        """Ending a call runs the end stages (one history row) and fires the call's Deferred."""
        h = Harness(Echo())
        pipeline = h.gateway.pipeline
        call = Call(pipeline, bare_request(b"/api/aura/x"), h.clock.seconds())
        finished: Deferred[None] = Deferred()
        call.finished = finished
        call.status = 204
        pipeline.end(call.request, call)
        self.assertIsNone(self.successResultOf(finished))
        self.assertEqual([r.status_code for r in h.history.records], [204])
