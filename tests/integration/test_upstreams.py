"""
The FastAPI + sse-starlette test upstream (L{tests.integration.upstream_app})
runs as a subprocess and behaves as other integration tests rely on.

These talk to the upstream directly with treq (no gateway involved).
"""

from __future__ import annotations

import gzip
import json
import time
from typing import Any, Optional, cast

from treq.client import HTTPClient
from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    readBody,
)

from tests.integration.upstream_app import GZIP_PLAIN, JSON_DOC, token_text
from tests.integration.gateway import parse_events
from tests.integration.upstreams import get_json, start_fastapi_upstream

reactor: Any = _global_reactor


class ChunkCollector(Protocol):
    """
    Collects a response body chunk by chunk, as it arrives; can abort the
    connection once C{abort_after} bytes came.
    """

    def __init__(self, abort_after: Optional[int] = None) -> None:
        self.chunks: list[bytes] = []
        self.abort_after = abort_after
        self.reason: Optional[Failure] = None
        #: Fires with None when the body ends, however it ends (see C{reason}).
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.abort_after is not None and sum(map(len, self.chunks)) >= self.abort_after:
            self.abort_after = None
            self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.reason = reason
        self.done.callback(None)


class UpstreamTests(TestCase):
    """One upstream subprocess per test; treq clients with no connection reuse."""

    def setUp(self) -> None:
        self.port = start_fastapi_upstream(self)
        self.base = f"http://127.0.0.1:{self.port}"
        # Non-persistent: no idle connection is left in the reactor at the end.
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.agent = Agent(reactor, pool=pool)
        self.http = HTTPClient(cast(IAgent, self.agent))

    @inlineCallbacks
    def test_streamArrivesIncrementally(self) -> Any:
        """
        C{GET /api/aura/stream} is text/event-stream with token events id
        1..count then C{done}, delivered over time (several chunks), not as
        one buffered body.
        """
        response = yield self.http.get(
            self.base + "/api/aura/stream?count=5&interval=0.05", unbuffered=True
        )
        self.assertEqual(response.code, 200)
        [ctype] = response.headers.getRawHeaders(b"content-type")
        self.assertTrue(ctype.startswith(b"text/event-stream"), ctype)
        collector = ChunkCollector()
        response.deliverBody(collector)
        yield collector.done
        assert collector.reason is not None
        self.assertTrue(collector.reason.check(ResponseDone), collector.reason)
        self.assertGreater(len(collector.chunks), 1)
        events = parse_events(b"".join(collector.chunks))
        self.assertEqual([e.get("id") for e in events[:-1]], ["1", "2", "3", "4", "5"])
        self.assertEqual(
            [json.loads(e["data"])["token"] for e in events[:-1]],
            [token_text(i) for i in range(1, 6)],
        )
        self.assertEqual(events[-1]["event"], "done")

    @inlineCallbacks
    def test_postStreamWithLastEventId(self) -> Any:
        """
        C{POST /api/aura/stream} takes count/interval/prompt from a JSON body
        and, with C{Last-Event-ID: 2}, starts at id 3.
        """
        response = yield self.http.post(
            self.base + "/api/aura/stream",
            json={"count": 4, "interval": 0.01, "prompt": "hello"},
            headers=Headers({b"Last-Event-ID": [b"2"]}),
            unbuffered=True,
        )
        body = yield response.content()
        events = parse_events(body)
        self.assertEqual([e.get("id") for e in events[:-1]], ["3", "4"])
        self.assertEqual(json.loads(events[0]["data"])["prompt"], "hello")

    @inlineCallbacks
    def test_echoShowsHeadersAsReceived(self) -> Any:
        """
        C{/api/aura/echo} reports method, path, raw query, body and every
        header as a [name, value] pair, repeated headers kept apart.
        """
        response = yield self.http.put(
            self.base + "/api/aura/echo/sub/path?a=1&a=2",
            data=b"payload",
            headers=Headers({b"X-Dup": [b"one", b"two"], b"X-Single": [b"s"]}),
        )
        echoed = yield response.json()
        self.assertEqual(echoed["method"], "PUT")
        self.assertEqual(echoed["path"], "/api/aura/echo/sub/path")
        self.assertEqual(echoed["query"], "a=1&a=2")
        self.assertEqual(echoed["body"], "payload")
        headers = echoed["headers"]
        self.assertEqual([v for n, v in headers if n == "x-dup"], ["one", "two"])
        self.assertIn(["x-single", "s"], headers)

    @inlineCallbacks
    def test_plainEndpoints(self) -> Any:
        """
        C{/json} is the JSON document, C{/gzip} is raw gzip bytes with
        Content-Encoding: gzip (as sent, not decoded), C{/status/418} is a 418, C{/cookie} sets two
        cookies and echoes the Cookie header.
        """
        response = yield self.http.get(self.base + "/api/aura/json")
        self.assertEqual((yield response.json()), JSON_DOC)

        # treq always decodes gzip (ContentDecoderAgent): use the bare Agent
        # to see the bytes on the wire.
        response = yield self.agent.request(b"GET", (self.base + "/api/aura/gzip").encode())
        self.assertEqual(response.headers.getRawHeaders(b"content-encoding"), [b"gzip"])
        raw = yield readBody(response)
        self.assertEqual(raw[:2], b"\x1f\x8b")
        self.assertEqual(gzip.decompress(raw), GZIP_PLAIN)

        response = yield self.http.get(self.base + "/api/aura/status/418")
        self.assertEqual(response.code, 418)
        self.assertEqual((yield response.json()), {"status": 418})

        response = yield self.http.get(
            self.base + "/api/aura/cookie", headers=Headers({b"Cookie": [b"a=b; c=d"]})
        )
        self.assertEqual(len(response.headers.getRawHeaders(b"set-cookie")), 2)
        self.assertEqual((yield response.json()), {"cookie": "a=b; c=d"})

    @inlineCallbacks
    def test_endlessGeneratorCancelledOnClose(self) -> Any:
        """
        Aborting an C{/api/aura/endless} connection makes the upstream
        generator finish: C{/api/aura/_active} goes from 1 back to 0.
        """
        response = yield self.http.get(self.base + "/api/aura/endless", unbuffered=True)
        collector = ChunkCollector(abort_after=200)
        response.deliverBody(collector)
        self.assertEqual(get_json(self.base + "/api/aura/_active")["active"], 1)
        yield collector.done
        reason = collector.reason
        self.assertGreaterEqual(len(parse_events(b"".join(collector.chunks))), 2)
        self.assertIsInstance(reason, Failure)
        deadline = time.monotonic() + 5
        while get_json(self.base + "/api/aura/_active")["active"] != 0:
            if time.monotonic() > deadline:
                self.fail("upstream generator still active 5 s after the client left")
            yield deferLater(reactor, 0.05, lambda: None)

    @inlineCallbacks
    def test_dieAbortsMidStream(self) -> Any:
        """
        C{/api/aura/die} sends two events, then the connection drops without
        the end of the chunked body: the client sees a failed response.
        """
        response = yield self.http.get(self.base + "/api/aura/die", unbuffered=True)
        collector = ChunkCollector()
        response.deliverBody(collector)
        yield collector.done
        reason = collector.reason
        assert reason is not None
        self.assertTrue(reason.check(ResponseFailed), reason)
        events = parse_events(b"".join(collector.chunks))
        self.assertEqual([e["id"] for e in events], ["1", "2"])

    @inlineCallbacks
    def test_silentHasNoPing(self) -> Any:
        """
        C{/api/aura/silent?seconds=S} sends one event, nothing at all (no ping
        comment) for S seconds, then a second event.
        """
        response = yield self.http.get(
            self.base + "/api/aura/silent?seconds=0.5", unbuffered=True
        )
        collector = ChunkCollector()
        response.deliverBody(collector)
        start = time.monotonic()
        yield collector.done
        self.assertGreaterEqual(time.monotonic() - start, 0.4)
        body = b"".join(collector.chunks)
        self.assertNotIn(b": ping", body)
        self.assertEqual([e["id"] for e in parse_events(body)], ["1", "2"])
