"""
Tests for L{aura_proxy.c_extensions}: a C module is used only if the values
it was compiled with equal the Python definitions, and the modules that load
the C code (L{aura_proxy.sse}, L{aura_proxy.fastclient}, the memory resume
log) fall back to Python, saying why, when they differ.

The checks of the real modules run in a fresh interpreter, where the C
module's CONSTANTS can be changed before the Python module imports it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from aura_proxy import c_extensions, client_wire, fastclient, sse
from aura_proxy.c_extensions import NOT_BUILT, load, mismatch

_REQUIRE_C = os.environ.get("AURA_PROXY_REQUIRE_C") == "1"


class MismatchTests(SynchronousTestCase):
    """How compiled-in values are compared with the Python ones."""

    def test_same(self) -> None:
        """Equal values (whatever their order) are no mismatch."""
        self.assertIsNone(mismatch({"A": 1, "B": b"x"}, {"B": b"x", "A": 1}))

    def test_different_value(self) -> None:
        """A differing value is named with both sides."""
        self.assertEqual(
            mismatch({"A": 1, "B": b"x"}, {"A": 2, "B": b"x"}),
            "compiled with A = 1, the Python code has 2",
        )

    def test_missing_and_extra(self) -> None:
        """A value only one side has is a mismatch too, and every difference is listed."""
        self.assertEqual(
            mismatch({"A": 1, "C": 3}, {"A": 1, "B": 2}),
            "compiled without B; compiled with C, which the Python code does not define",
        )

    def test_no_constants(self) -> None:
        """A build without CONSTANTS (older than the check) is a mismatch."""
        self.assertEqual(mismatch(None, {"A": 1}), "built without its CONSTANTS (older than the Python code)")


class LoadTests(SynchronousTestCase):
    """Importing a C module through the check."""

    def test_not_built(self) -> None:
        """A module that cannot be imported is not used: not built."""
        self.assertEqual(load("aura_proxy._no_such_module", {}), (None, NOT_BUILT))

    def test_checked(self) -> None:
        """A built module is returned when its constants match, refused with the reason when not."""
        try:
            from aura_proxy import _sse_stamp
        except ImportError:
            if _REQUIRE_C:
                raise
            self.skipTest("aura_proxy._sse_stamp is not built")
        expected = dict(_sse_stamp.CONSTANTS)
        self.assertEqual(load("aura_proxy._sse_stamp", expected), (_sse_stamp, None))
        expected["MAX_CARRIED_UPSTREAM_ID"] = 95
        module, reason = load("aura_proxy._sse_stamp", expected)
        self.assertIsNone(module)
        assert reason is not None
        self.assertIn("MAX_CARRIED_UPSTREAM_ID = 96, the Python code has 95", reason)
        self.assertIn("rebuild", reason)


class BuiltModulesTests(SynchronousTestCase):
    """The modules built from these sources pass the check."""

    skip = None if _REQUIRE_C else "AURA_PROXY_REQUIRE_C is not set"

    def test_in_use(self) -> None:
        """With the C modules required, sse and fastclient use them: no reason to give."""
        self.assertEqual((sse.C_DISABLED_REASON, fastclient.C_DISABLED_REASON), (None, None))
        self.assertIsNone(client_wire.C_DISABLED_REASON)
        self.assertTrue(client_wire.ACCELERATED)
        self.assertTrue(sse.ACCELERATED)
        self.assertIsNotNone(fastclient._ChunkedReader)


def _import_after(setup: str) -> dict[str, object]:
    """
    In a fresh interpreter: run C{setup} (which changes a C module), import
    sse, fastclient and the resume log, and report what they use.
    """
    code = textwrap.dedent(setup) + textwrap.dedent("""
        import json
        from aura_proxy import client_wire, fastclient, relay, sse
        from aura_proxy.resume import log
        print(json.dumps({
            "relay": relay.ACCELERATED, "writer": client_wire.ACCELERATED,
            "relay_reason": client_wire.C_DISABLED_REASON,
            "sse": sse.ACCELERATED, "sse_reason": sse.C_DISABLED_REASON,
            "store": log._EventStore.__module__,
            "reader": fastclient._ChunkedReader is not None, "reader_reason": fastclient.C_DISABLED_REASON,
        }))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, timeout=60)
    result: dict[str, object] = json.loads(out.stdout)
    return result


