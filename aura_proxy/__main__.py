"""
C{python -m aura_proxy check FILE...}: validate configuration files.

Prints every mistake (file, section, key, what is wrong) and exits 1 if any
file is invalid, 0 if all are valid.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from aura_proxy.config import ConfigError, load_config

USAGE = "usage: python -m aura_proxy check FILE [FILE...]\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["check"]:
        args = args[1:]
    elif args and args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    else:
        sys.stderr.write(USAGE)
        return 2
    if not args:
        sys.stderr.write(USAGE)
        return 2
    status = 0
    for path in args:
        try:
            config = load_config(path)
        except ConfigError as e:
            sys.stderr.write(str(e) + "\n")
            status = 1
        else:
            sys.stdout.write(f"{path}: OK ({len(config.routes)} routes)\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
