"""
Validate configuration files: C{aura-proxy-check FILE [FILE...]} (the
installed command) or C{python -m aura_proxy check FILE [FILE...]}.

Prints every mistake (file, section, key, what is wrong) and exits 1 if any
file is invalid, 0 if all are valid, 2 (with the usage) without a file.  A
deprecated key (still read) is a warning on stderr; the file is valid.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from aura_proxy.config import ConfigError, load_config

__all__ = ["check", "check_command", "main"]


def _usage(program: str) -> str:
    return f"usage: {program} FILE [FILE...]\n"


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
    """C{python -m aura_proxy check FILE [FILE...]}; the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["check"]:
        return _run("python -m aura_proxy check", args[1:])
    if args[:1] in (["-h"], ["--help"]):
        sys.stdout.write(_usage("python -m aura_proxy check"))
        return 0
    sys.stderr.write(_usage("python -m aura_proxy check"))
    return 2


if __name__ == "__main__":
    sys.exit(main())
