"""
The call history service: bounded queue, batching writer, spool, replay.

Rows form one FIFO: the spool (oldest, on disk) followed by the in-memory
queue (newest).  The writer always takes from the head: it replays the spool
before it writes queued rows, and while the database is unavailable it moves
queued rows to the tail of the spool, so rows reach the table in the order
they were recorded and survive a crash once spooled.

States of the database, as the writer sees it::

    down --connect ok--> up --insert fails (not the row's fault)--> down
      ^                                                              |
      +------- retry after a backoff (initial .. max, doubling) -----+

L{HistoryService.record} only normalises the row and appends it to the queue:
it never waits, never does I/O and never raises.  Blocking work (spool file
I/O, SQLite) happens in dedicated single threads; PostgreSQL is asynchronous.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from aura_proxy.config import HistoryConfig
from aura_proxy.history.backend import Backend, Clock, DelayedCall
from aura_proxy.history.record import CallRecord
from aura_proxy.history.schema import ID, Row, to_row
from aura_proxy.history.spool import Chunk, Spool

__all__ = ["HistoryService", "backend_for"]

T = TypeVar("T")

#: Seconds a stopping service keeps trying to put its rows in the table
#: (waiting for a connection attempt, replaying the spool) before it leaves
#: the rest in the spool for the next start.  The parent of C{workers = N}
#: gives a worker C{drain_timeout} + 15 s, systemd's unit more.
FINAL_WRITE_BUDGET = 5.0


def backend_for(config: HistoryConfig, reactor: Any, clock: Clock) -> Backend:
    """The backend named by C{config.dsn} (C{sqlite:///...} or C{postgresql://...})."""
    if config.dsn.startswith("sqlite:///"):
        from aura_proxy.history.sqlite import SQLiteBackend, sqlite_path

        return SQLiteBackend(sqlite_path(config.dsn), config.table, reactor)
    if config.dsn.startswith(("postgresql://", "postgres://")):
        from aura_proxy.history.postgres import PostgresBackend

        return PostgresBackend(config.dsn, config.table, reactor, clock)
    raise ValueError(f"unsupported history dsn {config.dsn!r}")


class HistoryService(Service):
    """
    Stores every L{CallRecord} handed to L{record}, exactly once, off the hot path.

    @param config: the C{[history]} section.
    @param reactor: for threads and sockets.
    @param clock: for the flush timer, retries and timeouts (default: C{reactor}).
    @param backend: the database (default: chosen from C{config.dsn}).
    @param threaded_spool: do spool file I/O in a dedicated thread (True in
        production; tests may do it inline for determinism).
    @param retry_initial: first delay before reconnecting, in seconds.
    @param retry_max: longest delay between reconnection attempts.
    """

    log = Logger()

    def __init__(
        self,
        config: HistoryConfig,
        reactor: Any,
        *,
        clock: Optional[Clock] = None,
        backend: Optional[Backend] = None,
        threaded_spool: bool = True,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
    ) -> None:
        self.config = config
        self._reactor = reactor
        self._clock: Clock = clock if clock is not None else reactor
        self._backend: Backend = backend if backend is not None else backend_for(
            config, reactor, self._clock
        )
        self._spool = Spool(config.spool_dir)
        self._threaded_spool = threaded_spool
        self._spool_pool: Optional[ThreadPool] = None
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._retry_delay = retry_initial

        self._queue: Deque[Row] = deque()
        # Rows in the spool not yet committed, counted when an append is
        # *submitted*: spool calls run in submission order, so a read submitted
        # later sees them.
        self._spool_rows = 0
        self._db_up = False
        self._connecting = False
        self._stopping = False
        self._stopped = False
        # How many of the oldest queued rows a flush (or the flush timer) asked
        # to be written now; rows queued after it wait for a full batch or the
        # next tick.  A flag instead kept a busy writer committing whatever few
        # rows arrived during its previous commit, a commit every ~13 ms.
        self._flush_rows = 0

        self._ticker: Optional[LoopingCall] = None
        self._retry_call: Optional[DelayedCall] = None
        self._kick_call: Optional[DelayedCall] = None
        self._busy = False
        self._again = False
        self._idle_waiters: List[Deferred[None]] = []
        #: The latest connection attempt: fires (with None) once it succeeded or failed.
        self._attempt: Deferred[None] = succeed(None)

        self._counters: Dict[str, int] = dict.fromkeys(
            (
                "queued", "written", "duplicates", "spooled", "replayed", "dropped", "failed",
                "connect_failures",
            ),
            0,
        )

    # -- public ----------------------------------------------------------------

    def record(self, rec: CallRecord) -> None:
        """
        Accept C{rec} for storage.  Never blocks, never raises: on an internal
        error the row is logged and counted as dropped.
        """
        try:
            row = to_row(rec, self.config.max_value_length)
            self._counters["queued"] += 1
            if self._stopped:
                # Late caller after shutdown: nobody will flush the queue any more.
                self._spill_now([row])
                return
            self._queue.append(row)
            if len(self._queue) > self.config.queue_size:
                # Overflow: the WHOLE queue goes to the spool, not only the new
                # row, so the spool (replayed first) never holds rows newer
                # than rows still queued.
                rows = self._take(len(self._queue))
                self._background(self._spill(rows))
                self._schedule_kick()
            elif len(self._queue) >= self.config.batch_size:
                self._schedule_kick()
        except Exception:
            self._counters["dropped"] += 1
            self.log.failure("history: call {id} not recorded", id=getattr(rec, "id", None))

    def flush(self) -> "Deferred[None]":
        """
        Write (or, with the database down, spool) every row queued so far, and
        replay the spool if the database is up.  Fires once the writer is idle.
        """
        self._flush_rows = len(self._queue)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        self._kick()
        return waiter

    def stats(self) -> Dict[str, int]:
        """
        Counters since start (for metrics): C{queued} rows accepted, C{written}
        new rows committed, C{duplicates} rows already stored (replays),
        C{spooled} rows written to the spool, C{replayed} spool rows committed,
        C{dropped} rows lost (internal error, spool unusable, unreadable spool
        line), C{failed} rows the database refused, C{connect_failures}
        failed (re)connection attempts; and gauges C{queue_length},
        C{spool_pending}, C{db_up} (0 or 1).
        """
        return dict(
            self._counters,
            queue_length=len(self._queue),
            spool_pending=self._spool_rows,
            db_up=int(self._db_up),
        )

    # -- service ---------------------------------------------------------------

    def startService(self) -> None:
        """Adopt a previous run's spool, start the flush timer and connect."""
        super().startService()
        self._stopping = self._stopped = False
        if self._threaded_spool:
            self._spool_pool = ThreadPool(minthreads=1, maxthreads=1, name="aura-history-spool")
            self._spool_pool.start()
        opened = self._io(self._spool.open)

        def adopted(pending: int) -> None:
            self._spool_rows += pending
            if pending:
                self.log.info(
                    "history: {n} rows left in spool {dir} by a previous run will be replayed",
                    n=pending, dir=self.config.spool_dir,
                )

        opened.addCallback(adopted)
        opened.addErrback(
            lambda f: self.log.failure("history: spool {dir} unusable", f, dir=self.config.spool_dir)
        )
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = self._clock  # type: ignore[assignment]  # a structural IReactorTime
        self._ticker.start(self.config.flush_interval, now=False)
        self._connect()

    def stopService(self) -> "Deferred[None]":
        """
        Flush the queue to the database, or to the spool when the database
        cannot take it; fires when every row is stored or spooled.
        """
        super().stopService()
        self._stopping = True
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        for call in (self._retry_call, self._kick_call):
            if call is not None and call.active():
                call.cancel()
        self._retry_call = self._kick_call = None
        return Deferred.fromCoroutine(self._shutdown())

    # -- connection ------------------------------------------------------------

    def _connect(self, final: bool = False) -> None:
        if self._connecting or self._db_up or (self._stopping and not final):
            return
        self._connecting = True
        done: Deferred[None] = Deferred()
        self._attempt = done

        def up(_: object) -> None:
            self._connecting = False
            if self._stopped:
                return
            self._db_up = True
            if self._stopping:
                # The shutdown writes what is left itself.
                return
            self._retry_delay = self._retry_initial
            self.log.info("history: {backend} database up", backend=self._backend.name)
            self._kick()

        def failed(f: Failure) -> None:
            self._connecting = False
            self._counters["connect_failures"] += 1
            if self._stopping:
                self.log.warn(
                    "history: {backend} database unavailable at shutdown ({why}); "
                    "rows left go to the spool", backend=self._backend.name,
                    why=f.getErrorMessage(),
                )
                return
            self.log.warn(
                "history: {backend} database unavailable ({why}); retrying in {delay}s",
                backend=self._backend.name, why=f.getErrorMessage(), delay=self._retry_delay,
            )
            self._schedule_retry()

        d = maybeDeferred(self._backend.connect)
        d.addCallbacks(up, failed)
        d.addErrback(lambda f: self.log.failure("history: connect bookkeeping failed", f))
        d.addBoth(lambda _: done.callback(None))

    def _schedule_retry(self) -> None:
        if self._stopping or (self._retry_call is not None and self._retry_call.active()):
            return
        self._retry_call = self._clock.callLater(self._retry_delay, self._retry)
        self._retry_delay = min(self._retry_delay * 2, self._retry_max)

    def _retry(self) -> None:
        self._retry_call = None
        self._connect()

    def _mark_down(self, f: Failure) -> None:
        if self._db_up:
            self.log.warn(
                "history: {backend} database failed ({why}); rows go to the spool until it is back",
                backend=self._backend.name, why=f.getErrorMessage(),
            )
        self._db_up = False
        self._schedule_retry()

    # -- writer ----------------------------------------------------------------

    def _tick(self) -> None:
        self._flush_rows = len(self._queue)
        self._kick()

    def _schedule_kick(self) -> None:
        # record() must stay cheap: the writer starts on the next reactor turn.
        if self._kick_call is None or not self._kick_call.active():
            self._kick_call = self._clock.callLater(0, self._kick)

    def _kick(self) -> None:
        self._kick_call = None
        if self._busy:
            self._again = True
            return
        self._busy = True
        d = Deferred.fromCoroutine(self._drain())
        d.addErrback(lambda f: self.log.failure("history: writer error", f))
        d.addBoth(self._drained)

    def _drained(self, _: object) -> None:
        self._busy = False
        if self._again and not self._stopping:
            self._again = False
            self._kick()
            return
        self._again = False
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    async def _drain(self) -> None:
        batch = self.config.batch_size
        while not self._stopping:
            if not self._db_up:
                # Keep rows durable while the database is away.
                if self._queue and (self._flush_rows or len(self._queue) >= batch):
                    await self._spill(self._take(len(self._queue)))
                return
            if self._spool_rows > 0:
                if not await self._replay_chunk():
                    return  # database down: the chunk stays in the spool
                continue
            if self._queue and (self._flush_rows or len(self._queue) >= batch):
                rows = self._take(batch)
                if not await self._store(rows):
                    # In order: this batch is older than anything still queued.
                    await self._spill(rows + self._take(len(self._queue)))
                    return
                continue
            return

    async def _replay_chunk(self) -> bool:
        """
        Store the spool's oldest chunk, then let it leave the spool; False
        when the database is unavailable (the chunk stays).
        """
        chunk: Optional[Chunk] = await self._io(self._spool.read, self.config.batch_size)
        if chunk is None:
            self._spool_rows = 0  # nothing there after all
            return True
        if chunk.rows and not await self._store(chunk.rows):
            return False
        # Only now may the rows leave the spool (the segment may be deleted).
        await self._io(self._spool.ack, chunk)
        self._spool_rows -= len(chunk.rows) + chunk.bad
        self._counters["replayed"] += len(chunk.rows)
        self._counters["dropped"] += chunk.bad
        return True

    async def _store(self, rows: List[Row]) -> bool:
        """
        Commit C{rows}; False when the database is unavailable (nothing to
        assume about what was stored: re-inserting is harmless).  Rows the
        database refuses are logged and dropped, the others stored.
        """
        try:
            inserted = await self._backend.insert(rows)
        except Exception:
            f = Failure()
            if not self._backend.is_row_error(f):
                self._mark_down(f)
                return False
        else:
            self._count_written(len(rows), inserted)
            return True
        # Some row is bad: one transaction per row isolates it.
        for row in rows:
            try:
                inserted = await self._backend.insert([row])
            except Exception:
                f = Failure()
                if not self._backend.is_row_error(f):
                    self._mark_down(f)
                    return False
                self._counters["failed"] += 1
                self.log.error(
                    "history: row {id} refused by the database and dropped: {why}",
                    id=row[ID], why=f.getErrorMessage(),
                )
            else:
                self._count_written(1, inserted)
        return True

    def _count_written(self, rows: int, inserted: int) -> None:
        self._counters["written"] += inserted
        self._counters["duplicates"] += rows - inserted

    async def _spill(self, rows: List[Row]) -> None:
        if not rows:
            return
        self._spool_rows += len(rows)
        try:
            await self._io(self._spool.append, rows)
        except Exception:
            self._spool_rows -= len(rows)
            self._counters["dropped"] += len(rows)
            self.log.failure(
                "history: spool {dir} failed: {n} rows lost (ids {first} .. {last})",
                dir=self.config.spool_dir, n=len(rows), first=rows[0][ID],
                last=rows[-1][ID],
            )
        else:
            self._counters["spooled"] += len(rows)

    def _spill_now(self, rows: List[Row]) -> None:
        """Spool synchronously: only once stopped, when blocking is acceptable."""
        try:
            self._spool.append(rows)
        except Exception:
            self._counters["dropped"] += len(rows)
            self.log.failure("history: spool failed: {n} rows lost", n=len(rows))
        else:
            self._counters["spooled"] += len(rows)

    def _take(self, n: int) -> List[Row]:
        """The C{n} oldest queued rows (or all, if fewer), off the queue."""
        queue = self._queue
        # The rows a flush asked for are the oldest: whichever are taken first.
        self._flush_rows = max(0, self._flush_rows - n)
        if n >= len(queue):
            rows = list(queue)
            queue.clear()
            return rows
        return [queue.popleft() for _ in range(n)]

    # -- shutdown --------------------------------------------------------------

    async def _shutdown(self) -> None:
        if self._busy:
            # The writer stops at its next step; wait for the batch in flight.
            waiter: Deferred[None] = Deferred()
            self._idle_waiters.append(waiter)
            await waiter
        deadline = self._clock.seconds() + FINAL_WRITE_BUDGET
        if not self._db_up:
            # A worker that stops before its first connection came up, or
            # while it waits to retry, still gets its rows into the table.
            self._connect(final=True)
            await self._until(self._attempt, deadline)
        while self._db_up and self._spool_rows > 0 and self._clock.seconds() < deadline:
            if not await self._replay_chunk():
                break
        rows = self._take(len(self._queue))
        # Rows may go straight to the table only if the spool holds nothing
        # older; otherwise they join its tail (replayed at next start).
        if rows and self._db_up and self._spool_rows == 0:
            while rows:
                batch, rows = rows[: self.config.batch_size], rows[self.config.batch_size:]
                if not await self._store(batch):
                    rows = batch + rows
                    break
        await self._spill(rows)
        try:
            await self._io(self._spool.close)
        except Exception:
            self.log.failure("history: closing spool failed")
        try:
            await self._backend.close()
        except Exception:
            self.log.failure("history: closing {backend} failed", backend=self._backend.name)
        pool, self._spool_pool = self._spool_pool, None
        if pool is not None:
            pool.stop()
        self._stopped = True
        self._db_up = False
        # Rows recorded while we were shutting down.
        if self._queue:
            self._spill_now(self._take(len(self._queue)))
        self.log.info("history: stopped {stats}", stats=self.stats())

    # -- helpers ---------------------------------------------------------------

    def _until(self, d: "Deferred[None]", deadline: float) -> "Deferred[None]":
        """Fires when C{d} has, or at C{deadline}, whichever comes first; C{d} runs on."""
        waiter: Deferred[None] = Deferred()

        def done(result: object) -> object:
            if not waiter.called:
                waiter.callback(None)
            return result

        timer = self._clock.callLater(max(0.0, deadline - self._clock.seconds()), done, None)
        d.addBoth(done)

        def stop_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        waiter.addBoth(stop_timer)
        return waiter

    def _io(self, fn: Callable[..., T], *args: Any) -> "Deferred[T]":
        """Run spool I/O in the spool thread (in submission order), or inline."""
        if self._spool_pool is not None:
            return deferToThreadPool(self._reactor, self._spool_pool, fn, *args)
        return maybeDeferred(fn, *args)

    def _background(self, coro: Any) -> None:
        d = Deferred.fromCoroutine(coro)
        d.addErrback(lambda f: self.log.failure("history: background task failed", f))
