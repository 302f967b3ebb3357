"""
A real browser resuming a stream through the gateway: headless Debian
chromium, a page using C{EventSource}, a cut connection, the browser's own
automatic reconnection with C{Last-Event-ID} (docs/resume.md, "Resuming with
EventSource").

Topology (everything on 127.0.0.1)::

    chromium --> forwarder (this process) --> gateway (twistd subprocess)
                                                 |-- /api/aura/** --> FastAPI upstream (subprocess)
                                                 `-- /page/**     --> page + collector (this process)

The page and the stream share one origin (the forwarder's), so no CORS is
involved.  The forwarder is a TCP relay the test controls: it sees every
request the browser sends and can abort every connection mid-stream.  The
page reports what its EventSource received by POSTing JSON to the collector.

Skipped when chromium is not installed (C{./dev test} installs it when apt is
available).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from aura_proxy.sse import parse_gateway_id
from tests.integration.cdp import FLAGS
from tests.integration.gateway import Tracking, listen, reactor, start_site, twistd_ini
from tests.integration.upstream_app import token_text
from tests.integration.upstreams import free_port, get_json, start_fastapi_upstream, start_process

TWISTD = str(Path(sys.executable).with_name("twistd"))
COUNT = 30
CUT_AFTER = 10

# The flags of every headless chromium the tests start (tests/integration/cdp.py).
CHROMIUM_FLAGS = FLAGS

# The page: one EventSource on a path of the same origin, the tenant in the
# query (an EventSource cannot set X-Tenant-ID).  Every event's type, data
# and lastEventId is kept; on `done` (the upstream's last event) it closes
# the EventSource, so that it does not reconnect, and posts the list.  A
# watchdog posts whatever it has after 15 s, so a failure shows the partial
# list instead of a bare timeout.
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>aura-proxy resume</title></head>
<body><pre id="log"></pre>
<script>
"use strict";
const received = [];
let opens = 0, errors = 0, posted = false;
const es = new EventSource("/api/aura/stream?count=%(count)d&interval=0.1%(query)s");
function report(reason) {
  if (posted) return;
  posted = true;
  es.close();
  fetch("/page/collect", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({reason: reason, opens: opens, errors: errors, events: received}),
  });
}
function keep(e) {
  received.push({type: e.type, data: e.data, id: e.lastEventId});
  if (e.type === "done") report("done");
}
es.onopen = () => { opens += 1; };
es.onerror = () => { errors += 1; };
es.addEventListener("token", keep);
es.addEventListener("done", keep);
es.addEventListener("message", keep);
setTimeout(() => report("watchdog"), 15000);
</script></body></html>
"""


def gateway_config(listen: int, admin: int, upstream: int, site: int, auth: str = "") -> str:
    return twistd_ini(
        listen, admin, upstream,
        headers="public_paths = /page/**\ntenant_from = header, query:tenant_id\n",
        sections=(
            f"[route:page]\npath = /page/**\nupstream = http://127.0.0.1:{site}\n\n"
            "[history]\nenabled = false\n\n"
            "[sse]\ninject_ids = true\nresume = memory\nresume_ttl = 30\n"
            f"on_client_disconnect = detach\n\n{auth}"
        ),
    )


class _Page(Resource):
    """The page; with C{cookie}, it also sets that cookie (a login flow would)."""

    isLeaf = True

    def __init__(self, query: str = "&tenant_id=t1", cookie: Optional[bytes] = None) -> None:
        super().__init__()
        self._query = query
        self._cookie = cookie

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if self._cookie is not None:
            request.setHeader(b"set-cookie", self._cookie)
        return (PAGE % {"count": COUNT, "query": self._query}).encode("utf-8")


