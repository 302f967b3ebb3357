"""
Where C{[limits]} counts: stream slots and token buckets, per tenant.

L{MemoryLimits} counts in this process.  L{RedisLimits} counts in Redis,
shared by every process and host using it, with Redis doing the counting
(no coordinator of our own):

    P streams              a sorted set: every open stream's slot, scored
                           by the time (Redis's clock, ms) its lease ends
    P streams:t:TENANT     the same, for one tenant
    P rate:TENANT          a hash {tokens, ts}: the tenant's token bucket

Taking a slot or a token is a Lua script (atomic: two processes never
both take the last slot); the takes of one reactor turn go in one script
call, one round trip.  Each process renews the leases of the slots it
holds every third of C{stream_lease} (on the injected clock); the slots of
a process that died expire on their own and are swept by the next take.
When Redis cannot answer (not connected, an error, no reply), the limits
fall back to counting in this process (L{MemoryLimits}), logged once per
outage, and go back to Redis once it answers again.

The limit values come with each call, so a reload changes them for new
requests while the counts (the open streams) stay.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import uuid
from typing import Any, Optional, Union

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from aura_proxy.config import LimitsConfig
from aura_proxy.redis_url import redis_address

__all__ = ["Decision", "LimitStore", "MemoryLimits", "RedisLimits", "Slot", "make_limits"]

log = Logger("aura_proxy.limits")

#: What a take answers: None (allowed) or the seconds to wait (refused).
Decision = Optional[float]

#: Seconds a refused stream is told to wait: a slot frees when a stream
#: ends, which nobody can foresee.
STREAM_RETRY_AFTER = 1.0


class Slot:
    """
    One open stream's place, taken by L{LimitStore.open_stream}; L{release}
    gives it back (once; again is a no-op).
    """

    __slots__ = ("tenant", "member", "_owner")

    def __init__(self, owner: "_SlotOwner", tenant: str, member: bytes) -> None:
        self._owner: Optional[_SlotOwner] = owner
        self.tenant = tenant
        self.member = member

    def release(self) -> None:
        """The stream has ended: free the slot."""
        owner, self._owner = self._owner, None
        if owner is not None:
            owner.free(self)


class _SlotOwner:
    def free(self, slot: Slot) -> None:
        raise NotImplementedError()


#: A take's answer: at once, or later (Redis).
Taken = Union[tuple[Decision, Optional[Slot]], "Deferred[tuple[Decision, Optional[Slot]]]"]
Rated = Union[Decision, "Deferred[Decision]"]


class LimitStore:
    """Counts streams and requests for C{[limits]}."""

    def open_stream(self, tenant: str, per_tenant: int, total: int) -> Taken:
        """
        Take a stream slot for C{tenant} if it has fewer than C{per_tenant}
        open streams and the gateway fewer than C{total} (0: no such limit).

        @return: C{(None, slot)} when taken, C{(seconds, None)} when refused;
            or a Deferred of that.
        """
        raise NotImplementedError()

    def take_token(self, tenant: str, rate: float, burst: int) -> Rated:
        """
        Take one token from C{tenant}'s bucket (C{rate} per second, at most
        C{burst}); None when taken, else the seconds until one is there.
        """
        raise NotImplementedError()

    def open_streams(self) -> int:
        """How many slots this process holds now."""
        raise NotImplementedError()

    def start(self) -> None:
        """Connect, start timers (nothing to do in memory)."""

    def stop(self) -> "Deferred[None]":
        """Stop timers and close connections."""
        return succeed(None)


class MemoryLimits(LimitStore, _SlotOwner):
    """Counting in this process."""

    #: Buckets kept before the full ones (idle tenants) are forgotten.
    MAX_BUCKETS = 10000

    def __init__(self, clock: IReactorTime) -> None:
        self._seconds = clock.seconds
        self._per_tenant: dict[str, int] = {}
        self._total = 0
        self._buckets: dict[str, list[float]] = {}
        self._full_at: dict[str, float] = {}

    def open_stream(self, tenant: str, per_tenant: int, total: int) -> tuple[Decision, Optional[Slot]]:
        count = self._per_tenant.get(tenant, 0)
        if (per_tenant and count >= per_tenant) or (total and self._total >= total):
            return STREAM_RETRY_AFTER, None
        self._per_tenant[tenant] = count + 1
        self._total += 1
        return None, Slot(self, tenant, b"")

    def free(self, slot: Slot) -> None:
        count = self._per_tenant.get(slot.tenant, 0) - 1
        if count > 0:
            self._per_tenant[slot.tenant] = count
        else:
            self._per_tenant.pop(slot.tenant, None)
        self._total = max(0, self._total - 1)

    def take_token(self, tenant: str, rate: float, burst: int) -> Decision:
        now = self._seconds()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            if len(self._buckets) >= self.MAX_BUCKETS:
                self._forget_full(now, rate, burst)
            bucket = self._buckets[tenant] = [float(burst), now]
        tokens = min(float(burst), bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return None
        bucket[0] = tokens
        return (1.0 - tokens) / rate

    def _forget_full(self, now: float, rate: float, burst: int) -> None:
        """Forget the buckets that have refilled (their tenants were idle)."""
        for tenant, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * rate >= burst:
                del self._buckets[tenant]

    def open_streams(self) -> int:
        return self._total


# -- Redis ---------------------------------------------------------------------

# A reactor turn's takes, in one script call.  Per take, in order:
#   open a stream slot: KEYS all slots, the tenant's slots; ARGV "o", lease
#     ms, per-tenant limit, total limit (0: none), member;
#   take a token: KEYS the tenant's bucket; ARGV "t", tokens per second, burst.
# Returns per take {1, 0} (taken) or {0, ms to wait} (a slot: {0, 0}).
_BATCH = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
local k, a = 1, 1
while a <= #ARGV do
  if ARGV[a] == 'o' then
    local all, mine = KEYS[k], KEYS[k + 1]
    local lease, per, total = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
    local member = ARGV[a + 4]
    k, a = k + 2, a + 5
    redis.call('ZREMRANGEBYSCORE', all, '-inf', now)
    redis.call('ZREMRANGEBYSCORE', mine, '-inf', now)
    if (per > 0 and redis.call('ZCARD', mine) >= per) or (total > 0 and redis.call('ZCARD', all) >= total) then
      out[#out + 1] = {0, 0}
    else
      redis.call('ZADD', all, now + lease, member)
      redis.call('ZADD', mine, now + lease, member)
      redis.call('PEXPIRE', all, lease * 2)
      redis.call('PEXPIRE', mine, lease * 2)
      out[#out + 1] = {1, 0}
    end
  else
    local key = KEYS[k]
    local rate, burst = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    k, a = k + 1, a + 3
    local b = redis.call('HMGET', key, 'tokens', 'ts')
    local tokens = tonumber(b[1]) or burst
    local ts = tonumber(b[2]) or now
    tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
    local taken, wait = 0, 0
    if tokens >= 1 then
      tokens = tokens - 1
      taken = 1
    else
      wait = math.ceil((1 - tokens) * 1000 / rate)
    end
    redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', now)
    redis.call('PEXPIRE', key, math.ceil(burst * 1000 / rate) + 1000)
    out[#out + 1] = {taken, wait}
  end
end
return out
"""

