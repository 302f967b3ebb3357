"""
Stream logs in Redis Streams, shared by every gateway process and host.

A client that reconnects to another gateway gets the same replay and live tail
as from the gateway that relayed its stream.

Layout, for a stream C{S} and the prefix C{P}::

    P S          a Redis Stream: entry C{<seq>-1} {d: <event bytes>} per event,
                 then C{<last seq>-2} {end: 1} once the stream has ended
    P S:owner    a string C{<instance>|<owner>}: which gateway instance
                 writes the stream, and who may resume it
    P instance:I the lease of gateway instance C{I}: set with a C{lease_ttl}
                 expiry (default 5 s) and renewed every C{lease_ttl / 3} while
                 the instance runs; deleted by a clean shutdown

so that "the events after C{n}" is C{XRANGE P S (n+1)-0 +} and the end marker
sorts after the last event.  A stream whose instance shut down cleanly ends
with C{<last seq>-2} {cut: 1} instead (L{RedisResumeLog.cut}).

Takeover: a stream whose writing instance is gone (its log ends in a cut
marker, or its instance's lease has expired: killed, crashed, cut off) is
I{cut short}.  An attachment to it gets every logged event after its id and
then the end of its response, with a C{retry:} hint
(L{aura_proxy.resume.replay.Replay.replay_cut}); when it has nothing more to
replay the attachment is refused, and the request goes upstream with the
upstream's own last id, which the gateway id carries: the upstream resumes
after the last event the client has.  A follower notices the lease gone at
its next blocking-read timeout (C{block_ms}), so a client following a stream
whose instance was killed is handed over within about C{lease_ttl + block_ms}.
The lease costs one C{SET} per instance every C{lease_ttl / 3}, whatever the
number of streams: nothing per event or per stream.

Writing (L{RedisResumeLog.open}, C{append}, C{close}) never waits for Redis:
calls are collected in memory and flushed once per reactor turn as one
C{EVALSHA} of a Lua script per 4096 events (or fewer), on one connection, so
one round trip carries the whole turn and the order of each stream is kept.
The writer knows the size of every event it keeps, so it trims exactly like
L{MemoryResumeLog} (at most C{max_events} events and C{max_bytes} bytes, at
least one event) with C{XTRIM MINID}: what Redis holds of a stream is always
a contiguous run of its events, and an attachment that needs an evicted event
gets None.  Keys of an open stream expire C{1.5 * ttl} after their last
refresh (every flush that touches the stream, and a sweep every C{ttl / 2}
for idle ones), so the log of a gateway that died disappears on its own; an
ended stream's keys expire C{ttl} after its end.

Reading (L{RedisResumeLog.attach}) checks the owner, the kept range and the
events after C{after_seq} in one Lua script (one consistent snapshot), then
follows the live rest with C{XREAD BLOCK} on a connection of its own (a
blocked connection can't carry anything else) until the end marker.  When a
follower can't guarantee it delivered every event (Redis went away, the keys
expired, an event is missing), it ends the response with C{replay_end()}: the
client reconnects with the last id it got, and the new attachment either
continues exactly or is refused so the request goes upstream as a fresh one.

When Redis is down, writes are dropped (counted in L{RedisResumeLog.dropped},
one log line per outage) and the streams they belong to are trimmed past the
lost events once Redis is back, and attachments fire None.

txredisapi uses the global reactor for connecting, reconnecting and reply
timeouts; the injected clock drives batching and the expiry sweep.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import deque
from functools import partial
from typing import Any, Callable, Optional

import txredisapi
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from aura_proxy.redis_url import redis_address
from aura_proxy.resume.log import FOREIGN, Attachment, Subscriber

__all__ = ["RedisResumeLog"]

log = Logger()

# Writes one reactor turn of open/append/close calls.
# KEYS: per stream, its stream key then its owner key.
# ARGV: open expiry (ms), ended expiry (ms), then per stream:
#   reset ("1": opened in this batch, forget any older stream of that id),
#   holder (instance|owner), n, n x (entry id, event bytes), min id to keep
#   ("" = no trim), end entry id ("" = still open), end field ("end" or "cut").
_WRITE = b"""
local open_ms, ended_ms = ARGV[1], ARGV[2]
local a = 3
for k = 1, #KEYS, 2 do
  local key, okey = KEYS[k], KEYS[k + 1]
  if ARGV[a] == '1' then redis.call('DEL', key) end
  local n = tonumber(ARGV[a + 2])
  local owner = ARGV[a + 1]
  a = a + 3
  for i = 1, n do
    redis.pcall('XADD', key, ARGV[a], 'd', ARGV[a + 1])
    a = a + 2
  end
  if ARGV[a] ~= '' then redis.call('XTRIM', key, 'MINID', ARGV[a]) end
  local ms = open_ms
  if ARGV[a + 1] ~= '' then
    redis.pcall('XADD', key, ARGV[a + 1], ARGV[a + 2], '1')
    ms = ended_ms
  end
  a = a + 3
  redis.call('SET', okey, owner, 'PX', ms)
  redis.call('PEXPIRE', key, ms)
