"""
Reading the last calls back (L{aura_proxy.history.recent}): the filter's
checks, the SQL, and L{HistoryReader} over a real SQLite file (its own
thread, its own connection, apart from the writer's).  The same query tests
run on PostgreSQL in tests.integration.test_history_recent_postgres.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aura_proxy.history.reader import HistoryReader
from aura_proxy.history.recent import (
    MAX_LIMIT,
    RECENT_COLUMNS,
    CallFilter,
    parse_call_filter,
    recent_sql,
)
from aura_proxy.history.schema import COLUMNS, to_row
from aura_proxy.history.sqlite import SQLiteBackend
from tests.history_helpers import EPOCH, history_config, make_record, make_stream_record


class ParseFilterTests(SynchronousTestCase):
    """L{parse_call_filter}: query parameters in, a L{CallFilter} or a message out."""

    def parse(self, **args: Any) -> CallFilter:
        """Parse C{args} as twisted.web's request.args (bytes names, lists of bytes values)."""
        return parse_call_filter({
            k.encode(): (v if isinstance(v, list) else [v.encode("utf-8") if isinstance(v, str) else v])
            for k, v in args.items()
        })

    def test_nothingMeansAll(self) -> None:
        """No parameter (or blank ones): every call, 50 newest."""
        self.assertEqual(parse_call_filter({}), CallFilter(50))
        self.assertEqual(self.parse(tenant="", status=" ", path=""), CallFilter(50))

    def test_everyParameter(self) -> None:
        """tenant, status (a code or a class, any case), path and limit are taken as given."""
        self.assertEqual(
            self.parse(tenant="t-1", status="5XX", path="/api/aura/", limit="7"),
            CallFilter(7, "t-1", "5xx", "/api/aura/"),
        )
        self.assertEqual(self.parse(status="404").status, "404")

    def test_refused(self) -> None:
        """Each malformed parameter is refused with a message naming it."""
        for args, name in [
            ({"status": "600"}, "status"),
            ({"status": "2x"}, "status"),
            ({"status": "abc"}, "status"),
            ({"path": "api/aura"}, "path"),
            ({"limit": "0"}, "limit"),
            ({"limit": str(MAX_LIMIT + 1)}, "limit"),
            ({"limit": "ten"}, "limit"),
            ({"tenant": "a\x00b"}, "tenant"),
            ({"tenant": "x" * 257}, "tenant"),
            ({"tenant": [b"a", b"b"]}, "tenant"),
            ({"path": [b"/\xff"]}, "path"),
        ]:
            with self.assertRaises(ValueError, msg=str(args)) as caught:
                self.parse(**args)
            self.assertIn(name, str(caught.exception))

    def test_sqlPerParamstyle(self) -> None:
        """One SELECT of the named columns, newest first; placeholders as the driver wants them."""
        sql, params = recent_sql("calls", "format", CallFilter(5, "t", "4xx", "/a_%"))
        self.assertEqual(
            sql,
            f"SELECT {', '.join(RECENT_COLUMNS)} FROM calls WHERE tenant_id = %s AND status_code BETWEEN %s AND %s "
            "AND path LIKE %s ESCAPE '\\' ORDER BY created_at DESC LIMIT %s",
        )
        self.assertEqual(params, ["t", 400, 499, "/a\\_\\%%", 5])
        sql, params = recent_sql("calls", "qmark", CallFilter(3))
        self.assertEqual(sql, f"SELECT {', '.join(RECENT_COLUMNS)} FROM calls ORDER BY created_at DESC LIMIT ?")
        self.assertEqual(params, [3])

    def test_columnsAreStoredOnes(self) -> None:
        """Every column read exists in the table (the schema may grow, these stay)."""
        self.assertTrue(set(RECENT_COLUMNS) <= set(COLUMNS))


