"""
SSE streaming through a real, in-process gateway (real sockets, real
reactor) in front of the FastAPI + sse-starlette test upstream (a
subprocess, one per test class) or small in-process Twisted upstreams.
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer

from tests.integration.gateway import (
    ChunkCollector,
    Upstream,
    client,
    connect_raw,
    gateway_ini,
    header_values,
    parse_events,
    reactor,
    sleep,
    start_gateway,
    start_hang_server,
    start_site,
    wait_until,
)
from tests.integration.upstreams import get_json, start_fastapi_upstream

TENANT = {b"X-Tenant-ID": [b"t1"]}


def event_times(collector: ChunkCollector) -> list[tuple[str, float]]:
    """(id or event name, arrival time) of each complete event, in order."""
    out: list[tuple[str, float]] = []
    body = b""
    for chunk, at in zip(collector.chunks, collector.times):
        body += chunk
        events = parse_events(body)
        for event in events[len(out):]:
            out.append((event.get("id", event.get("event", "?")), at))
    return out


class StreamingTests(TestCase):
    """The gateway relays SSE streams from the FastAPI upstream."""

    timeout = 20

    def setUp(self) -> None:
        # trial has no setUpClass: one upstream per test (~0.7 s to start).
        self.upstream = Upstream(start_fastapi_upstream(self))

    def gateway(self, gateway: str = "", routes: str = "") -> tuple[str, Any]:
        port, gw = start_gateway(self, gateway_ini(self.upstream.port, gateway, routes))
        return f"http://127.0.0.1:{port}", gw

    def active(self, name: str) -> int:
        answer = get_json(self.upstream.base + "/api/aura/_active", timeout=2)
        return int(answer["by_endpoint"].get(name, 0))

    async def test_eventsArriveAsSent(self) -> None:
        """
        Each event reaches the client when the upstream sends it (no
        buffering): with events 0.3 s apart, arrivals through the gateway are
        spaced about 0.3 s apart and the first arrives well before the end.
        """
        base, gw = self.gateway()
        http, _ = client()
        start = time.monotonic()
        response = await http.get(
            base + "/api/aura/stream?count=5&interval=0.3", headers=TENANT, unbuffered=True
        )
        self.assertEqual(response.code, 200)
        collector = ChunkCollector()
        response.deliverBody(collector)
        await collector.done
        end = time.monotonic()
        self.assertTrue(collector.reason.check(ResponseDone), collector.reason)
        times = event_times(collector)
        self.assertEqual([name for name, _ in times], ["1", "2", "3", "4", "5", "done"])
        first = times[0][1]
        self.assertLess(first - start, 0.9, "first event late")
        self.assertGreater(end - first, 1.0, "first event arrived only with the end")
        gaps = [b - a for (_, a), (_, b) in zip(times[:4], times[1:5])]
        for gap in gaps:
            self.assertGreater(gap, 0.15, f"events bunched together: gaps {gaps}")
            self.assertLess(gap, 0.6, f"events held back: gaps {gaps}")

    async def test_sseResponseHeaders(self) -> None:
        """
        An SSE response goes out with Content-Type text/event-stream,
        Cache-Control: no-cache (once), Connection: keep-alive,
        X-Accel-Buffering: no and without Content-Length (chunked).
        """
        base, gw = self.gateway()
        port = int(base.rsplit(":", 1)[1])
        raw = await connect_raw(
            self, port,
            b"GET /api/aura/stream?count=2&interval=0.01 HTTP/1.1\r\n"
            b"Host: gw\r\nX-Tenant-ID: t1\r\n\r\n",
        )
        await raw.wait_for(lambda d: d.endswith(b"0\r\n\r\n"))
        status, headers = raw.head()
        self.assertEqual(status, 200)
        [ctype] = header_values(headers, b"content-type")
        self.assertTrue(ctype.startswith(b"text/event-stream"), ctype)
        self.assertEqual(header_values(headers, b"cache-control"), [b"no-cache"])
        self.assertEqual(header_values(headers, b"connection"), [b"keep-alive"])
        self.assertEqual(header_values(headers, b"x-accel-buffering"), [b"no"])
        self.assertEqual(header_values(headers, b"content-length"), [])
        self.assertEqual(header_values(headers, b"transfer-encoding"), [b"chunked"])

    async def test_postStream(self) -> None:
        """
        A POST with a JSON body reaches the upstream (its count and prompt
        shape the stream) and the stream comes back to the client.
        """
        base, gw = self.gateway()
        http, _ = client()
        response = await http.post(
            base + "/api/aura/stream",
            json={"count": 3, "interval": 0.01, "prompt": "hello gateway"},
            headers=TENANT,
            unbuffered=True,
        )
        self.assertEqual(response.code, 200)
        self.assertIs(response.length, UNKNOWN_LENGTH)
        events = parse_events(await response.content())
        self.assertEqual([e.get("id") for e in events[:-1]], ["1", "2", "3"])
        self.assertEqual({json.loads(e["data"])["prompt"] for e in events[:-1]}, {"hello gateway"})
        self.assertEqual(events[-1]["event"], "done")

    async def test_lastEventIdForwarded(self) -> None:
        """
        Last-Event-ID reaches the upstream: with Last-Event-ID: 3 the stream
        resumes at id 4.
        """
        base, gw = self.gateway()
        http, _ = client()
        response = await http.get(
            base + "/api/aura/stream?count=5&interval=0.01",
            headers={b"X-Tenant-ID": [b"t1"], b"Last-Event-ID": [b"3"]},
            unbuffered=True,
        )
        events = parse_events(await response.content())
        self.assertEqual([e.get("id") for e in events[:-1]], ["4", "5"])

    async def test_heartbeatDuringSilence(self) -> None:
        """
        With heartbeat_interval = 0.5, a 2 s silent upstream makes the
        gateway send `: keep-alive` comment lines during the silence, between
        whole events, and the events themselves arrive intact.
        """
        base, gw = self.gateway("heartbeat_interval = 0.5")
        http, _ = client()
        response = await http.get(
            base + "/api/aura/silent?seconds=2", headers=TENANT, unbuffered=True
        )
        collector = ChunkCollector()
        response.deliverBody(collector)
        await collector.done
        body = collector.body
        self.assertTrue(collector.reason.check(ResponseDone), collector.reason)
        self.assertEqual([e["id"] for e in parse_events(body)], ["1", "2"])
        beats = body.count(b": keep-alive\n\n")
        self.assertGreaterEqual(beats, 2, body)
        self.assertLessEqual(beats, 5, body)
        # Every heartbeat sits between the two events.
        first_end = body.index(b"\r\n\r\n") + 4 if b"\r\n\r\n" in body else body.index(b"\n\n") + 2
        second = body.index(b"id: 2")
        self.assertEqual(body[first_end:second].count(b": keep-alive"), beats)
        # ...and arrived during the silence, not with the second event.
        beat_times = [t for c, t in zip(collector.chunks, collector.times) if b"keep-alive" in c]
        [(_, t1), (_, t2)] = event_times(collector)
        self.assertLess(beat_times[0], t2 - 0.5)
        self.assertGreater(beat_times[0], t1 + 0.3)

    async def test_idleTimeoutEndsStreamCleanly(self) -> None:
        """
        With idle_timeout = 1, an upstream silent for 5 s is cut after about
        1 s: the client's stream ends cleanly (terminal chunk) after the
        first event, the upstream generator is stopped and the gateway has
        no active stream left.
        """
        base, gw = self.gateway("idle_timeout = 1")
        http, _ = client()
        start = time.monotonic()
        response = await http.get(
            base + "/api/aura/silent?seconds=5", headers=TENANT, unbuffered=True
        )
        collector = ChunkCollector()
        response.deliverBody(collector)
        await collector.done
        elapsed = time.monotonic() - start
        self.assertTrue(collector.reason.check(ResponseDone), collector.reason)
        self.assertEqual([e["id"] for e in parse_events(collector.body)], ["1"])
        self.assertGreater(elapsed, 0.8)
        self.assertLess(elapsed, 2.5)
        self.assertEqual(gw.active_streams(), 0)
        await wait_until(lambda: self.active("silent") == 0, 1.0,
                         "upstream /silent generator still running")

    async def test_clientDisconnectStopsUpstream(self) -> None:
        """
        A client that disconnects mid-stream (/endless) makes the upstream
        generator stop within 1 s, and the gateway's active stream count
        goes back to 0.
        """
        base, gw = self.gateway()
        http, _ = client()
        response = await http.get(base + "/api/aura/endless", headers=TENANT, unbuffered=True)
        collector = ChunkCollector(abort_after=300)
        response.deliverBody(collector)
        await wait_until(lambda: self.active("endless") >= 1, 2.0, "upstream stream not started")
        self.assertEqual(gw.active_streams(), 1)
        await collector.done
        self.assertGreaterEqual(len(parse_events(collector.body)), 2)
        await wait_until(lambda: self.active("endless") == 0, 1.0,
                         "upstream /endless generator still running after the client left")
        await wait_until(lambda: gw.active_streams() == 0, 1.0, "gateway still counts the stream")

    async def test_disconnectBeforeHeadersClosesUpstream(self) -> None:
        """
        A client that disconnects while the upstream has not answered yet
        (an upstream that accepts and never answers) makes the gateway close
        its upstream connection within 1 s.
        """

        hang_port, hang = start_hang_server(self)
        base, gw = self.gateway(
            routes=f"[route:hang]\npath = /api/hang/**\nupstream = http://127.0.0.1:{hang_port}\n"
        )
        port = int(base.rsplit(":", 1)[1])
        raw = await connect_raw(
            self, port, b"GET /api/hang/x HTTP/1.1\r\nHost: gw\r\nX-Tenant-ID: t1\r\n\r\n"
        )
        await wait_until(lambda: any(b"/api/hang/x" in p.received for p in hang.open), 2.0,
                         "request never reached the hanging upstream")
        [upstream_conn] = list(hang.open)
        lost = hang.lost(upstream_conn)
        raw.transport.abortConnection()
        start = time.monotonic()
        await wait_until(lambda: lost.called, 1.0, "upstream connection still open after the client left")
        self.assertLess(time.monotonic() - start, 1.0)
        self.assertEqual(raw.data, b"")


    async def test_upstreamDiesMidStream(self) -> None:
        """
        When the upstream dies mid-stream (/die), the client's stream ends
        cleanly (terminal chunk: the body Deferred succeeds) after the
        events that were sent.
        """
        base, gw = self.gateway()
        http, _ = client()
        response = await http.get(base + "/api/aura/die", headers=TENANT, unbuffered=True)
        collector = ChunkCollector()
        response.deliverBody(collector)
        await collector.done
        self.assertTrue(collector.reason.check(ResponseDone), collector.reason)
        self.assertEqual([e["id"] for e in parse_events(collector.body)], ["1", "2"])
        await wait_until(lambda: gw.active_streams() == 0, 1.0, "gateway still counts the stream")


CHUNK = b"x" * 65536


@implementer(IPushProducer)
class _Flood:
    """Writes 64 KiB chunks as fast as the consumer allows."""

    def __init__(self, request: Any, counter: "FloodResource") -> None:
        self.request = request
        self.counter = counter
        self.paused = False
        self.stopped = False
        self.call: Any = None

    def start(self) -> None:
        self.request.registerProducer(self, True)
        self.schedule()

    def schedule(self) -> None:
        if self.call is None and not self.paused and not self.stopped:
            self.call = reactor.callLater(0, self.write)

    def write(self) -> None:
        self.call = None
        # Write until the transport pauses us (a few chunks per turn).
        for _ in range(4):
            if self.paused or self.stopped:
                return
            self.request.write(CHUNK)
            self.counter.written += len(CHUNK)
        self.schedule()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.schedule()

    def stopProducing(self) -> None:
        self.stopped = True
        self.counter.stopped = True
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None


class FloodResource(Resource):
    """An endless application/octet-stream body, with backpressure."""

    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)
        self.written = 0
        self.stopped = False

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"application/octet-stream")
        flood = _Flood(request, self)
        request.notifyFinish().addErrback(lambda _: flood.stopProducing())
        flood.start()
        return NOT_DONE_YET


class BackpressureTests(TestCase):
    """A client that stops reading stops the upstream, through the gateway."""

    timeout = 20

    async def test_slowClientPausesUpstream(self) -> None:
        """
        While the client does not read, the bytes the upstream writes stop
        growing (bounded by socket buffers: < 16 MiB, unchanged over the last
        second); once the client reads again, bytes flow again; when it
        leaves, the upstream is told to stop.
        """
        flood = FloodResource()
        up_port, _ = start_site(self, flood)
        port, gw = start_gateway(self, gateway_ini(
            1, routes=f"[route:flood]\npath = /flood/**\nupstream = http://127.0.0.1:{up_port}\n"))
        raw = await connect_raw(self, port)
        raw.transport.write(b"GET /flood/x HTTP/1.1\r\nHost: gw\r\nX-Tenant-ID: t\r\n\r\n")
        await raw.wait_for(lambda d: len(d) > 1 << 20)
        raw.transport.pauseProducing()
        await sleep(1.0)
        at_one = flood.written
        await sleep(1.0)
        at_two = flood.written
        self.assertLess(at_two, 16 << 20, "upstream kept writing into buffers")
        self.assertEqual(at_one, at_two, "upstream still writing while the client does not read")
        received = len(raw.data)
        raw.transport.resumeProducing()
        await wait_until(lambda: flood.written > at_two + (4 << 20), 3.0,
                         "upstream did not resume after the client read again")
        self.assertGreater(len(raw.data), received)
        raw.transport.abortConnection()
        await raw.closed
        await wait_until(lambda: flood.stopped, 1.0, "upstream not stopped after the client left")
        await wait_until(lambda: gw.active_streams() == 0, 1.0, "gateway still counts the stream")