class StaleBuildTests(SynchronousTestCase):
    """A C module whose compiled-in values differ from Python's is not used."""

    skip = None if _REQUIRE_C else "AURA_PROXY_REQUIRE_C is not set"

    def test_sse_stamp(self) -> None:
        """A different carried-id limit in _sse_stamp: the Python rewriter and store run, and say why."""
        got = _import_after("""
            from aura_proxy import _sse_stamp
            _sse_stamp.CONSTANTS["MAX_CARRIED_UPSTREAM_ID"] = 64
        """)
        self.assertEqual((got["sse"], got["store"], got["reader"]), (False, "aura_proxy.resume.log", True))
        self.assertIn("MAX_CARRIED_UPSTREAM_ID = 64, the Python code has 96", str(got["sse_reason"]))

    def test_sse_stamp_alphabet(self) -> None:
        """A different base64 alphabet in _sse_stamp is a mismatch too."""
        got = _import_after("""
            from aura_proxy import _sse_stamp
            _sse_stamp.CONSTANTS["BASE64URL_ALPHABET"] = _sse_stamp.CONSTANTS["BASE64URL_ALPHABET"].replace(b"-_", b"+/")
        """)
        self.assertFalse(got["sse"])
        self.assertIn("BASE64URL_ALPHABET", str(got["sse_reason"]))

    def test_chunked_read(self) -> None:
        """A different chunk-size limit in _chunked_read: the Python parser reads everything, and says why."""
        got = _import_after("""
            from aura_proxy import _chunked_read
            _chunked_read.CONSTANTS["MAX_CHUNK_SIZE"] = 2**63 - 1
        """)
        self.assertEqual((got["reader"], got["sse"]), (False, True))
        self.assertIn("MAX_CHUNK_SIZE", str(got["reader_reason"]))

    def test_chunked_read_attributes(self) -> None:
        """A connection attribute the C reader reads that _Connection does not have: not used."""
        got = _import_after("""
            from aura_proxy import _chunked_read
            _chunked_read.CONNECTION_ATTRIBUTES += ("_gone",)
        """)
        self.assertFalse(got["reader"])
        self.assertIn("_gone", str(got["reader_reason"]))

    def test_relay_core_transport_attributes(self) -> None:
        """_relay_core reading other Twisted transport attributes than the seam probes: neither relay nor writer in C."""
        got = _import_after("""
            from aura_proxy import _relay_core
            _relay_core.CONSTANTS["transport_attributes"] += ("_sendBuffer",)
        """)
        self.assertEqual((got["relay"], got["writer"], got["sse"]), (False, False, True))
        self.assertIn("transport_attributes", str(got["relay_reason"]))

    def test_relay_core_older_build(self) -> None:
        """A _relay_core built before the Python side's RELAY_CORE_API (no meter, say): not used."""
        got = _import_after("""
            from aura_proxy import _relay_core
            _relay_core.CONSTANTS["api"] = 1
        """)
        self.assertEqual((got["relay"], got["writer"], got["sse"]), (False, False, True))
        self.assertIn("api", str(got["relay_reason"]))

    def test_disabled_by_environment(self) -> None:
        """AURA_PROXY_DISABLE_C names the C modules to leave unused (or all), with that as the reason."""
        got = _import_after("""
            import os
            os.environ["AURA_PROXY_DISABLE_C"] = "aura_proxy._relay_core, aura_proxy._chunked_read"
        """)
        self.assertEqual((got["relay"], got["reader"], got["sse"]), (False, False, True))
        self.assertEqual(got["relay_reason"], "disabled by AURA_PROXY_DISABLE_C")
        got = _import_after("""
            import os
            os.environ["AURA_PROXY_DISABLE_C"] = "all"
        """)
        self.assertEqual((got["relay"], got["reader"], got["sse"], got["store"]),
                         (False, False, False, "aura_proxy.resume.log"))

    def test_not_built(self) -> None:
        """A C module that cannot be imported: not used, and the reason says not built."""
        got = _import_after("""
            import sys
            sys.modules["aura_proxy._sse_stamp"] = None
            sys.modules["aura_proxy._chunked_read"] = None
        """)
        self.assertEqual((got["sse"], got["reader"]), (False, False))
        self.assertEqual((got["sse_reason"], got["reader_reason"]), (c_extensions.NOT_BUILT, c_extensions.NOT_BUILT))
