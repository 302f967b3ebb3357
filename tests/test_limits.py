"""
Tests for C{[limits]}: L{aura_proxy.limits.MemoryLimits}, the L{Limits}
stage in the request path (in memory, and over a store that answers later
like Redis), and the section's configuration.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from aura_proxy.config import ConfigError, LimitsConfig, parse_config
from aura_proxy.limits import Decision, LimitStore, MemoryLimits, Slot, retry_after
from tests.test_proxy import CONFIG, TENANT, Harness

STREAM = dict(TENANT, Accept="text/event-stream")


def limited(**keys: object) -> str:
    """The test configuration with a C{[limits]} section of C{keys}."""
    return CONFIG + "[limits]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())


class Streams(Resource):
    """An upstream whose every request is an SSE stream the test ends."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render(self, request: Request) -> object:
        self.requests.append(request)
        if b"plain" in request.uri:
            request.setHeader(b"content-type", b"application/json")
            return b"{}"
        request.setHeader(b"content-type", b"text/event-stream")
        request.write(b"")
        return NOT_DONE_YET


class MemoryLimitsTests(TestCase):
    """Counting in one process."""

    def test_per_tenant_and_total(self) -> None:
        """A tenant gets at most C{per_tenant} slots, the process at most C{total}; 0 is no limit."""
        m = MemoryLimits(Clock())
        a1 = m.open_stream("a", 2, 3)[1]
        a2 = m.open_stream("a", 2, 3)[1]
        self.assertIsNotNone(a1)
        self.assertIsNotNone(a2)
        self.assertEqual(m.open_stream("a", 2, 3), (1.0, None))
        self.assertIsNotNone(m.open_stream("b", 2, 3)[1])
        self.assertEqual(m.open_stream("c", 2, 3), (1.0, None))
        self.assertEqual(m.open_streams(), 3)
        self.assertIsNotNone(m.open_stream("c", 0, 0)[1])

    def test_release_frees_once(self) -> None:
        """A released slot is free again; releasing it twice frees one slot, not two."""
        m = MemoryLimits(Clock())
        slot = m.open_stream("a", 1, 0)[1]
        assert slot is not None
        self.assertEqual(m.open_stream("a", 1, 0)[1], None)
        slot.release()
        slot.release()
        self.assertEqual(m.open_streams(), 0)
        self.assertIsNotNone(m.open_stream("a", 1, 0)[1])
        self.assertEqual(m.open_stream("a", 1, 0)[1], None)

    def test_token_bucket(self) -> None:
        """A bucket starts full (burst), refills at the rate, and says how long to wait when empty."""
        clock = Clock()
        m = MemoryLimits(clock)
        for _ in range(3):
            self.assertIsNone(m.take_token("a", 2.0, 3))
        wait = m.take_token("a", 2.0, 3)
        self.assertAlmostEqual(wait or 0, 0.5)
        self.assertIsNone(m.take_token("b", 2.0, 3))  # another tenant's bucket
        clock.advance(0.5)
        self.assertIsNone(m.take_token("a", 2.0, 3))
        self.assertIsNotNone(m.take_token("a", 2.0, 3))
        clock.advance(100)
        for _ in range(3):
            self.assertIsNone(m.take_token("a", 2.0, 3))  # never more than the burst
        self.assertIsNotNone(m.take_token("a", 2.0, 3))

    def test_idle_buckets_forgotten(self) -> None:
        """Past MAX_BUCKETS tenants, the buckets that have refilled are forgotten (memory stays bounded)."""
        clock = Clock()
        m = MemoryLimits(clock)
        m.MAX_BUCKETS = 10
        for i in range(10):
            m.take_token(f"t{i}", 1.0, 1)
        clock.advance(5)
        m.take_token("new", 1.0, 1)
        self.assertEqual(len(m._buckets), 1)

    def test_retry_after(self) -> None:
        """Retry-After is whole seconds, rounded up, at least 1."""
        self.assertEqual(retry_after(0.01), b"1")
        self.assertEqual(retry_after(1.2), b"2")
        self.assertEqual(retry_after(3.0), b"3")