# KEYS: pairs (all slots, a tenant's slots).  ARGV: lease ms, then one member
# per pair.  Moves each lease's end to now + lease.
_RENEW = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i = 1, #KEYS, 2 do
  local member = ARGV[(i + 1) / 2 + 1]
  redis.call('ZADD', KEYS[i], now + lease, member)
  redis.call('ZADD', KEYS[i + 1], now + lease, member)
  redis.call('PEXPIRE', KEYS[i], lease * 2)
  redis.call('PEXPIRE', KEYS[i + 1], lease * 2)
end
return 1
"""

#: Slots renewed, takes sent, per script call.
_RENEW_CHUNK = 1000
_BATCH_TAKES = 1000

_SCRIPTS = {name: (script, hashlib.sha1(script).hexdigest().encode("ascii"))
            for name, script in (("batch", _BATCH), ("renew", _RENEW))}


class RedisLimits(LimitStore, _SlotOwner):
    """
    Counting in Redis (see the module docstring), falling back to
    L{MemoryLimits} while Redis cannot answer.

    @param url: C{redis://[:password@]host[:port][/db]}.
    @param lease: seconds a slot lives in Redis without renewal.
    @param key_prefix: the keys' prefix (tests use their own).
    @param reply_timeout: seconds a take waits for Redis before counting
        in this process instead.
    """

    def __init__(
        self,
        clock: IReactorTime,
        url: str,
        lease: float = 30.0,
        *,
        key_prefix: str = "aura-proxy:limits:",
        reply_timeout: float = 1.0,
        connect_timeout: float = 1.0,
    ) -> None:
        address = redis_address(url)
        self._host, self._port = address.host, address.port
        self._dbid, self._password = address.dbid, address.password
        self._clock = clock
        self._lease_ms = max(1, int(lease * 1000))
        self._renew_every = max(lease / 3, 0.01)
        self._prefix = key_prefix.encode("utf-8")
        self._all = self._prefix + b"streams"
        self._reply_timeout = reply_timeout
        self._connect_timeout = connect_timeout
        self._factory: Any = None
        self._renew_call: Optional[IDelayedCall] = None
        #: The slots held in Redis, by member.
        self._held: dict[bytes, Slot] = {}
        self._names = (uuid.uuid4().hex + ":").encode("ascii")
        self._counter = itertools.count(1)
        self.fallback = MemoryLimits(clock)
        #: Whether Redis failed last time (one log line per outage).
        self.outage = False
        #: Script calls sent (each one round trip).
        self.round_trips = 0
        #: Whether the first connection is being made (at most
        #: connect_timeout): takes wait for it.
        self._connecting = False
        self._connect_call: Optional[IDelayedCall] = None
        #: This reactor turn's takes: keys, args, who waits for the reply.
        self._batch: list[tuple[list[bytes], list[bytes], Deferred[Any]]] = []
        #: Script calls of takes sent and not yet answered.
        self._in_flight = 0

    # -- life cycle --------------------------------------------------------------

    def start(self) -> None:
        import txredisapi
        from twisted.internet import reactor
        from twisted.internet.endpoints import HostnameEndpoint

        factory = txredisapi.RedisFactory(
            f"{self._host}:{self._port}", self._dbid, 1, isLazy=True,
            charset=None, password=self._password, replyTimeout=self._reply_timeout,
            convertNumbers=False,
        )
        self._factory = factory
        factory.startConnecting(
            HostnameEndpoint(reactor, self._host, self._port, timeout=self._connect_timeout)
        )
        # Until the first connection (or connect_timeout), a take waits for
        # it rather than count in this process.
        self._connecting = True
        self._connect_call = self._clock.callLater(self._connect_timeout, self._first_connection)

        def connected(result: object) -> None:
            self._first_connection()

        factory.deferred.addBoth(connected)
        self._renew_call = self._clock.callLater(self._renew_every, self._renew)

    def stop(self) -> "Deferred[None]":
        if self._renew_call is not None and self._renew_call.active():
            self._renew_call.cancel()
        self._renew_call = None
        self._first_connection()
        self._flush()
        factory, self._factory = self._factory, None
        if factory is None:
            return succeed(None)
        d: Deferred[Any] = factory.disconnect()
        return d.addBoth(lambda _: None)

    # -- counting ----------------------------------------------------------------

    def open_stream(self, tenant: str, per_tenant: int, total: int) -> Taken:
        member = self._names + b"%d" % next(self._counter)
        tenant_key = self._tenant_key(b"streams:t:", tenant)
        d = self._queue([self._all, tenant_key], [b"o", b"%d" % self._lease_ms, b"%d" % per_tenant,
                                                   b"%d" % total, member])
        if d is None:
            return self.fallback.open_stream(tenant, per_tenant, total)

        def answered(reply: Any) -> tuple[Decision, Optional[Slot]]:
            if isinstance(reply, Failure):
                self._failed(reply)
                return self.fallback.open_stream(tenant, per_tenant, total)
            self._back()
            if int(reply[0]) != 1:
                return STREAM_RETRY_AFTER, None
            slot = self._held[member] = Slot(self, tenant, member)
            return None, slot

        return d.addBoth(answered)

    def free(self, slot: Slot) -> None:
        self._held.pop(slot.member, None)
        conn = self._connection()
        if conn is None:
            return  # its lease ends on its own
        tenant_key = self._tenant_key(b"streams:t:", slot.tenant)
        try:
            conn.execute_command(b"ZREM", self._all, slot.member).addErrback(lambda f: None)
            conn.execute_command(b"ZREM", tenant_key, slot.member).addErrback(lambda f: None)
        except Exception:
            pass

    def take_token(self, tenant: str, rate: float, burst: int) -> Rated:
        key = self._tenant_key(b"rate:", tenant)
        d = self._queue([key], [b"t", repr(rate).encode("ascii"), b"%d" % burst])
        if d is None:
            return self.fallback.take_token(tenant, rate, burst)

        def answered(reply: Any) -> Decision:
            if isinstance(reply, Failure):
                self._failed(reply)
                return self.fallback.take_token(tenant, rate, burst)
            self._back()
            taken, wait_ms = int(reply[0]), int(reply[1])
            return None if taken == 1 else max(wait_ms, 1) / 1000.0

        return d.addBoth(answered)

    def open_streams(self) -> int:
        return len(self._held) + self.fallback.open_streams()

    def _renew(self) -> None:
        """Every third of the lease: move the leases of the slots held here forward."""
        self._renew_call = self._clock.callLater(self._renew_every, self._renew)
        held = list(self._held.items())
        for start in range(0, len(held), _RENEW_CHUNK):
            keys: list[bytes] = []
            members: list[bytes] = []
            for member, slot in held[start:start + _RENEW_CHUNK]:
                keys += (self._all, self._tenant_key(b"streams:t:", slot.tenant))
                members.append(member)
            d = self._eval("renew", keys, [b"%d" % self._lease_ms, *members])
            if d is not None:
                d.addCallbacks(lambda _: self._back(), self._failed)

    # -- Redis -------------------------------------------------------------------

    def _tenant_key(self, kind: bytes, tenant: str) -> bytes:
        return self._prefix + kind + tenant.encode("utf-8")

    def _connection(self) -> Any:
        if self._factory is None:
            return None
        for conn in self._factory.pool:
            if conn.connected:
                return conn
        return None

    def _first_connection(self) -> None:
        """Connected, or given up waiting: the takes that waited go on."""
        timer, self._connect_call = self._connect_call, None
        if timer is not None and timer.active():
            timer.cancel()
        self._connecting = False
        self._flush()

    def _queue(self, keys: list[bytes], args: list[bytes]) -> "Optional[Deferred[Any]]":
        """
        A take, sent at once when no script call is in flight, else with
        the takes that come meanwhile in the next one (L{_BATCH}, sent when
        the reply comes): one round trip for many requests under load, no
        timer.  Its reply item, or a failure; None when not connected (the
        caller counts in the process).  While the first connection is being
        made, takes wait for it.
        """
        if self._factory is None or (not self._connecting and self._connection() is None):
            self._failed(None)
            return None
        d: Deferred[Any] = Deferred()
        self._batch.append((keys, args, d))
        if not self._in_flight and not self._connecting:
            self._flush()
        return d

    def _flush(self) -> None:
        """Send the takes queued: one script call per L{_BATCH_TAKES}."""
        batch, self._batch = self._batch, []
        if not batch:
            return
        conn = self._connection()
        for start in range(0, len(batch), _BATCH_TAKES):
            chunk = batch[start:start + _BATCH_TAKES]
            if conn is None:
                self._deliver(Failure(ConnectionError("not connected")), chunk, sent=False)
                continue
            keys = [key for keys, _, _ in chunk for key in keys]
            args = [arg for _, args, _ in chunk for arg in args]
            self._in_flight += 1
            self._run(conn, "batch", keys, args).addBoth(self._deliver, chunk)

    def _deliver(
        self, replies: Any, chunk: list[tuple[list[bytes], list[bytes], "Deferred[Any]"]], sent: bool = True
    ) -> None:
        """Each take of C{chunk} gets its reply item (or the failure); then the takes queued meanwhile go."""
        if sent:
            self._in_flight -= 1
        if isinstance(replies, Failure):
            for _, _, d in chunk:
                d.errback(replies)
        else:
            for (_, _, d), reply in zip(chunk, replies):
                d.callback(reply)
        if sent and not self._in_flight and not self._connecting:
            self._flush()

    def _eval(self, name: str, keys: list[bytes], args: list[bytes]) -> "Optional[Deferred[Any]]":
        """Run a script now; None when not connected."""
        conn = self._connection()
        if conn is None:
            self._failed(None)
            return None
        return self._run(conn, name, keys, args)

    def _run(self, conn: Any, name: str, keys: list[bytes], args: list[bytes]) -> "Deferred[Any]":
        """Run a script on C{conn} by its sha (sent whole on NOSCRIPT)."""
        script, sha = _SCRIPTS[name]
        self.round_trips += 1
        try:
            d: Deferred[Any] = conn.execute_command(b"EVALSHA", sha, len(keys), *keys, *args)
        except Exception as e:
            return fail(e)

        def retry(failure: Failure) -> Any:
            if "NOSCRIPT" not in failure.getErrorMessage():
                return failure
            return conn.execute_command(b"EVAL", script, len(keys), *keys, *args)

        return d.addErrback(retry)

    def _failed(self, failure: Optional[Failure]) -> None:
        if not self.outage:
            self.outage = True
            why = "not connected" if failure is None else failure.getErrorMessage()
            log.warn(
                "limits: Redis at {host}:{port} cannot answer ({why}); counting in this "
                "process until it is back", host=self._host, port=self._port, why=why,
            )

    def _back(self) -> None:
        if self.outage:
            self.outage = False
            log.info("limits: counting in Redis at {host}:{port} again", host=self._host, port=self._port)


def make_limits(config: LimitsConfig, clock: IReactorTime) -> LimitStore:
    """The store C{[limits] store} names."""
    if config.store == "memory":
        return MemoryLimits(clock)
    return RedisLimits(clock, config.store, config.stream_lease, key_prefix=config.key_prefix)


def retry_after(seconds: float) -> bytes:
    """A C{Retry-After} value: whole seconds, at least 1."""
    return b"%d" % max(1, math.ceil(seconds))
