"""
The L{aura_proxy.resume.log.ResumeLog} contract, run against
L{MemoryResumeLog} (on a L{Clock}) and against L{RedisResumeLog} on the REAL
Redis at 127.0.0.1:6379 (each test with its own key prefix, deleted in
cleanup; skipped when Redis is not reachable).

Each contract test is written once in L{ResumeLogContract}; the two classes at
the bottom supply the log, the passing of time and the waiting.  With the
memory log everything is synchronous; with Redis every wait polls with a
bound (L{WAIT} seconds) and fails the test rather than hang.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Any, Callable, Generator, List, Tuple

import txredisapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from aura_proxy.resume import log as log_module
from aura_proxy.resume.log import FOREIGN, MemoryResumeLog
from aura_proxy.resume.redis import RedisResumeLog

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
WAIT = 5.0


def redis_available() -> bool:
    try:
        socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=0.5).close()
    except OSError:
        return False
    return True


class Collector:
    """A subscriber that records what it is given."""

    def __init__(self) -> None:
        self.events: List[Tuple[int, bytes]] = []
        self.ends = 0

    def replay_event(self, seq: int, block: bytes) -> None:
        assert not self.ends, "event after the end"
        self.events.append((seq, block))

    def replay_end(self) -> None:
        self.ends += 1

    @property
    def seqs(self) -> List[int]:
        return [seq for seq, _ in self.events]


def crash(log: RedisResumeLog) -> None:
    """Make C{log}'s gateway die: its timers stop and its connection drops, nothing more is written."""
    log._stopped = True
    for call in (log._sweep_call, log._renew_call, log._flush_call):
        if call is not None and call.active():
            call.cancel()
    log._factory.continueTrying = False
    for conn in log._factory.pool:
        conn.transport.abortConnection()


def block(seq: int) -> bytes:
    return b"id: S/%d\ndata: {\"n\": %d}\n\n" % (seq, seq)


def sleep(seconds: float) -> "Deferred[None]":
    return deferLater(reactor, seconds, lambda: None)


