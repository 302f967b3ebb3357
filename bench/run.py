"""bench/run [SCENARIO...]: SSE gateway benchmark, nginx and aura-proxy side by side.

Started through the bench/run wrapper (which sets `ulimit -n 20000`).  For every
scenario it starts a fresh ssesrv upstream (core 1), then for each proxy in turn
(nginx, then aura-proxy, each pinned to core 0 and started fresh so that its peak
RSS belongs to that scenario alone) it runs the load (sseload or wrk, core 1),
measures the proxy process, and stops it.  The -h2 scenarios load each proxy
through a TLS listener with HTTP/2 (ALPN h2) by h2load (Debian's nghttp2-client),
with a certificate made for the run.  Results: a markdown table printed and
written to bench/out/results-<timestamp>.md, raw numbers next to it as .json.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BIN = BENCH / "bin"
OUT = BENCH / "out"
TWISTD = ROOT / ".venv" / "bin" / "twistd"
PYSPY = ROOT / ".venv" / "bin" / "py-spy"
TENANT_HEADER = "X-Tenant-ID: bench"
#: More headers every request of the load sends (--jwt adds Authorization).
EXTRA_HEADERS: list[str] = []
PROXY_CORE = "0"
TOOLS_CORE = "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Scenario:
    name: str
    kind: str  # "sse", "wrk" or "h2load"
    description: str
    path: str = "/sse"
    conns: int = 0
    duration: float = 30
    warmup: float = 5
    ramp_per_ms: int = 20
    #: h2load's arguments before the URL (kind "h2load").
    h2load: tuple[str, ...] = ()
    #: SSE events per stream (an h2load SSE scenario: events/s = streams done x this / time).
    events_per_stream: int = 0


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario("tokens", "sse", "1000 streams x 20 events/s, 64 B (LLM token streaming)",
                 "/sse?rate=20&size=64", conns=1000, duration=30, warmup=5, ramp_per_ms=20),
        Scenario("hold", "sse", "8000 streams x 0.5 events/s, 64 B (many idle-ish streams; memory per stream)",
                 "/sse?rate=0.5&size=64", conns=8000, duration=20, warmup=20, ramp_per_ms=2),
        Scenario("burst", "sse", "100 streams x 500 events/s, 64 B (few very fast streams)",
                 "/sse?rate=500&size=64", conns=100, duration=30, warmup=5, ramp_per_ms=20),
        Scenario("json", "wrk", "wrk -t1 -c50 -d15s GET /json (request/response throughput)",
                 "/json", conns=50, duration=15, warmup=0),
        Scenario("json-h2", "h2load", "h2load -t1 -c50 -m10 -D15 GET /json over TLS + HTTP/2 "
                 "(50 connections, 10 streams each)",
                 "/json", conns=50, duration=15, warmup=0,
                 h2load=("-t1", "-c50", "-m10", "-D15", "--warm-up-time=2")),
        Scenario("sse-h2", "h2load", "h2load -t1 -c100 -m10 -n5000: 5000 SSE streams of 100 events "
                 "(1000 events/s, 64 B) over TLS + HTTP/2, 10 at a time per connection",
                 "/sse?rate=1000&size=64&count=100", conns=100, duration=0, warmup=0,
                 h2load=("-t1", "-c100", "-m10", "-n5000"), events_per_stream=100),
    ]
}

# -- process bookkeeping: everything started is killed on exit ---------------

_children: list[subprocess.Popen] = []


def spawn(cmd: list[str], log: Path, cwd: Optional[Path] = None) -> subprocess.Popen:
    fh = open(log, "ab")
    p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         cwd=str(cwd) if cwd else None, start_new_session=True)
    fh.close()
    _children.append(p)
    return p


def stop(p: Optional[subprocess.Popen], sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    if p is None or p.poll() is not None:
        return
    try:
        os.killpg(p.pid, sig)  # its own session: the process and anything it forked
    except ProcessLookupError:
        return
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(5)


def _cleanup() -> None:
    for p in reversed(_children):
        stop(p, grace=5)


def _on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


atexit.register(_cleanup)
for _s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(_s, _on_signal)


class ProxyStartError(Exception):
    pass


def die(msg: str) -> None:
    print(f"bench/run: error: {msg}", file=sys.stderr)
    sys.exit(2)


# -- helpers ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_report(name: str, lines: list[str]) -> Path:
    """Write a tool's markdown lines to bench/out/NAME-<timestamp>.md, say where, return the path."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"\nwritten: {path}")
    return path