class RecentQueryMixin:
    """The queries, on whatever database C{write} and C{reader} use (a TestCase mixin)."""

    def write(self, records: Sequence[Any]) -> Any:
        """Store C{records} (CallRecords) in the test table; a Deferred."""
        raise NotImplementedError

    def reader(self) -> HistoryReader:
        """A reader of the test table, closed at cleanup."""
        raise NotImplementedError

    async def store_calls(self) -> None:
        """Twelve calls, one second apart: tenants, statuses, paths and a stream differ."""
        records = [
            make_record(1, created_at=EPOCH + 1, tenant_id="a", status_code=200, path="/api/aura/chat"),
            make_record(2, created_at=EPOCH + 2, tenant_id="b", status_code=404, path="/api/tools/x"),
            make_record(3, created_at=EPOCH + 3, tenant_id="a", status_code=502, path="/api/aura/run"),
            make_record(4, created_at=EPOCH + 4, tenant_id="a", status_code=503, path="/api/a_b/1"),
            make_record(5, created_at=EPOCH + 5, tenant_id="b", status_code=200, path="/api/aXb/1"),
            make_record(6, created_at=EPOCH + 6, tenant_id="c", status_code=200, path="/api/100%/x"),
            make_record(7, created_at=EPOCH + 7, tenant_id="c", status_code=200, path="/api/100x/x"),
            dataclasses.replace(make_stream_record(8), created_at=EPOCH + 8, tenant_id="a", path="/api/aura/stream"),
        ]
        records += [make_record(i, created_at=EPOCH + i, tenant_id="z", status_code=201, path="/other") for i in range(9, 13)]
        await self.write(records)

    async def ids(self, where: CallFilter) -> list[object]:
        return [c["id"] for c in await self.reader().recent(where)]

    async def test_newestFirstAndLimit(self) -> None:
        """The newest calls first, at most C{limit}."""
        await self.store_calls()
        self.assertEqual(await self.ids(CallFilter(3)), ["req-000012", "req-000011", "req-000010"])  # type: ignore[attr-defined]

    async def test_byTenantAndStatus(self) -> None:
        """Tenant is exact; a status is a code or a class."""
        await self.store_calls()
        check = self.assertEqual  # type: ignore[attr-defined]
        check(await self.ids(CallFilter(50, tenant="a")), ["req-000008", "req-000004", "req-000003", "req-000001"])
        check(await self.ids(CallFilter(50, status="404")), ["req-000002"])
        check(await self.ids(CallFilter(50, status="5xx")), ["req-000004", "req-000003"])
        check(await self.ids(CallFilter(50, tenant="a", status="5xx")), ["req-000004", "req-000003"])
        check(await self.ids(CallFilter(50, tenant="nobody")), [])

    async def test_pathPrefixIsLiteral(self) -> None:
        """A path prefix matches literally: C{_} and C{%} in it are no wildcards."""
        await self.store_calls()
        check = self.assertEqual  # type: ignore[attr-defined]
        check(await self.ids(CallFilter(50, path_prefix="/api/aura/")), ["req-000008", "req-000003", "req-000001"])
        check(await self.ids(CallFilter(50, path_prefix="/api/a_b/")), ["req-000004"])
        check(await self.ids(CallFilter(50, path_prefix="/api/100%")), ["req-000006"])

    async def test_rowsAsJson(self) -> None:
        """Each call is a dict of the named columns: time as ISO text, is_stream a bool, stream figures kept."""
        await self.store_calls()
        calls = await self.reader().recent(CallFilter(50, tenant="a", path_prefix="/api/aura/stream"))
        self.assertEqual(len(calls), 1)  # type: ignore[attr-defined]
        call = calls[0]
        self.assertEqual(list(call), list(RECENT_COLUMNS))  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            (call["is_stream"], call["event_count"], call["end_reason"], call["first_event_ms"]),
            (True, 42, "completed", 3.25),
        )
        self.assertTrue(str(call["created_at"]).startswith("2026-01-01T00:00:08"))  # type: ignore[attr-defined]
        plain = (await self.reader().recent(CallFilter(1, tenant="b")))[0]
        self.assertIs(plain["is_stream"], False)  # type: ignore[attr-defined]

    async def test_moreColumnsLater(self) -> None:
        """A column added to the table later (a new migration) changes nothing for the reader."""
        await self.store_calls()
        await self.add_column()
        self.assertEqual(await self.ids(CallFilter(1)), ["req-000012"])  # type: ignore[attr-defined]

    async def add_column(self) -> None:
        """ALTER the test table: one more column."""
        raise NotImplementedError


class SQLiteRecentTests(RecentQueryMixin, TestCase):
    """The queries on a real SQLite file, written by one backend, read by a reader of its own."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = history_config(
            self.dir, dsn="sqlite:///" + os.path.join(self.dir, "h.db"), table="recent_calls", max_value_length=2048
        )
        self._reader: Any = None

    async def write(self, records: Sequence[Any]) -> None:
        writer = SQLiteBackend(os.path.join(self.dir, "h.db"), "recent_calls", reactor)
        self.addCleanup(writer.close)
        await writer.connect()
        await writer.insert([to_row(r, 2048) for r in records])

    def reader(self) -> HistoryReader:
        if self._reader is None:
            self._reader = HistoryReader(self.config, reactor)
            self.addCleanup(self._reader.close)
        return self._reader  # type: ignore[no-any-return]

    async def add_column(self) -> None:
        writer = SQLiteBackend(os.path.join(self.dir, "h.db"), "recent_calls", reactor)
        self.addCleanup(writer.close)
        await writer.connect()
        await writer._run(lambda: writer._conn.execute("ALTER TABLE recent_calls ADD COLUMN later TEXT"))  # type: ignore[union-attr]

    async def test_emptyDatabase(self) -> None:
        """A reader before anything was written: the table is made, no calls."""
        self.assertEqual(await self.reader().recent(CallFilter(10)), [])

    async def test_readerReconnectsAfterFailure(self) -> None:
        """A read that fails (the file is not a database) fails; once it is one again, the next read works."""
        path = os.path.join(self.dir, "h.db")
        with open(path, "wb") as f:
            f.write(b"not a database" * 100)
        with self.assertRaises(Exception):
            await self.reader().recent(CallFilter(10))
        os.remove(path)
        await self.store_calls()
        self.assertEqual(len(await self.reader().recent(CallFilter(10))), 10)
