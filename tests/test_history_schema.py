"""Row normalisation, and the spool's JSON form of a row."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import IntEnum
from typing import Any, Dict

from twisted.trial.unittest import SynchronousTestCase

from aura_proxy.history.record import CallRecord
from aura_proxy.history.schema import COLUMNS, ID, row_from_json, row_to_json, to_row
from tests.history_helpers import make_record, make_stream_record


class _Status(IntEnum):
    OK = 200


def named(rec: CallRecord, limit: int = 64) -> Dict[str, Any]:
    """The row of C{rec}, keyed by column name."""
    return row_to_json(to_row(rec, limit))


class ToRowTests(SynchronousTestCase):
    """L{to_row}."""

    def test_every_column_in_order(self) -> None:
        """A row holds one value per stored column, in insert order, the id first."""
        rec = make_record(1)
        row = to_row(rec, 64)
        self.assertEqual(len(row), len(COLUMNS))
        self.assertEqual(row[ID], rec.id)
        self.assertEqual(row, tuple(named(rec)[c] for c in COLUMNS))
        self.assertEqual((named(rec)["path"], named(rec)["status_code"]), (rec.path, rec.status_code))

    def test_plain_types(self) -> None:
        """Enums, int-like and float-like values become plain int, float and bool."""
        row = named(make_record(1, status_code=_Status.OK, latency_ms=3, is_stream=0))
        self.assertIs(type(row["status_code"]), int)
        self.assertIs(type(row["latency_ms"]), float)
        self.assertIs(row["is_stream"], False)
        stream = named(make_stream_record(2))
        self.assertEqual((stream["first_event_ms"], stream["event_count"]), (3.25, 42))
        self.assertIsNone(stream["request_size_bytes"])

    def test_created_at_in_utc(self) -> None:
        """created_at (Unix seconds) is ISO text in UTC with microseconds."""
        moment = datetime(2026, 3, 1, 23, 59, 59, 250_000, tzinfo=timezone.utc).timestamp()
        self.assertEqual(named(make_record(1, created_at=moment))["created_at"],
                         "2026-03-01T23:59:59.250000+00:00")

    def test_created_at_across_seconds(self) -> None:
        """
        Consecutive calls in different seconds (and a fraction that rounds up
        to the next second) each get their own second, not a cached one.
        """
        base = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()
        texts = [named(make_record(1, created_at=base + offset))["created_at"]
                 for offset in (0.5, 1.0, 1.9999999, 0.25, 86400.0)]
        self.assertEqual(texts, [
            "2026-01-01T00:00:00.500000+00:00",
            "2026-01-01T00:00:01.000000+00:00",
            "2026-01-01T00:00:02.000000+00:00",
            "2026-01-01T00:00:00.250000+00:00",
            "2026-01-02T00:00:00.000000+00:00",
        ])

    def test_every_text_column_bounded(self) -> None:
        """Each text column is cut to the limit and loses NUL, not only the usual suspects."""
        long = "\x00" + "v" * 100
        texts = ("id", "tenant_id", "user_id", "agent_id", "source", "caller_type", "method",
                 "path", "route", "query_string", "client_ip", "user_agent", "trace_id",
                 "end_reason")
        row = named(make_record(1, **{name: long for name in texts}), 8)
        for name in texts:
            self.assertEqual(row[name], "\ufffd" + "v" * 7, name)

    def test_sum_over_limit_each_within(self) -> None:
        """Strings that together exceed the limit but each fit it are kept whole."""
        row = named(make_record(1, path="/" + "p" * 40, user_agent="u" * 41), 41)
        self.assertEqual((len(row["path"]), len(row["user_agent"])), (41, 41))

    def test_non_ascii_and_lone_surrogate(self) -> None:
        """Non-ASCII text is kept; a lone surrogate (not UTF-8) is replaced."""
        row = named(make_record(1, user_id="jürgen", user_agent="x\udcff"))
        self.assertEqual((row["user_id"], row["user_agent"]), ("jürgen", "x?"))


class JsonFormTests(SynchronousTestCase):
    """L{row_to_json} and L{row_from_json}: the spool's line format."""

    def test_round_trip(self) -> None:
        """A row survives its JSON form unchanged."""
        for rec in (make_record(1), make_stream_record(2)):
            row = to_row(rec, 64)
            self.assertEqual(row_from_json(row_to_json(row)), row)

    def test_missing_column_is_null(self) -> None:
        """A line written before a column existed reads back with that column NULL."""
        old = row_to_json(to_row(make_record(1), 64))
        del old["end_reason"]
        old["retired_column"] = "x"
        row = row_from_json(old)
        self.assertEqual(len(row), len(COLUMNS))
        self.assertIsNone(row[COLUMNS.index("end_reason")])