def log_tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in lines[-n:])


def wait_port(port: int, proc: subprocess.Popen, name: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ProxyStartError(f"{name} exited with status {proc.returncode} before listening on "
                                  f"127.0.0.1:{port}; last log lines ({log}):\n{log_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise ProxyStartError(f"{name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s; "
                          f"last log lines ({log}):\n{log_tail(log)}")


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 GET (Connection: close) returning status and the raw rest."""
    extra = "".join(f"{h}\r\n" for h in EXTRA_HEADERS)
    req = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{TENANT_HEADER}\r\n{extra}"
           "Accept: */*\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(req)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return (int(m.group(1)) if m else 0), data


def wait_http(port: int, proc: subprocess.Popen, name: str, log: Path, timeout: float) -> None:
    """Poll until GET /json through the proxy answers 200 (the route works end to end)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ProxyStartError(f"{name} exited with status {proc.returncode}; last log lines ({log}):\n"
                                  f"{log_tail(log)}")
        try:
            status, data = http_get(port, "/json", timeout=2)
            if status == 200:
                return
            last = f"status {status}: {data[:300]!r}"
        except OSError as e:
            last = repr(e)
        time.sleep(0.2)
    raise ProxyStartError(f"{name} listens but GET /json through it did not answer 200 within "
                          f"{timeout:.0f} s (last: {last}); last log lines ({log}):\n{log_tail(log)}")


def warm_up(port: int) -> None:
    """One short SSE stream and a few /json requests, so lazy imports and pools exist
    before the idle RSS is read."""
    for _ in range(5):
        http_get(port, "/json")
    status, data = http_get(port, "/sse?rate=100&count=3", timeout=10)
    if status != 200 or data.count(b"data: ") < 3:
        raise ProxyStartError(f"warm-up SSE stream through the proxy failed: status {status}, "
                              f"{data[:300]!r}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of C{pid} and its live descendants (workers = N forks workers)."""
    stats: dict[int, list[str]] = {}
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            rest = path.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        stats[int(path.parent.name)] = rest
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        rest = stats.get(p)
        if rest is None:
            continue
        total += (int(rest[11]) + int(rest[12])) / CLK_TCK  # utime + stime (fields 14, 15)
        todo.extend(q for q, r in stats.items() if int(r[1]) == p)  # field 4: ppid
    return total


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class RssSampler(threading.Thread):
    """Samples VmRSS of a process every 0.2 s while the load runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.samples.append((time.monotonic(), proc_status_kb(self.pid, "VmRSS")))
            except OSError:
                return
            self._halt.wait(0.2)

    def finish(self) -> int:
        self._halt.set()
        self.join()
        return max((kb for _, kb in self.samples), default=0)


# -- tools ------------------------------------------------------------------------


def tools_source() -> Path:
    for cand in [os.environ.get("BENCH_TOOLS_SRC"), ROOT.parent / "shared" / "bench", "/work/shared/bench"]:
        if cand and (Path(cand) / "ssesrv.c").exists():
            return Path(cand)
    die("cannot find ssesrv.c/sseload.c (set BENCH_TOOLS_SRC to the folder holding them)")
    raise AssertionError


def build_tools() -> None:
    BIN.mkdir(parents=True, exist_ok=True)
    src = tools_source()
    for name in ("ssesrv", "sseload"):
        exe, c = BIN / name, src / f"{name}.c"
        if not exe.exists() or exe.stat().st_mtime < c.stat().st_mtime:
            print(f"building {exe.relative_to(ROOT)} from {c}", flush=True)
            subprocess.run(["cc", "-O2", "-o", str(exe), str(c)], check=True)
    for tool in ("nginx", "wrk", "taskset", "cc", "h2load"):
        if not shutil.which(tool):
            die(f"`{tool}` not found; install it: apt-get install -y nginx-light wrk util-linux gcc "
                "nghttp2-client")


# -- proxies ------------------------------------------------------------------------


NGINX_CONF = """\
# generated by bench/run
daemon off;
master_process off;          # one process: it is the worker, its pid is measured
worker_processes 1;
worker_rlimit_nofile 20000;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{
    worker_connections 20000;
    use epoll;
}}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-client-body;
    proxy_temp_path {tmp}/nginx-proxy-temp;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    upstream bench_upstream {{
        server 127.0.0.1:{upstream};
        keepalive 100;               # as aura-proxy's max_idle_connections default
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
{tls_listen}        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }}
    }}
}}
"""


class Proxy:
    name = "?"
    proc: Optional[subprocess.Popen] = None
    port = 0
    #: A TLS (HTTP/2 by ALPN) listener's port, when the scenario asked for one.
    tls_port = 0
    #: (certificate, key) PEM files of the TLS listener; None: no TLS listener.
    tls: Optional[tuple[Path, Path]] = None

    def __init__(self, tmp: Path, upstream: int) -> None:
        self.tmp, self.upstream = tmp, upstream
        self.log = tmp / f"{self.name}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None


class Nginx(Proxy):
    name = "nginx"

    def start(self) -> None:
        self.port = free_port()
        tls_listen = ""
        if self.tls is not None:
            self.tls_port = free_port()
            tls_listen = (f"        listen 127.0.0.1:{self.tls_port} ssl http2 backlog=4096;\n"
                          f"        ssl_certificate {self.tls[0]};\n        ssl_certificate_key {self.tls[1]};\n")
        conf = self.tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=self.tmp, upstream=self.upstream, port=self.port,
                                          tls_listen=tls_listen))
        self.proc = spawn(["taskset", "-c", PROXY_CORE, "nginx", "-p", str(self.tmp), "-c", str(conf),
                           "-e", str(self.tmp / "nginx-error.log")], self.log)
        wait_port(self.port, self.proc, "nginx", self.tmp / "nginx-error.log", timeout=10)
        wait_http(self.port, self.proc, "nginx", self.tmp / "nginx-error.log", timeout=10)


def aura_source_digest() -> str:
    """A short digest of aura_proxy/ (its .py and .ini files): the gateway is installed
    editable, so this names the code a run measured."""
    import hashlib
    h = hashlib.sha256()
    files = sorted(p for p in (ROOT / "aura_proxy").rglob("*") if p.suffix in (".py", ".ini", ".sql"))
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    newest = max((f.stat().st_mtime for f in files), default=0)
    return f"{h.hexdigest()[:12]} (newest file {datetime.datetime.fromtimestamp(newest):%H:%M:%S})"


def apply_overrides(text: str, overrides: list[tuple[str, str, str]]) -> str:
    """Set [SECTION] KEY = VALUE in an ini text: replaces the key if the section has it,
    else adds it under the section header, else adds the section at the end."""
    lines = text.splitlines()
    for section, key, value in overrides:
        header = f"[{section}]"
        starts = [i for i, line in enumerate(lines) if line.strip() == header]
        if not starts:
            lines += ["", header, f"{key} = {value}"]
            continue
        i = starts[0] + 1
        end = next((j for j in range(i, len(lines)) if lines[j].lstrip().startswith("[")), len(lines))
        for j in range(i, end):
            if re.match(rf"\s*{re.escape(key)}\s*=", lines[j]):
                lines[j] = f"{key} = {value}"
                break
        else:
            lines.insert(i, f"{key} = {value}")
    return "\n".join(lines) + "\n"


class Aura(Proxy):
    name = "aura-proxy"
    digests: list[str] = []
    overrides: list[tuple[str, str, str]] = []

    def start(self) -> None:
        d = aura_source_digest()
        if d not in Aura.digests:
            Aura.digests.append(d)
        self.digest = d
        if not TWISTD.exists():
            raise ProxyStartError(f"{TWISTD} not found (is the venv set up?)")
        self.port, admin = free_port(), free_port()
        while admin == self.port:
            admin = free_port()
        template = (BENCH / "aura-proxy-bench.ini").read_text()
        ini = self.tmp / "aura-proxy-bench.ini"
        text = (template.replace("@LISTEN_PORT@", str(self.port))
                .replace("@ADMIN_PORT@", str(admin))
                .replace("@UPSTREAM_PORT@", str(self.upstream)))
        if self.tls is not None:
            # A second listener: TLS, HTTP/2 by ALPN ([gateway] listen takes a list).
            self.tls_port = free_port()
            text = re.sub(r"^(listen = .*)$", rf"\1, ssl:{self.tls_port}:interface=127.0.0.1"
                          rf":privateKey={self.tls[1]}:certKey={self.tls[0]}", text, count=1, flags=re.M)
        ini.write_text(apply_overrides(text, Aura.overrides))
        run_dir = self.tmp / "aura-cwd"
        run_dir.mkdir(exist_ok=True)
        self.cmd = ["taskset", "-c", PROXY_CORE, str(TWISTD), "-n", "--pidfile=", "aura-proxy",
                    "--config", str(ini)]
        self.proc = spawn(self.cmd, self.log, cwd=run_dir)
        wait_port(self.port, self.proc, "aura-proxy", self.log, timeout=45)
        wait_http(self.port, self.proc, "aura-proxy", self.log, timeout=20)


PROXIES = {"nginx": Nginx, "aura": Aura}


# -- load ------------------------------------------------------------------------


def parse_wrk_time(text: str) -> float:
    """wrk durations ('812.00us', '1.20ms', '2.01s', '1.00m') -> microseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6, "m": 60e6}[m.group(2)]


