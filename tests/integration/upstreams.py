"""
Start real servers as subprocesses for integration tests.

Generic: L{free_port}, L{start_process} (any command, e.g. the gateway itself
as C{twistd -n aura-proxy --config FILE}), L{wait_for_http}, L{get_json}.
Specific: L{start_fastapi_upstream} runs L{tests.integration.upstream_app}
under uvicorn.

Waiting for readiness is a blocking poll (short socket timeouts, bounded
deadline): fine from a trial C{setUp}, where nothing else runs on the reactor
yet.  Every process is started in its own session, and a cleanup registered
on the test case terminates its whole process group (SIGTERM, then SIGKILL)
and waits for it.  Output goes to a file under the test's temporary
directory; if a process does not come up, the failure message ends with the
tail of that file.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Mapping, Optional, Sequence
from urllib.parse import urlsplit

from twisted.trial.unittest import SynchronousTestCase

__all__ = [
    "REPO_ROOT",
    "READY_TIMEOUT",
    "free_port",
    "get_json",
    "start_fastapi_upstream",
    "start_process",
    "stop_process",
    "tail",
    "wait_for_http",
]

#: The repository root: the default working directory, and first on PYTHONPATH.
REPO_ROOT = Path(__file__).resolve().parents[2]

#: Seconds a process gets to answer HTTP before the test fails.
READY_TIMEOUT = 15.0

#: Seconds between SIGTERM and SIGKILL on cleanup.
STOP_TIMEOUT = 5.0


def free_port(host: str = "127.0.0.1") -> int:
    """
    A TCP port that was free on C{host} a moment ago (bound to port 0, then
    released).  Another process may take it in between; that race is rare.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def tail(path: str | os.PathLike[str], max_bytes: int = 4000) -> str:
    """The last C{max_bytes} of a file, as text (empty if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - max_bytes, 0))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _http_status(url: str, timeout: float) -> Optional[int]:
    """The status of a GET of C{url}, or None if no HTTP answer came."""
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    conn_cls = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    kwargs: dict[str, Any] = {"timeout": timeout}
    if parts.scheme == "https":
        import ssl

        kwargs["context"] = ssl._create_unverified_context()
    conn = conn_cls(parts.hostname or "127.0.0.1", parts.port, **kwargs)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_for_http(
    url: str,
    deadline: float,
    process: Optional[subprocess.Popen[bytes]] = None,
) -> Optional[str]:
    """
    Poll C{url} until it answers with any HTTP status, C{process} exits, or
    C{time.monotonic()} passes C{deadline}.

    @return: None when it answered, else why not.
    """
    delay = 0.05
    while True:
        if process is not None and process.poll() is not None:
            return f"process exited with status {process.returncode} before {url} answered"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return f"{url} did not answer in time"
        if _http_status(url, timeout=min(1.0, max(remaining, 0.05))) is not None:
            return None
        time.sleep(min(delay, max(deadline - time.monotonic(), 0)))
        delay = min(delay * 1.5, 0.25)


def stop_process(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """
    Terminate C{process}'s process group (it leads its own session): SIGTERM,
    wait up to C{timeout} seconds, then SIGKILL and wait.  Idempotent.
    """
    if getattr(process, "_aura_stopped", False):
        return
    process._aura_stopped = True  # type: ignore[attr-defined]
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    # Children that outlived the leader, or a leader that ignored SIGTERM.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def _environment(env: Optional[Mapping[str, str]]) -> dict[str, str]:
    merged = dict(os.environ)
    if env is not None:
        merged.update(env)
    # So that `python -m ...` and `twistd aura-proxy` (the plugin lives in
    # REPO_ROOT/twisted/plugins) import this checkout, installed or not.
    paths = [str(REPO_ROOT)] + [p for p in merged.get("PYTHONPATH", "").split(os.pathsep) if p]
    merged["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    merged.setdefault("PYTHONUNBUFFERED", "1")
    return merged


def start_process(
    testcase: SynchronousTestCase,
    argv: Sequence[str],
    ready_url: str,
    env: Optional[Mapping[str, str]] = None,
    cwd: Optional[str | os.PathLike[str]] = None,
    timeout: float = READY_TIMEOUT,
) -> subprocess.Popen[bytes]:
    """
    Start C{argv} and block until C{ready_url} answers any HTTP status.

    The process runs in a new session (its own process group) with
    C{cwd} (default: the repository root) and C{os.environ} updated with
    C{env}, the repository root put first on C{PYTHONPATH}.  Its stdout and
    stderr go to a file under the test's temporary directory, available as
    C{process.log_path}.  A cleanup on C{testcase} stops the group.

    @raise twisted.trial.unittest.FailTest: if it does not answer within
        C{timeout} seconds or exits first; the message has the command, the
        reason and the tail of its output.
    """
    log_path = os.path.abspath(testcase.mktemp() + ".log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    log: IO[bytes] = open(log_path, "wb")
    testcase.addCleanup(log.close)
    process = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=str(cwd if cwd is not None else REPO_ROOT),
        env=_environment(env),
        start_new_session=True,
    )
    process.log_path = log_path  # type: ignore[attr-defined]
    testcase.addCleanup(stop_process, process)
    problem = wait_for_http(ready_url, time.monotonic() + timeout, process)
    if problem is not None:
        stop_process(process)
        log.flush()
        testcase.fail(
            f"{' '.join(argv)!s}: {problem} (timeout {timeout}s).\n"
            f"--- tail of {log_path} ---\n{tail(log_path)}"
        )
    return process


def start_fastapi_upstream(
    testcase: SynchronousTestCase,
    app: str = "tests.integration.upstream_app:app",
    ready_path: str = "/api/aura/json",
    extra_args: Sequence[str] = (),
    env: Optional[Mapping[str, str]] = None,
) -> int:
    """
    Run the FastAPI + sse-starlette test upstream under uvicorn on a free
    127.0.0.1 port, wait until it answers and return the port.  A cleanup on
    C{testcase} stops it.

    @param env: environment variables for its process (besides os.environ).
    """
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        # Open SSE streams must not hold up the shutdown at cleanup.
        "--timeout-graceful-shutdown",
        "1",
        *extra_args,
    ]
    start_process(testcase, argv, f"http://127.0.0.1:{port}{ready_path}", env=env)
    return port


def get_json(url: str, timeout: float = 5.0) -> Any:
    """
    A blocking GET of C{url}, decoded as JSON (e.g. C{/api/aura/_active}).
    Blocks the reactor: use it for quick local calls only.
    """
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return json.loads(response.read())
    finally:
        conn.close()
