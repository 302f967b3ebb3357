"""
The twistd plugin is found from any working directory after a plain
C{pip install .} and after C{pip install -e .}.

Each test copies the repository to a temporary directory, makes a fresh venv
whose only view of the already-installed dependencies is a .pth file naming
this project's .venv site-packages (nothing is downloaded: --no-index,
--no-deps, --no-build-isolation), installs the copy, and runs twistd from
another directory with no PYTHONPATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.integration.upstreams import (
    REPO_ROOT,
    free_port,
    stop_process,
    tail,
    wait_for_http,
)

_IGNORE = shutil.ignore_patterns(
    ".venv", "_trial_temp*", ".git", ".mypy_cache", ".hypothesis", "*.egg-info",
    "build", "dist", "dropin.cache", "__pycache__", "bench", "*.db", "spool", "*.so",
)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(argv: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=str(cwd), env=_clean_env(), capture_output=True,
                          text=True, timeout=timeout)


class InstallTests(TestCase):
    """A fresh venv per test; each test < ~15 s."""

    timeout = 90

    def make_venv(self, editable: bool) -> tuple[Path, Path, Path]:
        """
        Copy the repository, create a venv that sees the project's installed
        dependencies, install the copy into it.

        @return: (temporary root, venv, copy)
        """
        root = Path(self.mktemp()).resolve()
        root.mkdir(parents=True)
        copy = root / "src"
        shutil.copytree(REPO_ROOT, copy, ignore=_IGNORE)
        venv = root / "venv"
        result = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], root)
        self.assertEqual(result.returncode, 0, result.stderr)
        python = venv / "bin" / "python"
        new_site = Path(_run([str(python), "-c",
                              "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             root).stdout.strip())
        # The dependencies (and pip, setuptools, wheel) of the project's venv;
        # a path line only: that venv's own .pth files (its editable
        # aura_proxy) are not processed.
        deps = sysconfig.get_path("purelib")
        self.assertTrue(Path(deps, "twisted").is_dir(), deps)
        (new_site / "_aura_test_deps.pth").write_text(deps + "\n")
        target = ["-e", str(copy)] if editable else [str(copy)]
        result = _run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                       "--no-index", "--disable-pip-version-check", *target], root, timeout=120)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        # The venv has no twistd script of its own (Twisted is not installed
        # into it): the same entry point, on this venv's interpreter.
        twistd = venv / "bin" / "twistd"
        twistd.write_text(f"#!{python}\nimport sys\nfrom twisted.scripts.twistd import run\n"
                          "sys.exit(run())\n")
        twistd.chmod(0o755)
        return root, venv, copy

    def check_installed(self, editable: bool) -> None:
        root, venv, copy = self.make_venv(editable)
        elsewhere = root / "elsewhere"
        elsewhere.mkdir()
        python = str(venv / "bin" / "python")
        where = _run([python, "-c",
                      "import aura_proxy, twisted.plugins.aura_proxy_plugin as p; "
                      "import aura_proxy._sse_stamp as c, aura_proxy._chunked_read as r, "
                      "aura_proxy._relay_core as w; "
                      "print(aura_proxy.__file__); print(p.__file__); "
                      "print(c.__file__); print(r.__file__); print(w.__file__)"], elsewhere)
        self.assertEqual(where.returncode, 0, where.stderr)
        # The C extensions were compiled by the install itself (the copy has
        # no built module), next to the package.
        package, plugin, *extensions = where.stdout.split()
        expected = copy if editable else venv
        for path in (package, plugin, *extensions):
            self.assertTrue(Path(path).resolve().is_relative_to(expected),
                            f"{path} is not under {expected}")
            for source in (REPO_ROOT / "aura_proxy", REPO_ROOT / "twisted"):
                self.assertFalse(Path(path).resolve().is_relative_to(source),
                                 f"{path} comes from the checkout, not the install")

        help_ = _run([str(venv / "bin" / "twistd"), "--help"], elsewhere)
        self.assertEqual(help_.returncode, 0, help_.stderr)
        self.assertIn("aura-proxy", help_.stdout)

        listen, admin = free_port(), free_port()
        config = elsewhere / "gw.ini"
        config.write_text(
            f"[gateway]\nlisten = tcp:{listen}:interface=127.0.0.1\n"
            f"admin_listen = tcp:{admin}:interface=127.0.0.1\n\n"
            "[route:aura]\npath = /api/aura/**\nupstream = http://127.0.0.1:1\n\n"
            "[history]\nenabled = false\n\n[sse]\nresume = off\n"
        )
        log_path = root / "twistd.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [str(venv / "bin" / "twistd"), "-n", "--pidfile=", "aura-proxy",
                 "--config", str(config)],
                cwd=str(elsewhere), env=_clean_env(), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.addCleanup(stop_process, process)
        problem = wait_for_http(f"http://127.0.0.1:{admin}/healthz", time.monotonic() + 15, process)
        self.assertIsNone(problem, f"{problem}\n{tail(log_path)}")

        # The dashboard's files are package data: the installed gateway
        # serves them, as they are in the checkout.
        for path, name in [("/", "index.html"), ("/dashboard/dashboard.js", "dashboard.js"),
                           ("/dashboard/dashboard.css", "dashboard.css")]:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}{path}", timeout=10) as r:
                served = r.read()
            self.assertEqual(served, (REPO_ROOT / "aura_proxy" / "dashboard" / "static" / name).read_bytes(), path)
            self.assertTrue(Path(package).parent.joinpath("dashboard", "static", name).is_file(), name)

        # The installed check command takes the files themselves.
        check = _run([str(venv / "bin" / "aura-proxy-check"), str(config)], elsewhere)
        self.assertEqual((check.returncode, check.stdout), (0, f"{config}: OK (1 routes)\n"), check.stderr)

    def test_pipInstall(self) -> None:
        """
        After `pip install .` into a fresh venv, `twistd --help` run from
        another directory lists aura-proxy, the package and plugin come from
        that venv, `twistd -n aura-proxy --config FILE` answers /healthz and
        serves the dashboard's files (package data) and `aura-proxy-check
        FILE` accepts the file.
        """
        self.check_installed(editable=False)

    def test_pipInstallEditable(self) -> None:
        """
        After `pip install -e .` into a fresh venv, `twistd --help` run from
        another directory lists aura-proxy, the package and plugin come from
        the installed source tree, `twistd -n aura-proxy --config FILE`
        answers /healthz and serves the dashboard's files, and
        `aura-proxy-check FILE` accepts the file.
        """
        self.check_installed(editable=True)
