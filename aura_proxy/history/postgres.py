"""
PostgreSQL history backend: txpostgres (asynchronous psycopg2) on the reactor.

No thread: psycopg2's asynchronous mode lets the reactor poll the connection
socket.  One connection is enough because the service writes one batch at a
time.  Every call is bounded by a timeout, after which the connection is
dropped: libpq does not enforce C{connect_timeout} in asynchronous mode, and a
dead peer must not freeze the writer.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import psycopg2  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres  # type: ignore[import-untyped]

from aura_proxy.history.backend import Clock
from aura_proxy.history.recent import CallFilter, recent_sql
from aura_proxy.history.schema import COLUMNS, Row, insert_sql, load_migrations, version_table

__all__ = ["PostgresBackend"]

#: Rows per INSERT statement: 26 columns x 500 stays far below PostgreSQL's
#: 65535 bound parameters per statement.
_ROWS_PER_STATEMENT = 500


class _Connection(txpostgres.Connection):  # type: ignore[misc]
    """
    A txpostgres connection whose idle socket may die quietly.

    The stock class raises from C{doRead} when the server goes away between
    queries, which the reactor logs as an unhandled error; here that is a plain
    connection loss, noticed by the next query.
    """

    def doRead(self) -> Optional[Exception]:
        try:
            super().doRead()
        except Exception as e:
            return ConnectionLost(str(e))
        return None


class PostgresBackend:
    """L{aura_proxy.history.backend.Backend} over one txpostgres connection."""

    name = "postgresql"
    log = Logger()

    def __init__(
        self, dsn: str, table: str, reactor: Any, clock: Clock, timeout: float = 10.0
    ) -> None:
        self.dsn = dsn
        self.table = table
        self.timeout = timeout
        self._reactor = reactor
        self._clock = clock
        self._conn: Optional[_Connection] = None

    def connect(self) -> "Deferred[None]":
        """Open a connection, then apply pending migrations."""
        self._drop()
        conn = _Connection(reactor=self._reactor)
        self._conn = conn
        d = self._bounded(conn.connect(self.dsn), "connect")
        d.addCallback(lambda _: self._bounded(Deferred.fromCoroutine(self._migrate(conn)), "migrate"))
        return d

    def insert(self, rows: Sequence[Row]) -> "Deferred[int]":
        """Insert C{rows} in one transaction; fire with how many were new."""
        conn = self._conn
        if conn is None or conn.pollable() is None or conn.pollable().closed:
            return _failed(psycopg2.InterfaceError("history database connection is closed"))
        chunks: List[List[Any]] = []
        for start in range(0, len(rows), _ROWS_PER_STATEMENT):
            params: List[Any] = []
            for row in rows[start:start + _ROWS_PER_STATEMENT]:
                params.extend(row)
            chunks.append(params)
        n_cols = len(COLUMNS)

        async def interaction(cursor: Any) -> int:
            inserted = 0
            for params in chunks:
                await cursor.execute(insert_sql(self.table, "format", len(params) // n_cols), params)
                inserted += max(cursor.rowcount, 0)
            return inserted

        d = conn.runInteraction(lambda cursor: Deferred.fromCoroutine(interaction(cursor)))
        return self._bounded(d, "insert")

    def recent(self, where: CallFilter) -> "Deferred[list[tuple[Any, ...]]]":
        """
        The newest calls matching C{where} (L{aura_proxy.history.recent}'s
        columns), within C{timeout} seconds.
        """
        conn = self._conn
        if conn is None or conn.pollable() is None or conn.pollable().closed:
            return _failed(psycopg2.InterfaceError("history database connection is closed"))
        sql, params = recent_sql(self.table, "format", where)
        return self._bounded(conn.runQuery(sql, params), "query")

    def is_row_error(self, failure: Failure) -> bool:
        """
        Constraint and range errors (SQLSTATE classes 22 and 23), and values
        psycopg2 refuses before sending (cannot adapt, NUL in a string).
        """
        if failure.check(psycopg2.DataError, psycopg2.IntegrityError):
            return True
        if failure.check(psycopg2.ProgrammingError):
            # Client-side "can't adapt type" has no SQLSTATE; a server-side one
            # (e.g. table dropped) is not the row's fault.
            return getattr(failure.value, "pgcode", None) is None
        return failure.check(ValueError, TypeError, UnicodeError, OverflowError) is not None

    def close(self) -> "Deferred[None]":
        """Close the connection, if any."""
        self._drop()
        return succeed(None)

    async def _migrate(self, conn: _Connection) -> None:
        versions = version_table(self.table)

        async def step(cursor: Any, migration: Any) -> None:
            # Serialise concurrent starters (several proxies) on this table.
            await cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.table,))
            await cursor.execute(
                f"CREATE TABLE IF NOT EXISTS {versions} (version integer PRIMARY KEY, "
                "description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            await cursor.execute(f"SELECT 1 FROM {versions} WHERE version = %s", (migration.version,))
            if cursor.fetchone():
                return
            for statement in migration.statements:
                await cursor.execute(statement)
            await cursor.execute(
                f"INSERT INTO {versions} (version, description) VALUES (%s, %s)",
                (migration.version, migration.description),
            )
            self.log.info(
                "history: applied {dialect} migration {version} to {table}",
                dialect="postgresql", version=migration.version, table=self.table,
            )

        for migration in load_migrations("postgres", self.table):
            await conn.runInteraction(
                lambda cursor, m=migration: Deferred.fromCoroutine(step(cursor, m))
            )

    def _bounded(self, d: "Deferred[Any]", what: str) -> "Deferred[Any]":
        """C{d}, or a failure after C{timeout} seconds (dropping the connection)."""
        out: Deferred[Any] = Deferred()

        def expire() -> None:
            self._drop()
            if not out.called:
                out.errback(psycopg2.OperationalError(f"history database {what} timed out"))

        timer = self._clock.callLater(self.timeout, expire)

        def done(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if out.called:
                return None  # too late: the timeout already answered
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)
            return None

        d.addBoth(done)
        return out

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.pollable() is not None:
            try:
                conn.close()
            except Exception:
                # Closing a half-open connection may raise; it is gone either way.
                pass


def _failed(exc: Exception) -> "Deferred[Any]":
    d: Deferred[Any] = Deferred()
    d.errback(Failure(exc))
    return d