end
return 1
"""

# One attachment's snapshot.  KEYS: stream key, owner key.  ARGV: owner,
# after_seq, first entry id wanted, lease key prefix.  Returns {"none"},
# {"foreign"} (another owner's stream) or {"open"|"ended"|"cut", entries
# after after_seq}: "cut" when the log ends in a cut marker or its writing
# instance's lease is gone.
_READ = b"""
local holder = redis.call('GET', KEYS[2])
if not holder then return {'none'} end
local writer = nil
local bar = string.find(holder, '|', 1, true)
if bar then
  writer = string.sub(holder, 1, bar - 1)
  holder = string.sub(holder, bar + 1)
end
if holder ~= ARGV[1] then return {'foreign'} end
local after = tonumber(ARGV[2])
local first, last, ended = 1, 0, false
local head = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if #head > 0 then
  local s, k = string.match(head[1][1], '^(%d+)-(%d+)$')
  first = tonumber(s)
  if k == '2' then first = first + 1 end
  local tail = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  s, k = string.match(tail[1][1], '^(%d+)-(%d+)$')
  last = tonumber(s)
  ended = k == '2'
  if ended and tail[1][2][1] == 'cut' then ended = 'cut' end
end
if after < first - 1 or after > last then return {'none'} end
local state = 'open'
if ended == 'cut' then
  state = 'cut'
elseif ended then
  state = 'ended'
elseif writer and redis.call('EXISTS', ARGV[4] .. writer) == 0 then
  state = 'cut'
end
return {state, redis.call('XRANGE', KEYS[1], ARGV[3], '+')}
"""

_SCRIPTS = (_WRITE, _READ)
_CHUNK_EVENTS = 4096


class _Writer:
    """What the writing gateway knows of one open stream."""

    __slots__ = ("owner", "sizes", "size", "first_seq", "last_seq", "trim", "reset", "touched")

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.sizes: deque[tuple[int, int]] = deque()
        self.size = 0
        self.first_seq = 1
        self.last_seq = 0
        self.trim = False
        self.reset = True
        self.touched = False


class _Group:
    """One stream's share of a batch."""

    __slots__ = ("key", "okey", "writer", "reset", "events", "end_id", "end_field")

    def __init__(self, key: bytes, writer: _Writer) -> None:
        self.key = key
        self.okey = key + b":owner"
        self.writer = writer
        self.reset = writer.reset
        writer.reset = False
        self.events: list[tuple[int, bytes]] = []
        self.end_id: Optional[bytes] = None
        self.end_field = b"end"


