"""
Tests for L{aura_proxy.tap}: the command line of C{twistd aura-proxy} and the
plugin's entry point (the real C{twistd} runs in tests/integration/test_twistd.py).
"""

from __future__ import annotations

import io
import subprocess
import sys
from contextlib import redirect_stderr

from twisted.trial.unittest import SynchronousTestCase

from aura_proxy.assembly import GatewayService
from aura_proxy.tap import Options, makeService
from aura_proxy.workers import WorkerSupervisor

GOOD = (
    "[gateway]\nlisten = tcp:0:interface=127.0.0.1\nadmin_listen = tcp:0:interface=127.0.0.1\n{gateway}\n"
    "[route:aura]\npath = /api/aura/**\nupstream = http://127.0.0.1:9000\n\n"
    "[history]\nenabled = false\n\n[sse]\nresume = off\n"
)


class OptionsTests(SynchronousTestCase):
    """The command line and what makeService makes of it."""

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def options(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_bad_file_is_not_a_usage_error(self) -> None:
        """
        Parsing the command line does not read the file: a bad configuration
        is not an option error (twistd would print its whole usage before it).
        """
        path = self.write("[gateway]\nbogus = 1\n")
        options = self.options("--config", path, "--demo")
        self.assertEqual((options["config"], options["demo"]), (path, True))

    def test_bad_file_exits_with_its_problems_only(self) -> None:
        """makeService refuses an invalid file: its problems alone on stderr, exit status 1."""
        path = self.write("[gateway]\nidle_timeout = 0\n")
        err = io.StringIO()
        with redirect_stderr(err), self.assertRaises(SystemExit) as caught:
            makeService(self.options("--config", path))
        self.assertEqual(caught.exception.code, 1)
        self.assertEqual(err.getvalue().splitlines(), [
            f"{path}: [gateway] idle_timeout: expected a number of seconds > 0, got '0'",
            f"{path}: [route:NAME]: no route: every request would be answered 404 (add at least "
            "one [route:NAME] section with path and upstream)",
        ])

    def test_one_process(self) -> None:
        """A valid file with one worker: the gateway's own tree."""
        service = makeService(self.options("--config", self.write(GOOD.format(gateway=""))))
        self.assertIsInstance(service, GatewayService)

    def test_workers(self) -> None:
        """A valid file with workers = 2: the supervisor's tree."""
        service = makeService(self.options("--config", self.write(GOOD.format(gateway="workers = 2"))))
        self.assertIsInstance(list(service)[0], WorkerSupervisor)  # type: ignore[call-overload]


class PluginTests(SynchronousTestCase):
    """The twistd plugin stays a name: loading it, and the tap's options, installs no reactor."""

    def test_no_reactor_import(self) -> None:
        """
        Loading the plugin, aura_proxy.tap and its Options leaves the reactor
        uninstalled: twistd installs the one its command line names after
        reading them.
        """
        code = (
            "import sys, twisted.plugins.aura_proxy_plugin as p, aura_proxy.tap; "
            "p.auraProxy.options(); "
            "print('twisted.internet.reactor' in sys.modules)"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), "False")
