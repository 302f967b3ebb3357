"""Tests for L{aura_proxy.routes}: patterns, the most specific match, prefixes."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from aura_proxy.routes import MalformedPath, PathPattern, PatternError, Router, split_path, strip_segments


def router(*patterns: str) -> Router[str]:
    return Router((PathPattern.parse(p), p) for p in patterns)


class PatternTests(TestCase):
    """Pattern syntax and matching."""

    def test_double_star_matches_any_rest(self) -> None:
        """C{/api/aura/**} matches its prefix itself and anything below it."""
        p = PathPattern.parse("/api/aura/**")
        for path in (b"/api/aura", b"/api/aura/", b"/api/aura/chat", b"/api/aura/a/b/c"):
            self.assertTrue(p.matches(split_path(path)), path)
        for path in (b"/api", b"/api/auras/x", b"/x/api/aura"):
            self.assertFalse(p.matches(split_path(path)), path)

    def test_star_matches_one_segment(self) -> None:
        """C{*} matches exactly one segment."""
        p = PathPattern.parse("/api/*/health")
        self.assertTrue(p.matches(split_path(b"/api/aura/health")))
        self.assertFalse(p.matches(split_path(b"/api/health")))
        self.assertFalse(p.matches(split_path(b"/api/a/b/health")))

    def test_invalid_patterns(self) -> None:
        """Relative patterns and partial wildcards are refused."""
        for text in ("api/x", "/a/**/b", "/a/b*"):
            self.assertRaises(PatternError, PathPattern.parse, text)

    def test_percent_decoded_matching(self) -> None:
        """Segments are compared decoded, so an encoded literal still routes."""
        self.assertTrue(PathPattern.parse("/api/aura/**").matches(split_path(b"/api/%61ura/x")))


class RouterTests(TestCase):
    """The most specific route wins."""

    def test_longest_literal_prefix_wins(self) -> None:
        """A deeper literal pattern beats a shallower one, whatever the order."""
        r = router("/api/**", "/api/aura/**", "/**")
        self.assertEqual(r.match(split_path(b"/api/aura/chat")), "/api/aura/**")
        self.assertEqual(r.match(split_path(b"/api/other")), "/api/**")
        self.assertEqual(r.match(split_path(b"/static/x")), "/**")

    def test_literal_beats_star(self) -> None:
        """A literal segment beats C{*}, and C{*} beats C{**}."""
        r = router("/api/**", "/api/*/x", "/api/aura/x")
        self.assertEqual(r.match(split_path(b"/api/aura/x")), "/api/aura/x")
        self.assertEqual(r.match(split_path(b"/api/other/x")), "/api/*/x")
        self.assertEqual(r.match(split_path(b"/api/other/y")), "/api/**")

    def test_no_match(self) -> None:
        """A path no pattern matches gives None."""
        self.assertIsNone(router("/api/aura/**").match(split_path(b"/api/auth")))


class PathTests(TestCase):
    """Splitting and stripping raw request paths."""

    def test_dot_segments_refused(self) -> None:
        """C{.} and C{..} segments, plain or encoded, are malformed."""
        for path in (b"/api/monitoring/../aura/x", b"/a/./b", b"/a/%2e%2e/b"):
            self.assertRaises(MalformedPath, split_path, path)

    def test_relative_and_invalid_paths_refused(self) -> None:
        """A target that is not an absolute path, or not UTF-8, is malformed."""
        self.assertRaises(MalformedPath, split_path, b"http://x/y")
        self.assertRaises(MalformedPath, split_path, b"/a/%ff")
        self.assertRaises(MalformedPath, split_path, b"/a/%00")

    def test_control_characters_refused(self) -> None:
        """
        Every control character (below 0x20, and DEL) is refused, percent-encoded
        or raw, in any segment; a tab too. Printable and UTF-8 segments pass.
        """
        for path in (b"/api/aura/a%01b", b"/api/aura/a%1Fb", b"/api/aura/a%7fb", b"/api/a%09/x",
                     b"/api/aura/a\x01b", b"/api/aura/a\x7fb", b"/api/aura/%0d%0a"):
            with self.assertRaises(MalformedPath, msg=repr(path)) as caught:
                split_path(path)
            self.assertIn("control character", str(caught.exception))
        self.assertEqual(split_path(b"/api/aura/a%20b/%C3%A9~"), ["api", "aura", "a b", "\xe9~"])

    def test_strip_prefix(self) -> None:
        """strip_prefix removes leading segments and keeps the rest's encoding."""
        self.assertEqual(strip_segments(b"/api/aura/chat/x%20y", 2), b"/chat/x%20y")
        self.assertEqual(strip_segments(b"/api/aura", 2), b"/")
        self.assertEqual(strip_segments(b"/api/aura/", 2), b"/")
        self.assertEqual(strip_segments(b"/api/aura/x", 0), b"/api/aura/x")
        self.assertEqual(strip_segments(b"/a", 5), b"/")
