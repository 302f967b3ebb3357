"""
Tests for L{aura_proxy.assembly}: which tree a configuration gives, what is in
it, in which order it stops, and how an entry point refuses a bad file.
"""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stderr
from typing import Any

from treq.testing import StubTreq
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from aura_proxy import assembly
from aura_proxy.assembly import (
    GatewayService,
    StopInOrder,
    exit_with,
    gateway_service,
    make_service,
    read_config,
    service_from_file,
)
from aura_proxy.config import DEFAULT_CONFIG_NAME, ConfigError, default_config_text, parse_config
from aura_proxy.history.schema import row_from_json
from aura_proxy.history.spool import Spool
from aura_proxy.process import ProcessTuning
from aura_proxy.site import GatewaySite
from aura_proxy.workers import WorkerSupervisor

ROUTE = "[route:aura]\npath = /api/aura/**\nupstream = http://127.0.0.1:9000\n"


def ini(gateway: str = "", history: str = "enabled = false", sse: str = "resume = off") -> str:
    """A configuration listening on 8080, admin on 8081, with these [gateway], [history] and [sse] lines."""
    return (
        f"[gateway]\nlisten = tcp:8080:interface=127.0.0.1\nadmin_listen = tcp:8081:interface=127.0.0.1\n"
        f"{gateway}\n{ROUTE}\n[history]\n{history}\n[sse]\n{sse}\n"
    )


def names(tree: Any) -> list[str]:
    """The type names of C{tree}'s children, in start order."""
    return [type(service).__name__ for service in tree]


def listened(fake: MemoryReactorClock) -> dict[int, Any]:
    """The factories C{fake} was asked to listen with, by port."""
    return {port: factory for port, factory, _, _ in fake.tcpServers}


class _RecordingPort:
    """A listening port that notes when it stops listening."""

    def __init__(self, port: int, order: list[str]) -> None:
        self._port = port
        self._order = order

    def stopListening(self) -> None:
        self._order.append(f"port {self._port} closed")


class RecordingReactor(MemoryReactorClock):
    """A memory reactor whose listening ports note, in C{order}, when they stop."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[str] = []

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        super().listenTCP(port, factory, backlog, interface)
        return _RecordingPort(port, self.order)


class FakeHistory(Service):
    """Call history that notes when it is flushed (stopped)."""

    def __init__(self, order: list[str]) -> None:
        self._order = order

    def stopService(self) -> None:
        Service.stopService(self)
        self._order.append("history flushed")

    def stats(self) -> dict[str, object]:
        return {"queued": 0}


class TreeTests(SynchronousTestCase):
    """What L{gateway_service} puts in one gateway process."""

    def test_single_process_children(self) -> None:
        """
        Process tuning first, then history, the access log, the drain of
        open streams, the SIGHUP reload, the public listener and the admin
        site; the public port serves the gateway's site, the admin port another one.
        """
        fake = MemoryReactorClock()
        tree = gateway_service(parse_config(ini(history="dsn = sqlite:///x.db"), "gw.ini"), fake)
        self.assertEqual(names(tree), [
            "ProcessTuning", "HistoryService", "AccessLogService", "_Drain", "SighupReload",
            "StreamServerEndpointService", "AdminService",
        ])
        # The admin site: the dashboard (and its upstream prober), then the listener.
        self.assertEqual(names(list(tree)[-1]), ["DashboardService", "StreamServerEndpointService"])
        self.assertEqual(names(list(list(tree)[-1])[0]), ["UpstreamProber"])
        self.assertIsInstance(tree, GatewayService)
        self.assertIs(tree.history, list(tree)[1])
        tree.privilegedStartService()
        ports = listened(fake)
        self.assertEqual(sorted(ports), [8080, 8081])
        self.assertIs(ports[8080], tree.site)
        self.assertIsInstance(tree.site, GatewaySite)
        self.assertIs(tree.site.gateway, tree.gateway)
        self.assertNotIsInstance(ports[8081], GatewaySite)

    def test_demo(self) -> None:
        """With demo, the demo agent is in the tree too, listening on 127.0.0.1:9000."""
        fake = MemoryReactorClock()
        tree = gateway_service(parse_config(ini(), "gw.ini"), fake, demo=True, tuning=False)
        tree.privilegedStartService()
        self.assertEqual(sorted(listened(fake)), [8080, 8081, 9000])

    def test_hooks(self) -> None:
        """A caller's site factory and listener replace the defaults; without admin or tuning, none of those."""
        fake = MemoryReactorClock()
        made: list[Any] = []

        class OwnSite(GatewaySite):
            pass

        def listener(site: GatewaySite) -> Service:
            made.append(site)
            return Service()

        tree = gateway_service(
            parse_config(ini(), "gw.ini"), fake, listener=listener, site_factory=OwnSite,
            admin=False, tuning=False,
        )
        self.assertEqual(names(tree), ["AccessLogService", "_Drain", "SighupReload", "Service"])
        self.assertEqual(made, [tree.site])
        self.assertIsInstance(tree.site, OwnSite)
        tree.privilegedStartService()
        self.assertEqual(fake.tcpServers, [])

    def test_resume_log(self) -> None:
        """The stream log [sse] resume names is built once and shared by the gateway and the drain."""
        tree = gateway_service(
            parse_config(ini(sse="resume = memory"), "gw.ini"), MemoryReactorClock(), tuning=False)
        self.assertIsNotNone(tree.resume)
        self.assertIs(tree.gateway._services.resume, tree.resume)