@inlineCallbacks
def poll(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> Generator[Any, Any, None]:
    """Wait (really) until C{predicate()} holds, failing after C{timeout} s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        yield sleep(0.01)


@inlineCallbacks
def delete_keys(prefix: str) -> Generator[Any, Any, None]:
    """Delete every key under C{prefix} (test cleanup)."""
    conn = yield txredisapi.Connection(REDIS_HOST, REDIS_PORT, dbid=0, reconnect=False)
    try:
        keys = yield conn.keys(prefix + "*")
        if keys:
            yield conn.delete(keys)
    finally:
        yield conn.disconnect()


class ResumeLogContract:
    """
    The behaviour every ResumeLog has.  Subclasses provide:

      - C{make_log(ttl, max_events, max_bytes)} -> Deferred firing with a started log
      - C{settle()} -> Deferred firing once what was written can be read back
      - C{until(predicate, what)} -> Deferred firing once C{predicate()} holds
      - C{quiet()} -> Deferred firing after anything still due would have arrived
      - C{expire(log, stream_id, owner)} -> Deferred firing once the TTL has
        passed and the stream is gone (attach gives None)
    """

    TTL = 1.0

    make_log: Callable[..., "Deferred[Any]"]
    settle: Callable[[Any], "Deferred[Any]"]
    until: Callable[[Callable[[], bool], str], "Deferred[Any]"]
    quiet: Callable[[], "Deferred[Any]"]
    expire: Callable[[Any, str, str], "Deferred[Any]"]
    assertEqual: Callable[..., None]
    assertIsNone: Callable[..., None]
    assertIsNotNone: Callable[..., None]

    @inlineCallbacks
    def _stream(self, n: int, log: Any = None, stream_id: str = "s1", owner: str = "t1",
                **limits: int) -> Generator[Any, Any, Any]:
        if log is None:
            log = yield self.make_log(**limits)
        log.open(stream_id, owner)
        for seq in range(1, n + 1):
            log.append(stream_id, seq, block(seq))
        yield self.settle(log)
        return log

    @inlineCallbacks
    def test_replay_after_seq(self) -> Generator[Any, Any, None]:
        """Attaching after seq 2 of 5 delivers exactly events 3, 4, 5 with their bytes, in order, and no end."""
        log = yield self._stream(5)
        sub = Collector()
        att = yield log.attach("s1", "t1", 2, sub)
        self.assertIsNotNone(att)
        self.assertEqual(sub.events, [(s, block(s)) for s in (3, 4, 5)])
        self.assertEqual(sub.ends, 0)
        att.detach()

    @inlineCallbacks
    def test_attach_at_last_seq(self) -> Generator[Any, Any, None]:
        """Attaching after the last event is accepted and delivers nothing until more comes."""
        log = yield self._stream(3)
        sub = Collector()
        att = yield log.attach("s1", "t1", 3, sub)
        self.assertIsNotNone(att)
        log.append("s1", 4, block(4))
        yield self.until(lambda: sub.seqs == [4], "event 4")
        self.assertEqual(sub.events, [(4, block(4))])
        att.detach()

    @inlineCallbacks
    def test_live_tail(self) -> Generator[Any, Any, None]:
        """Events appended after attaching reach the subscriber after the replay, in order, with no duplicate."""
        log = yield self._stream(2)
        sub = Collector()
        att = yield log.attach("s1", "t1", 0, sub)
        for seq in range(3, 21):
            log.append("s1", seq, block(seq))
        yield self.until(lambda: len(sub.seqs) >= 20, "20 events")
        yield self.quiet()
        self.assertEqual(sub.events, [(s, block(s)) for s in range(1, 21)])
        self.assertEqual(sub.ends, 0)
        att.detach()

    @inlineCallbacks
    def test_appender_is_append(self) -> Generator[Any, Any, None]:
        """
        A stream's appender stores events and feeds live subscribers exactly
        as append does, and is ignored once the stream is closed.
        """
        log = yield self.make_log()
        log.open("s1", "t1")
        add = log.appender("s1")
        for seq in (1, 2):
            add(seq, block(seq))
        yield self.settle(log)
        sub = Collector()
        att = yield log.attach("s1", "t1", 0, sub)
        add(3, block(3))
        yield self.until(lambda: sub.seqs == [1, 2, 3], "events 1-3")
        log.close("s1")
        add(4, block(4))
        yield self.until(lambda: sub.ends > 0, "the end")
        yield self.quiet()
        self.assertEqual(sub.events, [(s, block(s)) for s in (1, 2, 3)])
        att.detach()

    @inlineCallbacks
    def test_end_delivered_live(self) -> Generator[Any, Any, None]:
        """Closing the stream delivers replay_end once, after every event, to a live subscriber."""
        log = yield self._stream(2)
        sub = Collector()
        yield log.attach("s1", "t1", 1, sub)
        log.append("s1", 3, block(3))
        log.close("s1")
        yield self.until(lambda: sub.ends > 0, "the end")
        yield self.quiet()
        self.assertEqual(sub.seqs, [2, 3])
        self.assertEqual(sub.ends, 1)

    @inlineCallbacks
    def test_end_delivered_on_ended_stream(self) -> Generator[Any, Any, None]:
        """Attaching to a stream that has ended replays the events after after_seq, then replay_end, at once."""
        log = yield self._stream(4)
        log.close("s1")
        yield self.settle(log)
        sub = Collector()
        att = yield log.attach("s1", "t1", 2, sub)
        self.assertIsNotNone(att)
        self.assertEqual((sub.seqs, sub.ends), ([3, 4], 1))
        att.detach()  # harmless

    @inlineCallbacks
    def test_ended_empty_stream(self) -> Generator[Any, Any, None]:
        """A stream closed without any event is attachable after 0 and gives just the end."""
        log = yield self._stream(0)
        log.close("s1")
        yield self.settle(log)
        sub = Collector()
        att = yield log.attach("s1", "t1", 0, sub)
        self.assertIsNotNone(att)
        self.assertEqual((sub.seqs, sub.ends), ([], 1))

    @inlineCallbacks
    def test_owner_mismatch(self) -> Generator[Any, Any, None]:
        """Another owner's attach fires FOREIGN and delivers nothing."""
        log = yield self._stream(3)
        sub = Collector()
        att = yield log.attach("s1", "intruder", 0, sub)
        self.assertIs(att, FOREIGN)
        self.assertEqual((sub.events, sub.ends), ([], 0))

    @inlineCallbacks
    def test_unknown_stream(self) -> Generator[Any, Any, None]:
        """An unknown stream id fires None and delivers nothing."""
        log = yield self.make_log()
        sub = Collector()
        att = yield log.attach("nope", "t1", 0, sub)
        self.assertIsNone(att)
        self.assertEqual((sub.events, sub.ends), ([], 0))

    @inlineCallbacks
    def test_after_seq_beyond_last(self) -> Generator[Any, Any, None]:
        """An after_seq past the last event (an id the log never had) fires None."""
        log = yield self._stream(3)
        sub = Collector()
        self.assertIsNone((yield log.attach("s1", "t1", 4, sub)))
        self.assertEqual(sub.events, [])

    @inlineCallbacks
    def test_evicted_by_max_events(self) -> Generator[Any, Any, None]:
        """With max_events=3 and 10 events only 8..10 are kept: after 6 (needs 7) or 0 is None; after 7 gives 8, 9, 10."""
        log = yield self._stream(10, max_events=3)
        for after in (0, 6):
            sub = Collector()
            self.assertIsNone((yield log.attach("s1", "t1", after, sub)))
            self.assertEqual(sub.events, [])
        sub = Collector()
        att = yield log.attach("s1", "t1", 7, sub)
        self.assertEqual(sub.seqs, [8, 9, 10])
        att.detach()

    @inlineCallbacks
    def test_evicted_by_max_bytes(self) -> Generator[Any, Any, None]:
        """max_bytes keeps only the newest events that fit (at least one): attach before the kept range is None."""
        size = len(block(1))
        log = yield self._stream(6, max_bytes=2 * size + 1)
        sub = Collector()
        self.assertIsNone((yield log.attach("s1", "t1", 3, sub)))
        att = yield log.attach("s1", "t1", 4, sub)
        self.assertEqual(sub.seqs, [5, 6])
        att.detach()

    @inlineCallbacks
    def test_oversized_event_kept(self) -> Generator[Any, Any, None]:
        """An event larger than max_bytes is still kept (alone), so the newest event is always replayable."""
        log = yield self._stream(3, max_bytes=4)
        sub = Collector()
        self.assertIsNone((yield log.attach("s1", "t1", 1, sub)))
        att = yield log.attach("s1", "t1", 2, sub)
        self.assertEqual(sub.seqs, [3])
        att.detach()

    @inlineCallbacks
    def test_gone_after_ttl(self) -> Generator[Any, Any, None]:
        """A closed stream is replayable at first, and gone (attach None) once the TTL has passed."""
        log = yield self._stream(2)
        log.close("s1")
        yield self.settle(log)
        sub = Collector()
        self.assertIsNotNone((yield log.attach("s1", "t1", 0, sub)))
        yield self.expire(log, "s1", "t1")
        sub = Collector()
        self.assertIsNone((yield log.attach("s1", "t1", 0, sub)))
        self.assertEqual(sub.events, [])

    @inlineCallbacks
    def test_open_stream_outlives_ttl(self) -> Generator[Any, Any, None]:
        """An open stream that stays quiet for longer than the TTL is still resumable (only ended ones expire)."""
        log = yield self._stream(2)
        yield self.idle(2.5 * self.TTL)
        sub = Collector()
        att = yield log.attach("s1", "t1", 1, sub)
        self.assertIsNotNone(att)
        self.assertEqual(sub.seqs, [2])
        att.detach()

    @inlineCallbacks
    def test_abandon_forgets_and_ends_followers(self) -> Generator[Any, Any, None]:
        """
        An abandoned stream (ended early) ends its live subscribers and is no
        longer attachable, so a resume goes upstream instead.
        """
        log = yield self._stream(2)
        sub = Collector()
        yield log.attach("s1", "t1", 0, sub)
        log.abandon("s1")
        yield self.until(lambda: sub.ends == 1, "the follower's end")
        yield self.settle(log)
        late = Collector()
        result = yield log.attach("s1", "t1", 0, late)
        self.assertIsNone(result)
        self.assertEqual(late.seqs, [])

    @inlineCallbacks
    def test_detach_stops_delivery(self) -> Generator[Any, Any, None]:
        """After detach() the subscriber gets no more events and no end, while other subscribers do."""
        log = yield self._stream(2)
        sub = Collector()
        att = yield log.attach("s1", "t1", 0, sub)
        att.detach()
        log.append("s1", 3, block(3))
        log.close("s1")
        witness = Collector()
        yield self.settle(log)
        yield log.attach("s1", "t1", 0, witness)
        yield self.until(lambda: witness.ends == 1, "the witness's end")
        yield self.quiet()
        self.assertEqual(witness.seqs, [1, 2, 3])
        self.assertEqual((sub.seqs, sub.ends), ([1, 2], 0))

    @inlineCallbacks
    def test_reopen_replaces(self) -> Generator[Any, Any, None]:
        """Opening a stream id again starts a new stream: the old events and owner are gone."""
        log = yield self._stream(5)
        log.open("s1", "t2")
        log.append("s1", 1, b"new\n\n")
        yield self.settle(log)
        self.assertIs((yield log.attach("s1", "t1", 0, Collector())), FOREIGN)
        sub = Collector()
        att = yield log.attach("s1", "t2", 0, sub)
        self.assertEqual(sub.events, [(1, b"new\n\n")])
        att.detach()

    @inlineCallbacks
    def test_streams_independent(self) -> Generator[Any, Any, None]:
        """Interleaved appends to several streams keep each stream's own events and order."""
        log = yield self.make_log()
        for sid in ("a", "b", "c"):
            log.open(sid, "t")
        for seq in range(1, 6):
            for sid in ("a", "b", "c"):
                log.append(sid, seq, sid.encode() + block(seq))
        yield self.settle(log)
        for sid in ("a", "b", "c"):
            sub = Collector()
            att = yield log.attach(sid, "t", 0, sub)
            self.assertEqual(sub.events, [(s, sid.encode() + block(s)) for s in range(1, 6)])
            att.detach()


class MemoryResumeLogTests(ResumeLogContract, TestCase):
    """The contract on L{MemoryResumeLog}, with a fake clock."""

    accelerate = True

    def setUp(self) -> None:
        self.clock = Clock()

    def make_log(self, max_events: int = 100, max_bytes: int = 1 << 20) -> "Deferred[Any]":
        log = MemoryResumeLog(self.clock, self.TTL, max_events, max_bytes, accelerate=self.accelerate)
        self.addCleanup(log.stop)
        return succeed(log)

    def test_store_kind(self) -> None:
        """Streams are kept in the C store with accelerate (where built), else in the Python one."""
        log = MemoryResumeLog(self.clock, self.TTL, 10, 1000, accelerate=self.accelerate)
        log.open("s1", "t")
        store = type(log._streams["s1"]).__mro__[1]
        python = store is log_module._PyEventStore
        self.assertEqual(python, not (self.accelerate and log_module._EventStore is not log_module._PyEventStore))
        if os.environ.get("AURA_PROXY_REQUIRE_C") and self.accelerate:
            self.assertFalse(python)

    def settle(self, log: Any) -> "Deferred[None]":
        return succeed(None)

    def until(self, predicate: Callable[[], bool], what: str) -> "Deferred[None]":
        assert predicate(), f"not yet: {what}"
        return succeed(None)

    def quiet(self) -> "Deferred[None]":
        return succeed(None)

    def idle(self, seconds: float) -> "Deferred[None]":
        self.clock.advance(seconds)
        return succeed(None)

    def expire(self, log: Any, stream_id: str, owner: str) -> "Deferred[None]":
        self.clock.advance(self.TTL)
        return succeed(None)


class PythonMemoryResumeLogTests(MemoryResumeLogTests):
    """The contract on L{MemoryResumeLog} with C{accelerate=False} (C{fast_path = off}): the Python store."""

    accelerate = False


class RedisResumeLogTests(ResumeLogContract, TestCase):
    """The contract on L{RedisResumeLog}, on the real Redis and reactor."""

    timeout = 20

    if not redis_available():
        skip = f"no Redis at {REDIS_HOST}:{REDIS_PORT}"

    def setUp(self) -> None:
        self.prefix = f"aura-proxy-test:{uuid.uuid4().hex}:"
        self.addCleanup(delete_keys, self.prefix)

    def new_log(self, max_events: int = 100, max_bytes: int = 1 << 20, **kw: Any) -> RedisResumeLog:
        kw.setdefault("key_prefix", self.prefix)
        kw.setdefault("block_ms", 200)
        log = RedisResumeLog(reactor, kw.pop("url", REDIS_URL), self.TTL, max_events, max_bytes, **kw)
        self.addCleanup(log.stop)
        return log

    @inlineCallbacks
    def make_log(self, max_events: int = 100, max_bytes: int = 1 << 20) -> Generator[Any, Any, Any]:
        log = self.new_log(max_events, max_bytes)
        yield log.start()
        return log

    def settle(self, log: Any) -> "Deferred[None]":
        return log.flushed()

    def until(self, predicate: Callable[[], bool], what: str) -> "Deferred[None]":
        return poll(predicate, what)

    def quiet(self) -> "Deferred[None]":
        return sleep(0.1)

    def idle(self, seconds: float) -> "Deferred[None]":
        return sleep(seconds)

    @inlineCallbacks
    def expire(self, log: Any, stream_id: str, owner: str) -> Generator[Any, Any, None]:
        gone = [False]

        @inlineCallbacks
        def check() -> Generator[Any, Any, None]:
            gone[0] = (yield log.attach(stream_id, owner, 0, Collector())) is None

        deadline = time.monotonic() + self.TTL + WAIT
        while True:
            yield check()
            if gone[0]:
                return
            if time.monotonic() > deadline:
                raise AssertionError("stream still there long after its TTL")
            yield sleep(0.1)

    # -- Redis only ----------------------------------------------------------------

    @inlineCallbacks
    def test_abandoned_stream_expires(self) -> Generator[Any, Any, None]:
        """
        The keys of a stream whose gateway died (never closed, no more
        refreshes) disappear on their own, about 1.5 TTL after the last write,
        and a follower then gets replay_end (its client reconnects and gets
        None: a fresh request).
        """
        writer = yield self.make_log()
        reader = yield self.make_log()
        yield self._stream(2, log=writer)
        sub = Collector()
        self.assertIsNotNone((yield reader.attach("s1", "t1", 0, sub)))
        started = time.monotonic()
        crash(writer)  # the writing gateway dies: no close, no refresh, no release
        yield poll(lambda: sub.ends == 1, "the follower's end", timeout=1.5 * self.TTL + WAIT)
        self.assertGreaterEqual(time.monotonic() - started, self.TTL)
        self.assertEqual(sub.seqs, [1, 2])
        self.assertIsNone((yield reader.attach("s1", "t1", 0, Collector())))

    @inlineCallbacks
    def test_redis_down(self) -> Generator[Any, Any, None]:
        """
        With Redis unreachable, start() still fires (after connect_timeout),
        append/open/close neither raise nor wait, the lost events are counted,
        and attach fires None.
        """
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # nothing listens there now
        log = self.new_log(url=f"redis://127.0.0.1:{port}/0", connect_timeout=0.3)
        started = time.monotonic()
        yield log.start()
        self.assertLess(time.monotonic() - started, 2.0)
        log.open("s1", "t1")
        for seq in range(1, 11):
            log.append("s1", seq, block(seq))
        log.close("s1")
        yield sleep(0)
        yield sleep(0)
        self.assertEqual(log.dropped, 10)
        self.assertIsNone((yield log.attach("s1", "t1", 0, Collector())))

    @inlineCallbacks
    def test_append_never_waits(self) -> Generator[Any, Any, None]:
        """
        append() only buffers: nothing is sent until the reactor turn ends,
        and a whole turn of appends to many streams goes out as one write.
        """
        log = yield self.make_log()
        before = log.flushes
        for sid in range(50):
            log.open(f"s{sid}", "t")
            for seq in range(1, 11):
                log.append(f"s{sid}", seq, block(seq))
        self.assertEqual(log.flushes, before)
        yield log.flushed()
        self.assertEqual(log.flushes, before + 1)
        sub = Collector()
        att = yield log.attach("s49", "t", 0, sub)
        self.assertEqual(sub.seqs, list(range(1, 11)))
        att.detach()

    @inlineCallbacks
    def test_lost_batch_leaves_no_gap(self) -> Generator[Any, Any, None]:
        """
        A batch Redis did not take (a write error) is dropped and counted, and
        the stream is trimmed past it on the next write: attaching before the
        lost events gives None (never a replay with a hole), after them works.
        """
        log = yield self.make_log()
        yield self._stream(2, log=log)

        class Failing:
            def execute_command(self, *args: Any, **kw: Any) -> "Deferred[Any]":
                return fail(txredisapi.ConnectionError("boom"))

        log._connection = lambda: Failing()  # type: ignore[method-assign]
        log.append("s1", 3, block(3))
        log.append("s1", 4, block(4))
        yield log.flushed()
        self.assertEqual(log.dropped, 2)
        del log._connection
        log.append("s1", 5, block(5))
        log.append("s1", 6, block(6))
        yield log.flushed()
        for after in (0, 2, 3):
            self.assertIsNone((yield log.attach("s1", "t1", after, Collector())))
        sub = Collector()
        att = yield log.attach("s1", "t1", 4, sub)
        self.assertEqual(sub.seqs, [5, 6])
        att.detach()

    @inlineCallbacks
    def test_script_cache_flushed(self) -> Generator[Any, Any, None]:
        """
        After SCRIPT FLUSH (as after a Redis failover) the batch that hit
        NOSCRIPT is dropped, the scripts are loaded again, and later writes
        and attaches work.
        """
        log = yield self.make_log()
        yield self._stream(1, log=log)
        conn = yield txredisapi.Connection(REDIS_HOST, REDIS_PORT, dbid=0, reconnect=False)
        yield conn.script_flush()
        yield conn.disconnect()
        log.append("s1", 2, block(2))
        yield log.flushed()
        self.assertEqual(log.dropped, 1)
        log.append("s1", 3, block(3))
        yield log.flushed()
        sub = Collector()
        att = yield log.attach("s1", "t1", 2, sub)
        self.assertEqual(sub.seqs, [3])
        att.detach()

    # -- takeover: the writing instance's lease ---------------------------------------

    @inlineCallbacks
    def test_cut_stream_replays_then_refuses(self) -> Generator[Any, Any, None]:
        """
        A stream cut by its instance's shutdown keeps its log: an attachment
        after seq 1 gets events 2 and 3 and then replay_cut (not replay_end);
        an attachment after the last event is refused (None), so the request
        goes upstream with the upstream's own id.
        """
        writer = yield self._stream(3)
        writer.cut("s1")
        yield writer.flushed()
        reader = yield self.make_log()
        sub = CutCollector()
        self.assertIsNotNone((yield reader.attach("s1", "t1", 1, sub)))
        self.assertEqual((sub.seqs, sub.cuts, sub.ends), ([2, 3], 1, 0))
        self.assertIsNone((yield reader.attach("s1", "t1", 3, CutCollector())))
        self.assertIs((yield reader.attach("s1", "t2", 1, CutCollector())), FOREIGN)

    @inlineCallbacks
    def test_clean_stop_cuts_followers_at_once(self) -> Generator[Any, Any, None]:
        """
        A follower of a stream whose instance stops cleanly (its lease
        released) ends cut short at its next blocking-read timeout, long
        before the lease would have expired, having got every event.
        """
        writer = self.new_log(lease_ttl=30.0)
        yield writer.start()
        yield self._stream(2, log=writer)
        reader = yield self.make_log()
        sub = CutCollector()
        self.assertIsNotNone((yield reader.attach("s1", "t1", 0, sub)))
        writer.append("s1", 3, block(3))
        yield writer.flushed()
        started = time.monotonic()
        yield writer.stop()
        yield poll(lambda: sub.cuts == 1, "the follower's cut end")
        self.assertLess(time.monotonic() - started, 5.0)
        self.assertEqual((sub.seqs, sub.ends), ([1, 2, 3], 0))
        self.assertIsNone((yield reader.attach("s1", "t1", 3, CutCollector())))

    @inlineCallbacks
    def test_dead_writers_lease_expires(self) -> Generator[Any, Any, None]:
        """
        When the writing instance dies (no release), its lease expires after
        lease_ttl: a follower then gets what was logged and ends cut short,
        an attachment after the last event is refused, and one after an
        earlier event replays the rest and ends cut short.
        """
        writer = RedisResumeLog(reactor, REDIS_URL, 60.0, 100, 1 << 20, key_prefix=self.prefix,
                                block_ms=200, lease_ttl=1.0)
        self.addCleanup(writer.stop)
        yield writer.start()
        yield self._stream(3, log=writer)
        reader = yield self.make_log()
        sub = CutCollector()
        self.assertIsNotNone((yield reader.attach("s1", "t1", 0, sub)))
        started = time.monotonic()
        crash(writer)
        yield poll(lambda: sub.cuts == 1, "the follower's cut end", timeout=1.0 + WAIT)
        self.assertGreaterEqual(time.monotonic() - started, 0.5)
        self.assertEqual(sub.seqs, [1, 2, 3])
        self.assertIsNone((yield reader.attach("s1", "t1", 3, CutCollector())))
        late = CutCollector()
        yield reader.attach("s1", "t1", 1, late)
        self.assertEqual((late.seqs, late.cuts), ([2, 3], 1))

    @inlineCallbacks
    def test_live_writers_lease_is_renewed(self) -> Generator[Any, Any, None]:
        """
        An instance that lives renews its lease: a silent open stream is
        followed, not cut, well past lease_ttl.
        """
        writer = self.new_log(lease_ttl=0.6)
        yield writer.start()
        yield self._stream(1, log=writer)
        writer.append("s1", 2, block(2))
        yield writer.flushed()
        yield sleep(1.5)
        reader = yield self.make_log()
        sub = CutCollector()
        att = yield reader.attach("s1", "t1", 0, sub)
        yield sleep(1.0)
        self.assertEqual((sub.seqs, sub.cuts, sub.ends), ([1, 2], 0, 0))
        writer.append("s1", 3, block(3))
        yield poll(lambda: sub.seqs == [1, 2, 3], "the live event")
        att.detach()


class CutCollector(Collector):
    """A subscriber that also tells a cut-short end (L{Replay.replay_cut}) from a complete one."""

    def __init__(self) -> None:
        super().__init__()
        self.cuts = 0

    def replay_cut(self) -> None:
        self.cuts += 1


class _FakeRedis:
    """A connection that records commands and answers each at once."""

    connected = True

    def __init__(self) -> None:
        self.commands: list[tuple[bytes, ...]] = []

    def execute_command(self, *args: Any, **kw: Any) -> "Deferred[Any]":
        self.commands.append(tuple(a if isinstance(a, bytes) else str(a).encode() for a in args))
        return succeed(None)

    def names(self) -> list[bytes]:
        return [c[0] for c in self.commands if c[0] != b"SCRIPT"]


class LeaseTests(TestCase):
    """The instance lease of L{RedisResumeLog}, on a fake clock and a fake connection."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.log = RedisResumeLog(self.clock, "redis://127.0.0.1:1", 300, 100, 1 << 20,
                                  key_prefix="p:", lease_ttl=3.0, instance="i1")
        self.conn = _FakeRedis()
        self.log._factory = type("F", (), {"pool": [self.conn], "disconnect": lambda self: succeed(None)})()

    def test_renewed_every_third_of_its_ttl(self) -> None:
        """The lease is set with a PX of lease_ttl and renewed every lease_ttl / 3 on the injected clock."""
        self.log._renew()
        self.assertEqual(self.conn.commands[-1], (b"SET", b"p:instance:i1", b"1", b"PX", b"3000"))
        for _ in range(3):
            self.clock.advance(1.0)
        self.assertEqual(self.conn.names().count(b"SET"), 4)

    def test_set_before_the_first_write(self) -> None:
        """The first stream write on a connection is preceded by the lease, so no reader sees it unowned."""
        self.log.open("s", "o")
        self.log.append("s", 1, b"data: x\n\n")
        self.clock.advance(0)
        self.assertEqual(self.conn.names(), [b"SET", b"EVALSHA"])
        holder = self.conn.commands[-1][8]  # EVALSHA sha 2 key okey open_ms ended_ms reset holder
        self.assertEqual(holder, b'i1|o')

    def test_stop_writes_cut_markers_then_releases(self) -> None:
        """Stopping flushes pending writes (a cut marker) and then deletes the lease, in that order."""
        self.log.open("s", "o")
        self.log.append("s", 1, b"data: x\n\n")
        self.log.cut("s")
        self.log.stop()
        names = self.conn.names()
        self.assertEqual(names[-2:], [b"EVALSHA", b"DEL"])
        self.assertEqual(self.conn.commands[-1], (b"DEL", b"p:instance:i1"))
        self.assertEqual(self.conn.commands[-2][-2:], (b"1-2", b"cut"))
        self.assertFalse(self.clock.getDelayedCalls())
