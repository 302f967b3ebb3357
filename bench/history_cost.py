"""bench/history-cost [--runs N]: what the call history adds to a plain request.

Two aura-proxy gateways run side by side, both pinned to core 0 and configured
alike (bench/aura-proxy-bench.ini) except `[history] enabled`: true (SQLite, the
shipped defaults) in one, false in the other.  Two wrk processes on core 1 load
both at once (`wrk -t1 -c50` on /json each), so whatever else the machine does
slows both alike.  For each gateway: CPU time (utime + stime, all threads: the
SQLite writer included) over the middle of the run, divided by the requests wrk
counted.  The ratio on/off is the cost of history per request; an A/A run (both
off) shows the method's own noise.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: process bookkeeping, tools, ini template)

DURATION = 14  # seconds of wrk
WINDOW = (3, 11)  # CPU measured from 3 s to 11 s into the load


def start_gateway(tmp: Path, name: str, upstream: int, history: str) -> tuple[subprocess.Popen, int]:
    """A gateway from the benchmark template with `[history] enabled = history`."""
    work = tmp / name
    work.mkdir()
    port, admin = bench.free_port(), bench.free_port()
    text = ((bench.BENCH / "aura-proxy-bench.ini").read_text()
            .replace("@LISTEN_PORT@", str(port)).replace("@ADMIN_PORT@", str(admin))
            .replace("@UPSTREAM_PORT@", str(upstream)))
    ini = work / "gateway.ini"
    ini.write_text(bench.apply_overrides(text, [("history", "enabled", history)]))
    log = work / "gateway.log"
    proc = bench.spawn(["taskset", "-c", bench.PROXY_CORE, str(bench.TWISTD), "-n", "--pidfile=",
                        "aura-proxy", "--config", str(ini)], log, cwd=work)
    bench.wait_port(port, proc, name, log, timeout=45)
    bench.wait_http(port, proc, name, log, timeout=20)
    bench.warm_up(port)
    return proc, port


def one_run(tmp: Path, upstream: int, label: str, first: str, second: str) -> dict[str, float]:
    """Both gateways under the same load at once; CPU microseconds per request of each."""
    run_dir = tmp / label
    run_dir.mkdir()
    a, a_port = start_gateway(run_dir, "a", upstream, first)
    b, b_port = start_gateway(run_dir, "b", upstream, second)
    try:
        loads = [subprocess.Popen(
            ["taskset", "-c", bench.TOOLS_CORE, "wrk", "-t1", "-c50", f"-d{DURATION}s",
             "-H", bench.TENANT_HEADER, f"http://127.0.0.1:{port}/json"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for port in (a_port, b_port)]
        time.sleep(WINDOW[0])
        cpu0 = [bench.cpu_seconds(p.pid) for p in (a, b)]
        time.sleep(WINDOW[1] - WINDOW[0])
        cpu1 = [bench.cpu_seconds(p.pid) for p in (a, b)]
        outputs = [load.communicate(timeout=DURATION + 30)[0] for load in loads]
    finally:
        bench.stop(a)
        bench.stop(b)
    result: dict[str, float] = {}
    for key, out, c0, c1 in zip(("a", "b"), outputs, cpu0, cpu1):
        rate = float(out.split("Requests/sec:")[1].split()[0])
        result[f"{key}_rps"] = rate
        result[f"{key}_us"] = (c1 - c0) / (WINDOW[1] - WINDOW[0]) / rate * 1e6
    result["ratio"] = result["a_us"] / result["b_us"]
    return result


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/history-cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="on/off pairs to measure (default 5)")
    ap.add_argument("--aa", type=int, default=1, help="off/off pairs, the method's noise (default 1)")
    args = ap.parse_args()
    bench.build_tools()
    bench.OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="aura-history-cost-"))
    up_port = bench.free_port()
    ssesrv = bench.spawn(["taskset", "-c", bench.TOOLS_CORE, str(bench.BIN / "ssesrv"), str(up_port)],
                         tmp / "ssesrv.log")
    bench.wait_port(up_port, ssesrv, "ssesrv", tmp / "ssesrv.log", timeout=10)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    rows = []
    try:
        plan = [("on/off", "true", "false")] * args.runs + [("off/off (A/A)", "false", "false")] * args.aa
        for i, (label, first, second) in enumerate(plan):
            r = one_run(tmp, up_port, f"run{i}", first, second)
            rows.append((label, r))
            print(f"{label}: {r['a_rps']:.0f} and {r['b_rps']:.0f} req/s, {r['a_us']:.1f} and "
                  f"{r['b_us']:.1f} us CPU per request, ratio {r['ratio']:.3f}", flush=True)
    finally:
        bench.stop(ssesrv)
        bench._cleanup()
    lines = [
        f"# history cost {stamp}",
        "",
        f"- command: `bench/history-cost --runs {args.runs} --aa {args.aa}`; "
        f"aura_proxy/ source digest {bench.aura_source_digest()}",
        "- two gateways on core 0 (bench/aura-proxy-bench.ini; `[history] enabled` as the row says), "
        f"each loaded by its own `wrk -t1 -c50 -d{DURATION}s` /json on core 1 at the same time; CPU "
        f"(all threads) from {WINDOW[0]} s to {WINDOW[1]} s of the load / requests per second",
        "",
        "| pair (first/second) | req/s first | req/s second | CPU us/req first | CPU us/req second | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        lines.append(f"| {label} | {r['a_rps']:.0f} | {r['b_rps']:.0f} | {r['a_us']:.1f} | "
                     f"{r['b_us']:.1f} | {r['ratio']:.3f} |")
    ratios = [r["ratio"] for label, r in rows if label == "on/off"]
    if ratios:
        lines += ["", f"history on / off, CPU per request: median {statistics.median(ratios):.3f}, "
                      f"range {min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} pairs"]
    text = "\n".join(lines) + "\n"
    out = bench.OUT / f"history-cost-{stamp}.md"
    out.write_text(text)
    print()
    print(text)
    print(f"written: {out.relative_to(bench.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
