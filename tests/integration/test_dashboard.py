"""
The dashboard of a real gateway (C{twistd aura-proxy}, the FastAPI upstream):

  - in a headless Debian chromium (driven over the DevTools pipe,
    L{tests.integration.cdp}): the page goes live on its SSE stream, traffic
    through the gateway shows up in it (the last calls, read from the
    history database), the filters narrow the calls, the routes show their
    upstream's health; a screenshot is taken (into docs/dashboard.png with
    C{AURA_PROXY_DASHBOARD_SCREENSHOT=docs/dashboard.png});
  - with C{workers = 2}: the parent, which serves the admin site and writes
    no history, lists the calls every worker served.

Skipped without chromium (the browser test only), as tests.integration.test_browser is.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import httpx
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.integration.cdp import Browser
from tests.integration.gateway import twistd_ini
from tests.integration.test_browser import find_chromium
from tests.integration.upstreams import free_port, start_fastapi_upstream, start_process

TWISTD = str(Path(sys.executable).with_name("twistd"))

#: Streams and plain calls the traffic sends.
STREAMS = 4
EVENTS = 8
PLAIN = 3


def config(listen: int, admin: int, upstream: int, dead: int, gateway: str = "", more: str = "") -> str:
    """A gateway with history in SQLite (flushed often), the aura route and a route to a closed port; C{more} sections."""
    return twistd_ini(
        listen, admin, upstream, gateway=gateway,
        sections=(
            f"[route:dead]\npath = /api/dead/**\nupstream = http://127.0.0.1:{dead}\n\n"
            "[history]\ndsn = sqlite:///history.db\nspool_dir = spool\nflush_interval = 0.2\n\n" + more
        ),
    )


def snapshot(admin: int, query: str = "") -> Any:
    """One JSON snapshot of the admin site."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/dashboard/snapshot?{query}", timeout=10) as r:
        return json.load(r)


def traffic(listen: int, tenant: str) -> None:
    """STREAMS streams of EVENTS events, PLAIN plain calls and one 404, all as C{tenant} (blocking)."""
    base = f"http://127.0.0.1:{listen}"
    headers = {"X-Tenant-ID": tenant}
    with httpx.Client(timeout=20) as client:
        for _ in range(STREAMS):
            with client.stream("GET", f"{base}/api/aura/stream?count={EVENTS}&interval=0.02", headers=headers) as r:
                assert r.status_code == 200, r.status_code
                for _ in r.iter_bytes():
                    pass
        for _ in range(PLAIN):
            assert client.get(f"{base}/api/aura/json", headers=headers).status_code == 200
        assert client.get(f"{base}/nowhere", headers=headers).status_code == 404


