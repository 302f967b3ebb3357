"""
L{RedisResumeLog} as several gateways use it: two instances ("gateway A" and
"gateway B") on the REAL Redis at 127.0.0.1:6379, each with its own
connections, sharing one key prefix (deleted in cleanup).  Also a rough
measurement of what C{append} costs the writing gateway (printed, not
asserted).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Generator

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from aura_proxy.resume.log import MemoryResumeLog
from aura_proxy.resume.log import FOREIGN
from aura_proxy.resume.redis import RedisResumeLog
from tests.test_resume_log import (
    REDIS_HOST,
    REDIS_PORT,
    REDIS_URL,
    Collector,
    block,
    delete_keys,
    poll,
    redis_available,
    sleep,
)


class TwoGatewaysTests(TestCase):
    """A stream written through gateway A, resumed through gateway B."""

    timeout = 30

    if not redis_available():
        skip = f"no Redis at {REDIS_HOST}:{REDIS_PORT}"

    def setUp(self) -> None:
        self.prefix = f"aura-proxy-test:{uuid.uuid4().hex}:"
        self.addCleanup(delete_keys, self.prefix)

    @inlineCallbacks
    def gateway(self, **kw: Any) -> Generator[Any, Any, Any]:
        log = RedisResumeLog(
            reactor, REDIS_URL, kw.pop("ttl", 30.0), kw.pop("max_events", 1000),
            kw.pop("max_bytes", 1 << 20), key_prefix=self.prefix, block_ms=200, **kw,
        )
        self.addCleanup(log.stop)
        yield log.start()
        return log

    @inlineCallbacks
    def test_resume_on_another_gateway(self) -> Generator[Any, Any, None]:
        """
        A client of gateway A that reconnects to gateway B mid-stream gets,
        from B, the events it missed, then the live events A keeps writing,
        then the end, each exactly once and in order; another tenant gets
        None from B.
        """
        a = yield self.gateway()
        b = yield self.gateway()
        a.open("s1", "tenant")
        for seq in range(1, 6):
            a.append("s1", seq, block(seq))
        yield a.flushed()

        self.assertIs((yield b.attach("s1", "other-tenant", 2, Collector())), FOREIGN)
        sub = Collector()
        att = yield b.attach("s1", "tenant", 2, sub)
        self.assertIsNotNone(att)
        self.assertEqual(sub.seqs, [3, 4, 5])

        for seq in range(6, 9):
            a.append("s1", seq, block(seq))
            yield sleep(0.01)
        yield poll(lambda: sub.seqs[-1:] == [8], "live events through B")
        a.append("s1", 9, block(9))
        a.close("s1")
        yield poll(lambda: sub.ends == 1, "the end through B")
        yield sleep(0.1)
        self.assertEqual(sub.events, [(s, block(s)) for s in range(3, 10)])
        self.assertEqual(sub.ends, 1)

    @inlineCallbacks
    def test_append_cost(self) -> Generator[Any, Any, None]:
        """
        Measures (prints, does not assert) the cost of append for 100k events
        over 1000 open streams, 1000 appends per reactor turn, flushes
        included; the only assertion is that every event reached Redis
        (nothing dropped, the last event of every stream is replayable).
        """
        log = yield self.gateway(max_events=50)
        streams = [f"s{i}" for i in range(1000)]
        payload = b"id: x\ndata: " + b"x" * 180 + b"\n\n"  # ~200-byte SSE event
        for sid in streams:
            log.open(sid, "t")
        yield log.flushed()

        append_cpu = 0.0
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for seq in range(1, 101):
            t = time.process_time()
            for sid in streams:
                log.append(sid, seq, payload)
            append_cpu += time.process_time() - t
            yield sleep(0)  # the turn ends: one flush
        yield log.flushed()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        n = 100 * len(streams)

        memory = MemoryResumeLog(reactor, 30.0, 50, 1 << 20)
        for sid in streams:
            memory.open(sid, "t")
        t = time.process_time()
        for seq in range(1, 101):
            for sid in streams:
                memory.append(sid, seq, payload)
        memory_cpu = time.process_time() - t
        yield memory.stop()

        print(
            f"\nRedisResumeLog.append, {n} events over {len(streams)} streams, "
            f"{log.flushes} flush round trips in all:\n"
            f"  append() call alone:         {append_cpu / n * 1e6:6.2f} us/event (CPU)\n"
            f"  gateway CPU incl. flushes:   {cpu / n * 1e6:6.2f} us/event\n"
            f"  wall until Redis acked all:  {wall / n * 1e6:6.2f} us/event\n"
            f"  (MemoryResumeLog.append:     {memory_cpu / n * 1e6:6.2f} us/event)"
        )
        self.assertEqual(log.dropped, 0)
        sub = Collector()
        att = yield log.attach("s999", "t", 99, sub)
        self.assertEqual(sub.seqs, [100])
        att.detach()
        self.assertIsNone((yield log.attach("s999", "t", 1, Collector())))  # trimmed to 50
