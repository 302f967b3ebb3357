"""
bench/stack-floor: how many small JSON requests per second the gateway's web
stack serves on one core when it proxies nothing, next to the gateway and
nginx in the same run.

Each server in turn is started fresh on the proxy core and loaded with
`wrk -t1 -c50 -d{SECONDS}s` on the tools core, as bench/run's `json` scenario
does: `twisted` (a twisted.web resource answering every GET with the same
28-byte JSON), `klein` (the same from a Klein route matching every path, as
the gateway routes), `aura` (the gateway with the bench ini, proxying /json to
ssesrv) and `nginx` (proxying the same).  What the first two serve is the
ceiling of a gateway built on them, before any proxying.
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as R  # noqa: E402

PYTHON = R.ROOT / ".venv" / "bin" / "python"
KINDS = ("twisted", "klein", "aura", "nginx")


def start_floor(kind: str, tmp: Path) -> tuple[subprocess.Popen, int]:
    """A stack_floor_server of C{kind}, listening."""
    port = R.free_port()
    log = tmp / f"floor-{kind}.log"
    proc = R.spawn(["taskset", "-c", R.PROXY_CORE, str(PYTHON), str(R.BENCH / "stack_floor_server.py"),
                    kind, str(port)], log)
    R.wait_port(port, proc, kind, log, timeout=15)
    return proc, port


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/stack-floor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kinds", nargs="*", metavar="SERVER", default=list(KINDS),
                    help=f"any of {', '.join(KINDS)} (default: all, in that order)")
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args()
    for kind in args.kinds:
        if kind not in KINDS:
            R.die(f"unknown server {kind!r} ({', '.join(KINDS)})")
    R.build_tools()
    tmp = Path(tempfile.mkdtemp(prefix="stack-floor-"))
    up = R.free_port()
    R.spawn(["taskset", "-c", R.TOOLS_CORE, str(R.BIN / "ssesrv"), str(up)], tmp / "ssesrv.log")
    time.sleep(0.5)
    lines = [
        f"# bench/stack-floor {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        "",
        f"- command: `bench/stack-floor {' '.join(sys.argv[1:])}`",
        f"- load: `wrk -t1 -c50 -d{args.seconds}s` GET /json; server on core {R.PROXY_CORE}, "
        f"wrk and ssesrv on core {R.TOOLS_CORE}",
        "",
        "| server | what it does | req/s | µs of CPU per request |",
        "|---|---|---:|---:|",
    ]
    what = {
        "twisted": "twisted.web resource, constant body",
        "klein": "Klein route, constant body",
        "aura": "aura-proxy, proxying to ssesrv",
        "nginx": "nginx, proxying to ssesrv",
    }
    print("\n".join(lines), flush=True)
    for kind in args.kinds:
        proxy = None
        if kind in ("aura", "nginx"):
            proxy = R.Aura(tmp, up) if kind == "aura" else R.Nginx(tmp, up)
            proxy.start()
            proc, port = proxy.proc, proxy.port
            R.warm_up(port)
        else:
            proc, port = start_floor(kind, tmp)
            for _ in range(5):
                R.http_get(port, "/json")
        assert proc is not None
        cpu0 = R.cpu_seconds(proc.pid)
        out = subprocess.run(
            ["taskset", "-c", R.TOOLS_CORE, "wrk", "-t1", "-c50", f"-d{args.seconds}s",
             "-H", R.TENANT_HEADER, f"http://127.0.0.1:{port}/json"],
            capture_output=True, text=True).stdout
        cpu = R.cpu_seconds(proc.pid) - cpu0
        if proxy is not None:
            proxy.stop()
        else:
            R.stop(proc)
        found = re.search(r"Requests/sec:\s+([\d.]+)", out)
        rate = float(found.group(1)) if found else 0.0
        per = f"{cpu / (rate * args.seconds) * 1e6:.0f}" if rate else "-"
        line = f"| {kind} | {what[kind]} | {rate:.0f} | {per} |"
        lines.append(line)
        print(line, flush=True)
    R.save_report("stack-floor", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
