"""
Tests for L{aura_proxy.reload}: reading the configuration file again while
serving (SIGHUP, C{python -m aura_proxy reload PIDFILE}, C{POST /reload}),
in one process and through the workers' supervisor.
"""

from __future__ import annotations

import io
import os
import signal
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from treq.testing import StubTreq

from aura_proxy.__main__ import main
from aura_proxy.admin import Admin
from aura_proxy.config import ConfigError, load_config, parse_config
from aura_proxy.reload import ReloadResult, Reloader, SighupReload, restart_only_changes
from aura_proxy.worker import ConfigFrames
from aura_proxy.tls_listen import TlsPems
from aura_proxy.workers import WorkerSupervisor, config_frame, tls_frame
from tests.test_proxy import CONFIG, TENANT, Harness, Stream, without_ids
from tests.test_workers import FakeReactor, ini

NEW_ROUTE = "[route:new]\npath = /api/new/**\nupstream = http://aura.internal:9000\n"


class ReloaderTests(TestCase):
    """One process: L{Reloader} over a gateway."""

    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.path.write_text(CONFIG)
        self.upstream = Stream()
        self.h = Harness(self.upstream)
        self.h.gateway.use(load_config(str(self.path)))
        self.reloader = Reloader(self.h.gateway)

    def test_new_route_for_new_requests(self) -> None:
        """A valid file with a new route is used at once: the new route answers, the old ones still do."""
        self.assertEqual(self.h.request("GET", "/api/new/x", headers=TENANT).code, 404)
        self.path.write_text(CONFIG + NEW_ROUTE)
        result = self.reloader.reload()
        self.assertEqual((result.ok, result.routes, result.needs_restart), (True, 3, ()))
        self.assertEqual(self.h.gateway.config.routes[-1].name, "new")

    def test_auth_and_cors_change(self) -> None:
        """A reload turns JWT checks on and allows another origin, for the next requests."""
        secret = Path(self.mktemp())
        secret.write_bytes(b"s" * 32)
        self.assertEqual(self.h.request("GET", "/api/aura/x", headers=TENANT).code, 200)
        self.path.write_text(
            CONFIG.replace("allowed_origins = http://localhost:3000", "allowed_origins = http://new.example")
            + f"[auth]\njwt = required\nalgorithms = HS256\nhs256_secret_file = {secret}\n")
        self.assertTrue(self.reloader.reload().ok)
        refused = self.h.request("GET", "/api/aura/x", headers=TENANT)
        self.assertEqual(refused.code, 401)
        self.assertEqual(self.h.json(refused)["error"]["code"], "missing_token")
        preflight = self.h.request("OPTIONS", "/api/aura/x", headers={
            "Origin": "http://new.example", "Access-Control-Request-Method": "GET"})
        self.assertEqual(preflight.code, 204)

    def test_listeners_told(self) -> None:
        """Each listener is called with the configuration put in use; one that fails is logged, not fatal."""
        told: list[Any] = []
        self.reloader.listeners.append(lambda c: 1 / 0)
        self.reloader.listeners.append(told.append)
        self.path.write_text(CONFIG + NEW_ROUTE)
        self.assertTrue(self.reloader.reload().ok)
        self.assertEqual([c.routes[-1].name for c in told], ["new"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_open_stream_untouched(self) -> None:
        """A stream opened before the reload keeps flowing, on the pipeline it started on."""
        response = self.h.request("GET", "/api/aura/s", headers=TENANT, unbuffered=True)
        received: list[bytes] = []
        self.h.client.collect(response, received.append)
        before = self.h.gateway.pipeline
        self.path.write_text(CONFIG + NEW_ROUTE)
        self.assertTrue(self.reloader.reload().ok)
        self.assertIsNot(self.h.gateway.pipeline, before)
        assert self.upstream.request is not None
        self.upstream.request.write(b"data: after\n\n")
        self.h.flush()
        self.assertEqual(without_ids(b"".join(received)), b"data: after\n\n")
        self.assertEqual(self.h.gateway.active_streams(), 1)

    def test_invalid_file_changes_nothing(self) -> None:
        """An invalid file is refused with check's lines, logged; the configuration in use stays."""
        before = self.h.gateway.pipeline
        self.path.write_text(CONFIG + NEW_ROUTE + "[limits]\nmax_streams_total = many\n")
        result = self.reloader.reload()
        with self.assertRaises(ConfigError) as checked:
            load_config(str(self.path))
        self.assertFalse(result.ok)
        self.assertEqual(list(result.problems), checked.exception.problems)
        self.assertIn("[limits] max_streams_total", result.problems[0])
        self.assertIs(self.h.gateway.pipeline, before)
        self.assertEqual(result.to_json()["status"], "refused")

    def test_unreadable_file(self) -> None:
        """A file that is gone is refused as check says it; nothing changes."""
        before = self.h.gateway.pipeline
        self.path.unlink()
        result = self.reloader.reload()
        self.assertFalse(result.ok)
        self.assertIn("cannot read", result.problems[0])
        self.assertIs(self.h.gateway.pipeline, before)

    def test_restart_only_keys_kept(self) -> None:
        """New values of keys that need a restart are kept out and reported; the rest applies."""
        self.path.write_text(
            CONFIG.replace("[gateway]\n", "[gateway]\nlisten = tcp:9999\n").replace(
                "connect_timeout = 5", "connect_timeout = 1")
            + NEW_ROUTE + "[history]\nbatch_size = 7\n[limits]\nstore = redis://127.0.0.1/0\n"
            "max_streams_total = 5\n")
        result = self.reloader.reload()
        self.assertTrue(result.ok)
        self.assertEqual(set(result.needs_restart), {
            "[gateway] listen", "[gateway] connect_timeout", "[history] batch_size", "[limits] store"})
        config = self.h.gateway.config
        self.assertEqual((config.gateway.listen, config.history.batch_size, config.limits.store),
                         (parse_config(CONFIG, "x").gateway.listen, 1000, "memory"))
        self.assertEqual(config.limits.max_streams_total, 5)
        self.assertEqual(config.routes[-1].name, "new")
        self.assertEqual(result.to_json()["needs_restart"], list(result.needs_restart))


class AssemblyTests(TestCase):
    """What the assembly wires to a reload."""

    def test_dashboard_follows(self) -> None:
        """A single process's dashboard shows the reloaded routes."""
        from twisted.internet.testing import MemoryReactorClock

        from aura_proxy.assembly import gateway_service

        path = Path(self.mktemp())
        path.write_text(CONFIG + "[history]\nenabled = false\n")
        tree = gateway_service(load_config(str(path)), MemoryReactorClock(), tuning=False)
        path.write_text(CONFIG + "[history]\nenabled = false\n" + NEW_ROUTE)
        self.assertTrue(tree.reloader.reload().ok)
        [admin] = [s for s in tree if type(s).__name__ == "AdminService"]
        dashboard = list(admin)[0]
        self.assertEqual(dashboard.dashboard.routes[-1].name, "new")


    def test_certificate_reloaded_with_the_file(self) -> None:
        """
        A single process's ssl: listener is its own TLS port (not strports'),
        and a reload reads its renewed files for new connections; a key that
        is not the certificate's keeps the one in use and is reported, while
        the rest of the reload (a new route) is applied.
        """
        from twisted.internet.testing import MemoryReactorClock

        from aura_proxy.assembly import gateway_service
        from tests.test_tls_listen import renew, serial_of
        from tests.tls_certs import make_pki

        pki = make_pki(self.mktemp())
        listen = f"ssl:0:interface=127.0.0.1:privateKey={pki.server_key}:certKey={pki.server_cert}"
        text = CONFIG.replace("[gateway]\n", f"[gateway]\nlisten = {listen}\n", 1) + "[history]\nenabled = false\n"
        self.assertIn(listen, text)
        path = Path(self.mktemp())
        path.write_text(text)
        tree = gateway_service(load_config(str(path)), MemoryReactorClock(), tuning=False)
        self.assertIn("TCPServer", [type(s).__name__ for s in tree])
        context = tree.certificates[listen].context

        renew(pki, self.mktemp())
        result = tree.reloader.reload()
        self.assertEqual((result.ok, result.tls_problems), (True, ()))
        self.assertEqual(context.options.certificate.get_serial_number(), serial_of(pki.server_cert))

        kept = context.options
        other = make_pki(self.mktemp())
        Path(pki.server_key).write_bytes(Path(other.server_key).read_bytes())
        path.write_text(text + NEW_ROUTE)
        result = tree.reloader.reload()
        self.assertTrue(result.ok)
        [problem] = result.tls_problems
        self.assertIn(f"{listen!r}: {pki.server_key}: this key is not the one", problem)
        self.assertIs(context.options, kept)
        self.assertEqual(tree.gateway.config.routes[-1].name, "new")
        self.assertEqual(result.to_json()["tls_problems"], [problem])


class RestartOnlyTests(TestCase):
    """L{restart_only_changes}."""

    def test_same_is_nothing(self) -> None:
        """Equal configurations: nothing to report, the new one as it is."""
        a, b = parse_config(CONFIG, "x"), parse_config(CONFIG, "x")
        self.assertEqual(restart_only_changes(a, b), (b, ()))


class AdminTests(TestCase):
    """C{POST /reload} on the admin site."""

    def client(self, result: ReloadResult) -> StubTreq:
        return StubTreq(Admin(lambda: {"status": "ok"}, reload=lambda: result).resource())

    async def test_reloaded(self) -> None:
        """A reload that worked answers 200 with what it did."""
        client = self.client(ReloadResult(True, "gw.ini", needs_restart=("[gateway] listen",), routes=2))
        response = await client.post("http://admin/reload")
        self.assertEqual(response.code, 200)
        self.assertEqual(await response.json(), {
            "status": "reloaded", "source": "gw.ini", "routes": 2, "needs_restart": ["[gateway] listen"]})

    async def test_reloaded_with_tls_problems(self) -> None:
        """A reload that kept a listener's certificate answers 200, with the TLS problems named."""
        problem = "'ssl:8443:privateKey=k.pem': k.pem: cannot read (Permission denied)"
        client = self.client(ReloadResult(True, "gw.ini", routes=2, tls_problems=(problem,)))
        response = await client.post("http://admin/reload")
        self.assertEqual(response.code, 200)
        self.assertEqual(await response.json(), {
            "status": "reloaded", "source": "gw.ini", "routes": 2, "needs_restart": [], "tls_problems": [problem]})

    async def test_refused(self) -> None:
        """A refused reload answers 400 with the problems."""
        client = self.client(ReloadResult(False, "gw.ini", ("gw.ini: [x] y: bad",)))
        response = await client.post("http://admin/reload")
        self.assertEqual(response.code, 400)
        self.assertEqual(await response.json(), {
            "status": "refused", "source": "gw.ini", "problems": ["gw.ini: [x] y: bad"]})

    async def test_get_not_allowed(self) -> None:
        """GET /reload reloads nothing (405)."""
        response = await self.client(ReloadResult(True, "x")).get("http://admin/reload")
        self.assertEqual(response.code, 405)


class SignalTests(TestCase):
    """SIGHUP and C{python -m aura_proxy reload PIDFILE}."""

    def test_sighup_reloads_while_running(self) -> None:
        """While the service runs SIGHUP reloads (in the reactor's thread); after stop the old handler is back."""
        calls: list[Any] = []
        reactor = Clock()
        reactor.callFromThread = lambda f, *a: calls.append(f)  # type: ignore[attr-defined]
        previous = signal.getsignal(signal.SIGHUP)
        service = SighupReload(reactor, lambda: None)
        service.startService()
        try:
            os.kill(os.getpid(), signal.SIGHUP)
        finally:
            service.stopService()
        self.assertEqual(len(calls), 1)
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)

    def test_reload_command(self) -> None:
        """C{reload PIDFILE} sends SIGHUP to the pid in the file; exit status 0."""
        got: list[int] = []
        previous = signal.signal(signal.SIGHUP, lambda n, f: got.append(n))
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        pidfile = Path(self.mktemp())
        pidfile.write_text(f"{os.getpid()}\n")
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(main(["reload", str(pidfile)]), 0)
        self.assertEqual(got, [signal.SIGHUP])
        self.assertIn(f"sent SIGHUP to {os.getpid()}", out.getvalue())

    def test_reload_command_errors(self) -> None:
        """A missing pid file is exit status 1 with a line saying so; no argument is 2."""
        err = io.StringIO()
        with redirect_stderr(err):
            self.assertEqual(main(["reload", "/nonexistent/aura.pid"]), 1)
            self.assertEqual(main(["reload"]), 2)
        self.assertIn("/nonexistent/aura.pid: cannot read a process id", err.getvalue())


class WorkersTests(TestCase):
    """The supervisor hands a checked file to every worker; a worker cuts it from its pipe."""

    def supervisor(self, path: Path) -> WorkerSupervisor:
        text = ini("workers = 2")
        path.write_text(text)
        supervisor = WorkerSupervisor(parse_config(text, str(path)), text, FakeReactor())
        supervisor.privilegedStartService()
        supervisor.startService()
        self.addCleanup(lambda: [s.close() for s in supervisor._sockets])
        return supervisor

    def test_every_worker_gets_the_text(self) -> None:
        """A valid file's text goes to each worker's stdin as one frame; restarted workers get it too."""
        path = Path(self.mktemp())
        supervisor = self.supervisor(path)
        new = ini("workers = 2") + NEW_ROUTE
        path.write_text(new)
        result = supervisor.reload()
        self.assertEqual((result.ok, result.workers), (True, 2))
        for worker in supervisor.workers:
            self.assertEqual(worker.process.written[0], config_frame(new))  # type: ignore[union-attr]
        self.assertEqual(supervisor.config_text, new)

    def test_invalid_file_sent_to_nobody(self) -> None:
        """An invalid file is refused by the parent: no worker hears of it."""
        path = Path(self.mktemp())
        supervisor = self.supervisor(path)
        path.write_text(ini("workers = 2") + "[route:bad]\npath = /x/**\n")
        result = supervisor.reload()
        self.assertFalse(result.ok)
        self.assertIn("[route:bad] upstream: missing", result.problems[0])
        for worker in supervisor.workers:
            self.assertNotIn(0, worker.process.written)  # type: ignore[union-attr]

    def test_workers_count_needs_restart(self) -> None:
        """A new number of workers is reported as needing a restart; the supervisor keeps its own."""
        path = Path(self.mktemp())
        supervisor = self.supervisor(path)
        path.write_text(ini("workers = 3"))
        result = supervisor.reload()
        self.assertEqual(result.needs_restart, ("[gateway] workers",))
        self.assertEqual(len(supervisor.workers), 2)
        self.assertEqual(supervisor.config.gateway.workers, 2)

    def test_dashboard_follows(self) -> None:
        """The parent's dashboard shows and probes the reloaded routes."""
        from aura_proxy.upstream_health import UpstreamProber

        path = Path(self.mktemp())
        supervisor = self.supervisor(path)
        prober = UpstreamProber(supervisor.config.routes, FakeReactor())
        supervisor.reload_listeners.append(lambda c: prober.use_routes(c.routes))
        path.write_text(ini("workers = 2") + NEW_ROUTE.replace("aura.internal:9000", "other.internal:9100"))
        self.assertTrue(supervisor.reload().ok)
        self.assertEqual([r.name for r in prober.routes][-1], "new")
        self.assertIn(("other.internal", 9100), prober.results)

    def test_frames(self) -> None:
        """Frames cut at any byte boundary come out whole, in order."""
        texts: list[str] = []
        frames = ConfigFrames(texts.append)
        data = config_frame("[a]\nx = é\n") + config_frame("second")
        for i in range(len(data)):
            frames.feed(data[i:i + 1])
        self.assertEqual(texts, ["[a]\nx = é\n", "second"])

    def test_tls_frames(self) -> None:
        """Certificates' bytes and texts, interleaved and cut anywhere, come out whole, each to its own callback, in order."""
        seen: list[object] = []
        frames = ConfigFrames(seen.append, seen.append)
        pems = {"ssl:1:privateKey=k.pem": TlsPems(b"KEY\n", b"CERT\n"), "ssl:2:a.pem": TlsPems(b"K", b"C", b"CH")}
        data = tls_frame(pems) + config_frame("text") + tls_frame({})
        for i in range(len(data)):
            frames.feed(data[i:i + 1])
        self.assertEqual(seen, [pems, "text", {}])

    def tls_supervisor(self, path: Path) -> tuple[WorkerSupervisor, Any, str]:
        from tests.test_workers import ssl_listen
        from tests.tls_certs import make_pki

        pki = make_pki(self.mktemp())
        listen = ssl_listen(pki)
        text = ini("workers = 2", listen=listen)
        path.write_text(text)
        supervisor = WorkerSupervisor(parse_config(text, str(path)), text, FakeReactor())
        supervisor.privilegedStartService()
        supervisor.startService()
        self.addCleanup(lambda: [s.close() for s in supervisor._sockets])
        return supervisor, pki, listen

    def test_certificates_to_every_worker(self) -> None:
        """
        On reload the parent reads the renewed files and writes their bytes to
        every worker before the text; a worker started later gets the same.
        A key that is not the certificate's keeps the bytes in use (sent
        again) and is reported, the text still handed on.
        """
        from tests.test_tls_listen import renew

        path = Path(self.mktemp())
        supervisor, pki, listen = self.tls_supervisor(path)
        old = supervisor.certificates.pems()[listen]
        renew(pki, self.mktemp())
        new = TlsPems(Path(pki.server_key).read_bytes(), Path(pki.server_cert).read_bytes())
        self.assertNotEqual(new, old)
        text = path.read_text()
        result = supervisor.reload()
        self.assertEqual((result.ok, result.workers, result.tls_problems), (True, 2, ()))
        frame = tls_frame({listen: new}) + config_frame(text)
        for worker in supervisor.workers:
            self.assertEqual(worker.process.written[0], frame)  # type: ignore[union-attr]
        self.assertEqual(supervisor.frames(supervisor.config_text), frame)

        from tests.tls_certs import make_pki

        Path(pki.server_key).write_bytes(Path(make_pki(self.mktemp()).server_key).read_bytes())
        result = supervisor.reload()
        self.assertTrue(result.ok)
        [problem] = result.tls_problems
        self.assertIn(f"{pki.server_key}: this key is not the one", problem)
        self.assertEqual(supervisor.frames(text), frame)