class _Follower:
    """An attachment: follows one stream with XREAD BLOCK on its own connection."""

    def __init__(
        self,
        owner_log: "RedisResumeLog",
        handler: Any,
        key: bytes,
        subscriber: Subscriber,
        last_seq: int,
        last_id: bytes,
    ) -> None:
        self._log = owner_log
        self._handler = handler
        self._key = key
        self._okey = key + b":owner"
        self._subscriber = subscriber
        self._last_seq = last_seq
        self._last_id = last_id
        self.done = False
        #: Whether the log was cut short (its writer shut down or is gone).
        self.cut = False

    def detach(self) -> None:
        """Deliver nothing more and close the connection."""
        self._finish(end=False)

    def start(self) -> None:
        if not self.done:
            self._read()

    def _read(self) -> None:
        d = self._handler.execute_command(
            b"XREAD", b"COUNT", b"1000", b"BLOCK", self._log._block_ms,
            b"STREAMS", self._key, self._last_id, apply_timeout=False,
        )
        d.addCallback(self._got).addErrback(self._failed)

    def _got(self, reply: Optional[list[Any]]) -> None:
        if self.done:
            return
        if reply is None:
            # nothing new for block_ms: still there, and its writer alive?
            self._handler.execute_command(b"GET", self._okey).addCallback(
                self._holder
            ).addErrback(self._failed)
            return
        for entry_id, fields in reply[0][1]:
            self._last_id = entry_id
            if not self.deliver(entry_id, fields):
                self._finish(end=True)
                return
        self._read()

    def _holder(self, holder: Optional[bytes]) -> None:
        if self.done:
            return
        if holder is None:
            log.info("resume: stream log {key!r} expired while followed", key=self._key)
            self._finish(end=True)
            return
        writer, bar, _ = holder.partition(b"|")
        if not bar:
            self._read()  # written by a gateway without leases: cannot tell
            return
        self._handler.execute_command(b"EXISTS", self._log._lease_prefix + writer).addCallback(
            self._lease
        ).addErrback(self._failed)

    def _lease(self, alive: Any) -> None:
        if self.done:
            return
        if int(alive):
            self._read()
            return
        # The writing instance is gone: what it logged is all there will be.
        log.info("resume: the gateway writing stream log {key!r} is gone; it is cut short", key=self._key)
        self.cut = True
        self._handler.execute_command(
            b"XREAD", b"COUNT", b"100000", b"STREAMS", self._key, self._last_id
        ).addCallback(self._rest).addErrback(self._failed)

    def _rest(self, reply: Optional[list[Any]]) -> None:
        if self.done:
            return
        for entry_id, fields in reply[0][1] if reply else ():
            self._last_id = entry_id
            if not self.deliver(entry_id, fields):
                break
        self._finish(end=True)

    def deliver(self, entry_id: bytes, fields: list[bytes]) -> bool:
        """One entry: True to go on, False when the follower has to end."""
        seq = int(entry_id.split(b"-", 1)[0])
        if fields[0] == b"d":
            if seq != self._last_seq + 1:
                log.warn(
                    "resume: stream log {key!r} lost events {first}..{last}; ending the replay",
                    key=self._key, first=self._last_seq + 1, last=seq - 1,
                )
                return False
            self._last_seq = seq
            self._subscriber.replay_event(seq, fields[1])
            return True
        # the end marker (whole: even if its writer is gone now) or the cut one
        self.cut = fields[0] == b"cut"
        return False

    def _failed(self, failure: Failure) -> None:
        if self.done:
            return  # the connection was closed by detach()
        log.failure("resume: following stream log {key!r} failed", failure, key=self._key)
        self._finish(end=True)

    def _finish(self, end: bool) -> None:
        if self.done:
            return
        self.done = True
        self._log._followers.discard(self)
        self._log._closing.append(self._handler.disconnect())
        if end:
            _end(self._subscriber, self.cut)


def _end(subscriber: Subscriber, cut: bool) -> None:
    """End C{subscriber}'s replay: as cut short (with a retry hint) when it was."""
    replay_cut = getattr(subscriber, "replay_cut", None) if cut else None
    if replay_cut is not None:
        replay_cut()
    else:
        subscriber.replay_end()


class _Ended:
    """The attachment to a stream that had ended: nothing left to stop."""

    def detach(self) -> None:
        pass