class _Collector(Resource):
    """Takes the page's one report (JSON) and fires C{reported} with it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.reported: Deferred[Any] = Deferred()

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        report = json.loads(request.content.read())
        if not self.reported.called:
            self.reported.callback(report)
        request.setHeader(b"content-type", b"application/json")
        return b"{}"


# -- the forwarder -------------------------------------------------------------


class _ToGateway(Protocol):
    def __init__(self, peer: "_FromBrowser") -> None:
        self.peer = peer
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.peer.gateway_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.peer.from_gateway(data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.lost.callback(None)
        self.peer.gateway_lost()


class _FromBrowser(Protocol):
    """One browser connection, relayed byte for byte to the gateway."""

    factory: "Forwarder"

    def connectionMade(self) -> None:
        self.sent = b""  # browser -> gateway, everything
        self.pending: list[bytes] = []
        self.gateway: Optional[_ToGateway] = None
        self.streaming = False
        self.events_seen = 0
        self.closed = False
        self.factory.connections.append(self)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.factory.gateway_port, timeout=5)
        connecting = connectProtocol(endpoint, _ToGateway(self))
        connecting.addErrback(lambda _: self.transport.abortConnection())

    def gateway_connected(self, gateway: _ToGateway) -> None:
        self.factory.upstream_sides.append(gateway)
        if self.closed:
            gateway.transport.abortConnection()
            return
        self.gateway = gateway
        for data in self.pending:
            gateway.transport.write(data)
        self.pending = []

    def dataReceived(self, data: bytes) -> None:
        self.sent += data
        if b"GET /api/aura/stream" in data:
            self.streaming = True
        if self.gateway is None:
            self.pending.append(data)
        else:
            self.gateway.transport.write(data)

    def from_gateway(self, data: bytes) -> None:
        if self.streaming:
            self.events_seen += data.count(b"\ndata:")
            self.factory.check_cut(self)
        self.transport.write(data)

    def gateway_lost(self) -> None:
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.closed = True
        if self.gateway is not None:
            self.gateway.transport.loseConnection()

    def abort(self) -> None:
        self.transport.abortConnection()
        if self.gateway is not None:
            self.gateway.transport.abortConnection()

    def stream_requests(self) -> list[dict[bytes, bytes]]:
        """The headers (lower-cased names) of each stream request on this connection."""
        out = []
        for m in re.finditer(rb"GET /api/aura/stream[^\r\n]*\r\n(.*?)\r\n\r\n", self.sent, re.S):
            headers = {}
            for line in m.group(1).split(b"\r\n"):
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            out.append(headers)
        return out


class Forwarder(Tracking, Factory):
    """
    A TCP relay to the gateway that aborts every connection (browser side
    and gateway side) once the first stream has carried C{cut_after} events.
    """

    protocol = _FromBrowser
    noisy = False

    def __init__(self, gateway_port: int, cut_after: int) -> None:
        self._init_tracking()
        self.gateway_port = gateway_port
        self.cut_after = cut_after
        self.connections: list[_FromBrowser] = []
        self.upstream_sides: list[_ToGateway] = []
        self.cut_done = False
        self.events_before_cut = 0

    def check_cut(self, connection: _FromBrowser) -> None:
        if self.cut_done or connection.events_seen < self.cut_after:
            return
        self.cut_done = True
        self.events_before_cut = connection.events_seen
        # Not from inside dataReceived.
        reactor.callLater(0, self.cut)

    def cut(self) -> None:
        for connection in list(self.connections):
            connection.abort()

    def stream_requests(self) -> list[dict[bytes, bytes]]:
        return [r for c in self.connections for r in c.stream_requests()]

    def close_gateway_sides(self) -> "Deferred[Any]":
        for side in self.upstream_sides:
            if side.transport is not None:
                side.transport.abortConnection()
        return DeferredList([side.lost for side in self.upstream_sides])


def _kill_group(process: "subprocess.Popen[bytes]") -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(3)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def find_chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


class BrowserResumeTests(TestCase):
    timeout = 40

    async def test_eventSourceResumesAfterCut(self) -> None:
        """
        A browser EventSource (tenant in the query: tenant_from = header,
        query:tenant_id) reading 30 events through the gateway has its
        connection aborted after about 10 events; the browser reconnects by
        itself with Last-Event-ID = the last id it got, and the gateway answers
        from its stream log.  The page received every event exactly once, in
        order (the upstream's data, 30 tokens then done), with distinct ids of
        one gateway stream; the forwarder saw two stream requests, the second
        carrying Last-Event-ID; the upstream was asked for the stream once.
        """
        await self.resume_in_browser(_Page())

    async def test_eventSourceWithTokenCookie(self) -> None:
        """
        With [auth] jwt = required and token_from = header, cookie:dwp_token,
        a browser EventSource (which cannot send Authorization) is let in by
        the HttpOnly cookie its page set, tenant and user from the token, and
        after the cut its reconnection (the same cookie, the same user) is
        answered from the stream log: every event once, the upstream asked
        once.
        """
        import jwt as pyjwt

        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        secret = os.urandom(32).hex().encode("ascii")
        (workdir / "hs256.key").write_bytes(secret)
        token = pyjwt.encode(
            {"sub": "user-1", "tenant_id": "t1", "exp": int(time.time()) + 600}, secret, algorithm="HS256"
        )
        auth = (
            f"[auth]\njwt = required\nalgorithms = HS256\nhs256_secret_file = {workdir / 'hs256.key'}\n"
            "token_from = header, cookie:dwp_token\n"
        )
        page = _Page(query="", cookie=f"dwp_token={token}; Path=/; HttpOnly; SameSite=Strict".encode("ascii"))
        requests = await self.resume_in_browser(page, auth, workdir)
        for request in requests:
            self.assertIn(b"dwp_token=" + token.encode("ascii"), request.get(b"cookie", b""))
            self.assertNotIn(b"authorization", request)

    async def resume_in_browser(
        self, page: _Page, auth: str = "", workdir: Optional[Path] = None
    ) -> list[dict[bytes, bytes]]:
        """
        The browser resume scenario for C{page} (and C{auth}, an [auth]
        section); returns the stream requests the forwarder saw.
        """
        chromium = find_chromium()
        if chromium is None:
            raise SkipTest("chromium is not installed (apt-get install chromium; ./dev test does)")
        if workdir is None:
            workdir = Path(self.mktemp()).resolve()
            workdir.mkdir(parents=True)

        root = Resource()
        page_dir = Resource()
        root.putChild(b"page", page_dir)
        collector = _Collector()
        page_dir.putChild(b"index.html", page)
        page_dir.putChild(b"collect", collector)
        site_port, _ = start_site(self, root)

        upstream = start_fastapi_upstream(self)
        gw_listen, gw_admin = free_port(), free_port()
        config = workdir / "gateway.ini"
        config.write_text(gateway_config(gw_listen, gw_admin, upstream, site_port, auth))
        start_process(
            self,
            [TWISTD, "-n", "--pidfile=", "aura-proxy", "--config", str(config)],
            f"http://127.0.0.1:{gw_admin}/healthz",
            cwd=workdir,
        )

        forwarder = Forwarder(gw_listen, CUT_AFTER)
        self.addCleanup(forwarder.close_gateway_sides)
        forward_port = listen(self, forwarder)

        log_path = workdir / "chromium.log"
        log = open(log_path, "wb")
        self.addCleanup(log.close)
        browser = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={workdir / 'profile'}",
             f"http://127.0.0.1:{forward_port}/page/index.html"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.addCleanup(_kill_group, browser)

        reported = collector.reported
        reported.addTimeout(30, reactor)
        try:
            report = await reported
        except Exception:
            log.flush()
            self.fail(
                f"the page never reported; forwarder saw {len(forwarder.connections)} "
                f"connections, cut={forwarder.cut_done}; chromium log:\n"
                f"{log_path.read_text(errors='replace')[-3000:]}"
            )

        events = report["events"]
        self.assertEqual(report["reason"], "done", report)
        expected = [("token", json.dumps({"index": i, "token": token_text(i)})) for i in range(1, COUNT + 1)]
        expected.append(("done", json.dumps({"count": COUNT})))
        self.assertEqual([(e["type"], e["data"]) for e in events], expected)
        ids = [e["id"] for e in events]
        self.assertEqual(len(set(ids)), len(ids), f"duplicate ids: {ids}")
        parsed = [parse_gateway_id(i) for i in ids]
        self.assertNotIn(None, parsed, ids)
        self.assertEqual({p[0] for p in parsed if p}, {parsed[0][0] if parsed[0] else ""})
        self.assertEqual([p[1] for p in parsed if p], list(range(1, COUNT + 2)))

        # There was a cut and an automatic reconnection carrying the last id.
        self.assertTrue(forwarder.cut_done)
        requests = forwarder.stream_requests()
        self.assertEqual(len(requests), 2, requests)
        self.assertNotIn(b"last-event-id", requests[0])
        resumed_from = requests[1].get(b"last-event-id", b"").decode()
        self.assertIn(resumed_from, ids)
        self.assertGreaterEqual(ids.index(resumed_from) + 1, CUT_AFTER - 1)
        self.assertLess(ids.index(resumed_from) + 1, COUNT)
        self.assertGreaterEqual(report["errors"], 1, report)
        self.assertEqual(report["opens"], 2, report)
        info = get_json(f"http://127.0.0.1:{upstream}/api/aura/_active")
        self.assertEqual(info["started"].get("stream"), 1)
        return requests
