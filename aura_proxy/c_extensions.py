"""
Loading the optional C extensions of the hot path.

Each C module hard-codes values that the Python code defines (limits, id
formats, attribute names); the Python code is their one definition.  A C
module exports the values it was compiled with as C{CONSTANTS}, and
L{load} uses it only if they equal the Python ones, so a stale build (the
Python changed, the C was not rebuilt) runs the Python code instead of
producing different bytes.  Why a module is not used is kept as a string for
the start-up line (C{sse.C_DISABLED_REASON}, C{fastclient.C_DISABLED_REASON}).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Mapping, Optional

__all__ = ["DISABLE_ENV", "NOT_BUILT", "load", "mismatch"]

#: An environment variable naming C modules (comma-separated, or C{all}) the
#: Python code is to do the work of, as if they were not built.
DISABLE_ENV = "AURA_PROXY_DISABLE_C"

#: The reason given for a C module that cannot be imported.
NOT_BUILT = "not built (no C compiler at install time?)"


def load(name: str, expected: Mapping[str, object]) -> tuple[Optional[ModuleType], Optional[str]]:
    """
    Import the C module C{name} if its C{CONSTANTS} equal C{expected}.

    Not imported at all when the environment variable L{DISABLE_ENV} names
    it (or says C{all}): how C{bench/cpu-split} measures what each module
    saves.

    @return: C{(module, None)} when it can be used, else C{(None, reason)}.
    """
    disabled = {item.strip() for item in os.environ.get(DISABLE_ENV, "").split(",")}
    if name in disabled or "all" in disabled:
        return None, f"disabled by {DISABLE_ENV}"
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None, NOT_BUILT
    reason = mismatch(getattr(module, "CONSTANTS", None), expected)
    if reason is not None:
        return None, f"{reason}: not used, rebuild it (pip install -e . or setup.py build_ext --inplace)"
    return module, None


def mismatch(compiled: object, expected: Mapping[str, object]) -> Optional[str]:
    """
    How the values a C module was compiled with (C{compiled}) differ from
    the Python definitions (C{expected}), or None if they are the same.
    """
    if not isinstance(compiled, dict):
        return "built without its CONSTANTS (older than the Python code)"
    differences = []
    for key in sorted(set(compiled) | set(expected)):
        if key not in expected:
            differences.append(f"compiled with {key}, which the Python code does not define")
        elif key not in compiled:
            differences.append(f"compiled without {key}")
        elif compiled[key] != expected[key]:
            differences.append(f"compiled with {key} = {compiled[key]!r}, the Python code has {expected[key]!r}")
    return "; ".join(differences) or None
