"""Unit tests of L{aura_proxy.history.spool.Spool}: segments, order, sealing, torn tails."""

from __future__ import annotations

import json
import os

from twisted.trial.unittest import TestCase

from aura_proxy.history.schema import COLUMNS, ID, Row, row_from_json
from aura_proxy.history.spool import Spool, gather_orphans
from tests.history_helpers import segments


def rows(*ids: str) -> list[Row]:
    """Rows with the given ids and every other column NULL."""
    return [row_from_json({"id": i}) for i in ids]


class SpoolTests(TestCase):
    """The on-disk spool, used directly (it is synchronous)."""

    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.spool = Spool(self.dir)
        self.assertEqual(self.spool.open(), 0)

    def drain(self, spool: Spool, size: int = 2) -> list[str]:
        """Read and ack everything, returning ids in read order."""
        out: list[str] = []
        while (chunk := spool.read(size)) is not None:
            out.extend(r[ID] for r in chunk.rows)
            spool.ack(chunk)
        return out

    def test_fifo_across_appends(self) -> None:
        """Rows come back in append order, in chunks of at most the asked size."""
        self.spool.append(rows("a", "b", "c"))
        self.spool.append(rows("d"))
        chunk = self.spool.read(2)
        assert chunk is not None
        self.assertEqual([r[ID] for r in chunk.rows], ["a", "b"])
        self.assertFalse(chunk.last)
        self.spool.ack(chunk)
        self.assertEqual(self.drain(self.spool), ["c", "d"])
        self.assertEqual(segments(self.dir), [])

    def test_reading_seals_segment(self) -> None:
        """Appends made while a segment is replayed go to a new segment, read after it."""
        self.spool.append(rows("a", "b"))
        chunk = self.spool.read(1)
        assert chunk is not None
        self.spool.append(rows("c"))
        self.assertEqual(len(segments(self.dir)), 2)
        self.spool.ack(chunk)
        self.assertEqual(self.drain(self.spool), ["b", "c"])

    def test_segment_kept_until_acked(self) -> None:
        """A segment read but not acked stays on disk and is read again by a new instance."""
        self.spool.append(rows("a", "b"))
        self.assertIsNotNone(self.spool.read(10))
        again = Spool(self.dir)
        self.assertEqual(again.open(), 2)
        self.assertEqual(self.drain(again), ["a", "b"])

    def test_new_instance_never_appends_to_old_segment(self) -> None:
        """After a restart, new rows go to a new segment, after the old ones."""
        self.spool.append(rows("a"))
        again = Spool(self.dir)
        again.append(rows("b"))
        self.assertEqual(len(segments(self.dir)), 2)
        self.assertEqual(self.drain(again), ["a", "b"])

    def test_torn_tail_skipped(self) -> None:
        """A torn last line (kill -9 mid-write) and garbage lines are skipped and counted."""
        self.spool.append(rows("a"))
        name = os.path.join(self.dir, segments(self.dir)[0])
        with open(name, "a") as f:
            f.write('not json\n{"id": "b"}\n{"id": "c"')
        again = Spool(self.dir)
        chunk = again.read(10)
        assert chunk is not None
        self.assertEqual([r[ID] for r in chunk.rows], ["a", "b"])
        self.assertEqual(chunk.bad, 2)
        self.assertTrue(chunk.last)
        again.ack(chunk)
        self.assertEqual(segments(self.dir), [])

    def test_big_segment_rotates(self) -> None:
        """A segment over max_segment_bytes is sealed: the next append starts a new file."""
        spool = Spool(self.mktemp(), max_segment_bytes=10)
        spool.append(rows("a"))
        spool.append(rows("b"))
        self.assertEqual(len(segments(spool.directory)), 2)
        self.assertEqual(self.drain(spool), ["a", "b"])
        self.assertEqual(spool.open(), 0)

    def test_lines_are_objects_by_column(self) -> None:
        """
        A spool line is a JSON object keyed by column name; a line written
        before a column existed reads back with that column NULL.
        """
        row = ("r1",) + tuple(range(1, len(COLUMNS)))
        self.spool.append([row])
        with open(os.path.join(self.dir, segments(self.dir)[0])) as f:
            self.assertEqual(json.loads(f.readline()), dict(zip(COLUMNS, row)))
        old = dict(zip(COLUMNS[:-1], ["old"] + [None] * (len(COLUMNS) - 2)))
        old["not_a_column"] = 1
        with open(os.path.join(self.dir, segments(self.dir)[0]), "a") as f:
            f.write(json.dumps(old) + "\n")
        chunk = Spool(self.dir).read(10)
        assert chunk is not None
        self.assertEqual(chunk.rows, [row, ("old",) + (None,) * (len(COLUMNS) - 1)])