def run_load(sc: Scenario, proxy: Proxy, tmp: Path, profile_out: Optional[Path]) -> dict[str, Any]:
    pid = proxy.pid
    rss_idle = proc_status_kb(pid, "VmRSS")
    if sc.kind == "sse":
        cmd = ["taskset", "-c", TOOLS_CORE, str(BIN / "sseload"), "-c", str(sc.conns), "-d", str(sc.duration),
               "-w", str(sc.warmup), "-r", str(sc.ramp_per_ms), "-H", TENANT_HEADER,
               *(arg for h in EXTRA_HEADERS for arg in ("-H", h)),
               "127.0.0.1", str(proxy.port), sc.path]
    elif sc.kind == "h2load":
        cmd = ["taskset", "-c", TOOLS_CORE, "h2load", *sc.h2load, "-H", TENANT_HEADER,
               *(arg for h in EXTRA_HEADERS for arg in ("-H", h)),
               f"https://127.0.0.1:{proxy.tls_port}{sc.path}"]
    else:
        cmd = ["taskset", "-c", TOOLS_CORE, "wrk", "-t1", f"-c{sc.conns}", f"-d{int(sc.duration)}s", "--latency",
               "-H", TENANT_HEADER, *(arg for h in EXTRA_HEADERS for arg in ("-H", h)),
               f"http://127.0.0.1:{proxy.port}{sc.path}"]
    sampler = RssSampler(pid)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    sampler.start()
    load = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    _children.append(load)
    spy = None
    if profile_out is not None:
        # start sampling once the streams are open and warm
        time.sleep(sc.conns / max(sc.ramp_per_ms, 1) / 1000 + min(sc.warmup, 3))
        spy = subprocess.Popen([str(PYSPY), "record", "--pid", str(pid), "--duration", "20", "--rate", "100",
                                "--nonblocking", "--idle", "--format", "raw", "--nolineno",
                                "--output", str(profile_out)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        _children.append(spy)
    timeout = sc.duration + sc.warmup + sc.conns / max(sc.ramp_per_ms, 1) / 1000 + 120
    try:
        out, _ = load.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(load, signal.SIGKILL)
        raise RuntimeError(f"{cmd[3]} did not finish within {timeout:.0f} s")
    wall = time.monotonic() - t0
    cpu = cpu_seconds(pid) - cpu0
    rss_loaded = sampler.finish()
    hwm = proc_status_kb(pid, "VmHWM")
    if spy is not None:
        spy_out, _ = spy.communicate(timeout=60)
        (tmp / "py-spy.log").write_text(spy_out)
    (tmp / f"{sc.name}-{proxy.name}-load.log").write_text(" ".join(cmd) + "\n" + out)
    r: dict[str, Any] = {"scenario": sc.name, "proxy": proxy.name, "load_cmd": " ".join(shlex.quote(c) for c in cmd),
                         "cpu_s": cpu, "wall_s": wall, "peak_rss_kb": hwm, "rss_idle_kb": rss_idle,
                         "rss_loaded_kb": rss_loaded}
    if sc.kind == "sse":
        last = [line for line in out.strip().splitlines() if line.startswith("{")]
        if load.returncode != 0 or not last:
            raise RuntimeError(f"sseload failed (status {load.returncode}):\n{out[-2000:]}")
        s = json.loads(last[-1])
        # failed = could not connect/send + non-200 + never answered (no response head by the end)
        unanswered = max(s["conns"] - s["ok"] - s["failed"] - s["non200"], 0)
        r.update(sseload=s, p50_us=s["p50_us"], p99_us=s["p99_us"], max_us=s["max_us"], rate=s["events_per_s"],
                 errors=f"{s['seq_gaps']}/{s['seq_dups']}/{s['failed'] + s['non200'] + unanswered}/"
                        f"{s['closed_early']}",
                 ok_streams=s["ok"], unanswered=unanswered)
        if s["ok"]:
            r["kb_per_stream"] = (rss_loaded - rss_idle) / s["ok"]
    elif sc.kind == "h2load":
        r.update(parse_h2load(out, load.returncode, sc))
    else:
        if load.returncode != 0:
            raise RuntimeError(f"wrk failed (status {load.returncode}):\n{out[-2000:]}")
        lat = re.search(r"^\s*Latency\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M)
        p50 = re.search(r"^\s*50%\s+(\S+)", out, re.M)
        p99 = re.search(r"^\s*99%\s+(\S+)", out, re.M)
        rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
        non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        sockerr = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        if not (lat and p50 and p99 and rps):
            raise RuntimeError(f"cannot parse wrk output:\n{out}")
        requests = re.search(r"(\d+) requests in", out)
        r.update(wrk=out, p50_us=parse_wrk_time(p50.group(1)), p99_us=parse_wrk_time(p99.group(1)),
                 max_us=parse_wrk_time(lat.group(3)), avg_us=parse_wrk_time(lat.group(1)), rate=float(rps.group(1)),
                 requests=int(requests.group(1)) if requests else None,
                 errors=f"non2xx {non2xx.group(1) if non2xx else 0}, sockerr "
                        f"{sum(int(x) for x in sockerr.groups()) if sockerr else 0}")
    return r


def parse_h2load(out: str, returncode: int, sc: Scenario) -> dict[str, Any]:
    """h2load's summary: requests/s (or SSE events/s), mean and max time per request, errors.
    h2load reports no percentiles: the p50 column holds the mean, p99 stays empty."""
    done = re.search(r"^finished in ([\d.]+)(\w+), ([\d.]+) req/s", out, re.M)
    reqs = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                     r"(\d+) errored, (\d+) timeout", out, re.M)
    codes = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out, re.M)
    timing = re.search(r"^time for request:\s+(\S+)\s+(\S+)\s+(\S+)", out, re.M)
    proto = re.search(r"^Application protocol: (\S+)", out, re.M)
    if returncode != 0 or not (done and reqs and codes and timing):
        raise RuntimeError(f"h2load failed (status {returncode}):\n{out[-2000:]}")
    if proto is None or proto.group(1) != "h2":
        raise RuntimeError(f"h2load did not negotiate h2:\n{out[-2000:]}")
    seconds = parse_wrk_time(done.group(1) + done.group(2)) / 1e6
    succeeded = int(reqs.group(4))
    rate = float(done.group(3))
    if sc.events_per_stream:
        rate = succeeded * sc.events_per_stream / seconds if seconds else 0.0
    return {"h2load": out, "p50_us": parse_wrk_time(timing.group(3)), "p99_us": None,
            "max_us": parse_wrk_time(timing.group(2)), "rate": rate, "requests": succeeded,
            "errors": f"failed {reqs.group(5)}, errored {reqs.group(6)}, timeout {reqs.group(7)}, "
                      f"non2xx {int(codes.group(2)) + int(codes.group(3)) + int(codes.group(4))}"}


def make_certificate(tmp: Path) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 (the tests' helper: a test CA and its server cert)."""
    sys.path.insert(0, str(ROOT))
    from tests.tls_certs import make_pki

    pki = make_pki(tmp / "pki", "bench")
    return Path(pki.server_cert), Path(pki.server_key)


# -- report ------------------------------------------------------------------------


def ms(us: Optional[float]) -> str:
    if us is None:
        return "-"
    v = us / 1000
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    if a is None or not b:
        return "-"
    return f"{a / b:.2f}x"


def cpu_ratio(r: dict[str, Any], b: dict[str, Any]) -> str:
    """SSE scenarios do the same work on both proxies, so CPU seconds compare directly;
    wrk runs for a fixed time, so json compares CPU per request."""
    if r.get("requests") and b.get("requests"):
        a_us, b_us = 1e6 * r["cpu_s"] / r["requests"], 1e6 * b["cpu_s"] / b["requests"]
        return f"{a_us / b_us:.2f}x per req ({a_us:.0f} vs {b_us:.0f} us)"
    return ratio(r["cpu_s"], b["cpu_s"])


def render(results: list[dict[str, Any]], header: list[str]) -> str:
    lines = header + [
        "",
        "| scenario | proxy | p50 ms | p99 ms | max ms | events/s (json: req/s) | gaps/dups/failed/closed "
        "(json: errors) | CPU s | peak RSS MB | p99 vs nginx | CPU vs nginx |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    base = {r["scenario"]: r for r in results if r["proxy"] == "nginx" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['scenario']} | {r['proxy']} | FAILED: {r['error'].splitlines()[0]} "
                         "| | | | | | | | |")
            continue
        b = base.get(r["scenario"]) if r["proxy"] != "nginx" else None
        lines.append(
            f"| {r['scenario']} | {r['proxy']} | {ms(r['p50_us'])} | {ms(r['p99_us'])} | {ms(r['max_us'])} "
            f"| {r['rate']:.0f} | {r['errors']} | {r['cpu_s']:.2f} | {r['peak_rss_kb'] / 1024:.1f} "
            f"| {ratio(r['p99_us'], b['p99_us']) if b else '1.00x' if r['proxy'] == 'nginx' else '-'} "
            f"| {cpu_ratio(r, b) if b else '1.00x' if r['proxy'] == 'nginx' else '-'} |")
    hold = [r for r in results if r["scenario"] == "hold" and "error" not in r]
    if hold:
        lines += ["", "Memory per held stream (hold): (max VmRSS while the streams are open - VmRSS idle "
                  "after warm-up) / streams that got 200.", "",
                  "| proxy | streams ok | RSS idle MB | RSS with streams MB | KB per stream |",
                  "|---|---:|---:|---:|---:|"]
        for r in hold:
            lines.append(f"| {r['proxy']} | {r['ok_streams']} | {r['rss_idle_kb'] / 1024:.1f} "
                         f"| {r['rss_loaded_kb'] / 1024:.1f} | {r.get('kb_per_stream', float('nan')):.1f} |")
    lines += ["", "Load commands (the proxy port is chosen per run):", ""]
    lines += [f"- {r['scenario']} / {r['proxy']}: `{r['load_cmd']}`" for r in results if "load_cmd" in r]
    return "\n".join(lines) + "\n"


def profile_report(raw: Path, top: int = 15) -> str:
    """Own (leaf-frame) time per function of the reactor (main) thread, from py-spy's raw
    collapsed stacks; plus inclusive time of the gateway's own functions."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = other = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        if not frames[0].startswith("<module> (") or "twistd" not in frames[0]:
            other += n  # thread-pool threads (history writer etc.), mostly idle in Condition.wait
            continue
        total += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for fn in set(frames):
            if "aura_proxy/" in fn:
                incl[fn] = incl.get(fn, 0) + n
    if not total:
        return "no samples of the reactor thread\n"
    out = [f"Reactor (main) thread: {total} samples at 100 Hz over 20 s, idle (epoll wait) included; "
           f"{other} samples of other threads left out.", "",
           f"Top {top} functions by own time:", "",
           "| # | own % | samples | function (file) |", "|---:|---:|---:|---|"]
    for i, (fn, n) in enumerate(sorted(own.items(), key=lambda kv: -kv[1])[:top], 1):
        out.append(f"| {i} | {100 * n / total:.1f} | {n} | `{fn}` |")
    out += ["", "aura_proxy functions by inclusive time (themselves + what they call):", "",
            "| incl % | samples | function (file) |", "|---:|---:|---|"]
    for fn, n in sorted(incl.items(), key=lambda kv: -kv[1])[:10]:
        out.append(f"| {100 * n / total:.1f} | {n} | `{fn}` |")
    return "\n".join(out) + "\n"


def use_jwt(tmp: Path) -> None:
    """[auth] jwt = required with a new RS256 key pair; the load sends a valid token."""
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = tmp / "jwt-public.pem"
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    token = jwt.encode({"sub": "bench-user", "tenant_id": "bench", "exp": int(time.time()) + 3600},
                       key, algorithm="RS256")
    Aura.overrides += [("auth", "jwt", "required"), ("auth", "algorithms", "RS256"),
                       ("auth", "public_key_file", str(public))]
    EXTRA_HEADERS.append(f"Authorization: Bearer {token}")


def main() -> int:
    global PROXY_CORE, TOOLS_CORE
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                    help=f"any of {', '.join(SCENARIOS)} (default: all, in that order)")
    ap.add_argument("--proxy", action="append", choices=list(PROXIES),
                    help="measure only this proxy (repeatable; default: nginx and aura)")
    ap.add_argument("--profile", action="store_true",
                    help="attach py-spy to aura-proxy for 20 s of each SSE scenario it runs; "
                         "writes bench/out/profile-<scenario>-<timestamp>.txt (raw stacks) and a "
                         "top-15 own-time table in the results (installs py-spy into the venv if missing)")
    ap.add_argument("--cpus", metavar="PROXY:TOOLS", default=f"{PROXY_CORE}:{TOOLS_CORE}",
                    help="taskset CPU lists for the proxy and for the tools (default 0:1); "
                         "e.g. 0,1:0,1 to give `workers = 2` both cores, sharing them with the tools")
    ap.add_argument("--aura-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a key of the generated aura-proxy ini, e.g. sse.resume=off "
                         "(repeatable; recorded in the report)")
    ap.add_argument("--jwt", action="store_true",
                    help="aura-proxy with [auth] jwt = required (RS256, a key pair made for the run); "
                         "every request of the load (both proxies) sends the token as Authorization")
    args = ap.parse_args()
    m = re.fullmatch(r"([0-9,-]+):([0-9,-]+)", args.cpus)
    if not m:
        die(f"--cpus expects PROXY:TOOLS CPU lists such as 0:1 or 0,1:0,1, got {args.cpus!r}")
    PROXY_CORE, TOOLS_CORE = m.group(1), m.group(2)
    for item in args.aura_set:
        m = re.fullmatch(r"([^.=]+)\.([^=]+)=(.*)", item)
        if not m:
            die(f"--aura-set expects SECTION.KEY=VALUE, got {item!r}")
        Aura.overrides.append((m.group(1).strip(), m.group(2).strip(), m.group(3).strip()))
    names = args.scenarios or list(SCENARIOS)
    for n in names:
        if n not in SCENARIOS:
            die(f"unknown scenario {n!r} (known: {', '.join(SCENARIOS)})")
    proxies = args.proxy or list(PROXIES)
    if args.profile and not PYSPY.exists():
        subprocess.run([str(ROOT / ".venv" / "bin" / "pip"), "install", "-q", "py-spy"], check=True)

    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(SCENARIOS[n].conns for n in names) * 2 + 100
    if soft < need:
        print(f"warning: open-file limit {soft} < {need}: run through bench/run (ulimit -n 20000)", file=sys.stderr)

    build_tools()
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    tmp = Path(tempfile.mkdtemp(prefix="aura-bench-"))
    if args.jwt:
        use_jwt(tmp)
    certificate = make_certificate(tmp) if any(SCENARIOS[n].kind == "h2load" for n in names) else None
    keep_tmp = False
    cmdline = os.environ.get("BENCH_CMDLINE") or "bench/run.py " + " ".join(sys.argv[1:])
    nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    header = [
        f"# aura-proxy benchmark {stamp}",
        "",
        f"- command: `{cmdline}` (in {ROOT})",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- host: {platform.node()}, {os.cpu_count()} cores, Linux {platform.release()}, {nginx_v}, "
        f"Python {platform.python_version()}",
        f"- proxy pinned to core {PROXY_CORE}; ssesrv, sseload and wrk pinned to core {TOOLS_CORE}; "
        "each proxy started fresh per scenario",
        "- latency: ssesrv send -> sseload receive (through the proxy); CPU s: proxy utime+stime during the "
        "whole load run (ramp + warm-up + measurement); peak RSS: the proxy's VmHWM",
        "- -h2 scenarios: h2load over TLS + HTTP/2 (ALPN h2) to each proxy's second listener; h2load gives no "
        "percentiles: p50 ms is its mean time per request (a whole SSE stream in sse-h2), p99 is empty, max is "
        "its max; sse-h2's events/s = streams done x 100 / h2load's time",
        "- aura-proxy config: bench/aura-proxy-bench.ini"
        + (" with " + ", ".join(f"[{a}] {b} = {c}" for a, b, c in Aura.overrides) if Aura.overrides else ""),
        "- scenarios: " + "; ".join(f"{n}: {SCENARIOS[n].description}" for n in names),
    ]
    results: list[dict[str, Any]] = []
    profiles: list[str] = []
    failed = False
    try:
        for name in names:
            sc = SCENARIOS[name]
            up_port = free_port()
            ssesrv = spawn(["taskset", "-c", TOOLS_CORE, str(BIN / "ssesrv"), str(up_port)], tmp / f"ssesrv-{name}.log")
            try:
                wait_port(up_port, ssesrv, "ssesrv", tmp / f"ssesrv-{name}.log", timeout=10)
            except ProxyStartError as e:
                die(str(e))
            for pname in proxies:
                proxy = PROXIES[pname](tmp, up_port)
                if sc.kind == "h2load":
                    proxy.tls = certificate
                print(f"== {name}: {proxy.name} ({sc.description})", flush=True)
                try:
                    proxy.start()
                    warm_up(proxy.port)
                    prof = None
                    if args.profile and pname == "aura" and sc.kind == "sse":
                        prof = OUT / f"profile-{name}-{stamp}.txt"
                    r = run_load(sc, proxy, tmp, prof)
                    if isinstance(proxy, Aura):
                        r["aura_source"] = proxy.digest
                    if proxy.proc is not None and proxy.proc.poll() is not None:
                        raise RuntimeError(f"{proxy.name} died during the run; log:\n{log_tail(proxy.log)}")
                    if prof is not None and prof.exists():
                        profiles.append(f"### {name} / aura-proxy ({prof.relative_to(ROOT)})\n\n"
                                        + profile_report(prof))
                    results.append(r)
                    print(f"   p50 {ms(r['p50_us'])} ms, p99 {ms(r['p99_us'])} ms, max {ms(r['max_us'])} ms, "
                          f"{r['rate']:.0f}/s, errors {r['errors']}, CPU {r['cpu_s']:.2f} s, "
                          f"peak RSS {r['peak_rss_kb'] / 1024:.1f} MB", flush=True)
                except (ProxyStartError, RuntimeError, OSError) as e:
                    failed = keep_tmp = True
                    print(f"bench/run: {name}/{proxy.name} FAILED: {e}", file=sys.stderr, flush=True)
                    results.append({"scenario": name, "proxy": proxy.name, "error": str(e)})
                finally:
                    proxy.stop()
            stop(ssesrv)
    finally:
        if results:
            if Aura.digests:
                header.append(f"- aura_proxy/ source digest: {', '.join(Aura.digests)}")
                if len(Aura.digests) > 1:
                    header.append("- WARNING: aura_proxy/ changed while the suite ran (it is installed "
                                  "editable): rows were measured on different code, see the .json")
            text = render(results, header)
            if profiles:
                text += "\n## Profile (py-spy)\n\n" + "\n".join(profiles)
            if failed:
                text += f"\nSome runs failed; logs kept in {tmp}\n"
            md = OUT / f"results-{stamp}.md"
            md.write_text(text)
            (OUT / f"results-{stamp}.json").write_text(json.dumps(
                {"command": cmdline, "stamp": stamp, "results": results}, indent=2, default=str))
            print()
            print(text)
            print(f"written: {md.relative_to(ROOT)} (+ .json)")
        _cleanup()
        if not keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