def wait(predicate: Any, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll C{predicate} (blocking) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s (last: {value!r})")
        time.sleep(0.2)


class DashboardTests(TestCase):
    """The dashboard against a real gateway."""

    timeout = 120

    def gateway(self, gateway: str = "", more: str = "") -> tuple[int, int, Path]:
        """Start the upstream and a twistd gateway; its (listen, admin) ports and directory."""
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir(parents=True)
        upstream = start_fastapi_upstream(self)
        listen, admin, dead = free_port(), free_port(), free_port()
        (workdir / "gateway.ini").write_text(config(listen, admin, upstream, dead, gateway, more))
        start_process(
            self, [TWISTD, "-n", "--pidfile=", "aura-proxy", "--config", str(workdir / "gateway.ini")],
            f"http://127.0.0.1:{admin}/healthz", cwd=workdir,
        )
        return listen, admin, workdir

    async def test_browserSeesTrafficAndFilters(self) -> None:
        """
        The page goes live; after traffic through the gateway the number of
        calls it shows goes from 0 to every call made, newest first, with
        the stream's figures; a tenant filter shows only that tenant's calls
        and a status filter only the 404; the aura route's upstream is up,
        the route to a closed port down.  Where the registry holds the
        gateway's metrics, the events delivered grow by what was streamed.
        """
        chromium = find_chromium()
        if chromium is None:
            raise SkipTest("chromium is not installed (apt-get install chromium; ./dev test does)")
        listen, admin, workdir = self.gateway()
        browser = Browser(chromium, workdir / "profile", workdir / "chromium.log", width=1400, height=1100)
        self.addCleanup(browser.close)
        tenant = "dash-" + uuid.uuid4().hex[:8]
        other = "other-" + uuid.uuid4().hex[:8]

        def text(element: str) -> Any:
            return browser.evaluate(f'document.getElementById("{element}").textContent')

        def before_traffic() -> dict[str, Any]:
            browser.open(f"http://127.0.0.1:{admin}/")
            browser.wait_for('document.getElementById("conn-status").textContent === "live"')
            browser.wait_for('document.querySelectorAll("#routes tbody tr").length === 2')
            return {"calls": text("calls-count"), "events": text("events-total"),
                    "metrics": browser.evaluate('document.getElementById("metrics-note").hidden')}

        first = await deferToThread(before_traffic)
        self.assertEqual(first["calls"], "0")

        await deferToThread(traffic, listen, tenant)
        await deferToThread(traffic, listen, other)
        calls = 2 * (STREAMS + PLAIN + 1)

        def after_traffic() -> dict[str, Any]:
            wait(lambda: text("calls-count") == str(calls), what=f"{calls} calls on the page")
            rows = browser.evaluate(
                'Array.from(document.querySelectorAll("#calls tbody tr"))'
                '.map(tr => Array.from(tr.children).map(td => td.textContent))'
            )
            routes = browser.evaluate(
                'Array.from(document.querySelectorAll("#routes tbody tr"))'
                '.map(tr => Array.from(tr.children).map(td => td.textContent))'
            )
            # Narrow to one tenant, then to its 404.
            browser.evaluate(
                f'document.getElementById("filter-tenant").value = "{tenant}";'
                'document.getElementById("filters").requestSubmit(); true'
            )
            wait(lambda: text("calls-count") == str(STREAMS + PLAIN + 1), what="the tenant's calls only")
            tenants = browser.evaluate(
                'Array.from(document.querySelectorAll("#calls tbody tr")).map(tr => tr.children[1].textContent)'
            )
            browser.evaluate(
                'document.getElementById("filter-status").value = "4xx";'
                'document.getElementById("filters").requestSubmit(); true'
            )
            wait(lambda: text("calls-count") == "1", what="the 404 only")
            status = browser.evaluate('document.querySelector("#calls tbody tr").children[5].textContent')
            # A filter the server refuses is shown, the stream goes on with the last good one.
            browser.evaluate(
                'document.getElementById("filter-status").value = "teapot";'
                'document.getElementById("filters").requestSubmit(); true'
            )
            refused = wait(lambda: text("filter-error"), what="the refusal shown")
            search = browser.evaluate("location.search")
            out = {"rows": rows, "routes": routes, "tenants": tenants, "status": status, "refused": refused,
                   "search": search, "events": text("events-total")}
            # Back to every call for the picture.
            browser.evaluate(
                'for (const id of ["filter-tenant", "filter-status"]) document.getElementById(id).value = "";'
                'document.getElementById("filters").requestSubmit(); true'
            )
            wait(lambda: text("calls-count") == str(calls), what="all calls again")
            time.sleep(1.5)
            shot = Path(os.environ.get("AURA_PROXY_DASHBOARD_SCREENSHOT") or (workdir / "dashboard.png"))
            browser.screenshot(shot)
            out["shot"] = shot
            return out

        seen = await deferToThread(after_traffic)
        rows = seen["rows"]
        self.assertEqual(len(rows), calls)
        self.assertEqual({r[1] for r in rows}, {tenant, other})
        self.assertEqual(rows[0][1], other)  # newest first
        streams = [r for r in rows if r[7] == "yes"]
        self.assertEqual(len(streams), 2 * STREAMS)
        self.assertEqual({r[9] for r in streams}, {str(EVENTS + 1)})  # the tokens and `done`
        self.assertEqual({r[5] for r in rows if r[3] == "/nowhere"}, {"404"})
        routes = {r[0]: r for r in seen["routes"]}
        self.assertEqual((routes["aura"][3], routes["dead"][3]), ("up", "down"))
        self.assertIn("Refused", routes["dead"][5])
        self.assertEqual(set(seen["tenants"]), {tenant})
        self.assertEqual(seen["status"], "404")
        self.assertIn("status", seen["refused"])
        self.assertIn(f"tenant={tenant}", seen["search"])
        self.assertGreater(seen["shot"].stat().st_size, 10000)
        if first["metrics"]:
            # The registry holds the gateway's metrics: the delivered events grew.
            self.assertGreaterEqual(int(seen["events"]) - int(first["events"]), 2 * STREAMS * (EVENTS + 1))

    async def test_parentOfWorkersListsEveryWorkersCalls(self) -> None:
        """
        With workers = 2, the parent serves the admin site: its snapshot
        lists every call, whichever worker served it (read from the history
        database), and its routes' upstream health.
        """
        listen, admin, _ = self.gateway("workers = 2\n", "[sse]\nresume = off\n")
        tenant = "workers-" + uuid.uuid4().hex[:8]

        def run() -> Any:
            # Several connections, so that both workers are likely to serve some.
            for _ in range(3):
                traffic(listen, tenant)
            want = 3 * (STREAMS + PLAIN + 1)
            return wait(lambda: (lambda s: s if len(s["calls"]) == want else None)(
                snapshot(admin, f"tenant={tenant}&limit=100")), what=f"{want} calls in the parent's snapshot")

        body = await deferToThread(run)
        self.assertEqual({c["tenant_id"] for c in body["calls"]}, {tenant})
        self.assertEqual(len({c["id"] for c in body["calls"]}), len(body["calls"]))
        self.assertEqual([w["alive"] for w in body["health"]["workers"]], [True, True])
        health = {r["name"]: r["upstream_health"]["up"] for r in body["routes"]}
        self.assertEqual(health, {"aura": True, "dead": False})
