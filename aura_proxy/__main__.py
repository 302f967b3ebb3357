"""
Validate configuration files: C{aura-proxy-check FILE [FILE...]} (the
installed command) or C{python -m aura_proxy check FILE [FILE...]}.

Prints every mistake (file, section, key, what is wrong) and exits 1 if any
file is invalid, 0 if all are valid, 2 (with the usage) without a file.  A
deprecated key (still read) is a warning on stderr; the file is valid.

C{python -m aura_proxy reload PIDFILE} sends SIGHUP to the gateway whose
pid is in PIDFILE (twistd's C{--pidfile}): it reloads its configuration
(docs/operations.md); exit status 1 if there is no such process.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Optional, Sequence

from aura_proxy.config import ConfigError, load_config

__all__ = ["check", "check_command", "main", "reload"]


def _usage(program: str) -> str:
    return f"usage: {program} FILE [FILE...]\n"


_RELOAD_USAGE = "usage: python -m aura_proxy reload PIDFILE\n"


def reload(pidfile: str) -> int:
    """Send SIGHUP to the gateway whose pid is in C{pidfile}; the exit status."""
    try:
        with open(pidfile, encoding="ascii") as f:
            pid = int(f.read().strip())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        sys.stderr.write(f"{pidfile}: cannot read a process id ({e})\n")
        return 1
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as e:
        sys.stderr.write(f"{pidfile}: cannot signal process {pid} ({e.strerror or e})\n")
        return 1
    sys.stdout.write(
        f"sent SIGHUP to {pid}: it reloads its configuration (the result is in its log; "
        "POST /reload on the admin port answers it)\n"
    )
    return 0


def check(paths: Sequence[str]) -> int:
    """Validate each file in C{paths}, reporting each; the exit status."""
    status = 0
    for path in paths:
        try:
            config = load_config(path)
        except ConfigError as e:
            sys.stderr.write(str(e) + "\n")
            status = 1
        else:
            for line in config.deprecations:
                sys.stderr.write(f"warning: {line}\n")
            sys.stdout.write(f"{path}: OK ({len(config.routes)} routes)\n")
    return status


def _run(program: str, args: list[str]) -> int:
    if args and args[0] in ("-h", "--help"):
        sys.stdout.write(_usage(program))
        return 0
    if not args:
        sys.stderr.write(_usage(program))
        return 2
    return check(args)


def check_command(argv: Optional[Sequence[str]] = None) -> int:
    """
    The installed C{aura-proxy-check FILE [FILE...]} command; the exit status.

    A leading C{check} (C{aura-proxy-check check FILE}, the form it once
    needed) is accepted too.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["check"]:
        args = args[1:]
    return _run("aura-proxy-check", args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """C{python -m aura_proxy check FILE [FILE...]} or C{reload PIDFILE}; the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["check"]:
        return _run("python -m aura_proxy check", args[1:])
    if args[:1] == ["reload"]:
        if len(args) != 2:
            sys.stderr.write(_RELOAD_USAGE)
            return 2
        return reload(args[1])
    if args[:1] in (["-h"], ["--help"]):
        sys.stdout.write(_usage("python -m aura_proxy check") + _RELOAD_USAGE)
        return 0
    sys.stderr.write(_usage("python -m aura_proxy check") + _RELOAD_USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main())
