"""
L{RedisLimits} as several gateway processes use it: instances on the REAL
Redis at 127.0.0.1:6379, each with its own connection, sharing one key
prefix per test (its keys deleted in cleanup; never FLUSHDB).  And one
pointed at a closed port: counting goes on in the process.
"""

from __future__ import annotations

import socket
import uuid
from typing import Any, Generator

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, maybeDeferred
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from aura_proxy.limits import RedisLimits
from tests.test_resume_log import REDIS_HOST, REDIS_PORT, REDIS_URL, delete_keys, poll, redis_available, sleep


def closed_port() -> int:
    """A local port nobody listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


class SharedTests(TestCase):
    """Two stores ("two workers") on one Redis."""

    timeout = 30

    if not redis_available():
        skip = f"no Redis at {REDIS_HOST}:{REDIS_PORT}"

    def setUp(self) -> None:
        self.prefix = f"aura-proxy-test:limits:{uuid.uuid4().hex}:"
        self.addCleanup(delete_keys, self.prefix)

    @inlineCallbacks
    def store(self, lease: float = 30.0) -> Generator[Any, Any, RedisLimits]:
        limits = RedisLimits(reactor, REDIS_URL, lease, key_prefix=self.prefix)
        limits.start()
        self.addCleanup(limits.stop)
        yield poll(lambda: limits._connection() is not None, "a connection to Redis")
        return limits

    @inlineCallbacks
    def test_streams_shared(self) -> Generator[Any, Any, None]:
        """A tenant's slots are counted across processes; a released one is free for the other."""
        a = yield self.store()
        b = yield self.store()
        _, s1 = yield maybeDeferred(a.open_stream, "t", 2, 0)
        _, s2 = yield maybeDeferred(a.open_stream, "t", 2, 0)
        self.assertIsNotNone(s1)
        self.assertIsNotNone(s2)
        wait, refused = yield maybeDeferred(b.open_stream, "t", 2, 0)
        self.assertEqual((wait, refused), (1.0, None))
        _, other = yield maybeDeferred(b.open_stream, "u", 2, 0)
        self.assertIsNotNone(other)
        s1.release()
        yield sleep(0.05)
        _, s3 = yield maybeDeferred(b.open_stream, "t", 2, 0)
        self.assertIsNotNone(s3)
        self.assertFalse(a.outage or b.outage)

    @inlineCallbacks
    def test_takes_batched(self) -> Generator[Any, Any, None]:
        """
        The first take goes at once; the takes that come while it is in
        flight go together in one more script call; each is answered in order.
        """
        a = yield self.store()
        before = a.round_trips
        streams = [a.open_stream("t", 3, 0) for _ in range(5)]
        tokens = [a.take_token("t", 1.0, 2) for _ in range(3)]
        results = yield DeferredList(streams + tokens, fireOnOneErrback=True)
        self.assertEqual(a.round_trips - before, 2)
        slots = [value[1] for _, value in results[:5]]
        self.assertEqual([slot is not None for slot in slots], [True, True, True, False, False])
        self.assertEqual([value is None for _, value in results[5:]], [True, True, False])

    @inlineCallbacks
    def test_total_shared(self) -> Generator[Any, Any, None]:
        """max_streams_total counts every tenant's streams in every process."""
        a = yield self.store()
        b = yield self.store()
        yield maybeDeferred(a.open_stream, "t", 0, 2)
        yield maybeDeferred(b.open_stream, "u", 0, 2)
        _, refused = yield maybeDeferred(a.open_stream, "v", 0, 2)
        self.assertIsNone(refused)

    @inlineCallbacks
    def test_dead_process_slots_expire(self) -> Generator[Any, Any, None]:
        """
        The slots of a process that stops without releasing them (a crash)
        free themselves once their lease ends; a live process renews its own.
        """
        dead = yield self.store(lease=0.6)
        alive = yield self.store(lease=0.6)
        _, kept = yield maybeDeferred(alive.open_stream, "t", 2, 0)
        _, lost = yield maybeDeferred(dead.open_stream, "t", 2, 0)
        self.assertIsNotNone(kept)
        self.assertIsNotNone(lost)
        yield dead.stop()  # no release: as if it crashed
        _, refused = yield maybeDeferred(alive.open_stream, "t", 2, 0)
        self.assertIsNone(refused)
        yield sleep(1.5)  # more than the lease: the live slot was renewed, the dead one not
        _, again = yield maybeDeferred(alive.open_stream, "t", 2, 0)
        self.assertIsNotNone(again)
        _, third = yield maybeDeferred(alive.open_stream, "t", 2, 0)
        self.assertIsNone(third)

    @inlineCallbacks
    def test_token_bucket_shared(self) -> Generator[Any, Any, None]:
        """A tenant's bucket is one for every process: the burst is shared, then a wait is told."""
        a = yield self.store()
        b = yield self.store()
        self.assertIsNone((yield maybeDeferred(a.take_token, "t", 1.0, 3)))
        self.assertIsNone((yield maybeDeferred(b.take_token, "t", 1.0, 3)))
        self.assertIsNone((yield maybeDeferred(a.take_token, "t", 1.0, 3)))
        wait = yield maybeDeferred(b.take_token, "t", 1.0, 3)
        self.assertIsNotNone(wait)
        self.assertGreater(wait, 0.5)
        self.assertLessEqual(wait, 1.0)
        self.assertIsNone((yield maybeDeferred(b.take_token, "u", 1.0, 3)))

    @inlineCallbacks
    def test_outage_and_back(self) -> Generator[Any, Any, None]:
        """
        While the connection is down the store counts in the process (logged
        once); once it is back it counts in Redis again (logged).
        """
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        a = yield self.store()
        conn = a._connection()
        conn.transport.loseConnection()
        yield poll(lambda: a._connection() is None, "the connection to drop")
        _, local1 = yield maybeDeferred(a.open_stream, "t", 1, 0)
        _, local2 = yield maybeDeferred(a.open_stream, "t", 1, 0)
        self.assertIsNotNone(local1)
        self.assertIsNone(local2)  # counted in the process meanwhile
        self.assertTrue(a.outage)
        yield poll(lambda: a._connection() is not None, "the reconnection", timeout=15)
        _, shared = yield maybeDeferred(a.open_stream, "t", 1, 0)
        self.assertIsNotNone(shared)
        self.assertFalse(a.outage)
        texts = [e.get("log_format", "") for e in events if e.get("log_namespace") == "aura_proxy.limits"]
        self.assertEqual(len([t for t in texts if "cannot answer" in t]), 1)
        self.assertEqual(len([t for t in texts if "again" in t]), 1)


class DownTests(TestCase):
    """A store whose Redis is not there."""

    timeout = 30

    @inlineCallbacks
    def test_counts_in_process(self) -> Generator[Any, Any, None]:
        """
        Pointed at a closed port, a take at start waits for the first
        connection (at most connect_timeout), then every take is answered at
        once from the process's counts.
        """
        limits = RedisLimits(reactor, f"redis://127.0.0.1:{closed_port()}/0", 30.0, connect_timeout=0.5)
        limits.start()
        self.addCleanup(limits.stop)
        first = limits.open_stream("t", 1, 0)
        self.assertIsInstance(first, Deferred)
        wait, slot = yield first
        self.assertIsNotNone(slot)
        self.assertEqual(limits.open_stream("t", 1, 0), (1.0, None))
        self.assertIsNone(limits.take_token("t", 1.0, 1))
        self.assertTrue(limits.outage)
        slot.release()
        self.assertEqual(limits.open_streams(), 0)