class OlderSpoolTests(TestCase):
    """A spool left by a gateway of the previous schema."""

    def test_rows_of_the_previous_schema_replay(self) -> None:
        """
        A segment written before migration 3 (no stream id, no detached tail
        in its lines) is read by this release: every row whole, the new
        columns NULL, into a database that now has them.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        old_columns = COLUMNS[:COLUMNS.index("stream_id")]
        line = {name: None for name in old_columns}
        line.update(id="old-1", created_at="2026-01-01T00:00:00.000000+00:00", method="GET",
                    path="/api/aura/s", status_code=200, latency_ms=5.0, is_stream=True, event_count=3)
        with open(os.path.join(directory, "history-0000000000000007.jsonl"), "w") as f:
            f.write(json.dumps(line) + "\n")
        spool = Spool(directory)
        self.assertEqual(spool.open(), 1)
        chunk = spool.read(10)
        assert chunk is not None
        [row] = chunk.rows
        named = dict(zip(COLUMNS, row))
        self.assertEqual((named["id"], named["event_count"], named["is_stream"]), ("old-1", 3, True))
        for column in ("stream_id", "resumed_after", "detached_event_count", "detached_ms"):
            self.assertIsNone(named[column], column)
        self.assertEqual(chunk.bad, 0)


class GatherOrphansTests(TestCase):
    """L{gather_orphans}: rows spooled under another C{workers} setting are not stranded."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def spool_with(self, directory: str, *batches: tuple[str, ...]) -> None:
        """A spool in C{directory} left with one sealed segment per batch."""
        for batch in batches:
            spool = Spool(directory)
            spool.append(rows(*batch))
            spool.close()

    def replayed(self, directory: str) -> list[str]:
        """Every id a new process's spool in C{directory} replays, in order."""
        spool = Spool(directory)
        spool.open()
        out: list[str] = []
        while (chunk := spool.read(100)) is not None:
            out.extend(r[ID] for r in chunk.rows)
            spool.ack(chunk)
        return out

    def test_single_process_takes_its_former_workers_spools(self) -> None:
        """
        Back to one process after C{workers = 3}: the workers' segments move
        into the spool it replays, after its own, each worker's in order; the
        emptied worker directories go.
        """
        self.spool_with(self.dir, ("own",))
        self.spool_with(os.path.join(self.dir, "worker-1"), ("w1a",), ("w1b",))
        self.spool_with(os.path.join(self.dir, "worker-3"), ("w3",))
        self.assertEqual(gather_orphans(self.dir, 1), 3)
        self.assertEqual(self.replayed(self.dir), ["own", "w1a", "w1b", "w3"])
        self.assertEqual(sorted(os.listdir(self.dir)), [])

    def test_workers_take_the_single_process_spool_and_those_beyond_n(self) -> None:
        """
        C{workers = 2} after one process and after C{workers = 4}: worker 1
        gets the top-level segments and those of workers 3 and 4; worker 2
        keeps its own, untouched.
        """
        self.spool_with(self.dir, ("top",))
        self.spool_with(os.path.join(self.dir, "worker-1"), ("w1",))
        self.spool_with(os.path.join(self.dir, "worker-2"), ("w2",))
        self.spool_with(os.path.join(self.dir, "worker-4"), ("w4",))
        self.assertEqual(gather_orphans(self.dir, 2), 2)
        self.assertEqual(self.replayed(os.path.join(self.dir, "worker-1")), ["w1", "top", "w4"])
        self.assertEqual(self.replayed(os.path.join(self.dir, "worker-2")), ["w2"])
        self.assertFalse(os.path.exists(os.path.join(self.dir, "worker-4")))
        self.assertEqual(segments(self.dir), [])

    def test_nothing_to_move(self) -> None:
        """A spool of this layout, or none at all, is left as it is."""
        self.assertEqual(gather_orphans(os.path.join(self.dir, "absent"), 2), 0)
        self.spool_with(self.dir, ("own",))
        self.assertEqual(gather_orphans(self.dir, 1), 0)
        self.assertEqual(segments(self.dir), ["history-0000000000000000.jsonl"])
