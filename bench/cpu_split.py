"""
bench/cpu-split: user and system CPU per relayed SSE event, nginx against
aura-proxy configurations, in a steady window of the same load.

Each proxy in PROXY... is started fresh (pinned as bench/run pins it), loaded
with STREAMS streams x RATE events/s from ssesrv through sseload, and its
utime and stime (and how often its main thread went to sleep waiting for
sockets: voluntary context switches) are read from 6 s to 16 s into the load: after every stream
is open, so the figures are the per-event cost alone (bench/run's CPU seconds
include opening the streams).  PROXY is `nginx`, `aura` (the bench ini: every
feature on), `aura:plain` (event ids and resume off), `aura:ids` (ids on,
resume off), `aura:no-c-stamp`, `aura:no-c-read`, `aura:no-c-relay` (every
feature on, that one C module left unused), `aura:no-c` (no C module, the
lean loop still on) or `aura:stock` (`fast_path = off`).  Give a proxy more than once to see the run-to-run spread.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as R  # noqa: E402

#: Each aura configuration: ini overrides, and the environment of its process
#: (AURA_PROXY_DISABLE_C leaves the named C modules unused: what each saves).
CONFIGS: dict[str, tuple[list[tuple[str, str, str]], dict[str, str]]] = {
    "aura": ([], {}),
    "aura:plain": ([("sse", "inject_ids", "false"), ("sse", "resume", "off")], {}),
    "aura:ids": ([("sse", "resume", "off")], {}),
    "aura:no-c-stamp": ([], {"AURA_PROXY_DISABLE_C": "aura_proxy._sse_stamp"}),
    "aura:no-c-read": ([], {"AURA_PROXY_DISABLE_C": "aura_proxy._chunked_read"}),
    "aura:no-c-relay": ([], {"AURA_PROXY_DISABLE_C": "aura_proxy._relay_core"}),
    "aura:no-c": ([], {"AURA_PROXY_DISABLE_C": "all"}),
    "aura:stock": ([("gateway", "fast_path", "off")], {}),
}


def times(pid: int) -> tuple[float, float, int]:
    """utime, stime (s) and voluntary context switches (sleeps) of pid's main thread."""
    rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    status = Path(f"/proc/{pid}/status").read_text()
    sleeps = int(status.split("voluntary_ctxt_switches:")[1].split()[0])
    return int(rest[11]) / R.CLK_TCK, int(rest[12]) / R.CLK_TCK, sleeps


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/cpu-split", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("proxies", nargs="*", metavar="PROXY", default=["nginx", "aura", "aura:plain", "aura", "nginx"])
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=20.0, help="events per second per stream")
    ap.add_argument("--aura-src", metavar="DIR",
                    help="run aura-proxy from this source tree (PYTHONPATH), e.g. a git worktree of an older commit")
    args = ap.parse_args()
    for name in args.proxies:
        if name != "nginx" and name not in CONFIGS:
            R.die(f"unknown proxy {name!r} (nginx, {', '.join(CONFIGS)})")
    if args.aura_src:
        os.environ["PYTHONPATH"] = str(Path(args.aura_src).resolve())
    R.build_tools()
    tmp = Path(tempfile.mkdtemp(prefix="cpu-split-"))
    up = R.free_port()
    R.spawn(["taskset", "-c", R.TOOLS_CORE, str(R.BIN / "ssesrv"), str(up)], tmp / "ssesrv.log")
    time.sleep(0.5)
    window = 10.0
    events = args.streams * args.rate * window
    lines = [
        f"# bench/cpu-split {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        "",
        f"- command: `bench/cpu-split {' '.join(sys.argv[1:])}`",
        f"- load: {args.streams} streams x {args.rate:g} events/s of 64 B; CPU read from 6 s to 16 s "
        f"into the load ({events:.0f} events); proxy on core {R.PROXY_CORE}, tools on core {R.TOOLS_CORE}",
        f"- aura_proxy/ source: {args.aura_src or 'this checkout'}",
        "",
        "| proxy | user µs/event | system µs/event | total µs/event | sleeps/event | sseload: events, gaps |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for name in args.proxies:
        overrides, env = CONFIGS.get(name, ([], {}))
        R.Aura.overrides = overrides
        proxy = R.Nginx(tmp, up) if name == "nginx" else R.Aura(tmp, up)
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            proxy.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        R.warm_up(proxy.port)
        out = tmp / f"sseload-{len(lines)}.json"
        load = subprocess.Popen(
            ["taskset", "-c", R.TOOLS_CORE, str(R.BIN / "sseload"), "-c", str(args.streams), "-d", "20",
             "-w", "2", "-r", "1000", "-H", "X-Tenant-ID: bench", "127.0.0.1", str(proxy.port),
             f"/sse?rate={args.rate:g}&size=64"],
            stdout=open(out, "w"), stderr=subprocess.STDOUT)
        time.sleep(6)
        u0, s0, c0 = times(proxy.pid)
        time.sleep(window)
        u1, s1, c1 = times(proxy.pid)
        load.wait()
        proxy.stop()
        last = [ln for ln in out.read_text().splitlines() if ln.startswith("{")]
        stats = R.json.loads(last[-1]) if last else {}
        seen = f"{stats.get('events_per_s', 0):.0f}/s, gaps {stats.get('seq_gaps', '?')}"
        user, system = (u1 - u0) / events * 1e6, (s1 - s0) / events * 1e6
        line = (f"| {name} | {user:.1f} | {system:.1f} | {user + system:.1f} | {(c1 - c0) / events:.2f} | "
                f"{seen} |")
        lines.append(line)
        print(line, flush=True)
    R.save_report("cpu-split", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
