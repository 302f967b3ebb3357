"""Request ids: version 7 UUIDs, time-ordered and unique."""

from __future__ import annotations

import os
import uuid

from twisted.trial.unittest import SynchronousTestCase

from aura_proxy import request_ids
from aura_proxy.request_ids import new_request_id


class RequestIdTests(SynchronousTestCase):
    """L{new_request_id}."""

    def test_canonical_version_7(self) -> None:
        """An id is a canonical lower-case UUID text of version 7, RFC 9562 variant."""
        for _ in range(200):
            text = new_request_id()
            parsed = uuid.UUID(text)
            self.assertEqual(str(parsed), text)
            self.assertEqual(parsed.version, 7)
            self.assertEqual(parsed.variant, uuid.RFC_4122)

    def test_leading_milliseconds(self) -> None:
        """The first 48 bits are the Unix time in milliseconds at creation."""
        self.patch(request_ids, "time_ns", lambda: 1_764_144_000_123_456_789)
        parsed = uuid.UUID(new_request_id())
        self.assertEqual(parsed.int >> 80, 1_764_144_000_123)

    def test_ordered_by_time(self) -> None:
        """Ids made in later milliseconds sort after earlier ones, as text too."""
        ids = []
        for ms in (1_700_000_000_000, 1_700_000_000_001, 1_700_000_001_000, 1_800_000_000_000):
            self.patch(request_ids, "time_ns", lambda ms=ms: ms * 1_000_000)
            ids.append(new_request_id())
        self.assertEqual(sorted(ids), ids)

    def test_unique_within_a_millisecond(self) -> None:
        """Ids made in the same millisecond still differ: 74 bits are random."""
        self.patch(request_ids, "time_ns", lambda: 1_700_000_000_000_000_000)
        ids = {new_request_id() for _ in range(20_000)}
        self.assertEqual(len(ids), 20_000)

    def test_random_bits_placed(self) -> None:
        """The 74 random bits fill every bit but the time, version and variant ones."""
        self.patch(request_ids, "time_ns", lambda: 0)
        self.patch(request_ids, "getrandbits", lambda n: (1 << n) - 1)
        ones = uuid.UUID(new_request_id()).int
        self.patch(request_ids, "getrandbits", lambda n: 0)
        zeros = uuid.UUID(new_request_id()).int
        self.assertEqual(ones ^ zeros, (1 << 76) - 1 & ~(0xF << 76) & ~(0b11 << 62) | 0xFFF << 64)
        self.assertEqual(bin(ones ^ zeros).count("1"), 74)

    def test_forked_child_differs(self) -> None:
        """A forked worker does not repeat its parent's random bits."""
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.write(write, new_request_id().encode())
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        child = os.read(read, 100).decode()
        os.close(read)
        self.patch(request_ids, "time_ns", lambda: 0)
        self.assertNotEqual(child[15:], new_request_id()[15:])