class StageTests(TestCase):
    """The Limits stage in the request path, counting in memory."""

    def open(self, h: Harness, headers: dict[str, str] = STREAM, path: str = "/api/aura/s") -> Any:
        d = h.client.request("GET", "http://gw.example" + path, headers=headers, unbuffered=True)
        h.flush()
        return h.successResultOf(d)

    def test_third_stream_refused_until_one_ends(self) -> None:
        """
        With max_streams_per_tenant = 2 a tenant's third stream gets 429
        too_many_streams (JSON, request id, Retry-After) without reaching the
        upstream; once one ends, the next one is served.
        """
        upstream = Streams()
        h = Harness(upstream, limited(max_streams_per_tenant=2))
        self.assertEqual(self.open(h).code, 200)
        self.assertEqual(self.open(h).code, 200)
        refused = self.open(h)
        self.assertEqual(refused.code, 429)
        self.assertEqual(refused.headers.getRawHeaders("retry-after"), ["1"])
        body = h.json(refused)
        self.assertEqual(body["error"]["code"], "too_many_streams")
        self.assertEqual(body["error"]["request_id"], refused.headers.getRawHeaders("x-request-id")[0])
        self.assertEqual(len(upstream.requests), 2)
        self.assertEqual(h.history.records[-1].status_code, 429)
        # another tenant is not affected
        self.assertEqual(self.open(h, dict(STREAM, **{"X-Tenant-ID": "t2"})).code, 200)
        upstream.requests[0].finish()
        h.flush()
        self.assertEqual(self.open(h).code, 200)
        self.assertEqual(self.open(h).code, 429)

    def test_plain_requests_take_no_slot(self) -> None:
        """A request that does not ask for a stream is never refused for open streams."""
        upstream = Streams()
        h = Harness(upstream, limited(max_streams_per_tenant=1))
        self.assertEqual(self.open(h).code, 200)
        for _ in range(3):
            self.assertEqual(self.open(h, TENANT, "/api/aura/plain").code, 200)
        self.assertEqual(h.gateway.limits.open_streams(), 1)

    def test_total_limit(self) -> None:
        """max_streams_total counts every tenant's streams (and those without a tenant)."""
        h = Harness(Streams(), limited(max_streams_total=2))
        self.assertEqual(self.open(h).code, 200)
        self.assertEqual(self.open(h, dict(STREAM, **{"X-Tenant-ID": "t2"})).code, 200)
        self.assertEqual(self.open(h, dict(STREAM, **{"X-Tenant-ID": "t3"})).code, 429)
        self.assertEqual(self.open(h, {"Accept": "text/event-stream"}, "/api/aura/public/x").code, 429)

    def test_client_leaving_frees_the_slot(self) -> None:
        """A stream whose client disconnects frees its slot (the call ends)."""
        upstream = Streams()
        h = Harness(upstream, limited(max_streams_per_tenant=1))
        d = h.client.request("GET", "http://gw.example/api/aura/s", headers=STREAM, unbuffered=True)
        h.flush()
        self.assertEqual(h.gateway.limits.open_streams(), 1)
        d.cancel()
        h.flush()
        upstream.requests[0].finish()  # whatever the upstream does after
        h.flush()
        self.assertEqual(h.gateway.limits.open_streams(), 0)

    def test_upstream_failure_frees_the_slot(self) -> None:
        """A stream request the upstream answers with an error (not a stream) frees its slot."""
        h = Harness(Streams(), limited(max_streams_per_tenant=1))
        self.assertEqual(self.open(h, STREAM, "/api/aura/plain").code, 200)
        self.assertEqual(h.gateway.limits.open_streams(), 0)
        self.assertEqual(self.open(h).code, 200)

    def test_request_rate(self) -> None:
        """
        Over requests_per_second_per_tenant (with its burst) a tenant gets 429
        rate_limited with Retry-After; the bucket refills with time.
        """
        upstream = Streams()
        h = Harness(upstream, limited(requests_per_second_per_tenant="0.5", burst=2))
        self.assertEqual(self.open(h, TENANT, "/api/aura/plain").code, 200)
        self.assertEqual(self.open(h, TENANT, "/api/aura/plain").code, 200)
        refused = self.open(h, TENANT, "/api/aura/plain")
        self.assertEqual(refused.code, 429)
        self.assertEqual(refused.headers.getRawHeaders("retry-after"), ["2"])
        self.assertEqual(h.json(refused)["error"]["code"], "rate_limited")
        self.assertEqual(len(upstream.requests), 2)
        h.clock.advance(2)
        self.assertEqual(self.open(h, TENANT, "/api/aura/plain").code, 200)

    def test_off_counts_nothing(self) -> None:
        """Without [limits] (every limit 0) nothing is counted."""
        h = Harness(Streams())
        for _ in range(5):
            self.assertEqual(self.open(h).code, 200)
        self.assertEqual(h.gateway.limits.open_streams(), 0)

    def test_reload_keeps_counts(self) -> None:
        """A new configuration changes the limits; the streams already open still count."""
        h = Harness(Streams(), limited(max_streams_per_tenant=3))
        self.assertEqual(self.open(h).code, 200)
        self.assertEqual(self.open(h).code, 200)
        h.gateway.use(parse_config(limited(max_streams_per_tenant=2), "test.ini"))
        self.assertEqual(self.open(h).code, 429)


