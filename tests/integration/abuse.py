"""
Abuse: a client that opens streams by the thousand and drops each one as soon
as its first event arrives, against a C{twistd} gateway and a real upstream.

With C{[sse] on_client_disconnect = detach} every dropped stream detaches
(its upstream still read into the resume log); the gateway must keep them
within C{max_detached_streams} (in all) and C{max_detached_streams_per_tenant},
its memory logs within C{resume_max_total_bytes}, and its RSS within the bound
those settings imply.  This module runs one such attack and checks that, from
the gateway's admin C{/healthz} (its C{"sse"} figures, polled throughout) and
its VmRSS from /proc:

    ulimit -n 20000
    .venv/bin/python -m tests.integration.abuse --streams 10000      # the full run, defaults caps
    .venv/bin/python -m tests.integration.abuse --streams 300 --max-detached 50 --per-tenant 20

(tests/integration/test_abuse.py runs the small one in CI.)  It prints what it
saw and, last, one JSON line; it exits 1 when a bound was broken.

The upstream is the FastAPI + sse-starlette test app (C{--upstream fastapi},
its C{/api/aura/endless} stream) or, lighter for the full run, ssesrv from
shared/bench (C{--upstream ssesrv}, compiled into a temp dir).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOLS_SRC = Path(os.environ.get("BENCH_TOOLS_SRC", "/work/shared/bench"))
#: Bytes a stream's log reserves per event slot (aura_proxy.sse.EVENT_STORE_ENTRY_BYTES).
ENTRY_BYTES = 16


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"abuse: {proc.args} exited ({proc.returncode})")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"abuse: {url} did not answer within {timeout} s")


class Processes:
    """Everything started, stopped (by process group) at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: Optional[dict[str, str]] = None) -> subprocess.Popen[bytes]:
        with open(self.workdir / f"{name}.log", "wb") as log:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 cwd=str(self.workdir), env=env, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(15)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass


