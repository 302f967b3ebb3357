"""
Twisted endpoint descriptions (C{KIND:ARG:key=value...}) split into their
arguments, without making the endpoint: an C{ssl:} one would read its key
files, which a parse must not do (L{aura_proxy.tls_listen}).
"""

from __future__ import annotations

__all__ = ["split_description"]


def split_description(description: str, kind: str) -> tuple[list[str], dict[str, str]]:
    """
    The positional and named arguments of C{description}, an endpoint of
    C{kind} (C{"tcp"}, C{"ssl"}), in Twisted's syntax: colon-separated, each
    C{ARG} or C{key=value}, with backslash-escaped colons (an IPv6
    interface, a Windows path).
    """
    parts: list[str] = [""]
    escaped = False
    for char in description:
        if escaped:
            parts[-1] += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("")
        else:
            parts[-1] += char
    if parts[0] == kind:
        parts = parts[1:]
    positional: list[str] = []
    named: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if sep:
            named[key] = value
        else:
            positional.append(key)
    return positional, named
