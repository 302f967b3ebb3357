"""
SQLite history backend: the stdlib C{sqlite3} in one dedicated worker thread.

SQLite calls block (disk, locks), so every call runs in a private
L{ThreadPool} of exactly one thread: never in the reactor thread, and never two
at once on the one connection.
"""

from __future__ import annotations

import os
import re
import sqlite3
from itertools import chain
from typing import Any, Callable, Optional, Sequence, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from aura_proxy.history.recent import CallFilter, recent_sql
from aura_proxy.history.schema import COLUMNS, Row, insert_sql, load_migrations, version_table

__all__ = ["SQLiteBackend", "sqlite_path"]

T = TypeVar("T")

#: Rows per INSERT statement, at most; fewer if the library's limit on bound
#: values (999 before SQLite 3.32) does not allow 100 rows.
_ROWS_PER_STATEMENT = 100

_ROW_ERRORS = (
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.InterfaceError,  # a value of a type SQLite cannot bind
    OverflowError,  # an integer wider than 64 bits
    ValueError,
    TypeError,
    UnicodeError,
)


# The sqlite3 module binds str, int, float and bytearray directly, but looks
# for an adapter for any other value, None and bool included: two failed
# attribute lookups (each raising and clearing an AttributeError) per value,
# about a third of an insert's cost with a typical row's ten NULL columns.
# A registered adapter is found in one dict lookup.  Process-wide, and
# harmless: both bind exactly what the default would (NULL, and 0 or 1).
# The empty dict's get() maps None to None as a C call, with no Python frame.
_NOTHING: dict[None, None] = {}
sqlite3.register_adapter(type(None), _NOTHING.get)  # type: ignore[arg-type]
sqlite3.register_adapter(bool, int)


#: SQLite's ALTER TABLE has no ADD COLUMN IF NOT EXISTS: the backend checks.
_ADD_COLUMN = re.compile(r"^ALTER\s+TABLE\s+(\w+)\s+ADD\s+COLUMN\s+(\w+)\s", re.I)


def _adds_existing_column(conn: sqlite3.Connection, statement: str) -> bool:
    """Whether C{statement} adds a column its table already has (then it is skipped)."""
    match = _ADD_COLUMN.match(statement)
    if match is None:
        return False
    table, column = match.groups()
    # table is the validated configured name (the only one the DDL names).
    have = {row[1].lower() for row in conn.execute(f"PRAGMA table_info({table})")}
    return column.lower() in have


def sqlite_path(dsn: str) -> str:
    """C{sqlite:///rel/path} -> C{rel/path}; C{sqlite:////abs/path} -> C{/abs/path}."""
    return dsn[len("sqlite:///"):]


class SQLiteBackend:
    """L{aura_proxy.history.backend.Backend} over one SQLite file."""

    name = "sqlite"

    def __init__(self, path: str, table: str, reactor: Any) -> None:
        self.path = path
        self.table = table
        self._reactor = reactor
        self._pool: Optional[ThreadPool] = None
        self._conn: Optional[sqlite3.Connection] = None  # touched only in the worker thread
        self._statements: dict[int, str] = {}  # INSERT text by number of rows
        self._rows_per_statement = 1

    def _run(self, fn: Callable[..., T], *args: Any) -> "Deferred[T]":
        if self._pool is None:
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name="aura-history-sqlite")
            self._pool.start()
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    def connect(self) -> "Deferred[None]":
        """Open the file (creating its directory) and apply pending migrations."""
        return self._run(self._connect)

    def insert(self, rows: Sequence[Row]) -> "Deferred[int]":
        """Insert C{rows} in one transaction; fire with how many were new."""
        return self._run(self._insert_rows, list(rows))

    def recent(self, where: CallFilter) -> "Deferred[list[tuple[Any, ...]]]":
        """
        The newest calls matching C{where} (L{aura_proxy.history.recent}'s
        columns), read in the backend's thread.
        """
        return self._run(self._select, *recent_sql(self.table, "qmark", where))

    def is_row_error(self, failure: Failure) -> bool:
        """Constraint, range, type or encoding problems are the row's fault."""
        return failure.check(*_ROW_ERRORS) is not None

    def close(self) -> "Deferred[None]":
        """Close the connection in its thread, then stop the thread."""
        pool, self._pool = self._pool, None
        if pool is None:
            return succeed(None)
        d = deferToThreadPool(self._reactor, pool, self._close)

        def stop(result: object) -> object:
            # The pool is idle once _close has run: joining is immediate.
            pool.stop()
            return result

        d.addBoth(stop)
        d.addErrback(lambda f: None)
        return d

    # -- worker thread ---------------------------------------------------------

    def _connect(self) -> None:
        self._close()
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        # Explicit transactions (isolation_level=None); the worker thread is
        # the only user, but the pool may swap its thread: no same-thread check.
        conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        try:
            # WAL lets a DBA read while we write; FULL keeps acked commits on power loss.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            # A multi-row INSERT keeps a statement journal (to undo just that
            # statement on a constraint error): in memory, not a new temp file
            # in /var/tmp for every statement.
            conn.execute("PRAGMA temp_store=MEMORY")
            self._rows_per_statement = max(1, min(
                _ROWS_PER_STATEMENT,
                conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(COLUMNS),
            ))
            self._migrate(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        versions = version_table(self.table)
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {versions} ("
            "version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        for migration in load_migrations("sqlite", self.table):
            # IMMEDIATE: take the write lock before checking, so two processes
            # opening the same file cannot both apply a migration.
            conn.execute("BEGIN IMMEDIATE")
            try:
                done = conn.execute(
                    f"SELECT 1 FROM {versions} WHERE version = ?", (migration.version,)
                ).fetchone()
                if not done:
                    for statement in migration.statements:
                        if not _adds_existing_column(conn, statement):
                            conn.execute(statement)
                    conn.execute(
                        f"INSERT INTO {versions} (version, description, applied_at) "
                        "VALUES (?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
                        (migration.version, migration.description),
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _insert_rows(self, rows: Sequence[Row]) -> int:
        if self._conn is None:
            raise sqlite3.OperationalError("history database is not open")
        conn = self._conn
        inserted = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Many rows per statement: the sqlite3 module releases the GIL
            # around every statement step, and with the reactor thread busy
            # each release is a thread switch (executemany: one per row).
            step = self._rows_per_statement
            for start in range(0, len(rows), step):
                chunk = rows[start:start + step]
                cursor = conn.execute(
                    self._statement(len(chunk)), list(chain.from_iterable(chunk))
                )
                inserted += max(cursor.rowcount, 0)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return inserted

    def _select(self, sql: str, params: list[object]) -> list[tuple[Any, ...]]:
        if self._conn is None:
            raise sqlite3.OperationalError("history database is not open")
        return self._conn.execute(sql, params).fetchall()

    def _statement(self, rows: int) -> str:
        statement = self._statements.get(rows)
        if statement is None:
            statement = self._statements[rows] = insert_sql(self.table, "qmark", rows)
        return statement

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