async def one_stream(port: int, path: str, tenant: str, timeout: float) -> bool:
    """Open a stream, wait for its first event, drop the connection; whether an event came."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: gw\r\nX-Tenant-ID: {tenant}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        seen = b""
        deadline = time.monotonic() + timeout
        while b"data:" not in seen:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            chunk = await asyncio.wait_for(reader.read(65536), left)
            if not chunk:
                return False
            seen = seen[-64:] + chunk
        return True
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        writer.transport.abort()


async def attack(port: int, path: str, streams: int, tenants: int, concurrency: int, timeout: float) -> int:
    """
    C{streams} streams, at most C{concurrency} at once, over C{tenants}
    tenants (half of them tenant 0's); how many got their first event.
    """
    slots = asyncio.Semaphore(concurrency)
    ok = 0

    async def run(i: int) -> None:
        nonlocal ok
        async with slots:
            # Every other stream is tenant abuse-0's: one tenant that takes
            # more than its share, so that both caps come into play.
            tenant = 0 if i % 2 else (i // 2) % tenants
            if await one_stream(port, path, f"abuse-{tenant}", timeout):
                ok += 1

    await asyncio.gather(*(run(i) for i in range(streams)))
    return ok


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=10000)
    ap.add_argument("--tenants", type=int, default=20,
                    help="the streams' X-Tenant-ID: abuse-0 ... abuse-(N-1), every other stream abuse-0's")
    ap.add_argument("--concurrency", type=int, default=200, help="streams being opened at once")
    ap.add_argument("--max-detached", type=int, default=None, help="[sse] max_detached_streams (default: the gateway's)")
    ap.add_argument("--per-tenant", type=int, default=None, help="[sse] max_detached_streams_per_tenant")
    ap.add_argument("--max-total-bytes", type=int, default=None, help="[sse] resume_max_total_bytes")
    ap.add_argument("--max-bytes", type=int, default=None, help="[sse] resume_max_bytes")
    ap.add_argument("--upstream", choices=("fastapi", "ssesrv"), default="fastapi")
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between the upstream's events")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds watched after the last stream dropped")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO_ROOT))
    from aura_proxy.config import parse_config

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="abuse-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    procs = Processes(workdir)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        up = free_port()
        if args.upstream == "fastapi":
            upstream = procs.start("upstream", [
                sys.executable, "-m", "uvicorn", "tests.integration.upstream_app:app", "--host", "127.0.0.1",
                "--port", str(up), "--log-level", "warning", "--timeout-graceful-shutdown", "1",
                "--backlog", "4096"], env=dict(env, PYTHONPATH=str(REPO_ROOT)))
            wait_http(f"http://127.0.0.1:{up}/api/aura/json", upstream)
            route = f"[route:aura]\npath = /api/aura/**\nupstream = http://127.0.0.1:{up}\n"
            path = f"/api/aura/endless?interval={args.interval:g}"
        else:
            subprocess.run(["cc", "-O2", "-o", str(workdir / "ssesrv"), str(TOOLS_SRC / "ssesrv.c")], check=True)
            upstream = procs.start("upstream", [str(workdir / "ssesrv"), str(up)])
            wait_http(f"http://127.0.0.1:{up}/json", upstream)
            route = f"[route:aura]\npath = /api/aura/**\nupstream = http://127.0.0.1:{up}\nstrip_prefix = 2\n"
            path = f"/api/aura/sse?rate={1 / args.interval:g}&size=64"
        listen, admin = free_port(), free_port()
        sse = ["resume = memory", "on_client_disconnect = detach"]
        for key, value in (("max_detached_streams", args.max_detached),
                           ("max_detached_streams_per_tenant", args.per_tenant),
                           ("resume_max_total_bytes", args.max_total_bytes),
                           ("resume_max_bytes", args.max_bytes)):
            if value is not None:
                sse.append(f"{key} = {value}")
        ini = (f"[gateway]\nlisten = tcp:{listen}:interface=127.0.0.1:backlog=4096\n"
               f"admin_listen = tcp:{admin}:interface=127.0.0.1\naccess_log = false\n\n{route}\n"
               f"[history]\nenabled = false\n\n[sse]\n" + "\n".join(sse) + "\n")
        (workdir / "gateway.ini").write_text(ini)
        config = parse_config(ini, str(workdir / "gateway.ini")).sse
        twistd = str(Path(sys.executable).with_name("twistd"))
        gateway = procs.start("gateway", [twistd, "-n", "--pidfile=", "aura-proxy", "--config",
                                          str(workdir / "gateway.ini")], env=env)
        health_url = f"http://127.0.0.1:{admin}/healthz"
        wait_http(health_url, gateway)
        idle_kb = rss_kb(gateway.pid)

        seen: dict[str, int] = {"detached": 0, "per_tenant": 0, "resume_bytes": 0, "rss_kb": idle_kb}
        last: dict[str, Any] = {}
        stop_watch = False

        def watch() -> None:
            nonlocal last
            while not stop_watch:
                try:
                    last = get_json(health_url)["sse"]
                except OSError:
                    time.sleep(0.2)
                    continue
                seen["detached"] = max(seen["detached"], last["detached"])
                seen["per_tenant"] = max(seen["per_tenant"], last["detached_max_per_tenant"])
                seen["resume_bytes"] = max(seen["resume_bytes"], last.get("resume", {}).get("bytes", 0))
                seen["rss_kb"] = max(seen["rss_kb"], rss_kb(gateway.pid))
                time.sleep(0.25)

        import threading

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.monotonic()
        ok = asyncio.run(attack(listen, path, args.streams, args.tenants, args.concurrency, timeout=30))
        took = time.monotonic() - started
        time.sleep(args.settle)
        stop_watch = True
        watcher.join()
        final = get_json(health_url)
        final_rss = rss_kb(gateway.pid)

        per_stream = config.resume_max_bytes + ENTRY_BYTES * config.resume_max_events
        held = config.max_detached_streams + args.concurrency
        resume_bound = min(config.resume_max_total_bytes, held * per_stream)
        # Beyond the logs, each stream held costs the gateway its connections
        # and objects: allowed 64 KiB each, on top of the idle process.
        rss_bound_kb = idle_kb + 1.25 * resume_bound / 1024 + held * 64
        # The cap is enforced on the reactor turn after a store grows: one
        # read per stream of slack.
        bytes_slack = 1.10
        problems = []
        if seen["detached"] > config.max_detached_streams:
            problems.append(f"detached streams reached {seen['detached']} > {config.max_detached_streams}")
        if seen["per_tenant"] > config.max_detached_streams_per_tenant:
            problems.append(f"one tenant had {seen['per_tenant']} > {config.max_detached_streams_per_tenant}")
        if seen["resume_bytes"] > config.resume_max_total_bytes * bytes_slack:
            problems.append(f"resume logs reached {seen['resume_bytes']} > {config.resume_max_total_bytes}")
        if seen["rss_kb"] > rss_bound_kb:
            problems.append(f"RSS reached {seen['rss_kb']} kB > {rss_bound_kb:.0f} kB")
        if ok < args.streams * 0.9:
            problems.append(f"only {ok} of {args.streams} streams got their first event")
        result = {
            "streams": args.streams, "got_first_event": ok, "seconds": round(took, 1),
            "tenants": args.tenants, "concurrency": args.concurrency, "upstream": args.upstream,
            "max_detached_streams": config.max_detached_streams,
            "max_detached_streams_per_tenant": config.max_detached_streams_per_tenant,
            "resume_max_total_bytes": config.resume_max_total_bytes,
            "peak_detached": seen["detached"], "peak_detached_per_tenant": seen["per_tenant"],
            "peak_resume_bytes": seen["resume_bytes"], "idle_rss_kb": idle_kb, "peak_rss_kb": seen["rss_kb"],
            "final_rss_kb": final_rss, "rss_bound_kb": round(rss_bound_kb), "final": final.get("sse"),
            "problems": problems,
        }
        print(f"{ok}/{args.streams} streams opened and dropped in {took:.1f} s; peak detached "
              f"{seen['detached']} (cap {config.max_detached_streams}), per tenant {seen['per_tenant']} "
              f"(cap {config.max_detached_streams_per_tenant}); resume logs peak {seen['resume_bytes']} B "
              f"(cap {config.resume_max_total_bytes}); RSS idle {idle_kb / 1024:.1f} MB, peak "
              f"{seen['rss_kb'] / 1024:.1f} MB (bound {rss_bound_kb / 1024:.1f} MB)")
        for problem in problems:
            print("PROBLEM:", problem)
        print(json.dumps(result))
        return 1 if problems else 0
    finally:
        procs.stop()


if __name__ == "__main__":
    sys.exit(main())
