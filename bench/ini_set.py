"""
python bench/ini_set.py FILE [SECTION.KEY=VALUE]... -- set keys of an INI file in place.

The --aura-set overrides of bench/callgrind-json and bench/callgrind-sse: each
SECTION.KEY=VALUE sets KEY in [SECTION] (added when missing), replacing any
value the file had, and is echoed to stderr.  The file is rewritten without
its comments (it is a generated temporary file).
"""

from __future__ import annotations

import configparser
import re
import sys


def main(argv: list[str]) -> int:
    path, sets = argv[0], argv[1:]
    ini = configparser.ConfigParser(interpolation=None)
    ini.optionxform = str  # type: ignore[assignment,method-assign]
    ini.read(path)
    for item in sets:
        m = re.fullmatch(r"([^.=]+)\.([^=]+)=(.*)", item)
        if not m:
            sys.stderr.write(f"--aura-set expects SECTION.KEY=VALUE, got {item!r}\n")
            return 2
        section, key, value = (g.strip() for g in m.groups())
        if not ini.has_section(section):
            ini.add_section(section)
        ini.set(section, key, value)
        sys.stderr.write(f"--aura-set: [{section}] {key} = {value}\n")
    with open(path, "w", encoding="utf-8") as f:
        ini.write(f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
