"""
Path patterns and route selection.

A pattern is a path of segments: a literal, C{*} (exactly one segment) or, as the
last segment only, C{**} (any rest of the path, including none).  Patterns are
compared on percent-decoded segments, so C{/api/%61ura/x} is routed as
C{/api/aura/x}; the request's own bytes are what go upstream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Generic, Iterable, Optional, Sequence, TypeVar
from urllib.parse import unquote_to_bytes

__all__ = [
    "PathPattern",
    "PatternError",
    "MalformedPath",
    "Router",
    "split_path",
    "strip_segments",
]

T = TypeVar("T")


class PatternError(ValueError):
    """A path pattern that cannot be used; the message says why."""


class MalformedPath(ValueError):
    """A request path the gateway refuses to route (400)."""


@dataclass(frozen=True)
class PathPattern:
    """
    A parsed path pattern such as C{/api/aura/**}.

    @ivar segments: the segments before a trailing C{**}, each a literal or C{*}.
    @ivar open_ended: whether the pattern ends in C{**}.
    """

    text: str
    segments: tuple[str, ...]
    open_ended: bool

    @classmethod
    def parse(cls, text: str) -> "PathPattern":
        """
        Parse a pattern.

        @raise PatternError: if it does not start with C{/} or uses C{**} before
            the end.
        """
        if not text.startswith("/"):
            raise PatternError(f"a path pattern starts with '/', got {text!r}")
        parts = text[1:].split("/")
        if parts and parts[-1] == "":
            parts.pop()
        open_ended = bool(parts) and parts[-1] == "**"
        if open_ended:
            parts.pop()
        for part in parts:
            if part == "**":
                raise PatternError(f"'**' may only end a pattern, got {text!r}")
            if "*" in part and part != "*":
                raise PatternError(f"'*' must be a whole segment, got {text!r}")
        normal = "/" + "/".join(parts + (["**"] if open_ended else []))
        return cls(normal, tuple(parts), open_ended)

    @property
    def specificity(self) -> tuple[int, int, int]:
        """Sort key: more literal segments, then more segments, then closed patterns win."""
        literals = sum(1 for s in self.segments if s != "*")
        return (literals, len(self.segments), 0 if self.open_ended else 1)

    def matches(self, segments: Sequence[str]) -> bool:
        """Whether decoded path C{segments} match this pattern."""
        mine = self.segments
        if len(segments) < len(mine) or (len(segments) > len(mine) and not self.open_ended):
            return False
        for want, got in zip(mine, segments):
            if want != "*" and want != got:
                return False
        return True


# Control characters: every byte below 0x20, and DEL.
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_CONTROL_TEXT = re.compile("[\x00-\x1f\x7f]")


def split_path(path: bytes) -> list[str]:
    """
    Split a raw request path (no query) into percent-decoded segments.

    A trailing slash is ignored for matching.

    @raise MalformedPath: for a path that is not absolute, holds a control
        character (below 0x20, or DEL; percent-encoded or not), does not decode as UTF-8, or has C{.} or C{..} segments
        (which an upstream could resolve to a path the gateway did not check).
    """
    if not path.startswith(b"/"):
        raise MalformedPath("the request target must be an absolute path")
    if _CONTROL.search(path) is not None:
        raise MalformedPath("the request path has a control character")
    raw = path[1:].split(b"/")
    if raw and raw[-1] == b"":
        raw.pop()
    segments = []
    for part in raw:
        try:
            if b"%" in part:
                segment = unquote_to_bytes(part).decode("utf-8")
                # (The raw path was checked above; only decoding can add one.)
                if _CONTROL_TEXT.search(segment) is not None:
                    raise MalformedPath("the request path has a control character")
            else:
                segment = part.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedPath("the request path is not valid UTF-8")
        if segment in (".", ".."):
            raise MalformedPath("the request path has a '.' or '..' segment")
        segments.append(segment)
    return segments


def strip_segments(path: bytes, count: int) -> bytes:
    """Remove the first C{count} segments of a raw path, keeping its encoding."""
    if count == 0:
        return path
    parts = path.split(b"/", count + 1)
    # parts[0] is the empty string before the leading slash.
    if len(parts) <= count + 1:
        return b"/"
    return b"/" + parts[count + 1]


class Router(Generic[T]):
    """
    Chooses the most specific pattern that matches a path.

    Ties keep configuration order.
    """

    def __init__(self, entries: Iterable[tuple[PathPattern, T]]) -> None:
        indexed = list(enumerate(entries))
        indexed.sort(key=lambda item: (item[1][0].specificity, -item[0]), reverse=True)
        self._entries = [entry for _, entry in indexed]

    def match(self, segments: Sequence[str]) -> Optional[T]:
        """The value of the best matching pattern, or None."""
        for pattern, value in self._entries:
            if pattern.matches(segments):
                return value
        return None
