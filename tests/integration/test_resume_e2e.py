"""
Resumable streams end to end (docs/resume.md): real gateway processes
(C{twistd -n aura-proxy}), the real FastAPI + sse-starlette upstream, real
Redis, and a real SSE client library (httpx + httpx-sse) doing what client
authors are told to do: remember the last id, reconnect with C{Last-Event-ID}.

Every server is a subprocess, so these tests are synchronous: the client
blocks (with bounded socket timeouts and deadlines), nothing runs on the
reactor.  How often the upstream was asked for a stream is read from the
upstream itself (C{/api/aura/_active} counts every stream generator it
started).
"""

from __future__ import annotations

import json
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import httpx
from httpx_sse import connect_sse
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from aura_proxy.sse import parse_gateway_id
from tests.integration.gateway import twistd_ini
from tests.integration.upstream_app import token_text
from tests.integration.upstreams import free_port, get_json, start_fastapi_upstream, start_process

TWISTD = str(Path(sys.executable).with_name("twistd"))

#: Socket timeouts of the client: any single read or connect.
CLIENT_TIMEOUT = httpx.Timeout(5.0)

#: Wall-clock bound on reading one stream.
STREAM_DEADLINE = 15.0

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_PREFIX = "aura-proxy:resume:"


@dataclass(frozen=True)
class Received:
    """One event as the client library dispatched it."""

    id: str
    event: str
    data: str


def token_data(index: int) -> str:
    """The data the upstream sends for token C{index} (no prompt)."""
    return json.dumps({"index": index, "token": token_text(index)})


def expected_stream(count: int, after: int = 0) -> list[tuple[str, str]]:
    """(event, data) of /api/aura/stream?count=N after upstream id C{after}."""
    out = [("token", token_data(i)) for i in range(after + 1, count + 1)]
    out.append(("done", json.dumps({"count": count})))
    return out


def gateway_config(listen: int, admin: int, upstream: int, sse: str, extra: str = "") -> str:
    return twistd_ini(listen, admin, upstream, sections=(
        f"[history]\nenabled = false\n\n[sse]\ninject_ids = true\n{sse}\n{extra}"))


def read_events(
    base: str,
    method: str,
    path: str,
    tenant: str,
    body: Optional[dict[str, Any]] = None,
    last_event_id: Optional[str] = None,
    stop_after: Optional[int] = None,
) -> tuple[list[Received], bool]:
    """
    Open a stream through a fresh httpx client and read it.

    @param stop_after: cut the connection (close the response and the
        client, unread) once this many events arrived.
    @return: the events and whether the stream ended by itself (as opposed
        to being cut).
    """
    headers = {"X-Tenant-ID": tenant}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    events: list[Received] = []
    deadline = time.monotonic() + STREAM_DEADLINE
    kwargs: dict[str, Any] = {"headers": headers}
    if body is not None:
        kwargs["json"] = body
    with httpx.Client(timeout=CLIENT_TIMEOUT) as client:
        with connect_sse(client, method, base + path, **kwargs) as source:
            response = source.response
            if response.status_code != 200:
                raise AssertionError(f"{method} {path}: HTTP {response.status_code}: {response.read()!r}")
            for sse in source.iter_sse():
                events.append(Received(sse.id, sse.event, sse.data))
                if stop_after is not None and len(events) >= stop_after:
                    # Leaving both context managers unread closes the socket.
                    return events, False
                if time.monotonic() > deadline:
                    raise AssertionError(f"stream not finished after {STREAM_DEADLINE}s: {events}")
    return events, True


def payloads(events: list[Received]) -> list[tuple[str, str]]:
    return [(e.event, e.data) for e in events]


def stream_id_of(event_id: str) -> str:
    parsed = parse_gateway_id(event_id)
    assert parsed is not None, f"not a gateway id: {event_id!r}"
    return parsed[0]


def seqs(events: list[Received]) -> list[int]:
    out = []
    for e in events:
        parsed = parse_gateway_id(e.id)
        assert parsed is not None, f"not a gateway id: {e.id!r}"
        out.append(parsed[1])
    return out


