"""Tests for L{aura_proxy.answers}: the JSON errors and preflight answers the gateway gives itself."""

from __future__ import annotations

import json

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from aura_proxy.answers import error_answer, preflight_answer
from aura_proxy.contract import Cors
from aura_proxy.errors import GatewayError
from tests.test_stages import C, make_call, written


class ErrorAnswerTests(SynchronousTestCase):
    """L{error_answer}."""

    def test_json_with_request_id_and_cors(self) -> None:
        """The error is a JSON body with the call's request id, its length, and the gateway's CORS headers."""
        call = make_call(Origin="http://localhost:3000")
        error_answer(call.request, call, GatewayError(404, "no_route", "nope"), Cors(C.cors))
        head, _, body = written(call).partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 404 "))
        self.assertIn(b"Content-Type: application/json", head)
        self.assertIn(b"Content-Length: %d" % len(body), head)
        self.assertIn(b"X-Request-Id: " + call.id.encode(), head)
        self.assertIn(b"Access-Control-Allow-Origin: http://localhost:3000", head)
        self.assertEqual(json.loads(body)["error"],
                         {"status": 404, "code": "no_route", "message": "nope", "request_id": call.id})
        self.assertEqual((call.status, call.response_size), (404, len(body)))

    def test_without_cors(self) -> None:
        """With no CORS rules given, no Access-Control-* or Vary header goes out."""
        call = make_call(Origin="http://localhost:3000")
        error_answer(call.request, call, GatewayError(403, "cors_forbidden", "no"), None)
        self.assertNotIn(b"Access-Control", written(call))
        self.assertNotIn(b"Vary", written(call))

    def test_client_gone(self) -> None:
        """A client that left is not answered; the call is a 499."""
        call = make_call()
        call.request.connectionLost(Failure(ConnectionDone()))
        error_answer(call.request, call, GatewayError(502, "upstream_unavailable", "x"), None)
        self.assertEqual(written(call), b"")
        self.assertEqual((call.status, call.response_size), (499, None))


class PreflightAnswerTests(SynchronousTestCase):
    """L{preflight_answer}."""

    def test_204_with_the_allowed_headers(self) -> None:
        """An allowed preflight is a finished 204 with exactly the headers given."""
        call = make_call(method=b"OPTIONS")
        preflight_answer(call.request, call, [(b"Access-Control-Allow-Origin", b"http://a"),
                                              (b"Access-Control-Max-Age", b"60")])
        head = written(call)
        self.assertTrue(head.startswith(b"HTTP/1.1 204 "))
        self.assertIn(b"Access-Control-Allow-Origin: http://a", head)
        self.assertIn(b"Access-Control-Max-Age: 60", head)
        self.assertTrue(call.request.finished)
        self.assertEqual(call.status, 204)
