"""bench/rss-soak: the gateway's resident memory under a long stream load, against the bound
docs/configuration.md states.

Started through the bench/rss-soak wrapper (which sets `ulimit -n 20000`).  It builds ssesrv and
sseload from shared/bench into a temp dir, starts ssesrv (the upstream), starts the gateway
(`twistd -n aura-proxy`, the configuration at its defaults but for the ports and any --set), holds
CONNS streams x RATE events/s through it with sseload for DURATION seconds, and samples the
gateway's VmRSS from /proc every INTERVAL seconds.  It reports the peak, the level (the median of
the last fifth of the samples) and the bound stated for the settings in force:

    resume memory <= min(resume_max_total_bytes, streams x (resume_max_bytes + 16 x resume_max_events))

and (with --baseline-mb, the level of a run with resume = off) level - baseline against it.
Every process it started is killed on exit.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TOOLS_SRC = Path(os.environ.get("BENCH_TOOLS_SRC", ROOT.parent / "shared" / "bench"))
if not (TOOLS_SRC / "ssesrv.c").exists():
    TOOLS_SRC = Path("/work/shared/bench")

_children: list[subprocess.Popen[bytes]] = []


def _cleanup() -> None:
    for p in reversed(_children):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


atexit.register(_cleanup)
for _s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(_s, _on_signal)


def spawn(cmd: list[str], log: Path, cwd: Optional[Path] = None, env: Optional[dict[str, str]] = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             cwd=str(cwd) if cwd else None, env=env, start_new_session=True)
    _children.append(p)
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kb(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench/rss-soak: process exited early ({proc.args})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"bench/rss-soak: port {port} not open after {timeout} s")


def health(admin_port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/healthz", timeout=5) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]
    except Exception as e:  # the figure is informative only
        return {"error": str(e)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=20)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--duration", type=float, default=300, help="seconds of load after all streams are open")
    ap.add_argument("--interval", type=float, default=5, help="seconds between RSS samples")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="a key of the gateway's ini, e.g. sse.resume=off")
    ap.add_argument("--tree", type=Path, default=ROOT,
                    help="the source tree whose aura_proxy runs (built in place); default this one")
    ap.add_argument("--baseline-mb", type=float, default=None,
                    help="level RSS of the same load with resume = off, to compare the difference with the bound")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="rss-soak-"))
    for tool in ("ssesrv", "sseload"):
        subprocess.run(["cc", "-O2", "-o", str(tmp / tool), str(TOOLS_SRC / f"{tool}.c")], check=True)

    sections: dict[str, dict[str, str]] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = value
    upstream, port, admin = free_port(), free_port(), free_port()
    ini: dict[str, dict[str, str]] = {
        "gateway": {"listen": f"tcp:{port}:interface=127.0.0.1:backlog=4096",
                    "admin_listen": f"tcp:{admin}:interface=127.0.0.1", "access_log": "false"},
        "route:bench": {"path": "/**", "upstream": f"http://127.0.0.1:{upstream}"},
    }
    for section, keys in sections.items():
        ini.setdefault(section, {}).update(keys)
    (tmp / "gateway.ini").write_text("".join(
        f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) + "\n" for section, keys in ini.items()
    ))

    srv = spawn([str(tmp / "ssesrv"), str(upstream)], tmp / "ssesrv.log")
    wait_port(upstream, srv)
    env = dict(os.environ, PYTHONPATH=str(args.tree.resolve()), AURA_PROXY_CONFIG=str(tmp / "gateway.ini"))
    # The tac file, not the plugin: PYTHONPATH picks the tree whose aura_proxy runs.
    gw = spawn([str(ROOT / ".venv" / "bin" / "twistd"), "-n", "--pidfile=", "--logfile=" + str(tmp / "twistd.log"),
                "-y", str(args.tree.resolve() / "aura-proxy.tac")],
               tmp / "gateway.out", cwd=tmp, env=env)
    wait_port(port, gw)
    idle = rss_kb(gw.pid) or 0

    ramp_ms = 20
    warm = args.conns / (ramp_ms * 1000) + 5
    load = spawn([str(tmp / "sseload"), "-c", str(args.conns), "-d", str(args.duration), "-w", str(warm),
                  "-r", str(ramp_ms), "-H", "X-Tenant-ID: bench", "127.0.0.1", str(port),
                  f"/sse?rate={args.rate:g}&size={args.size}"], tmp / "sseload.log")
    samples: list[tuple[float, int]] = []
    start = time.monotonic()
    while load.poll() is None:
        time.sleep(args.interval)
        kb = rss_kb(gw.pid)
        if kb is None:
            raise SystemExit(f"bench/rss-soak: the gateway exited; see {tmp}")
        samples.append((time.monotonic() - start, kb))
        print(f"{samples[-1][0]:7.1f} s  RSS {kb / 1024:8.1f} MB", flush=True)
    report = health(admin)
    summary_line = (tmp / "sseload.log").read_text().strip().splitlines()[-1:]
    load_summary = json.loads(summary_line[0]) if summary_line and summary_line[0].startswith("{") else {}

    from configparser import ConfigParser

    cfg = ConfigParser(interpolation=None)
    cfg.read(args.tree / "aura_proxy" / "defaults.ini")
    for section, keys in sections.items():
        for k, v in keys.items():
            if not cfg.has_section(section):
                cfg.add_section(section)
            cfg.set(section, k, v)
    sse = cfg["sse"]
    resume_on = sse.get("resume", "memory") == "memory"
    max_bytes = int(sse.get("resume_max_bytes", "262144"))
    max_events = int(sse.get("resume_max_events", "2000"))
    total_cap = int(sse["resume_max_total_bytes"]) if "resume_max_total_bytes" in sse else None
    per_stream = max_bytes + 16 * max_events
    bound = args.conns * per_stream if resume_on else 0
    if total_cap is not None and resume_on:
        bound = min(bound, total_cap)

    tail = [kb for _, kb in samples[-max(1, len(samples) // 5):]]
    level = statistics.median(tail) / 1024
    peak = max(kb for _, kb in samples) / 1024
    out: dict[str, Any] = {
        "conns": args.conns, "rate": args.rate, "size": args.size, "duration_s": args.duration,
        "settings": args.set, "tree": str(args.tree), "idle_mb": round(idle / 1024, 1),
        "peak_mb": round(peak, 1), "level_mb": round(level, 1),
        "stated_resume_bound_mb": round(bound / 2**20, 1),
        "samples": [(round(t, 1), kb) for t, kb in samples],
        "sseload": load_summary, "healthz": report,
    }
    print(f"streams {args.conns} x {args.rate:g} ev/s x {args.size} B for {args.duration:g} s ({' '.join(args.set) or 'defaults'})")
    print(f"RSS idle {idle / 1024:.1f} MB, peak {peak:.1f} MB, level {level:.1f} MB")
    print(f"stated resume bound: {bound / 2**20:.1f} MiB")
    if args.baseline_mb is not None:
        used = level - args.baseline_mb
        ratio = used / (bound / 2**20) if bound else float("nan")
        out["resume_mb"] = round(used, 1)
        out["resume_vs_bound"] = round(ratio, 3)
        print(f"level - baseline = {used:.1f} MB = {ratio:.0%} of the bound")
    print("sseload:", json.dumps(load_summary))
    print("healthz:", json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