class StopOrderTests(SynchronousTestCase):
    """The assembled tree stops in order: listeners, then streams, then history."""

    def test_streams_end_before_history_flushes(self) -> None:
        """
        Stopping the tree closes the admin and public ports first, then ends
        the open streams (each recorded as C{shutdown}), and flushes call
        history only once every stream has ended.
        """
        fake = RecordingReactor()
        order = fake.order
        self.patch(assembly, "make_history", lambda config, reactor: FakeHistory(order))
        tree = gateway_service(parse_config(ini(), "gw.ini"), fake, tuning=False)
        streams_ended: Deferred[None] = Deferred()

        def shutdown(grace: float = 2.0, then: Any = None) -> "Deferred[None]":
            order.append("streams told to end")
            return streams_ended

        tree.gateway.shutdown = shutdown  # type: ignore[method-assign]
        tree.privilegedStartService()
        tree.startService()
        stopped = tree.stopService()
        self.assertEqual(order, ["port 8081 closed", "port 8080 closed", "streams told to end"])
        self.assertNoResult(stopped)
        order.append("streams ended")
        streams_ended.callback(None)
        self.assertEqual(order[-2:], ["streams ended", "history flushed"])
        self.successResultOf(stopped)

    def test_failing_child_does_not_stop_the_rest(self) -> None:
        """A child whose stop fails is logged; the children before it still stop."""
        order: list[str] = []

        class Noting(Service):
            def stopService(self) -> None:
                Service.stopService(self)
                order.append("first stopped")

        class Failing(Service):
            def stopService(self) -> None:
                raise RuntimeError("cannot stop")

        top = StopInOrder()
        Noting().setServiceParent(top)
        Failing().setServiceParent(top)
        top.startService()
        self.successResultOf(top.stopService())
        self.assertEqual(order, ["first stopped"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class HealthTests(TestCase):
    """The single process's admin site."""

    async def test_healthz(self) -> None:
        """
        /healthz answers 200 JSON: status ok, open streams, the [sse] bounds'
        figures (detached streams, the memory log's bytes), history's state.
        """
        fake = MemoryReactorClock()
        self.patch(assembly, "make_history", lambda config, reactor: FakeHistory([]))
        tree = gateway_service(parse_config(ini(sse="resume = memory"), "gw.ini"), fake, tuning=False)
        tree.privilegedStartService()
        response = await StubTreq(listened(fake)[8081].resource).get("http://admin/healthz")
        self.assertEqual(response.code, 200)
        body = json.loads(await response.text())
        sse = body.pop("sse")
        self.assertEqual(body, {"status": "ok", "active_streams": 0, "history": {"queued": 0}})
        self.assertEqual((sse["detached"], sse["cancelled_by_max_detached_streams"]), (0, 0))
        self.assertEqual((sse["resume"]["bytes"], sse["resume"]["max_total_bytes"]), (0, 536870912))


class DecisionTests(SynchronousTestCase):
    """L{make_service}: one process or the supervisor, from the configuration alone."""

    def test_one_worker_is_the_gateway(self) -> None:
        """workers = 1: the gateway itself, tuned."""
        text = ini()
        tree = make_service(parse_config(text, "gw.ini"), text, MemoryReactorClock())
        self.assertIsInstance(tree, GatewayService)
        self.assertIsInstance(list(tree)[0], ProcessTuning)

    def test_workers_is_the_supervisor(self) -> None:
        """workers = 2: the supervisor of two workers, handed the very text, and the admin site; not tuned."""
        text = ini("workers = 2")
        tree = make_service(parse_config(text, "gw.ini"), text, MemoryReactorClock(), demo=True)
        self.assertNotIsInstance(tree, GatewayService)
        # The supervisor, its SIGHUP reload, the SIGUSR1 forwarder (the access log is on), the demo agent,
        # the admin site.
        self.assertEqual(
            names(tree),
            ["WorkerSupervisor", "SighupReload", "_ForwardUsr1", "StreamServerEndpointService", "AdminService"])
        [supervisor] = [s for s in tree if isinstance(s, WorkerSupervisor)]
        self.assertEqual(len(supervisor.workers), 2)
        self.assertEqual(supervisor.config_text, text)
        self.assertFalse(any(isinstance(s, ProcessTuning) for s in tree))

    def test_spools_of_another_layout_are_gathered(self) -> None:
        """
        Starting with C{workers = 2} moves a single process's spooled rows,
        and those of a worker beyond 2, into worker 1's spool, which replays
        them; with history off, nothing is touched.
        """
        spool = os.path.abspath(self.mktemp())
        for directory in (spool, os.path.join(spool, "worker-3")):
            left = Spool(directory)
            left.append([row_from_json({"id": directory})])
            left.close()
        history = f"dsn = sqlite:///{spool}/h.db\nspool_dir = {spool}"
        text = ini("workers = 2", history=history + "\nenabled = false")
        make_service(parse_config(text, "gw.ini"), text, MemoryReactorClock())
        self.assertTrue(os.path.isdir(os.path.join(spool, "worker-3")))
        text = ini("workers = 2", history=history)
        make_service(parse_config(text, "gw.ini"), text, MemoryReactorClock())
        self.assertEqual(sorted(os.listdir(spool)), ["worker-1"])
        self.assertEqual(len(os.listdir(os.path.join(spool, "worker-1"))), 2)


class StartWarningTests(SynchronousTestCase):
    """What L{make_service} warns about before it builds anything."""

    def warnings(self, text: str) -> list[str]:
        with capturedLogs() as events:
            make_service(parse_config(text, "gw.ini"), text, MemoryReactorClock())
        return [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]

    def test_deprecated_key(self) -> None:
        """A deprecated key is one warning line naming the file, the key and what to write instead."""
        [line] = self.warnings(ini("access_log = false"))
        self.assertTrue(line.startswith("gw.ini: [gateway] access_log is deprecated"), line)
        self.assertIn("[log] access = off", line)

    def test_admin_beyond_loopback(self) -> None:
        """An admin site beyond loopback without a token is a warning; with a token, or on loopback, none."""
        open_admin = ini().replace("admin_listen = tcp:8081:interface=127.0.0.1", "admin_listen = tcp:8081")
        [line] = self.warnings(open_admin)
        self.assertIn("beyond loopback, without [admin] token_file", line)
        self.assertEqual(self.warnings(ini()), [])
        token = self.mktemp()
        with open(token, "w") as f:
            f.write("0123456789abcdef0123\n")
        self.assertEqual(self.warnings(open_admin + f"[admin]\ntoken_file = {token}\n"), [])


class FileTests(SynchronousTestCase):
    """Reading the file, and refusing a bad one."""

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_read_config(self) -> None:
        """The file's configuration, named after it, and its exact text."""
        path = self.write(ini())
        config, text = read_config(path)
        self.assertEqual((config.source, text), (path, ini()))

    def test_defaults(self) -> None:
        """No file: the embedded defaults."""
        config, text = read_config(None)
        self.assertEqual((config.source, text), (DEFAULT_CONFIG_NAME, default_config_text()))

    def test_bad_file(self) -> None:
        """An invalid or unreadable file is a ConfigError naming it."""
        path = self.write(ini("bogus = 1"))
        with self.assertRaises(ConfigError) as caught:
            service_from_file(path, MemoryReactorClock())
        [problem] = caught.exception.problems
        self.assertTrue(problem.startswith(f"{path}: [gateway] bogus: unknown key"), problem)
        self.assertRaises(ConfigError, read_config, path + ".missing")

    def test_service_from_file_with_workers(self) -> None:
        """A file with workers = 2 gives the supervisor (the .tac and twistd alike)."""
        tree = service_from_file(self.write(ini("workers = 2")), MemoryReactorClock())
        self.assertEqual(names(tree)[0], "WorkerSupervisor")

    def test_exit_with(self) -> None:
        """An entry point refusing a file prints only its problems, one per line, and exits 1."""
        err = io.StringIO()
        with redirect_stderr(err), self.assertRaises(SystemExit) as caught:
            exit_with(ConfigError(["a.ini: [gateway] x: bad", "a.ini: [route:NAME]: no route"]))
        self.assertEqual(caught.exception.code, 1)
        self.assertEqual(err.getvalue(), "a.ini: [gateway] x: bad\na.ini: [route:NAME]: no route\n")
