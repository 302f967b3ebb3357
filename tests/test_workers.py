"""
Unit tests for L{aura_proxy.workers}: the configuration checks of
C{[gateway] workers}, the shared socket, and the supervisor's start, restart
(with backoff), health report and drain, against a fake reactor.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import shutil
import ssl
from contextlib import redirect_stderr
from typing import Any, Optional
from unittest import mock

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IProcessProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from treq.testing import StubTreq

from aura_proxy.assembly import StopInOrder, supervisor_service
from aura_proxy.config import ConfigError, load_config, parse_config
from aura_proxy.tls_listen import TlsFileError, TlsPems
from aura_proxy.worker import (
    ConfigFrames,
    _AdoptedPort,
    _AdoptedPorts,
    adopted_ports,
    main,
    worker_config,
    worker_service,
)
from aura_proxy.workers import (
    LISTEN_FD,
    WorkerSupervisor,
    bind_socket,
    config_fd,
    config_frame,
    listen_address,
)
from tests.integration.gateway import sleep
from tests.test_config import problems
from tests.test_tls_listen import serial_of
from tests.tls_certs import TestPki, make_pki

ROUTE = """
[route:aura]
path = /api/aura/**
upstream = http://127.0.0.1:9000
"""


def ini(
    gateway: str = "", sse: str = "resume = off", history: str = "enabled = false",
    listen: str = "tcp:0:interface=127.0.0.1",
) -> str:
    """A small configuration with the given [gateway], [sse] and [history] bodies, and listen."""
    return (
        f"[gateway]\nlisten = {listen}\nadmin_listen = tcp:0:interface=127.0.0.1\n"
        f"{gateway}\n{ROUTE}\n[sse]\n{sse}\n[history]\n{history}\n"
    )


def ssl_listen(pki: TestPki, port: int = 0, interface: str = "127.0.0.1") -> str:
    """An ssl: description with the test PKI's server key and certificate."""
    return f"ssl:{port}:interface={interface}:privateKey={pki.server_key}:certKey={pki.server_cert}"


class ConfigTests(TestCase):
    """C{[gateway] workers} and what it refuses."""

    def test_default_is_one(self) -> None:
        """Without the key, one process (as before workers existed)."""
        self.assertEqual(parse_config(ini(), "gw.ini").gateway.workers, 1)

    def test_number(self) -> None:
        """A whole number >= 1 is taken as it is."""
        self.assertEqual(parse_config(ini("workers = 3"), "gw.ini").gateway.workers, 3)

    def test_auto_is_cpu_count(self) -> None:
        """C{auto} is os.cpu_count(), resolved when the file is parsed."""
        with mock.patch("os.cpu_count", return_value=6):
            self.assertEqual(parse_config(ini("workers = auto"), "gw.ini").gateway.workers, 6)
        with mock.patch("os.cpu_count", return_value=None):
            self.assertEqual(parse_config(ini("workers = auto"), "gw.ini").gateway.workers, 1)

    def test_bad_values(self) -> None:
        """0, negatives, decimals and words are refused, naming file, section and key."""
        for value in ("0", "-2", "1.5", "many"):
            found = problems(ini(f"workers = {value}"))
            self.assertEqual(len(found), 1, found)
            self.assertTrue(found[0].startswith("gw.ini: [gateway] workers: "), found)
            self.assertIn("or auto", found[0])

    def test_memory_resume_refused(self) -> None:
        """workers > 1 with [sse] resume = memory is refused (a resume may land on another worker)."""
        found = problems(ini("workers = 2", sse="resume = memory"))
        self.assertEqual(len(found), 1, found)
        self.assertTrue(found[0].startswith("gw.ini: [gateway] workers: workers = 2 "), found)
        self.assertIn("[sse] resume = memory", found[0])
        self.assertIn("redis://", found[0])

    def test_memory_resume_is_the_default(self) -> None:
        """The default resume (memory) is refused too: a bare workers = 2 needs [sse] resume set."""
        text = ini("workers = 2").replace("[sse]\nresume = off\n", "")
        self.assertIn("[sse] resume = memory", problems(text)[0])

    def test_auto_resolving_to_many_refused_with_memory(self) -> None:
        """auto on a multi-core machine is refused with memory resume, and the message says why."""
        with mock.patch("os.cpu_count", return_value=8):
            found = problems(ini("workers = auto", sse="resume = memory"))
        self.assertEqual(len(found), 1, found)
        self.assertIn("workers = auto (8 processes: os.cpu_count()", found[0])
        self.assertIn("decided when the configuration is checked", found[0])

    def test_auto_resolving_to_one_accepted_with_memory(self) -> None:
        """auto on a single core is one process, where memory resume is fine."""
        with mock.patch("os.cpu_count", return_value=1):
            config = parse_config(ini("workers = auto", sse="resume = memory"), "gw.ini")
        self.assertEqual((config.gateway.workers, config.sse.resume), (1, "memory"))

    def test_shared_resume_accepted(self) -> None:
        """workers > 1 is fine with resume off or in Redis."""
        for resume in ("off", "redis://127.0.0.1:6379/0"):
            config = parse_config(ini("workers = 4", sse=f"resume = {resume}"), "gw.ini")
            self.assertEqual(config.gateway.workers, 4)

    def test_listen_must_be_tcp_or_ssl(self) -> None:
        """
        workers > 1 refuses an endpoint that is neither tcp: nor ssl: (unix,
        tcp6), alone or next to a tcp: one; the message names only the refused.
        """
        for listen in ("unix:/tmp/aura.sock", "tcp6:8080", "tcp:0:interface=127.0.0.1, unix:/tmp/aura.sock"):
            found = [p for p in problems(ini("workers = 2", listen=listen)) if "[gateway] listen:" in p]
            self.assertEqual(len(found), 1, (listen, found))
            self.assertTrue(
                found[0].startswith("gw.ini: [gateway] listen: workers = 2 needs tcp: or ssl: endpoints"), found)
            self.assertNotIn("tcp:0:interface", found[0])
            self.assertIn(listen.split(", ")[-1], found[0])

    def test_tcp_and_ssl_listeners_accepted(self) -> None:
        """workers > 1 takes several tcp: and ssl: endpoints, in their order."""
        pki = make_pki(self.mktemp())
        listen = f"tcp:0:interface=127.0.0.1, {ssl_listen(pki)}, tcp:0:interface=127.0.0.2"
        config = parse_config(ini("workers = 2", listen=listen), "gw.ini")
        self.assertEqual(config.gateway.workers, 2)
        self.assertEqual(
            [d.split(":", 1)[0] for d in config.gateway.listen], ["tcp", "ssl", "tcp"])

    def test_missing_key_file_is_a_config_error(self) -> None:
        """
        An ssl: listener whose key file is missing is refused when the file
        is checked (load_config: naming file, section, key and the missing
        path) and by the parent at start, not in a worker.
        """
        pki = make_pki(self.mktemp())
        missing = os.path.join(self.mktemp(), "gone.key")
        listen = ssl_listen(pki).replace(pki.server_key, missing)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(ini("workers = 2", listen=listen))
        with self.assertRaises(ConfigError) as raised:
            load_config(path)
        found = raised.exception.problems
        self.assertEqual(len(found), 1, found)
        self.assertTrue(found[0].startswith(f"{path}: [gateway] listen: "), found)
        self.assertIn(missing, found[0])
        config = parse_config(ini("workers = 2", listen=listen), "gw.ini")
        with self.assertRaises(ConfigError) as at_start:
            supervisor_service(config, "", MemoryReactorClock())
        self.assertIn(missing, at_start.exception.problems[0])

    def test_listen_anything_with_one_worker(self) -> None:
        """With one worker, listen may be any endpoint, as before."""
        text = ini().replace("listen = tcp:0:interface=127.0.0.1\nadmin", "listen = unix:/tmp/aura.sock\nadmin")
        self.assertEqual(parse_config(text, "gw.ini").gateway.listen, ("unix:/tmp/aura.sock",))


class WorkerCertificateTests(TestCase):
    """A worker's TLS comes from the bytes its parent read, never from the key files."""

    def test_worker_builds_tls_from_given_bytes(self) -> None:
        """
        Given the parent's bytes, a worker serves them on its adopted ssl:
        socket although the files it names do not exist (so need not be
        readable), and takes new bytes for new connections.
        """
        pki, renewed = make_pki(self.mktemp()), make_pki(self.mktemp())
        listen = "ssl:0:interface=127.0.0.1:privateKey=/nowhere/key.pem:certKey=/nowhere/cert.pem"
        pems = TlsPems(open(pki.server_key, "rb").read(), open(pki.server_cert, "rb").read())
        config = parse_config(ini(listen=listen), "gw.ini")
        tree = worker_service(config, 1, MemoryReactorClock(), listen_fd=99, pems={listen: pems})
        [ports] = [s for s in tree if isinstance(s, _AdoptedPorts)]
        [port] = list(ports)
        factory = port._factory  # type: ignore[attr-defined]
        self.assertIsInstance(factory, TLSMemoryBIOFactory)
        self.assertIs(factory.wrappedFactory.site, tree.site)
        context = tree.certificates[listen].context
        self.assertEqual(context.options.certificate.get_serial_number(), serial_of(pki.server_cert))
        self.assertIsNone(tree.reloader.certificates)
        new = TlsPems(open(renewed.server_key, "rb").read(), open(renewed.server_cert, "rb").read())
        self.assertEqual(tree.certificates.use({listen: new}), ())
        self.assertEqual(context.options.certificate.get_serial_number(), serial_of(renewed.server_cert))

    def test_worker_without_bytes_reads_the_files(self) -> None:
        """Started by hand (no parent's bytes), a worker reads the files; a missing one stops its start."""
        pki = make_pki(self.mktemp())
        config = parse_config(ini(listen=ssl_listen(pki)), "gw.ini")
        tree = worker_service(config, 1, MemoryReactorClock(), listen_fd=99)
        self.assertEqual(tree.certificates.pems()[ssl_listen(pki)].cert, open(pki.server_cert, "rb").read())
        os.remove(pki.server_key)
        self.assertRaises(TlsFileError, worker_service, config, 1, MemoryReactorClock(), listen_fd=99)


class SocketTests(TestCase):
    """The listening socket the parent binds and the workers adopt."""

    def test_listen_address(self) -> None:
        """A tcp: description gives port, interface, backlog and family, with Twisted's defaults."""
        a = listen_address("tcp:8080")
        self.assertEqual((a.port, a.interface, a.backlog, a.family), (8080, "", 50, socket.AF_INET))
        b = listen_address("tcp:0:interface=127.0.0.1:backlog=7")
        self.assertEqual((b.port, b.interface, b.backlog), (0, "127.0.0.1", 7))
        self.assertEqual(listen_address(r"tcp:8080:interface=\:\:1").family, socket.AF_INET6)

    def test_listen_address_tls(self) -> None:
        """
        An ssl: description gives its address and its parsed TLS settings
        (files named, not read: the parent reads them for its workers); a
        tcp: one has none.
        """
        a = listen_address("ssl:8443:interface=127.0.0.1:privateKey=/nowhere/k.pem:certKey=/nowhere/c.pem:backlog=9")
        self.assertEqual((a.port, a.interface, a.backlog, a.family), (8443, "127.0.0.1", 9, socket.AF_INET))
        assert a.tls is not None
        self.assertEqual((a.tls.private_key, a.tls.cert_key), ("/nowhere/k.pem", "/nowhere/c.pem"))
        self.assertIsNone(listen_address("tcp:8080").tls)

    def test_listen_address_refuses_others(self) -> None:
        """Anything but tcp: and ssl: is a ValueError."""
        for description in ("unix:/tmp/x.sock", "tcp6:8080"):
            self.assertRaises(ValueError, listen_address, description)

    def test_bind_socket(self) -> None:
        """The socket listens (a client can connect) and is non-blocking."""
        sock = bind_socket(listen_address("tcp:0:interface=127.0.0.1"))
        self.addCleanup(sock.close)
        self.assertFalse(sock.getblocking())
        with socket.create_connection(sock.getsockname(), timeout=2):
            pass

    async def test_adopted_port(self) -> None:
        """A worker's listener accepts on an inherited descriptor and stops accepting on stop."""
        sock = bind_socket(listen_address("tcp:0:interface=127.0.0.1"))
        self.addCleanup(sock.close)
        accepted: list[object] = []

        class Count(Protocol):
            def connectionMade(self) -> None:
                accepted.append(self)
                assert self.transport is not None
                self.transport.loseConnection()

        service = _AdoptedPort(reactor, os.dup(sock.fileno()), Factory.forProtocol(Count))  # type: ignore[arg-type]
        service.startService()
        client = socket.create_connection(sock.getsockname(), timeout=2)
        self.addCleanup(client.close)
        for _ in range(100):
            if accepted:
                break
            await sleep(0.02)
        self.assertEqual(len(accepted), 1)
        await service.stopService()  # type: ignore[misc]


    def test_adopted_ports(self) -> None:
        """
        A worker adopts one port per inherited socket, from the first fd on,
        in listen order: an ssl: one serves the site through TLS (with the
        description's context), a tcp: one serves the site itself.
        """
        pki = make_pki(self.mktemp())
        site = Site(Resource())
        ports = adopted_ports(MemoryReactorClock(), 7, ["tcp:0", ssl_listen(pki), "tcp:0:interface=127.0.0.2"], site)
        self.assertIsInstance(ports, _AdoptedPorts)
        children = list(ports)
        self.assertEqual([p._fd for p in children], [7, 8, 9])  # type: ignore[attr-defined]
        self.assertIs(children[0]._factory, site)  # type: ignore[attr-defined]
        tls = children[1]._factory  # type: ignore[attr-defined]
        self.assertIsInstance(tls, TLSMemoryBIOFactory)
        self.assertIs(tls.wrappedFactory.site, site)
        self.assertIs(children[2]._factory, site)  # type: ignore[attr-defined]

    async def test_adopted_tls_port_offers_h2(self) -> None:
        """
        An adopted ssl: socket completes a TLS handshake with a client
        verifying the test CA, and ALPN picks h2 when the client offers it
        (the site offers h2 and http/1.1, as Twisted's ssl: listener does).
        """
        pki = make_pki(self.mktemp())
        sock = bind_socket(listen_address("tcp:0:interface=127.0.0.1"))
        self.addCleanup(sock.close)
        ports = adopted_ports(reactor, os.dup(sock.fileno()), [ssl_listen(pki)], Site(Resource()))
        ports.startService()
        self.addCleanup(ports.stopService)
        context = ssl.create_default_context(cafile=pki.ca)
        context.set_alpn_protocols(["h2", "http/1.1"])
        address = sock.getsockname()

        def connect() -> Optional[str]:
            with socket.create_connection(address, timeout=5) as raw:
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    return tls.selected_alpn_protocol()

        self.assertEqual(await deferToThread(connect), "h2")


class ConfigForWorkerTests(TestCase):
    """What each worker changes in the configuration."""

    def test_own_spool_directory(self) -> None:
        """Each worker spools to spool_dir/worker-INDEX; everything else is the same."""
        config = parse_config(ini(history="spool_dir = /var/spool/aura"), "gw.ini")
        mine = worker_config(config, 2)
        self.assertEqual(mine.history.spool_dir, os.path.join("/var/spool/aura", "worker-2"))
        self.assertEqual(mine.history.dsn, config.history.dsn)
        self.assertEqual((mine.gateway, mine.routes, mine.sse), (config.gateway, config.routes, config.sse))

    def test_worker_tree(self) -> None:
        """
        A worker builds its tree through the assembly: process tuning first,
        its own spool directory, the inherited socket as listener, no admin port.
        """
        fake = MemoryReactorClock()
        config = parse_config(ini(history="spool_dir = /var/spool/aura"), "gw.ini")
        tree = worker_service(config, 3, fake, listen_fd=99)
        self.assertEqual(
            [type(s).__name__ for s in tree],
            ["ProcessTuning", "HistoryService", "AccessLogService", "_Drain", "_AdoptedPorts"])
        [ports] = [s for s in tree if isinstance(s, _AdoptedPorts)]
        [port] = list(ports)
        assert isinstance(port, _AdoptedPort)
        self.assertEqual(port._fd, 99)
        self.assertIs(port._factory, tree.site)
        self.assertEqual(tree.gateway.config.history.spool_dir, os.path.join("/var/spool/aura", "worker-3"))

    def test_worker_listens_where_the_parent_bound(self) -> None:
        """
        Given the descriptions its parent bound (--listen), a worker adopts
        those, not its configuration's listen (a reload may have changed it).
        """
        config = parse_config(ini(listen="tcp:0:interface=127.0.0.1, tcp:0:interface=127.0.0.2"), "gw.ini")
        tree = worker_service(config, 1, MemoryReactorClock(), listen=["tcp:0:interface=127.0.0.3"])
        [ports] = [s for s in tree if isinstance(s, _AdoptedPorts)]
        self.assertEqual([p._fd for p in ports], [LISTEN_FD])  # type: ignore[attr-defined]

    def test_worker_main_refuses_bad_config(self) -> None:
        """A worker given an invalid configuration exits 2 with the usual messages."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[gateway]\nbogus = 1\n")
        err = io.StringIO()
        with redirect_stderr(err):
            status = main(["--index", "1", "--config", path])
        self.assertEqual(status, 2)
        self.assertIn(f"{path}: [gateway] bogus: unknown key", err.getvalue())


# -- the supervisor, against a fake reactor ------------------------------------


class FakeProcess:
    """The parts of a process transport the supervisor uses."""

    def __init__(self, protocol: IProcessProtocol, pid: int) -> None:
        self.protocol = protocol
        self.pid = pid
        self.signals: list[Any] = []
        self.written: dict[int, bytes] = {}
        self.closed: set[int] = set()

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written[fd] = self.written.get(fd, b"") + data

    def closeChildFD(self, fd: int) -> None:
        self.closed.add(fd)

    def signalProcess(self, name: Any) -> None:
        self.signals.append(name)

    def end(self, code: Optional[int] = 0, signal: Optional[int] = None) -> None:
        reason = ProcessDone(0) if code == 0 and signal is None else ProcessTerminated(code, signal)
        self.protocol.processEnded(Failure(reason))


class FakeReactor(MemoryReactorClock):
    """A memory reactor whose spawnProcess records fake processes."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[FakeProcess, list[str], dict[int, Any]]] = []
        self.fail_spawn = False
        self._next_pid = 1000
        #: What callFromThread was asked to run (a signal handler's work), not run yet.
        self.thread_calls: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    def callFromThread(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.thread_calls.append((f, args, kwargs))

    def spawnProcess(self, protocol: Any, executable: Any, args: Any = (), env: Any = None,
                     path: Any = None, uid: Any = None, gid: Any = None, usePTY: Any = False,
                     childFDs: Any = None) -> FakeProcess:
        if self.fail_spawn:
            raise OSError("too many processes")
        self._next_pid += 1
        process = FakeProcess(protocol, self._next_pid)
        self.spawned.append((process, list(args), dict(childFDs)))
        protocol.makeConnection(process)
        return process


class SupervisorTests(TestCase):
    """L{WorkerSupervisor} with a fake reactor: no real process is started."""

    def make(
        self, workers: int = 2, listen: str = "tcp:0:interface=127.0.0.1", **kwargs: Any
    ) -> tuple[WorkerSupervisor, FakeReactor]:
        """A started supervisor of C{workers} fake workers (the parent's tree, as the assembly builds it)."""
        fake = FakeReactor()
        text = ini(f"workers = {workers}", listen=listen)
        # Starting the tree handles SIGUSR1 (forwarded to the workers): put trial's back after.
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        self.tree = supervisor_service(parse_config(text, "gw.ini"), text, fake, **kwargs)
        [supervisor] = [s for s in self.tree if isinstance(s, WorkerSupervisor)]
        self.tree.privilegedStartService()
        self.tree.startService()
        self.addCleanup(lambda: [s.close() for s in supervisor._sockets])
        self.addCleanup(lambda: shutil.rmtree(supervisor._private_dir or "/nonexistent", ignore_errors=True))
        return supervisor, fake

    def process(self, supervisor: WorkerSupervisor, index: int) -> FakeProcess:
        """The fake process currently running worker C{index}."""
        process = supervisor.workers[index - 1].process
        assert isinstance(process, FakeProcess)
        return process

    def test_start_spawns_every_worker(self) -> None:
        """Start spawns N workers, each given the socket as fd 3, the config on fd 4, its index."""
        supervisor, fake = self.make(3)
        self.assertEqual(len(fake.spawned), 3)
        [sock] = supervisor._sockets
        for i, (process, argv, fds) in enumerate(fake.spawned, start=1):
            self.assertEqual(argv[1:3], ["-m", "aura_proxy.worker"])
            self.assertEqual(argv[argv.index("--index") + 1], str(i))
            self.assertIn("--watch-parent", argv)
            self.assertEqual(argv[argv.index("--config-fd") + 1], "4")
            self.assertEqual(fds, {0: "w", 1: 1, 2: 2, LISTEN_FD: sock.fileno(), 4: "w"})
            self.assertEqual(process.written[4], config_frame(supervisor.config_text))
            self.assertIn(4, process.closed)
        self.assertEqual([w.pid for w in supervisor.workers], [p.pid for p, _, _ in fake.spawned])

    def test_every_socket_to_every_worker(self) -> None:
        """
        With tcp:, ssl: and tcp: listeners the parent binds three sockets
        (listening on each) and hands every worker all of them as fds 3, 4
        and 5 in listen order, their descriptions in the same order, and the
        config on fd 6; stopping closes all three.
        """
        pki = make_pki(self.mktemp())
        listen = f"tcp:0:interface=127.0.0.1, {ssl_listen(pki)}, tcp:0:interface=127.0.0.2"
        supervisor, fake = self.make(2, listen=listen)
        self.assertEqual(len(supervisor._sockets), 3)
        self.assertTrue(supervisor.listening)
        self.assertEqual(config_fd(3), 6)
        for sock in supervisor._sockets:
            with socket.create_connection(sock.getsockname()[:2], timeout=2):
                pass
        self.assertEqual([s.getsockname()[0] for s in supervisor._sockets], ["127.0.0.1", "127.0.0.1", "127.0.0.2"])
        for process, argv, fds in fake.spawned:
            self.assertEqual(
                fds, {0: "w", 1: 1, 2: 2, 3: supervisor._sockets[0].fileno(),
                      4: supervisor._sockets[1].fileno(), 5: supervisor._sockets[2].fileno(), 6: "w"})
            self.assertEqual(argv[argv.index("--listen-fd") + 1], "3")
            self.assertEqual(argv[argv.index("--config-fd") + 1], "6")
            self.assertEqual(
                [argv[i + 1] for i, a in enumerate(argv) if a == "--listen"], list(supervisor.config.gateway.listen))
            # The ssl: listener's key and certificate, as the parent read them, then the text.
            texts: list[str] = []
            pems: list[dict[str, TlsPems]] = []
            ConfigFrames(texts.append, pems.append).feed(process.written[6])
            self.assertEqual(texts, [supervisor.config_text])
            self.assertEqual(pems, [{ssl_listen(pki): TlsPems(
                open(pki.server_key, "rb").read(), open(pki.server_cert, "rb").read())}])
            self.assertIn(6, process.closed)
        sockets = list(supervisor._sockets)
        for process, _, _ in fake.spawned:
            process.signals.clear()
        self.tree.stopService()
        self.assertFalse(supervisor.listening)
        self.assertEqual([s.fileno() for s in sockets], [-1, -1, -1])

    def test_bind_is_all_or_nothing(self) -> None:
        """
        When one listener's port is taken, starting fails and the sockets
        bound before it are closed: nothing is left listening, no worker spawned.
        """
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        text = ini("workers = 2", listen=f"tcp:0:interface=127.0.0.2, tcp:{port}:interface=127.0.0.1")
        fake = FakeReactor()
        supervisor = WorkerSupervisor(parse_config(text, "gw.ini"), text, fake)
        opened: list[socket.socket] = []
        real_bind = bind_socket

        def bind(address: Any) -> socket.socket:
            sock = real_bind(address)
            opened.append(sock)
            return sock

        with mock.patch("aura_proxy.workers.bind_socket", bind):
            self.assertRaises(OSError, supervisor.privilegedStartService)
        self.assertFalse(supervisor.listening)
        self.assertEqual([s.fileno() for s in opened], [-1])
        self.assertEqual(fake.spawned, [])

    def test_parent_serves_admin_only(self) -> None:
        """
        The parent's tree is the supervisor, its SIGHUP reload, the forwarder
        of SIGUSR1 to the workers (the access log is on) and the admin site (listening on
        admin_listen through the reactor): no gateway, no process tuning; the
        public socket is the supervisor's own.
        """
        supervisor, fake = self.make()
        self.assertIsInstance(self.tree, StopInOrder)
        self.assertEqual(
            [type(s).__name__ for s in self.tree], ["WorkerSupervisor", "SighupReload", "_ForwardUsr1", "AdminService"])
        self.assertEqual(len(fake.tcpServers), 1)
        self.assertEqual(fake.tcpServers[0][3], "127.0.0.1")

    def test_crashed_worker_restarts(self) -> None:
        """A worker that ends while running restarts after min_delay, with a new pid and restarts 1."""
        supervisor, fake = self.make(min_delay=0.5)
        old = self.process(supervisor, 1)
        fake.advance(60)
        old.end(signal=9)
        self.assertFalse(supervisor.workers[0].alive)
        fake.advance(0.4)
        self.assertEqual(len(fake.spawned), 2)
        fake.advance(0.1)
        self.assertEqual(len(fake.spawned), 3)
        worker = supervisor.workers[0]
        self.assertTrue(worker.alive)
        self.assertEqual(worker.restarts, 1)
        self.assertNotEqual(worker.pid, old.pid)
        self.assertEqual(supervisor.workers[1].restarts, 0)

    def test_backoff_when_crashing_at_start(self) -> None:
        """Quick deaths in a row double the delay up to max_delay; a stable run resets it."""
        supervisor, fake = self.make(1, min_delay=0.5, max_delay=4.0, stable_after=10.0)
        delays = []
        for _ in range(6):
            self.process(supervisor, 1).end(code=1)
            call = supervisor.workers[0].restart_call
            assert call is not None
            delays.append(call.getTime() - fake.seconds())
            fake.advance(delays[-1])
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0, 4.0, 4.0])
        fake.advance(10)
        self.process(supervisor, 1).end(code=1)
        call = supervisor.workers[0].restart_call
        assert call is not None
        self.assertEqual(call.getTime() - fake.seconds(), 0.5)
        self.assertEqual(supervisor.workers[0].restarts, 6)

    def test_spawn_failure_retries(self) -> None:
        """When a worker cannot even be spawned, the supervisor tries again later."""
        supervisor, fake = self.make(1, min_delay=1.0)
        fake.fail_spawn = True
        self.process(supervisor, 1).end(signal=9)
        fake.advance(1.0)
        self.assertFalse(supervisor.workers[0].alive)
        self.assertIsNotNone(supervisor.workers[0].restart_call)
        fake.fail_spawn = False
        fake.advance(2.0)
        self.assertTrue(supervisor.workers[0].alive)
        self.flushLoggedErrors(OSError)

    def test_health(self) -> None:
        """The report lists index, pid, restarts and liveness of every worker; unavailable when none runs."""
        supervisor, fake = self.make()
        body = supervisor.health()
        self.assertEqual(body["status"], "ok")
        self.assertEqual(
            body["workers"],
            [{"index": 1, "pid": self.process(supervisor, 1).pid, "restarts": 0, "alive": True},
             {"index": 2, "pid": self.process(supervisor, 2).pid, "restarts": 0, "alive": True}],
        )
        self.process(supervisor, 1).end(signal=9)
        self.process(supervisor, 2).end(signal=9)
        body = supervisor.health()
        self.assertEqual(body["status"], "unavailable")
        self.assertEqual([w["alive"] for w in body["workers"]], [False, False])  # type: ignore[union-attr]

    async def test_admin_healthz(self) -> None:
        """The parent's admin site answers /healthz with its workers; 503 once none runs."""
        supervisor, fake = self.make()
        [(_, site, _, _)] = fake.tcpServers
        http = StubTreq(site.resource)
        response = await http.get("http://admin/healthz")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"])
        body = json.loads(await response.text())
        self.assertEqual([w["pid"] for w in body["workers"]], [w.pid for w in supervisor.workers])
        self.process(supervisor, 1).end(signal=9)
        self.process(supervisor, 2).end(signal=9)
        response = await http.get("http://admin/healthz")
        self.assertEqual(response.code, 503)
        self.assertEqual(json.loads(await response.text())["status"], "unavailable")

    async def test_admin_readyz(self) -> None:
        """
        The parent's /readyz names its checks: ready while the socket is
        bound and at least one worker runs, every running one ready by its
        own checks; 503 naming C{workers} when one is not (its failing checks
        and errors listed), and once none runs.
        """
        supervisor, fake = self.make()
        reports: dict[int, dict[str, object]] = {
            1: {"status": "ready", "failing": [], "checks": {}},
            2: {"status": "ready", "failing": [], "checks": {}},
        }
        asked: list[int] = []

        def worker_readiness(worker: Any) -> "Deferred[dict[str, object]]":
            asked.append(worker.index)
            return succeed(reports[worker.index])

        supervisor.worker_readiness = worker_readiness  # type: ignore[method-assign]
        [(_, site, _, _)] = fake.tcpServers
        http = StubTreq(site.resource)
        response = await http.get("http://admin/readyz")
        self.assertEqual(response.code, 200)
        body = json.loads(await response.text())
        self.assertEqual(body["status"], "ready")
        self.assertEqual(list(body["checks"]), ["config", "listening", "workers"])
        self.assertEqual(body["checks"]["workers"], {"ok": True, "alive": 2, "ready": 2, "workers": 2})
        self.assertEqual(sorted(asked), [1, 2])
        reports[2] = {"status": "not_ready", "failing": ["history"], "checks": {
            "history": {"ok": False, "error": "the history database is unavailable"},
            "config": {"ok": True}}}
        response = await http.get("http://admin/readyz")
        self.assertEqual(response.code, 503)
        workers = json.loads(await response.text())["checks"]["workers"]
        self.assertEqual((workers["ok"], workers["ready"]), (False, 1))
        self.assertEqual(workers["not_ready"], [{
            "worker": 2, "pid": self.process(supervisor, 2).pid, "failing": ["history"],
            "errors": {"history": "the history database is unavailable"}}])
        reports[2] = {"status": "ready", "failing": [], "checks": {}}
        self.process(supervisor, 1).end(signal=9)
        self.assertEqual((await http.get("http://admin/readyz")).code, 200)
        self.process(supervisor, 2).end(signal=9)
        response = await http.get("http://admin/readyz")
        self.assertEqual(response.code, 503)
        body = json.loads(await response.text())
        self.assertEqual(body["failing"], ["workers"])
        self.assertEqual(body["checks"]["workers"]["alive"], 0)

    def test_sigusr1_goes_to_every_worker(self) -> None:
        """SIGUSR1 to the parent (logrotate) is sent on to every running worker, in the reactor's turn."""
        supervisor, fake = self.make()
        os.kill(os.getpid(), signal.SIGUSR1)
        # The handler only schedules the forwarding: nothing is sent from inside a signal handler.
        self.assertEqual(self.process(supervisor, 1).signals, [])
        [(forward, args, kwargs)] = fake.thread_calls
        forward(*args, **kwargs)
        # By number: Twisted's signalProcess knows only a few signals by name, not USR1.
        self.assertEqual(self.process(supervisor, 1).signals, [signal.SIGUSR1])
        self.assertEqual(self.process(supervisor, 2).signals, [signal.SIGUSR1])

    def test_stop_drains(self) -> None:
        """Stop sends SIGTERM to every worker and finishes once all have ended, without restarts."""
        supervisor, fake = self.make()
        first, second = self.process(supervisor, 1), self.process(supervisor, 2)
        stopped = self.tree.stopService()
        self.assertEqual((first.signals, second.signals), (["TERM"], ["TERM"]))
        self.assertNoResult(stopped)
        first.end()
        self.assertNoResult(stopped)
        second.end()
        self.successResultOf(stopped)
        fake.advance(100)
        self.assertEqual(len(fake.spawned), 2)
        self.assertEqual((first.signals, second.signals), (["TERM"], ["TERM"]))
        self.assertEqual(supervisor._sockets, [])

    def test_stop_closes_the_socket_before_workers_end(self) -> None:
        """
        Stopping closes the parent's listening socket at once, while the
        workers still drain: once they have closed theirs, new connections
        are refused (a load balancer sends them elsewhere).
        """
        supervisor, fake = self.make()
        self.tree.stopService()
        self.assertEqual(supervisor._sockets, [])
        self.assertEqual(self.process(supervisor, 1).signals, ["TERM"])

    def test_stop_timeout_follows_drain_timeout(self) -> None:
        """The supervisor waits for its workers drain_timeout + 15 s before SIGKILL, at least 30 s."""
        for drain, expected in (("30", 45.0), ("5", 30.0), ("120", 135.0)):
            text = ini(f"workers = 2\ndrain_timeout = {drain}")
            tree = supervisor_service(parse_config(text, "gw.ini"), text, FakeReactor())
            [supervisor] = [s for s in tree if isinstance(s, WorkerSupervisor)]
            self.assertEqual(supervisor.stop_timeout, expected, drain)

    def test_stop_kills_after_timeout(self) -> None:
        """A worker still running stop_timeout seconds after SIGTERM gets SIGKILL."""
        supervisor, fake = self.make(stop_timeout=30.0)
        first, second = self.process(supervisor, 1), self.process(supervisor, 2)
        stopped = supervisor.stopService()
        first.end()
        fake.advance(29.9)
        self.assertEqual(second.signals, ["TERM"])
        fake.advance(0.1)
        self.assertEqual(second.signals, ["TERM", "KILL"])
        self.assertNoResult(stopped)
        second.end(signal=9)
        self.successResultOf(stopped)

    def test_stop_cancels_pending_restart(self) -> None:
        """A worker waiting for its restart is not restarted once the supervisor stops."""
        supervisor, fake = self.make(min_delay=1.0)
        self.process(supervisor, 1).end(signal=9)
        stopped = supervisor.stopService()
        self.process(supervisor, 2).end()
        self.successResultOf(stopped)
        fake.advance(60)
        self.assertEqual(len(fake.spawned), 2)


class AcceptOneAtATimeTests(TestCase):
    """Workers sharing a socket take turns accepting."""

    def test_port_accepts_one_connection_per_wakeup(self) -> None:
        """
        An adopted port keeps numberAccepts at 1, whatever Twisted's adaptive
        accept loop sets, so one worker cannot take a whole burst.
        """
        from twisted.internet import reactor
        from twisted.internet.protocol import Factory

        from aura_proxy.worker import _accept_one_at_a_time

        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        _accept_one_at_a_time(port)
        port.numberAccepts += 20
        self.assertEqual(port.numberAccepts, 1)
        _accept_one_at_a_time(port)
        self.assertEqual(type(port).__name__, "OneAcceptPort")