class RedisResumeLog:
    """
    Stream logs in Redis Streams (see the module docstring).

    @ivar dropped: events lost because Redis could not be written.
    @ivar flushes: write round trips sent.
    """

    def __init__(
        self,
        clock: IReactorTime,
        url: str,
        ttl: float,
        max_events: int,
        max_bytes: int,
        *,
        key_prefix: str = "aura-proxy:resume:",
        block_ms: int = 1000,
        reply_timeout: float = 10.0,
        connect_timeout: float = 3.0,
        lease_ttl: float = 5.0,
        instance: Optional[str] = None,
    ) -> None:
        """
        @param url: C{redis://[:password@]host[:port][/db]}.
        @param block_ms: longest blocking read of a follower, after which it
            checks that the stream still exists.
        @param connect_timeout: how long L{start} waits for the first
            connection before giving up waiting (connecting goes on).
        @param lease_ttl: seconds this instance's lease outlives its last
            renewal (renewed every C{lease_ttl / 3}): how soon the streams of
            an instance that died are seen cut short.
        @param instance: this instance's name in Redis (default: random).
        """
        address = redis_address(url)
        self._host, self._port = address.host, address.port
        self._dbid, self._password = address.dbid, address.password
        self._clock = clock
        self._ttl = ttl
        self._open_ms = max(1, int(ttl * 1500))
        self._ended_ms = max(1, int(ttl * 1000))
        self._sweep_every = max(ttl / 2, 0.05)
        self._max_events = max(1, max_events)
        self._max_bytes = max_bytes
        self._prefix = key_prefix.encode("utf-8")
        #: This gateway instance's name in the stream logs' holders.
        self.instance = instance or secrets.token_hex(8)
        self._holder = self.instance.encode("ascii") + b"|"
        self._lease_prefix = self._prefix + b"instance:"
        self._lease_key = self._lease_prefix + self.instance.encode("ascii")
        self._lease_ms = b"%d" % max(1, int(lease_ttl * 1000))
        self._renew_every = max(lease_ttl / 3, 0.05)
        self._renew_call: Optional[IDelayedCall] = None
        self._leased: Any = None  # the connection the lease was last set on
        self._block_ms = block_ms
        self._reply_timeout = reply_timeout
        self._connect_timeout = connect_timeout
        self._factory: Any = None
        self._loaded: Any = None  # the connection the scripts were loaded on
        self._shas = [hashlib.sha1(s).hexdigest().encode("ascii") for s in _SCRIPTS]
        self._writers: dict[str, _Writer] = {}
        self._batch: dict[str, _Group] = {}
        self._groups: list[_Group] = []
        self._flush_call: Optional[IDelayedCall] = None
        self._sweep_call: Optional[IDelayedCall] = None
        self._in_flight: set["Deferred[Any]"] = set()
        self._followers: set[_Follower] = set()
        self._closing: list["Deferred[Any]"] = []
        self._outage = False
        self._stopped = False
        self.dropped = 0
        self.flushes = 0

    # -- life cycle --------------------------------------------------------------

    def start(self) -> "Deferred[None]":
        """
        Connect.  Fires when connected, or after C{connect_timeout} seconds
        (logged) while connecting goes on in the background; never fails.
        """
        factory = txredisapi.RedisFactory(
            f"{self._host}:{self._port}", self._dbid, 1, isLazy=True,
            charset=None, password=self._password, replyTimeout=self._reply_timeout,
            convertNumbers=False,
        )
        self._factory = factory
        from twisted.internet import reactor

        factory.startConnecting(
            HostnameEndpoint(reactor, self._host, self._port, timeout=self._connect_timeout)
        )
        self._sweep_call = self._clock.callLater(self._sweep_every, self._sweep)
        self._renew_call = self._clock.callLater(0, self._renew)
        started: Deferred[None] = Deferred()

        def connected(_: object) -> None:
            if not started.called:
                started.callback(None)

        def not_yet() -> None:
            if not started.called:
                log.warn(
                    "resume: Redis at {host}:{port} not reachable yet; streams are "
                    "not resumable until it is (connecting in the background)",
                    host=self._host, port=self._port,
                )
                started.callback(None)

        factory.deferred.addBoth(connected)
        timer = self._clock.callLater(self._connect_timeout, not_yet)
        started.addCallback(lambda _: timer.cancel() if timer.active() else None)
        return started

    def stop(self) -> "Deferred[None]":
        """
        Write what is pending (the cut markers of a drain), release this
        instance's lease (its streams still open are then cut short for
        every other instance), end followers (their clients resume
        elsewhere), close every connection.
        """
        self._stopped = True
        for call in (self._sweep_call, self._renew_call):
            if call is not None and call.active():
                call.cancel()
        self._sweep_call = self._renew_call = None
        self._flush_now()
        conn = self._connection()
        if conn is not None:
            released: Deferred[Any] = conn.execute_command(b"DEL", self._lease_key)
            self._in_flight.add(released)
            released.addBoth(lambda r: self._in_flight.discard(released))
        for follower in list(self._followers):
            follower.cut = True
            follower._finish(end=True)
        factory = self._factory

        def disconnect(_: object) -> "Deferred[Any]":
            return DeferredList(
                self._closing + ([factory.disconnect()] if factory is not None else []),
                consumeErrors=True,
            )

        d = DeferredList(list(self._in_flight), consumeErrors=True)
        d.addCallback(disconnect)
        return d.addCallback(lambda _: None)

    def flushed(self) -> "Deferred[None]":
        """
        Fires once everything written so far has been answered by Redis (or
        dropped): for shutdown and tests, never needed on the hot path.
        """
        self._flush_now()
        d = DeferredList(list(self._in_flight), consumeErrors=True)
        return d.addCallback(lambda _: None)

    def log_size(self) -> tuple[str, int, int]:
        """
        For metrics, at scrape time: C{("redis", streams, event bytes)} of
        the streams this process is writing (what it knows without asking
        Redis; streams other processes write, or that ended, are not in it).
        """
        return "redis", len(self._writers), sum(writer.size for writer in self._writers.values())

    # -- writing -----------------------------------------------------------------

    def open(self, stream_id: str, owner: str) -> None:
        writer = self._writers[stream_id] = _Writer(owner)
        self._group(stream_id, writer, new=True)

    def appender(self, stream_id: str) -> Callable[[int, bytes], None]:
        return partial(self.append, stream_id)

    def append(self, stream_id: str, seq: int, block: bytes) -> None:
        writer = self._writers.get(stream_id)
        if writer is None or seq <= writer.last_seq:
            return
        writer.last_seq = seq
        sizes = writer.sizes
        sizes.append((seq, len(block)))
        writer.size += len(block)
        while len(sizes) > self._max_events or (writer.size > self._max_bytes and len(sizes) > 1):
            old_seq, old_size = sizes.popleft()
            writer.size -= old_size
            writer.first_seq = old_seq + 1
            writer.trim = True
        group = self._batch.get(stream_id)
        if group is None:
            group = self._group(stream_id, writer)
        group.events.append((seq, block))

    def close(self, stream_id: str) -> None:
        self._end(stream_id, b"end")

    def cut(self, stream_id: str) -> None:
        """
        The stream was cut by this instance's shutdown (a drain), not by its
        upstream: its log stays, ended by a cut marker, so that a client
        resuming on another instance gets what it missed and then goes
        upstream with the upstream's own id.
        """
        self._end(stream_id, b"cut")

    def _end(self, stream_id: str, field: bytes) -> None:
        writer = self._writers.pop(stream_id, None)
        if writer is None:
            return
        group = self._batch.get(stream_id) or self._group(stream_id, writer)
        group.end_id = b"%d-2" % writer.last_seq
        group.end_field = field
        del self._batch[stream_id]  # anything later (a reopening) goes after

    def abandon(self, stream_id: str) -> None:
        writer = self._writers.pop(stream_id, None)
        if writer is None:
            return
        self._batch.pop(stream_id, None)
        key = self._prefix + stream_id.encode("utf-8")

        def forget(_: object) -> None:
            # Followers on any gateway see the owner key gone at their next
            # blocking-read timeout and end their clients' streams.
            conn = self._connection()
            if conn is not None:
                conn.execute_command(b"DEL", key, key + b":owner").addErrback(
                    lambda f: log.failure("resume: forgetting an abandoned stream failed", f)
                )

        self.flushed().addCallback(forget)

    def _group(self, stream_id: str, writer: _Writer, new: bool = False) -> _Group:
        group = None if new else self._batch.get(stream_id)
        if group is None:
            group = _Group(self._prefix + stream_id.encode("utf-8"), writer)
            self._batch[stream_id] = group
            self._groups.append(group)
            if self._flush_call is None and not self._stopped:
                self._flush_call = self._clock.callLater(0, self._flush)
        return group

    def _renew(self) -> None:
        """Renew this instance's lease (every C{lease_ttl / 3})."""
        conn = self._connection()
        if conn is not None:
            self._set_lease(conn)
        self._renew_call = self._clock.callLater(self._renew_every, self._renew)

    def _set_lease(self, conn: Any) -> None:
        self._leased = conn
        try:
            d: Deferred[Any] = conn.execute_command(b"SET", self._lease_key, b"1", b"PX", self._lease_ms)
        except Exception:
            self._leased = None
            return
        d.addErrback(self._lease_failed)

    def _lease_failed(self, failure: Failure) -> None:
        self._leased = None  # set again before the next write
        if not self._outage:
            log.warn("resume: renewing this instance's lease failed: {why}", why=failure.getErrorMessage())

    def _sweep(self) -> None:
        """Refresh the expiry of open streams no flush touched lately."""
        for stream_id, writer in self._writers.items():
            if not writer.touched:
                self._group(stream_id, writer)
            writer.touched = False
        self._sweep_call = self._clock.callLater(self._sweep_every, self._sweep)

    def _connection(self) -> Any:
        """A usable connection with the scripts loaded, or None."""
        if self._factory is None:
            return None
        for conn in self._factory.pool:
            if conn.connected:
                if conn is not self._loaded:
                    # sent before anything else on this connection: every
                    # EVALSHA after them finds the scripts
                    for script in _SCRIPTS:
                        conn.execute_command(b"SCRIPT", b"LOAD", script).addErrback(
                            lambda f: log.failure("resume: SCRIPT LOAD failed", f)
                        )
                    self._loaded = conn
                return conn
        return None

    def _flush_now(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush()

    def _flush(self) -> None:
        self._flush_call = None
        groups, self._groups, self._batch = self._groups, [], {}
        if not groups:
            return
        conn = self._connection()
        if conn is None:
            self._lost(groups, "not connected")
            return
        if self._leased is not conn or self._outage:
            # before any stream of this instance is written on a connection
            self._set_lease(conn)
        head: list[bytes] = [b"%d" % self._open_ms, b"%d" % self._ended_ms]
        keys: list[bytes] = []
        args = list(head)
        chunk: list[_Group] = []
        count = 0
        for group in groups:
            writer = group.writer
            writer.touched = True
            first = writer.first_seq
            keys += (group.key, group.okey)
            args += (b"1" if group.reset else b"", self._holder + writer.owner.encode("utf-8"))
            n_at = len(args)
            args.append(b"")
            n = 0
            for seq, block in group.events:
                if seq >= first:  # else evicted already: not worth sending
                    args += (b"%d-1" % seq, block)
                    n += 1
            args[n_at] = b"%d" % n
            if writer.trim:
                writer.trim = False
                args.append(b"%d-0" % first)
            else:
                args.append(b"")
            args += (group.end_id or b"", group.end_field)
            chunk.append(group)
            count += n + 1
            if count >= _CHUNK_EVENTS:
                self._send(conn, keys, args, chunk)
                keys, args, chunk, count = [], list(head), [], 0
        if chunk:
            self._send(conn, keys, args, chunk)

    def _send(self, conn: Any, keys: list[bytes], args: list[bytes], groups: list[_Group]) -> None:
        self.flushes += 1
        try:
            d: Deferred[Any] = conn.execute_command(
                b"EVALSHA", self._shas[0], len(keys), *keys, *args
            )
        except Exception as e:
            self._lost(groups, str(e))
            return
        self._in_flight.add(d)

        def done(result: object) -> None:
            self._in_flight.discard(d)
            if isinstance(result, Failure):
                self._script_lost(result)
                self._lost(groups, result.getErrorMessage())
            elif self._outage:
                self._outage = False
                log.info(
                    "resume: writing to Redis again ({dropped} events dropped so far)",
                    dropped=self.dropped,
                )

        d.addBoth(done)

    def _script_lost(self, failure: Failure) -> None:
        # SCRIPT FLUSH (or a failover) emptied the script cache: load again
        if "NOSCRIPT" in failure.getErrorMessage():
            self._loaded = None

    def _lost(self, groups: list[_Group], why: str) -> None:
        """
        A batch did not reach Redis: count it, and make sure what Redis keeps
        of each stream stays a contiguous run of events.
        """
        lost = sum(len(g.events) for g in groups)
        self.dropped += lost
        if not self._outage:
            self._outage = True
            log.warn(
                "resume: cannot write stream logs to Redis ({why}); dropping events "
                "until it is back", why=why,
            )
        for group in groups:
            writer = group.writer
            if group.reset:
                writer.reset = True
            if group.events:
                # events up to the last lost one are gone for good
                gap = group.events[-1][0]
                while writer.sizes and writer.sizes[0][0] <= gap:
                    writer.size -= writer.sizes.popleft()[1]
                writer.first_seq = max(writer.first_seq, gap + 1)
                writer.trim = True

    # -- reading -----------------------------------------------------------------

    def attach(
        self, stream_id: str, owner: str, after_seq: int, subscriber: Subscriber
    ) -> "Deferred[Optional[Attachment]]":
        if self._stopped:
            return succeed(None)
        if self._groups:
            self._flush_now()  # what this gateway wrote is read first
        conn = self._connection()
        if conn is None:
            return succeed(None)
        key = self._prefix + stream_id.encode("utf-8")
        try:
            d: Deferred[Any] = conn.execute_command(
                b"EVALSHA", self._shas[1], 2, key, key + b":owner",
                owner.encode("utf-8"), b"%d" % after_seq, b"%d-0" % (after_seq + 1),
                self._lease_prefix,
            )
        except Exception:
            return succeed(None)

        def read(reply: list[Any]) -> "Deferred[Optional[Attachment]]":
            state = reply[0]
            if state == b"none":
                return succeed(None)
            if state == b"foreign":
                return succeed(FOREIGN)
            entries: list[Any] = reply[1]
            if state == b"ended":
                return succeed(self._replay(key, subscriber, after_seq, entries))
            if state == b"cut":
                if not any(fields[0] == b"d" for _, fields in entries):
                    # Nothing missed: the upstream, asked with its own id, has the rest.
                    return succeed(None)
                return succeed(self._replay(key, subscriber, after_seq, entries, cut=True))
            return self._follow(key, subscriber, after_seq, entries)

        def failed(failure: Failure) -> None:
            self._script_lost(failure)
            log.failure("resume: reading stream log {key!r} failed", failure, key=key)
            return None

        return d.addCallback(read).addErrback(failed)

    def _replay(
        self, key: bytes, subscriber: Subscriber, after_seq: int, entries: list[Any], cut: bool = False
    ) -> Attachment:
        follower = _Follower(self, None, key, subscriber, after_seq, b"")
        follower.done = True
        for entry_id, fields in entries:
            if not follower.deliver(entry_id, fields):
                break
        _end(subscriber, cut)
        return _Ended()

    def _follow(
        self, key: bytes, subscriber: Subscriber, after_seq: int, entries: list[Any]
    ) -> "Deferred[Optional[Attachment]]":
        connecting = txredisapi.Connection(
            self._host, self._port, self._dbid, reconnect=False, charset=None,
            password=self._password, connectTimeout=self._connect_timeout,
            convertNumbers=False,
        )

        def connected(handler: Any) -> Optional[Attachment]:
            if self._stopped:
                self._closing.append(handler.disconnect())
                return None
            follower = _Follower(
                self, handler, key, subscriber, after_seq, b"%d-1" % after_seq
            )
            self._followers.add(follower)
            for entry_id, fields in entries:
                follower._last_id = entry_id
                if not follower.deliver(entry_id, fields):
                    follower._finish(end=True)
                    return follower
            follower.start()
            return follower

        def failed(failure: Failure) -> None:
            log.warn(
                "resume: no connection to follow stream log {key!r}: {why}",
                key=key, why=failure.getErrorMessage(),
            )
            return None

        return connecting.addCallbacks(connected, failed)

