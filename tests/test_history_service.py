"""
Unit tests of L{aura_proxy.history.HistoryService}: queue, batching, spool,
replay order, idempotency, shutdown.  A fake backend and a L{Clock} make them
deterministic; spool I/O runs inline (C{threaded_spool=False}).
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from aura_proxy.config import HistoryConfig
from aura_proxy.history import CallRecord, HistoryService, make_history
from aura_proxy.history.service import FINAL_WRITE_BUDGET
from tests.history_helpers import (
    FakeBackend,
    history_config,
    make_record,
    make_stream_record,
    segments,
)


class ServiceTests(TestCase):
    """HistoryService with a fake backend and a fake clock."""

    def setUp(self) -> None:
        self.spool_dir = self.mktemp()
        self.clock = Clock()
        self.backend = FakeBackend()

    def service(self, backend: Any = None, **changes: Any) -> HistoryService:
        """A started service over C{backend} (default: the test's fake)."""
        svc = HistoryService(
            history_config(self.spool_dir, **changes),
            reactor,
            clock=self.clock,
            backend=backend if backend is not None else self.backend,
            threaded_spool=False,
            retry_initial=1.0,
            retry_max=8.0,
        )
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        return svc

    def test_record_never_raises(self) -> None:
        """record() swallows a broken record: it is logged and counted as dropped."""
        svc = self.service()
        svc.record(object())  # type: ignore[arg-type]
        self.assertEqual(svc.stats()["dropped"], 1)
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)

    def test_record_does_no_io(self) -> None:
        """record() only queues: nothing is inserted until the reactor turns."""
        svc = self.service()
        for i in range(10):
            svc.record(make_record(i))
        self.assertEqual(self.backend.batches, [])
        self.clock.advance(0)
        self.assertEqual(len(self.backend.batches), 1)

    def test_batch_size_triggers_write(self) -> None:
        """A full batch is written at once, in one insert; a partial one waits."""
        svc = self.service(batch_size=3)
        svc.record(make_record(1))
        svc.record(make_record(2))
        self.clock.advance(0)
        self.assertEqual(self.backend.batches, [])
        svc.record(make_record(3))
        self.clock.advance(0)
        self.assertEqual(self.backend.batches, [["req-000001", "req-000002", "req-000003"]])
        self.assertEqual(svc.stats()["written"], 3)

    def test_flush_interval_writes_partial_batch(self) -> None:
        """A partial batch is written when the flush timer fires."""
        svc = self.service(batch_size=100, flush_interval=2.0)
        svc.record(make_record(1))
        self.clock.advance(1.9)
        self.assertEqual(self.backend.order, [])
        self.clock.advance(0.1)
        self.assertEqual(self.backend.order, ["req-000001"])

    def test_rows_after_a_timed_flush_wait(self) -> None:
        """
        The flush timer writes the rows queued when it fired; rows recorded
        while that write is in flight wait for a full batch or the next tick,
        instead of a commit each time the previous one finishes.
        """
        svc = self.service(batch_size=100, flush_interval=1.0)
        self.backend.slow = True
        svc.record(make_record(1))
        svc.record(make_record(2))
        self.clock.advance(1.0)
        svc.record(make_record(3))
        svc.record(make_record(4))
        self.backend.release()
        self.clock.advance(0)
        self.assertEqual(self.backend.batches, [["req-000001", "req-000002"]])
        self.clock.advance(1.0)
        self.assertEqual(self.backend.batches[1:], [["req-000003", "req-000004"]])

    def test_flush_writes_everything_queued(self) -> None:
        """flush() writes every row queued when it was called, across several batches."""
        svc = self.service(batch_size=3, flush_interval=60.0)
        self.backend.slow = True
        for i in range(1, 3):
            svc.record(make_record(i))
        done = svc.flush()
        for i in range(3, 8):
            svc.record(make_record(i))
        self.backend.release()
        self.clock.advance(0)
        self.successResultOf(done)
        # 1-2 (the flush), then 3-5 (a full batch); 6-7 were queued after the
        # flush and make no full batch: they wait for the timer.
        self.assertEqual(self.backend.order, [f"req-{i:06d}" for i in range(1, 6)])

    def test_db_down_spools_then_replays_in_order(self) -> None:
        """
        With the database down rows go to the spool on each flush; once it is
        back they are replayed in recording order and the spool is emptied.
        """
        self.backend.up = False
        svc = self.service(batch_size=5)
        for i in range(12):
            svc.record(make_record(i))
        self.clock.advance(1.0)
        self.assertEqual(svc.stats()["spooled"], 12)
        self.assertEqual(svc.stats()["queue_length"], 0)
        self.assertEqual(len(segments(self.spool_dir)), 1)
        for i in range(12, 15):  # spooled too: the database is still down
            svc.record(make_record(i))
        self.clock.advance(1.0)
        self.backend.up = True
        self.clock.advance(8.0)  # past the retry backoff
        self.assertEqual(self.backend.order, [f"req-{i:06d}" for i in range(15)])
        self.assertEqual(segments(self.spool_dir), [])
        stats = svc.stats()
        self.assertEqual((stats["written"], stats["replayed"], stats["spool_pending"]), (15, 15, 0))

    def test_write_failure_spools_batch_and_queue_in_order(self) -> None:
        """A batch that fails for a connection reason is spooled with the queue behind it."""
        svc = self.service(batch_size=2, queue_size=1000)
        for i in range(5):
            svc.record(make_record(i))
        self.backend.up = False
        self.clock.advance(0)
        self.assertEqual(svc.stats()["spooled"], 5)
        self.backend.up = True
        self.clock.advance(1.0)
        self.assertEqual(self.backend.order, [f"req-{i:06d}" for i in range(5)])

    def test_retry_backoff_doubles_up_to_max(self) -> None:
        """Reconnection attempts back off 1, 2, 4, 8, 8 seconds (initial 1, max 8)."""
        self.backend.up = False
        self.service()
        times = []
        last = self.backend.connects
        for _ in range(40):
            self.clock.advance(0.5)
            if self.backend.connects != last:
                last = self.backend.connects
                times.append(self.clock.seconds())
        self.assertEqual(times, [1.0, 3.0, 7.0, 15.0])

    def test_queue_overflow_spools_without_loss_or_reorder(self) -> None:
        """
        When the queue is full the whole queue goes to the spool, so nothing
        is lost and rows still arrive in order.
        """
        self.backend.slow = True  # the first batch stays in flight
        svc = self.service(batch_size=5, queue_size=20)
        for i in range(5):
            svc.record(make_record(i))
        self.clock.advance(0)  # batch 0..4 in flight
        for i in range(5, 60):
            svc.record(make_record(i))
        self.assertGreater(svc.stats()["spooled"], 0)
        self.assertLessEqual(svc.stats()["queue_length"], 20)
        self.backend.release()
        self.clock.advance(1.0)
        self.assertEqual(self.backend.order, [f"req-{i:06d}" for i in range(60)])
        self.assertEqual(svc.stats()["dropped"], 0)

    def test_bad_row_is_dropped_alone(self) -> None:
        """
        A batch refused because of one row is retried row by row: the bad row
        is logged with its id and dropped, the others (also later ones) stored.
        """
        self.backend.bad_ids = {"req-000003"}
        svc = self.service(batch_size=5)
        for i in range(10):
            svc.record(make_record(i))
        self.clock.advance(0)
        expected = [f"req-{i:06d}" for i in range(10) if i != 3]
        self.assertEqual(self.backend.order, expected)
        self.assertEqual(svc.stats()["failed"], 1)
        self.assertEqual(svc.stats()["written"], 9)

    def test_lost_ack_does_not_duplicate(self) -> None:
        """
        A batch committed but not acknowledged (connection lost) is spooled
        and replayed: ON CONFLICT keeps every id exactly once.
        """
        self.backend.lose_ack_once = True
        svc = self.service(batch_size=4)
        for i in range(8):
            svc.record(make_record(i))
        self.clock.advance(0)
        self.clock.advance(2.0)
        self.assertEqual(self.backend.order, [f"req-{i:06d}" for i in range(8)])
        self.assertEqual(len(self.backend.rows), 8)
        self.assertEqual(svc.stats()["duplicates"], 4)

    def test_stop_flushes_queue_to_db(self) -> None:
        """stopService() writes queued rows and returns a Deferred that fires after."""
        svc = self.service(batch_size=100)
        for i in range(7):
            svc.record(make_record(i))
        d = svc.stopService()
        self.assertIsInstance(d, Deferred)
        self.successResultOf(d)
        self.assertEqual(len(self.backend.order), 7)
        self.assertTrue(self.backend.closed)
        self.assertEqual(segments(self.spool_dir), [])

    def test_stop_with_db_down_spools_queue(self) -> None:
        """With the database down, stopService() puts queued rows in the spool."""
        self.backend.up = False
        svc = self.service(batch_size=100)
        for i in range(7):
            svc.record(make_record(i))
        self.successResultOf(svc.stopService())
        self.assertEqual(svc.stats()["spooled"], 7)
        self.assertEqual(len(segments(self.spool_dir)), 1)

    def test_stop_waits_for_a_connection_in_flight(self) -> None:
        """
        A service stopped while its first connection is still being made
        (a worker stopped right after it started) waits for it, then stores
        the rows it spooled meanwhile and those still queued, in order: the
        table has every row, the spool none.
        """
        self.backend.slow_connect = True
        svc = self.service(batch_size=100)
        for i in range(5):
            svc.record(make_record(i))
        self.successResultOf(svc.flush())
        self.assertEqual(svc.stats()["spooled"], 5)
        for i in range(5, 8):
            svc.record(make_record(i))
        d = svc.stopService()
        self.assertNoResult(d)
        self.backend.connected()
        self.successResultOf(d)
        self.assertEqual(self.backend.order, [f"req-{i:06d}" for i in range(8)])
        self.assertEqual(svc.stats()["replayed"], 5)
        self.assertEqual(segments(self.spool_dir), [])

    def test_stop_tries_a_down_database_once_more(self) -> None:
        """
        A service waiting to retry a database that failed makes one more
        attempt when it stops: if the database is back, the spool and the
        queue reach the table instead of waiting for the next start.
        """
        self.backend.up = False
        svc = self.service(batch_size=100)
        for i in range(4):
            svc.record(make_record(i))
        self.successResultOf(svc.flush())
        self.assertEqual(svc.stats()["spooled"], 4)
        svc.record(make_record(4))
        self.backend.up = True
        self.successResultOf(svc.stopService())
        self.assertEqual(self.backend.order, [f"req-{i:06d}" for i in range(5)])
        self.assertEqual(segments(self.spool_dir), [])

    def test_stop_gives_up_on_a_connection_after_the_budget(self) -> None:
        """
        A connection that never comes holds the shutdown for
        FINAL_WRITE_BUDGET seconds at most; the rows are then in the spool.
        """
        self.backend.slow_connect = True
        svc = self.service(batch_size=100)
        for i in range(3):
            svc.record(make_record(i))
        d = svc.stopService()
        self.clock.advance(FINAL_WRITE_BUDGET - 0.1)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.successResultOf(d)
        self.assertEqual(self.backend.order, [])
        self.assertEqual(svc.stats()["spooled"], 3)
        self.assertEqual(len(segments(self.spool_dir)), 1)

    def test_stop_replays_the_spool_within_the_budget(self) -> None:
        """
        With the database up, a stopping service replays what its spool
        holds before it writes its queue (order kept), while the budget
        lasts; what the budget does not cover stays spooled, behind it.
        """
        self.backend.up = False
        svc = self.service(batch_size=2)
        for i in range(6):
            svc.record(make_record(i))
        self.successResultOf(svc.flush())
        self.assertEqual(svc.stats()["spooled"], 6)
        self.backend.up = True
        self.backend.slow = True
        svc.record(make_record(6))
        d = svc.stopService()
        # The first chunk is in flight; a slow database uses the budget up.
        self.clock.advance(FINAL_WRITE_BUDGET)
        self.backend.release()
        self.successResultOf(d)
        self.assertEqual(self.backend.order, ["req-000000", "req-000001"])
        self.assertEqual(svc.stats()["spool_pending"], 5)

    def test_record_after_stop_is_spooled(self) -> None:
        """A call finishing after shutdown is still kept, in the spool."""
        svc = self.service()
        self.successResultOf(svc.stopService())
        svc.record(make_record(1))
        self.assertEqual(svc.stats()["spooled"], 1)

    def test_restart_replays_spool_exactly_once(self) -> None:
        """
        kill -9: rows spooled by an instance that never stopped are replayed
        by the next instance, each exactly once, in order.
        """
        down = FakeBackend()
        down.up = False
        first = HistoryService(
            history_config(self.spool_dir), reactor, clock=Clock(), backend=down,
            threaded_spool=False,
        )
        first.startService()
        for i in range(25):
            first.record(make_record(i))
        first.flush()
        self.assertEqual(first.stats()["spooled"], 25)
        del first  # no stopService: the process "died"
        svc = self.service()
        self.assertEqual(self.backend.order, [f"req-{i:06d}" for i in range(25)])
        self.assertEqual(svc.stats()["replayed"], 25)
        self.assertEqual(segments(self.spool_dir), [])

    def test_rows_recorded_during_replay_go_after_it(self) -> None:
        """Rows recorded while an old spool is replayed are stored after the spooled ones."""
        os.makedirs(self.spool_dir)
        with open(os.path.join(self.spool_dir, "history-0000000000000007.jsonl"), "w") as f:
            for i in range(3):
                f.write(json.dumps({"id": f"old-{i}"}) + "\n")
        svc = self.service(batch_size=2)
        svc.record(make_record(1))
        self.clock.advance(1.0)
        self.assertEqual(self.backend.order, ["old-0", "old-1", "old-2", "req-000001"])

    def test_values_bounded_and_stream_nulls_kept(self) -> None:
        """
        Client strings are cut to max_value_length with NUL replaced; a stream
        summary keeps query_string and sizes NULL.
        """
        svc = self.service(max_value_length=16)
        svc.record(make_record(1, path="/" + "a" * 100, user_agent="x\x00y"))
        svc.record(make_stream_record(2))
        self.successResultOf(svc.flush())
        plain = self.backend.rows["req-000001"]
        self.assertEqual(len(plain["path"]), 16)
        self.assertEqual(plain["user_agent"], "x\ufffdy")
        self.assertEqual(plain["created_at"], "2026-01-01T00:00:00.001000+00:00")
        stream = self.backend.rows["req-000002"]
        self.assertEqual(
            (stream["query_string"], stream["request_size_bytes"], stream["response_size_bytes"]),
            (None, None, None),
        )
        self.assertEqual((stream["event_count"], stream["end_reason"]), (42, "completed"))

    def test_make_history(self) -> None:
        """make_history() is None when disabled, a HistoryService otherwise."""
        config = history_config(self.spool_dir)
        self.assertIsNone(make_history(HistoryConfig(enabled=False), reactor))
        self.assertIsInstance(make_history(config, reactor), HistoryService)
        self.assertIs(CallRecord, make_record(1).__class__)

    def test_enum_status_stored_as_int(self) -> None:
        """An HTTPStatus status code is stored as a plain int (JSON- and DB-safe)."""
        from http import HTTPStatus

        svc = self.service()
        svc.record(make_record(1, status_code=HTTPStatus.NOT_FOUND))
        self.successResultOf(svc.flush())
        self.assertIs(type(self.backend.rows["req-000001"]["status_code"]), int)
