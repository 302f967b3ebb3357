"""
Abuse, small enough for CI: 300 streams opened and dropped against a twistd
gateway and the FastAPI upstream, with the caps set low (50 detached streams,
20 per tenant, 200 kB of memory logs).  The attack and its checks are in
L{tests.integration.abuse}, which also runs the full 10,000 (see there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.upstreams import REPO_ROOT


class AbuseTests(SynchronousTestCase):
    """One small attack, run as operators would run the full one."""

    def test_open_and_drop_stays_within_caps(self) -> None:
        """
        300 streams over 3 tenants (half of them one tenant's), each dropped at its first event: the
        gateway's detached streams never exceed 50 in all nor 20 for one
        tenant (both caps cancel streams), its memory logs stay within
        200 kB (dropping detached streams' logs when over), its RSS within
        the bound, and every stream got its first event.
        """
        # Absolute: the attack runs from the repository root, not trial's directory.
        workdir = os.path.abspath(self.mktemp())
        run = subprocess.run(
            [sys.executable, "-m", "tests.integration.abuse", "--streams", "300", "--tenants", "3",
             "--concurrency", "100", "--max-detached", "50", "--per-tenant", "20",
             "--max-total-bytes", "200000", "--max-bytes", "65536", "--settle", "4", "--workdir", workdir],
            cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=240,
        )
        self.assertEqual(run.returncode, 0, run.stdout + run.stderr)
        result = json.loads(run.stdout.strip().splitlines()[-1])
        self.assertEqual(result["problems"], [])
        self.assertEqual(result["got_first_event"], 300)
        self.assertLessEqual(result["peak_detached"], 50)
        self.assertLessEqual(result["peak_detached_per_tenant"], 20)
        final = result["final"]
        self.assertGreater(final["cancelled_by_max_detached_streams_per_tenant"], 0)
        self.assertGreater(final["cancelled_by_max_detached_streams"], 0)
        self.assertGreater(final["resume"]["evicted_detached"], 0)
        self.assertLessEqual(final["detached"], 50)