def redis_command(*args: str, timeout: float = 2.0) -> bytes:
    """One command to the test Redis (RESP), its raw reply."""
    payload = b"*%d\r\n" % len(args) + b"".join(
        b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args
    )
    with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=timeout) as s:
        s.sendall(payload)
        return s.recv(65536)


class ResumeEndToEndTests(SynchronousTestCase):
    """Each test runs its own upstream and gateway process(es)."""

    def setUp(self) -> None:
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir(parents=True)
        self.upstream = start_fastapi_upstream(self)

    def start_gateway(self, sse: str, name: str = "gateway") -> str:
        """Start a gateway routing to the upstream; return its base URL."""
        listen, admin = free_port(), free_port()
        config = self.workdir / f"{name}.ini"
        config.write_text(gateway_config(listen, admin, self.upstream, sse))
        start_process(
            self,
            [TWISTD, "-n", "--pidfile=", "aura-proxy", "--config", str(config)],
            f"http://127.0.0.1:{admin}/healthz",
            cwd=self.workdir,
        )
        return f"http://127.0.0.1:{listen}"

    def upstream_streams(self) -> int:
        """How many /api/aura/stream generators the upstream ever started."""
        info = get_json(f"http://127.0.0.1:{self.upstream}/api/aura/_active")
        return int(info["started"].get("stream", 0))

    def upstream_active_streams(self) -> int:
        info = get_json(f"http://127.0.0.1:{self.upstream}/api/aura/_active")
        return int(info["by_endpoint"].get("stream", 0))

    def assertWholeStream(
        self, first: list[Received], rest: list[Received], count: int
    ) -> None:
        """C{first + rest} is the upstream's whole stream, once, in order, on one stream id."""
        events = first + rest
        self.assertEqual(payloads(events), expected_stream(count))
        ids = [e.id for e in events]
        self.assertEqual(len(set(ids)), len(ids), f"duplicate ids: {ids}")
        self.assertEqual({stream_id_of(i) for i in ids}, {stream_id_of(ids[0])})
        self.assertEqual(seqs(events), list(range(1, len(events) + 1)))

    def test_postResumeSameGateway(self) -> None:
        """
        resume = memory: an httpx-sse client POSTs a stream, reads 7 events and
        cuts the connection; it reconnects to the same gateway with POST (same
        body, same tenant) and Last-Event-ID = the last id it saw.  Together
        the two responses hold every upstream event exactly once, in order,
        with distinct ids of one gateway stream, and the upstream was asked
        for the stream only once (the resumed POST was answered from the log).
        """
        base = self.start_gateway("resume = memory\non_client_disconnect = detach")
        body = {"count": 20, "interval": 0.05}
        first, ended = read_events(base, "POST", "/api/aura/stream", "t1", body, stop_after=7)
        self.assertFalse(ended)
        self.assertEqual(len(first), 7)
        rest, ended = read_events(
            base, "POST", "/api/aura/stream", "t1", body, last_event_id=first[-1].id
        )
        self.assertTrue(ended)
        self.assertWholeStream(first, rest, 20)
        self.assertEqual(self.upstream_streams(), 1)

    def test_resumeOnAnotherGatewayThroughRedis(self) -> None:
        """
        resume = redis://: two gateway processes A and B share one Redis.  A
        client reads 5 events of a GET stream from A, is cut, and reconnects
        to B with Last-Event-ID: B answers with every remaining event exactly
        once, in order (replay from Redis, then the live tail A is still
        writing), and the upstream was asked for the stream only once (B never
        called it).
        """
        try:
            reply = redis_command("PING")
        except OSError as e:
            raise SkipTest(f"no Redis on {REDIS_HOST}:{REDIS_PORT}: {e}")
        if not reply.startswith(b"+PONG"):
            raise SkipTest(f"Redis on {REDIS_HOST}:{REDIS_PORT} answered {reply!r}")
        seen: set[str] = set()

        def forget_keys() -> None:
            # Registered first: runs after both gateways have stopped.
            keys = [REDIS_PREFIX + s + suffix for s in seen for suffix in ("", ":owner")]
            if keys:
                redis_command("DEL", *keys)

        self.addCleanup(forget_keys)
        sse = "resume = redis://127.0.0.1:6379/0\nresume_ttl = 30\non_client_disconnect = detach"
        a = self.start_gateway(sse, "a")
        b = self.start_gateway(sse, "b")
        path = "/api/aura/stream?count=25&interval=0.05"
        first, ended = read_events(a, "GET", path, "t1", stop_after=5)
        seen.add(stream_id_of(first[0].id))
        self.assertFalse(ended)
        rest, ended = read_events(b, "GET", path, "t1", last_event_id=first[-1].id)
        seen.update(stream_id_of(e.id) for e in rest)
        self.assertTrue(ended)
        self.assertWholeStream(first, rest, 25)
        self.assertEqual(self.upstream_streams(), 1)

    def test_stolenIdGetsFreshStream(self) -> None:
        """
        Only the tenant that opened a stream may resume it.  Tenant t2
        sending t1's event id as Last-Event-ID gets a fresh stream from the
        upstream (a new gateway stream id, the upstream asked again from the
        start: nothing of t1's stream, not even the upstream id the gateway
        id carries, goes with it), not t1's replay.  The same id from t1 is
        still replayed from the log without asking the upstream.
        """
        base = self.start_gateway("resume = memory")
        path = "/api/aura/stream?count=8&interval=0.01"
        original, ended = read_events(base, "GET", path, "t1")
        self.assertTrue(ended)
        self.assertEqual(payloads(original), expected_stream(8))
        self.assertEqual(self.upstream_streams(), 1)
        stolen = original[2].id  # token 3
        parsed = parse_gateway_id(stolen)
        assert parsed is not None
        self.assertEqual(parsed[2], b"3", "the gateway id carries the upstream's id")

        thief, ended = read_events(base, "GET", path, "t2", last_event_id=stolen)
        self.assertTrue(ended)
        self.assertEqual(self.upstream_streams(), 2)
        self.assertEqual(payloads(thief), expected_stream(8))
        self.assertNotIn(stream_id_of(original[0].id), {stream_id_of(e.id) for e in thief})
        self.assertEqual(seqs(thief), list(range(1, len(thief) + 1)))

        owner, ended = read_events(base, "GET", path, "t1", last_event_id=stolen)
        self.assertTrue(ended)
        self.assertEqual(owner, original[3:])
        self.assertEqual(self.upstream_streams(), 2)

    def test_detachKeepsReadingUpstream(self) -> None:
        """
        on_client_disconnect = detach: a client is cut after 5 events while
        the upstream goes on producing (still streaming to the gateway while
        no client is connected); reconnecting 2 s later with Last-Event-ID
        yields at once the events produced meanwhile, then the live rest:
        every event exactly once, in order, the upstream asked only once.
        """
        base = self.start_gateway("resume = memory\nresume_ttl = 30\non_client_disconnect = detach")
        count, interval = 40, 0.1
        path = f"/api/aura/stream?count={count}&interval={interval}"
        first, ended = read_events(base, "GET", path, "t1", stop_after=5)
        self.assertFalse(ended)
        time.sleep(2.0)
        # Nobody is connected to the gateway, yet the upstream still streams.
        self.assertEqual(self.upstream_active_streams(), 1)
        started = time.monotonic()
        headers = {"X-Tenant-ID": "t1", "Last-Event-ID": first[-1].id}
        rest: list[Received] = []
        arrivals: list[float] = []
        with httpx.Client(timeout=CLIENT_TIMEOUT) as client:
            with connect_sse(client, "GET", base + path, headers=headers) as source:
                self.assertEqual(source.response.status_code, 200)
                for sse in source.iter_sse():
                    rest.append(Received(sse.id, sse.event, sse.data))
                    arrivals.append(time.monotonic() - started)
                    self.assertLess(time.monotonic() - started, STREAM_DEADLINE)
        self.assertWholeStream(first, rest, count)
        self.assertEqual(self.upstream_streams(), 1)
        # About 2 s / 0.1 s = 20 events were produced while detached; they
        # come as one burst, long before the upstream could produce them anew.
        burst = [t for t in arrivals if t < 0.5]
        self.assertGreaterEqual(len(burst), 12, f"arrival times: {arrivals}")

    def test_resumeTwice(self) -> None:
        """
        A resumed response can itself be cut and resumed: a client reads 4
        events, is cut, resumes and reads 6 more, is cut again, resumes with
        the last id of the resumed response and gets the rest.  All three
        responses together are the whole stream, once, in order, one stream
        id, one upstream call; resuming with the id of the final event then
        answers an empty stream that ends at once, still without asking the
        upstream.
        """
        base = self.start_gateway("resume = memory\non_client_disconnect = detach")
        path = "/api/aura/stream?count=20&interval=0.05"
        first, ended = read_events(base, "GET", path, "t1", stop_after=4)
        self.assertFalse(ended)
        second, ended = read_events(base, "GET", path, "t1", last_event_id=first[-1].id, stop_after=6)
        self.assertFalse(ended)
        third, ended = read_events(base, "GET", path, "t1", last_event_id=second[-1].id)
        self.assertTrue(ended)
        self.assertWholeStream(first, second + third, 20)
        empty, ended = read_events(base, "GET", path, "t1", last_event_id=third[-1].id)
        self.assertTrue(ended)
        self.assertEqual(empty, [])
        self.assertEqual(self.upstream_streams(), 1)

    def upstream_started(self, endpoint: str) -> int:
        info = get_json(f"http://127.0.0.1:{self.upstream}/api/aura/_active")
        return int(info["started"].get(endpoint, 0))

    def test_resumeAfterUpstreamDiedGoesUpstream(self) -> None:
        """
        When the upstream dies mid-stream, the gateway ends the client's SSE
        response cleanly so that the client "may resume" (Relay clean_end).
        Resuming with the last id must not be answered from the log as if the
        stream had completed (an empty stream, ended at once, which an
        EventSource would re-request every few seconds for resume_ttl): the
        log cannot hold what the upstream never sent, so the request goes
        upstream again, with the upstream's own last id (docs/resume.md: a
        gateway id it cannot replay).
        """
        base = self.start_gateway("resume = memory\non_client_disconnect = detach")
        first, ended = read_events(base, "GET", "/api/aura/die", "t1")
        self.assertTrue(ended, "the gateway ends the client's response cleanly")
        self.assertEqual([e.data for e in first], [json.dumps({"index": i}) for i in (1, 2)])
        self.assertEqual(self.upstream_started("die"), 1)
        rest, ended = read_events(base, "GET", "/api/aura/die", "t1", last_event_id=first[-1].id)
        self.assertEqual(self.upstream_started("die"), 2, "the resumed request never reached the upstream")
        self.assertNotEqual(rest, [])


    def test_resumeAfterCancelledStreamGoesUpstream(self) -> None:
        """
        on_client_disconnect = cancel closes the upstream when the client
        leaves, so the log ends where the client was cut.  A client resuming
        with its last id must not get an empty stream that ends cleanly (the
        answer silently cut short, no `done`): the gateway cannot replay the
        missed events, so it asks the upstream again with the upstream's own
        last id, and the client gets every remaining event once, in order.
        """
        base = self.start_gateway("resume = memory\non_client_disconnect = cancel")
        path = "/api/aura/stream?count=20&interval=0.05"
        first, ended = read_events(base, "GET", path, "t1", stop_after=4)
        self.assertFalse(ended)
        time.sleep(0.3)
        rest, ended = read_events(base, "GET", path, "t1", last_event_id=first[-1].id)
        self.assertTrue(ended)
        self.assertEqual(payloads(first + rest), expected_stream(20))