class LaterStore(LimitStore):
    """A store that answers later, as Redis does: the test fires each answer."""

    def __init__(self) -> None:
        self.memory = MemoryLimits(Clock())
        self.pending: list[tuple[Deferred[Any], Any]] = []

    def open_stream(self, tenant: str, per_tenant: int, total: int) -> Any:
        d: Deferred[Any] = Deferred()
        self.pending.append((d, self.memory.open_stream(tenant, per_tenant, total)))
        return d

    def take_token(self, tenant: str, rate: float, burst: int) -> Any:
        d: Deferred[Decision] = Deferred()
        self.pending.append((d, self.memory.take_token(tenant, rate, burst)))
        return d

    def open_streams(self) -> int:
        return self.memory.open_streams()

    def answer(self) -> None:
        while self.pending:
            d, value = self.pending.pop(0)
            d.callback(value)


class LaterStageTests(TestCase):
    """The stage over a store that answers later (Redis)."""

    def harness(self, **keys: object) -> tuple[Harness, LaterStore, Streams]:
        upstream = Streams()
        h = Harness(upstream, limited(**keys))
        store = LaterStore()
        h.gateway.limits = store
        h.gateway._services = dataclasses.replace(h.gateway._services, limits=store)
        h.gateway.use(h.gateway.config)
        return h, store, upstream

    def test_waits_then_goes_on(self) -> None:
        """The request waits for the store's answers (token, then slot), then goes upstream."""
        h, store, upstream = self.harness(max_streams_per_tenant=1, requests_per_second_per_tenant=10)
        d = h.client.request("GET", "http://gw.example/api/aura/s", headers=STREAM, unbuffered=True)
        h.flush()
        self.assertNoResult(d)
        self.assertEqual(upstream.requests, [])
        store.answer()
        h.flush()
        store.answer()
        h.flush()
        self.assertEqual(h.successResultOf(d).code, 200)
        self.assertEqual(len(upstream.requests), 1)
        self.assertEqual(store.open_streams(), 1)

    def test_refused_later(self) -> None:
        """A refusal that comes later is the same 429 with Retry-After."""
        h, store, upstream = self.harness(max_streams_per_tenant=1)
        first = h.client.request("GET", "http://gw.example/api/aura/s", headers=STREAM, unbuffered=True)
        h.flush()
        store.answer()
        h.flush()
        self.assertEqual(h.successResultOf(first).code, 200)
        second = h.client.request("GET", "http://gw.example/api/aura/s", headers=STREAM)
        h.flush()
        store.answer()
        h.flush()
        response = h.successResultOf(second)
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["1"])
        self.assertEqual(len(upstream.requests), 1)

    def test_store_failure_goes_on(self) -> None:
        """A store that fails unexpectedly is logged and the request goes on: limits never stop traffic."""
        h, store, upstream = self.harness(max_streams_per_tenant=1)
        d = h.client.request("GET", "http://gw.example/api/aura/s", headers=STREAM, unbuffered=True)
        h.flush()
        failing, _ = store.pending.pop()
        failing.errback(RuntimeError("boom"))
        h.flush()
        self.assertEqual(h.successResultOf(d).code, 200)
        self.assertEqual(len(upstream.requests), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_client_gone_while_waiting(self) -> None:
        """A client that leaves while the store answers is recorded 499 and its slot freed."""
        h, store, upstream = self.harness(max_streams_per_tenant=1)
        d = h.client.request("GET", "http://gw.example/api/aura/s", headers=STREAM, unbuffered=True)
        h.flush()
        d.cancel()
        h.flush()
        store.answer()
        h.flush()
        self.assertEqual(upstream.requests, [])
        self.assertEqual(store.open_streams(), 0)
        self.assertEqual(h.history.records[-1].status_code, 499)
        self.failureResultOf(d)


class ConfigTests(TestCase):
    """The [limits] section."""

    def test_defaults_off(self) -> None:
        """Without the section every limit is 0 (off), counted in memory."""
        limits = parse_config(CONFIG, "t.ini").limits
        self.assertEqual(limits, LimitsConfig())
        self.assertFalse(limits.enabled)

    def test_shipped_file(self) -> None:
        """etc/aura-proxy.ini (the embedded defaults) lists every [limits] key, at its default."""
        from aura_proxy.config import _LIMITS, default_config_text, load_config

        self.assertEqual(load_config(None).limits, LimitsConfig())
        text = default_config_text()
        section = text[text.index("[limits]"):]
        for key in _LIMITS:
            self.assertIn(f"\n{key} = ", section)

    def test_values(self) -> None:
        """Every key parses; burst 0 is the rate rounded up."""
        limits = parse_config(limited(
            max_streams_per_tenant=2, max_streams_total=100, requests_per_second_per_tenant="2.5",
            store="redis://127.0.0.1:6379/0", stream_lease=10), "t.ini").limits
        self.assertEqual((limits.max_streams_per_tenant, limits.max_streams_total), (2, 100))
        self.assertEqual((limits.requests_per_second_per_tenant, limits.bucket_size), (2.5, 3))
        self.assertEqual((limits.store, limits.stream_lease), ("redis://127.0.0.1:6379/0", 10.0))
        self.assertTrue(limits.enabled)

    def test_mistakes_named(self) -> None:
        """Bad values are refused naming file, section and key."""
        with self.assertRaises(ConfigError) as e:
            parse_config(limited(max_streams_per_tenant=-1, requests_per_second_per_tenant="x",
                                 store="mongodb://x", nope=1), "t.ini")
        text = str(e.exception)
        self.assertIn("t.ini: [limits] max_streams_per_tenant:", text)
        self.assertIn("t.ini: [limits] requests_per_second_per_tenant:", text)
        self.assertIn("t.ini: [limits] store: expected memory or redis://host:port/db", text)
        self.assertIn("t.ini: [limits] nope: unknown key", text)

    def test_workers_need_redis(self) -> None:
        """With workers > 1, limits counted in memory are refused (each worker would count alone)."""
        base = CONFIG.replace("[gateway]\n", "[gateway]\nworkers = 2\n") + "[sse]\nresume = off\n"
        with self.assertRaises(ConfigError) as e:
            parse_config(base + "[limits]\nmax_streams_per_tenant = 2\n", "t.ini")
        self.assertIn("t.ini: [limits] store: store = memory cannot be used with [gateway] workers = 2", str(e.exception))
        parse_config(base + "[limits]\nmax_streams_per_tenant = 2\nstore = redis://127.0.0.1/0\n", "t.ini")
        parse_config(base, "t.ini")  # no limits: nothing to share


class SlotTests(TestCase):
    """A slot's release."""

    def test_release_once(self) -> None:
        """Only the first release reaches the store."""
        freed: list[Slot] = []

        class Owner:
            def free(self, slot: Slot) -> None:
                freed.append(slot)

        slot = Slot(Owner(), "t", b"m")  # type: ignore[arg-type]
        slot.release()
        slot.release()
        self.assertEqual(freed, [slot])

