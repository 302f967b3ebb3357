"""
Streams that survive their instance, end to end with real processes
(L{bench/rolling_restart.py}): twistd gateways sharing Redis and history,
ssesrv (shared/bench/ssesrv.c, compiled into a temporary directory) as the
resumable upstream, clients that reconnect as an EventSource does, and
HAProxy for the rolling restart.  Each test runs one scenario as a
subprocess and checks its JSON result; a scenario that lacks a tool (cc,
haproxy, Redis, PostgreSQL) is skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPT = ROOT / "bench" / "rolling_restart.py"


def scenario(testcase: SynchronousTestCase, *args: str, timeout: float = 300) -> dict[str, Any]:
    """Run C{bench/rolling_restart.py ARGS}; its JSON result (skips the test on exit 77)."""
    workdir = str(Path(testcase.mktemp()).resolve())
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--workdir", workdir],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode == 77:
        raise SkipTest(lines[-1] if lines else "a tool is missing")
    if not lines:
        testcase.fail(f"no result (exit {done.returncode}): {done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


class DrainTests(SynchronousTestCase):
    """SIGTERM to a twistd gateway with open streams and POSTs in flight."""

    def test_sigterm_drains(self) -> None:
        """
        With 10 open streams and 5 POSTs in flight (each answered 1 s after
        it arrives), SIGTERM: every POST gets its whole 200 answer, every
        stream ends cleanly after a whole event with a C{retry:} hint once
        drain_timeout (2 s) has passed, the history has a row for each of
        the 15 calls, and the gateway exits soon after.
        """
        r = scenario(self, "drain", "--streams", "10", "--posts", "5", "--drain", "2")
        self.assertEqual(r["posts_answered_200"], 5, r)
        self.assertEqual(r["streams_cut_whole_with_retry"], 10, r)
        self.assertEqual((r["history_missing"], r["history_twice"], r["history_connections"]), (0, 0, 15), r)
        self.assertLess(r["exit_s"], 15, r)
        self.assertTrue(r["ok"], r)


class TakeoverTests(SynchronousTestCase):
    """Two gateways sharing Redis; the one relaying a stream goes away after its 21st event."""

    def check(self, r: dict[str, Any]) -> None:
        self.assertEqual((r["completed"], r["lost"], r["duplicated"], r["out_of_order"]), (2, 0, 0, 0), r)
        self.assertEqual((r["history_missing"], r["history_twice"]), (0, 0), r)
        self.assertTrue(r["ok"], r)

    def test_owner_stopped(self) -> None:
        """
        SIGTERM to the owner: the clients resume on the other gateway with
        Last-Event-ID and get every one of the 60 events exactly once, in
        order, the pause at most a few seconds; both gateways recorded every
        connection.
        """
        r = scenario(self, "takeover", "--streams", "2", "--signal", "TERM", "--max-gap", "8")
        self.check(r)

    def test_owner_killed(self) -> None:
        """
        kill -9 of the owner: once its lease has expired (5 s) the other
        gateway treats the stream as cut short and resumes it upstream: every
        event exactly once, within seconds; the surviving gateway recorded
        every connection it served.
        """
        r = scenario(self, "takeover", "--streams", "2", "--signal", "KILL", "--max-gap", "12")
        self.check(r)


class RollingRestartTests(SynchronousTestCase):
    """Two gateways sharing Redis and PostgreSQL behind HAProxy, restarted one after the other."""

    def test_rolling_restart(self) -> None:
        """
        20 streams of 60 events through HAProxy; SIGTERM one gateway, start
        it again, then the other: every stream completes with 0 lost and 0
        duplicated events, and the history table has every connection
        (each resumed one its own row) exactly once.
        """
        r = scenario(self, "rolling", "--streams", "20", "--history", "postgresql")
        self.assertEqual((r["completed"], r["lost"], r["duplicated"]), (20, 0, 0), r)
        self.assertGreaterEqual(r["resumed_streams"], 20, r)
        self.assertEqual((r["history_missing"], r["history_twice"]), (0, 0), r)
        self.assertTrue(r["ok"], r)

    def test_rolling_restart_with_workers(self) -> None:
        """
        The same with C{workers = 2} on each gateway (SIGTERM to the parent,
        which closes its socket and has both workers drain): 10 streams, 0
        lost, 0 duplicated, every connection in history once (SQLite files).
        """
        r = scenario(self, "rolling", "--streams", "10", "--workers", "2", "--history", "sqlite")
        self.assertEqual((r["completed"], r["lost"], r["duplicated"]), (10, 0, 0), r)
        self.assertEqual((r["history_missing"], r["history_twice"]), (0, 0), r)
        self.assertTrue(r["ok"], r)
