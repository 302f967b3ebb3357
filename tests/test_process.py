"""
Tests for L{aura_proxy.process}: how a gateway process tunes itself, and what
it says about it.
"""

from __future__ import annotations

import gc
from typing import Any, List

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.selectreactor import SelectReactor
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from aura_proxy import fastclient, process, relay, sse


class PrepareProcessTests(SynchronousTestCase):
    """prepare_process: lean loop, GC pace, one log line about the C parts."""

    def setUp(self) -> None:
        self.events: List[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        threshold = gc.get_threshold()
        self.addCleanup(lambda: gc.set_threshold(*threshold))
        self.addCleanup(gc.unfreeze)

    def hot_path_events(self) -> List[dict[str, Any]]:
        return [e for e in self.events if "hot path" in e.get("log_format", "")]

    def test_epoll_reactor(self) -> None:
        """An epoll reactor gets the lean loop; the GC its slower young pace; one info line."""
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        process.prepare_process(reactor)
        self.assertEqual(reactor.doIteration.__name__, "do_poll")
        self.assertEqual(gc.get_threshold()[0], 50_000)
        [event] = self.hot_path_events()
        from aura_proxy import twisted_internals

        if (
            sse.ACCELERATED and fastclient._ChunkedReader is not None and relay.ACCELERATED
            and not twisted_internals.unavailable()
        ):
            self.assertEqual(event["log_level"], LogLevel.info)
            self.assertEqual(event["lean"], "on")

    def test_missing_extensions_warn(self) -> None:
        """Without the C extensions the line is a warning naming them."""
        self.patch(sse, "ACCELERATED", False)
        self.patch(fastclient, "_ChunkedReader", None)
        self.patch(relay, "ACCELERATED", False)
        process.prepare_process(SelectReactor())
        [event] = self.hot_path_events()
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["missing"], "aura_proxy._sse_stamp, aura_proxy._chunked_read, aura_proxy._relay_core")
        self.assertEqual(event["lean"], "off (not an epoll reactor)")

    def test_unused_extension_says_why(self) -> None:
        """A C module built with other constants than the Python code's: the warning gives the reason."""
        self.patch(sse, "ACCELERATED", True)
        self.patch(relay, "ACCELERATED", True)
        self.patch(fastclient, "_ChunkedReader", None)
        self.patch(fastclient, "C_DISABLED_REASON", "compiled with MAX_READ = 1, the Python code has 65536")
        process.prepare_process(SelectReactor())
        [event] = self.hot_path_events()
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["missing"], "aura_proxy._chunked_read")
        self.assertEqual(
            event["why"], "aura_proxy._chunked_read: compiled with MAX_READ = 1, the Python code has 65536"
        )

    def test_missing_internal_warns(self) -> None:
        """A Twisted internal that is not found makes the line a warning naming the fast path it switched off."""
        from tests.test_twisted_internals import switched_off

        switched_off(self, "write_buffers")
        process.log_hot_path(True)
        [event] = self.hot_path_events()
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertIn("writes sent straight to the client's socket", event["internals"])
        self.assertIn("switched off by a test", event["internals"])

    def test_fast_path_off(self) -> None:
        """With fast_path = off the epoll reactor keeps its own loop, and the line says stock Twisted."""
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        process.prepare_process(reactor, fast_path=False)
        self.assertNotEqual(reactor.doIteration.__name__, "do_poll")
        self.assertFalse(hasattr(reactor, "_aura_pending_writes"))
        [event] = self.hot_path_events()
        self.assertEqual((event["log_level"], event["fast_path"]), (LogLevel.info, "off"))
        self.assertIn("stock Twisted", event["log_format"])


class ProcessTuningTests(SynchronousTestCase):
    """ProcessTuning: the child service of the tree that tunes the process when it starts."""

    def setUp(self) -> None:
        threshold = gc.get_threshold()
        self.addCleanup(lambda: gc.set_threshold(*threshold))
        self.addCleanup(gc.unfreeze)

    def test_tunes_on_start_not_before(self) -> None:
        """Building the service changes nothing; starting it switches the loop and the GC's pace."""
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        gc.set_threshold(700, 10, 10)
        service = process.ProcessTuning(reactor)
        self.assertNotEqual(reactor.doIteration.__name__, "do_poll")
        self.assertEqual(gc.get_threshold()[0], 700)
        service.startService()
        self.assertEqual(reactor.doIteration.__name__, "do_poll")
        self.assertEqual(gc.get_threshold()[0], 50_000)
        self.assertTrue(service.running)

    def test_fast_path_off_keeps_the_loop(self) -> None:
        """ProcessTuning with fast_path off leaves the reactor's own poll loop."""
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        process.ProcessTuning(reactor, fast_path=False).startService()
        self.assertNotEqual(reactor.doIteration.__name__, "do_poll")
