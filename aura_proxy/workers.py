"""
Several gateway processes sharing one listening socket: C{[gateway] workers = N}.

With C{workers > 1}, the assembly (L{aura_proxy.assembly.make_service}) runs a
L{WorkerSupervisor} instead of the gateway itself.  The supervisor (the
I{parent}):

  - binds every public C{listen} socket (each a C{tcp:} or C{ssl:}
    endpoint) once;
  - spawns N worker processes, C{python -m aura_proxy.worker}, handing each
    the listening sockets as file descriptors 3, 4, ... (in C{listen}
    order; a worker wraps an C{ssl:} one's connections in TLS itself) and
    the configuration text (after the certificates' bytes) on a pipe (the
    next descriptor), so every worker
    runs exactly the configuration the parent checked even if the file
    changes later;
  - restarts a worker that ends while the parent is running, after a delay
    that doubles for each worker that dies soon after it started (so a worker
    that cannot start does not spin);
  - reports every worker in its health report (L{WorkerSupervisor.health}),
    which the parent's admin site serves at C{GET /healthz} (and
    C{GET /readyz}: ready while at least one worker runs);
  - forwards SIGUSR1 (reopen the access log file, after logrotate) to
    every worker (L{signal_workers});
  - on reload (SIGHUP, C{POST /reload}: L{WorkerSupervisor.reload}) checks
    the file again and, if it is valid, writes its text to every worker on
    the worker's stdin pipe (L{config_frame}), each of which applies it as a
    single-process gateway does (L{aura_proxy.reload}); a worker started
    later gets the new text;
  - gives each worker a private Unix socket in a directory only this user
    may enter (made at start, removed at stop), where the worker answers its
    own C{/readyz} and, with C{[metrics]} on, its figures; the parent's
    C{GET /metrics} scrapes the running workers and sums them
    (L{WorkerSupervisor.metrics}), and its C{GET /readyz} asks each running
    worker (L{WorkerSupervisor.worker_readiness});
  - on shutdown (SIGTERM/SIGINT to twistd) sends SIGTERM to every worker and
    waits for them to end (each ends its open streams and flushes its history
    like a single-process gateway), then SIGKILLs whatever is left after
    C{stop_timeout} seconds.

The worker process itself is L{aura_proxy.worker}.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

from twisted.application.service import Service
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IStreamClientEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, readBody
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from aura_proxy.config import Config, ConfigError, load_certificates, parse_config
from aura_proxy.reload import ReloadResult, read_text, restart_only_changes, tell
from aura_proxy.tls_listen import SslListen, TlsPems, is_ssl, parse_ssl_listen
from aura_proxy.twisted_internals import tcp_endpoint_address

__all__ = [
    "LISTEN_FD",
    "ListenAddress",
    "WorkerState",
    "WorkerSupervisor",
    "bind_socket",
    "config_fd",
    "config_frame",
    "listen_address",
    "read_tls_frame",
    "tls_frame",
]

log = Logger("aura_proxy.workers")

#: Seconds the parent waits for one worker's figures before counting it down.
METRICS_SCRAPE_TIMEOUT = 5.0
#: Seconds the parent's C{/readyz} waits for one worker's own before counting it not ready.
READINESS_TIMEOUT = 2.0
#: Seconds between the parent's own readings of its workers' figures (for the dashboard).
METRICS_REFRESH = 5.0
#: Seconds the parent waits for its workers after SIGTERM before SIGKILL.
DEFAULT_STOP_TIMEOUT = 30.0
#: Seconds before the first restart of a worker that died.
DEFAULT_MIN_DELAY = 0.5
#: Longest delay between restarts of a worker that keeps dying at start.
DEFAULT_MAX_DELAY = 30.0
#: A worker that ran at least this many seconds restarts after MIN_DELAY again.
DEFAULT_STABLE_AFTER = 10.0

#: The child's first shared listening socket; the others follow it, in listen order.
LISTEN_FD = 3


def config_fd(listeners: int) -> int:
    """The child's descriptor of the config pipe: the first after its C{listeners} sockets."""
    return LISTEN_FD + listeners


def config_frame(text: str) -> bytes:
    """A configuration text as the parent writes it to a worker's stdin: its length, a line break, the text."""
    data = text.encode("utf-8")
    return b"%d\n" % len(data) + data


def tls_frame(pems: Mapping[str, TlsPems]) -> bytes:
    """
    The key, certificate and chain bytes of the C{ssl:} listeners, by
    description, as the parent writes them to a worker (before the
    configuration it goes with): C{tls}, its length, a line break, JSON.
    """
    data = json.dumps({d: p.to_json() for d, p in pems.items()}).encode("ascii")
    return b"tls %d\n" % len(data) + data


def read_tls_frame(data: bytes) -> dict[str, TlsPems]:
    """What L{tls_frame} wrote (its JSON)."""
    return {d: TlsPems.from_json(p) for d, p in json.loads(data).items()}


# -- the shared sockets --------------------------------------------------------


@dataclass(frozen=True)
class ListenAddress:
    """Where a C{tcp:} or C{ssl:} endpoint description listens, and its TLS settings."""

    port: int
    interface: str
    backlog: int
    family: socket.AddressFamily
    #: An C{ssl:} endpoint's description, parsed (its files are read by
    #: L{aura_proxy.tls_listen.ListenerCertificates}); None for C{tcp:}.
    tls: Optional[SslListen] = None


def listen_address(description: str) -> ListenAddress:
    """
    Parse a C{tcp:PORT[:interface=ADDRESS][:backlog=N]} or C{ssl:PORT:...}
    description (the same syntax, and the same defaults, as Twisted's
    endpoints; an C{ssl:} one's files are not read).

    @raise ValueError: for any other kind of endpoint.
    """
    from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
    from twisted.internet.testing import MemoryReactor

    tls = None
    if is_ssl(description):
        tls = parse_ssl_listen(description)
        port, interface, backlog = tls.port, tls.interface, tls.backlog
    else:
        endpoint = serverFromString(MemoryReactor(), description)
        if type(endpoint) is not TCP4ServerEndpoint:
            raise ValueError(f"workers need tcp: or ssl: endpoints, got {description!r}")
        port, interface, backlog = tcp_endpoint_address(endpoint, description)
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    return ListenAddress(port, interface, backlog, family, tls)


def bind_socket(address: ListenAddress) -> socket.socket:
    """
    A non-blocking listening socket on C{address}, set up as Twisted's own
    TCP port would be (C{SO_REUSEADDR}, the endpoint's backlog).
    """
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address.family == socket.AF_INET6:
            info = socket.getaddrinfo(
                address.interface, address.port, address.family, socket.SOCK_STREAM, 0,
                socket.AI_PASSIVE | socket.AI_NUMERICHOST,
            )
            sock.bind(info[0][4])
        else:
            sock.bind((address.interface, address.port))
        sock.listen(address.backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


# -- the parent ----------------------------------------------------------------


@dataclass
class WorkerState:
    """One worker slot, as the supervisor (and C{/healthz}) sees it."""

    index: int
    pid: Optional[int] = None
    restarts: int = 0
    process: Optional[IProcessTransport] = None
    started_at: float = 0.0
    #: Deaths in a row, each soon after its start: the backoff exponent.
    quick_failures: int = 0
    restart_call: Optional[IDelayedCall] = None
    waiters: Optional[list["Deferred[None]"]] = None

    @property
    def alive(self) -> bool:
        """Whether a process for this slot is running."""
        return self.process is not None

    def summary(self) -> dict[str, object]:
        """The C{/healthz} view of this worker."""
        return {"index": self.index, "pid": self.pid, "restarts": self.restarts, "alive": self.alive}


class _WorkerProtocol(ProcessProtocol):
    """Hands a new worker its configuration; tells the supervisor when it ends."""

    def __init__(self, supervisor: "WorkerSupervisor", worker: WorkerState) -> None:
        self._supervisor = supervisor
        self._worker = worker

    def connectionMade(self) -> None:
        assert self.transport is not None
        fd = self._supervisor.config_fd
        self.transport.writeToChild(fd, self._supervisor.frames(self._supervisor.config_text))
        self.transport.closeChildFD(fd)

    def processEnded(self, reason: Failure) -> None:
        self._supervisor._ended(self._worker, reason)


def _child_environment() -> dict[str, str]:
    """The parent's environment, with this package importable by C{python -m}."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


class WorkerSupervisor(Service):
    """
    The parent process of C{workers > 1}: owns the listening sockets, runs,
    restarts and drains the worker processes.  (The parent's admin site, and
    the demo agent, are its siblings in the tree L{aura_proxy.assembly} builds.)

    @ivar workers: one L{WorkerState} per slot, indexes 1 to N.
    """

    def __init__(
        self,
        config: Config,
        config_text: str,
        reactor: Any,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        min_delay: float = DEFAULT_MIN_DELAY,
        max_delay: float = DEFAULT_MAX_DELAY,
        stable_after: float = DEFAULT_STABLE_AFTER,
        executable: str = sys.executable,
        registry: Any = None,
    ) -> None:
        """
        @param config_text: the INI text of C{config}, handed to every worker
            (which parses it with C{config.source} as the file name).
        """
        self.config = config
        self.config_text = config_text
        #: What the parent binds, in listen order (a worker's fds 3, 4, ...):
        #: fixed at start, as C{listen} needs a restart to change.
        self.descriptions = config.gateway.listen
        self.addresses = [listen_address(d) for d in self.descriptions]
        #: The ssl: listeners' certificates, read here (twistd builds the
        #: tree before it drops privileges, so a key only root may read
        #: works) and at each reload; the workers get their bytes, never
        #: opening the files themselves, so every worker, even one
        #: restarted later, serves the same certificate.
        self.certificates = load_certificates(config)
        self.workers = [WorkerState(i) for i in range(1, config.gateway.workers + 1)]
        self.stop_timeout = stop_timeout
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.stable_after = stable_after
        self._reactor = reactor
        self._executable = executable
        self._sockets: list[socket.socket] = []
        self._stopping = False
        #: Called with each configuration reloaded (the parent's dashboard).
        self.reload_listeners: list[Callable[[Config], object]] = []
        # Where the workers answer the parent (made at start, gone at stop).
        self._private_dir: Optional[str] = None
        self._metrics_sum: Any = None
        self._metrics_refresh: Any = None
        if config.metrics.enabled:
            from aura_proxy.metrics import WorkersMetrics

            # The sum of the workers' figures, in registry too (the dashboard
            # reads it), refreshed at each GET /metrics and every few seconds.
            self._metrics_sum = WorkersMetrics(
                lambda: [(w.index, w.alive) for w in self.workers], self._scrape_worker,
                config.gateway.fast_path, registry,
            )

    def private_socket(self, worker: WorkerState) -> Optional[str]:
        """
        The Unix socket where C{worker} answers its parent (its C{/readyz},
        and its figures with C{[metrics]} on); None before start.
        """
        if self._private_dir is None:
            return None
        return os.path.join(self._private_dir, f"worker-{worker.index}.sock")

    def worker_readiness(self, worker: WorkerState) -> "Deferred[dict[str, object]]":
        """
        C{worker}'s own C{/readyz} report (L{aura_proxy.readiness.gateway_readiness}),
        asked over its private socket; a worker that does not answer within
        L{READINESS_TIMEOUT} is reported not ready, its error named.
        """
        path = self.private_socket(worker)
        if path is None:
            return succeed({"status": "not_ready", "failing": ["answer"], "error": "not started"})
        agent = Agent.usingEndpointFactory(self._reactor, _UnixSocket(self._reactor, path))
        d = agent.request(b"GET", b"http://worker/readyz")
        d.addCallback(readBody)
        d.addCallback(json.loads)

        def unanswered(why: str) -> dict[str, object]:
            return {"status": "not_ready", "failing": ["answer"], "error": why}

        # The agent reports its cancelled request as ResponseNeverReceived:
        # name the timeout here, where it is known.
        d.addTimeout(
            READINESS_TIMEOUT, self._reactor,
            onTimeoutCancel=lambda result, timeout: unanswered(f"no answer within {timeout:g} s"),
        )
        return d.addErrback(lambda f: unanswered(f.getErrorMessage() or repr(f.value)))

    def metrics(self) -> "Deferred[bytes]":
        """
        The parent's C{GET /metrics}: every running worker's figures, summed,
        and C{aura_proxy_up{worker}} per slot (L{aura_proxy.metrics.WorkersMetrics}).
        """
        if self._metrics_sum is None:
            return succeed(b"")
        return self._metrics_sum.render()  # type: ignore[no-any-return]

    def _scrape_worker(self, index: int) -> "Deferred[Optional[str]]":
        """Worker C{index}'s own figures (its text), over its private socket."""
        path = self.private_socket(self.workers[index - 1])
        if path is None:
            return succeed(None)
        agent = Agent.usingEndpointFactory(self._reactor, _UnixSocket(self._reactor, path))
        d = agent.request(b"GET", b"http://worker/metrics")
        d.addCallback(lambda response: readBody(response) if response.code == 200 else None)
        d.addTimeout(METRICS_SCRAPE_TIMEOUT, self._reactor)
        return d.addCallback(lambda body: body.decode("utf-8") if body is not None else None)

    @property
    def listening(self) -> bool:
        """Whether every shared listening socket is bound (from start to stop)."""
        return len(self._sockets) == len(self.addresses)

    @property
    def config_fd(self) -> int:
        """The worker's descriptor of the config pipe (after its listening sockets)."""
        return config_fd(len(self.addresses))

    def signal_workers(self, number: int) -> None:
        """
        Send signal C{number} (SIGUSR1: reopen the access log) to every
        running worker.  (A number: Twisted's C{signalProcess} takes only a
        few signals by name, and USR1 is not one of them.)
        """
        for worker in self.workers:
            self._signal(worker, number)

    def health(self) -> dict[str, object]:
        """The parent's C{/healthz} report: every worker's index, pid, restarts and liveness."""
        workers = [w.summary() for w in self.workers]
        ok = any(w["alive"] for w in workers)
        return {"status": "ok" if ok else "unavailable", "workers": workers}

    def reload(self) -> ReloadResult:
        """
        Check the configuration file again; if it is valid, hand its text to
        every running worker (and to workers started later).  Keys that need
        a restart are reported (L{aura_proxy.reload.RESTART_ONLY}).
        """
        source = self.config.source
        try:
            text = read_text(source)
            new = parse_config(text, source)
        except ConfigError as e:
            log.warn(
                "reload of {source} refused, the configuration in use stays:\n{problems}",
                source=source, problems=str(e),
            )
            return ReloadResult(False, source, tuple(e.problems))
        merged, needs_restart = restart_only_changes(self.config, new)
        self.config = merged
        self.config_text = text
        tell(self.reload_listeners, merged)
        # Renewed certificates: read by the parent, handed on with the text.
        tls_problems = self.certificates.reload()
        frame = self.frames(text)
        told = 0
        for worker in self.workers:
            if worker.process is None:
                continue
            try:
                worker.process.writeToChild(0, frame)
            except Exception:
                log.failure("worker {index}: cannot hand it the new configuration", index=worker.index)
                continue
            told += 1
        log.info(
            "reloaded {source}: {routes} routes, handed to {told} workers",
            source=source, routes=len(merged.routes), told=told,
        )
        if needs_restart:
            log.warn(
                "reload of {source}: needs restart, kept as they were: {keys}",
                source=source, keys=", ".join(needs_restart),
            )
        return ReloadResult(
            True, source, needs_restart=needs_restart, routes=len(merged.routes), workers=told,
            tls_problems=tls_problems,
        )

    def frames(self, text: str) -> bytes:
        """
        What a worker is handed, at its start and on reload: the
        certificates' bytes (with C{ssl:} listeners), then the configuration
        C{text}.
        """
        frame = config_frame(text)
        if self.certificates:
            frame = tls_frame(self.certificates.pems()) + frame
        return frame

    # -- service ---------------------------------------------------------------

    def _bind(self) -> None:
        if self._sockets:
            return
        # All or none: a port already taken fails the start, leaving nothing bound.
        sockets: list[socket.socket] = []
        try:
            for address in self.addresses:
                sockets.append(bind_socket(address))
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        self._sockets = sockets

    def privilegedStartService(self) -> None:
        # Bind before twistd drops privileges (--uid), as strports does.
        self._bind()
        super().privilegedStartService()

    def startService(self) -> None:
        self._bind()
        super().startService()
        self._stopping = False
        if self._private_dir is None:
            self._private_dir = tempfile.mkdtemp(prefix="aura-proxy-workers-")
        if self._metrics_sum is not None and self._metrics_refresh is None:
            from twisted.internet.task import LoopingCall

            self._metrics_refresh = LoopingCall(self._metrics_sum.render)
            self._metrics_refresh.clock = self._reactor
            self._metrics_refresh.start(METRICS_REFRESH, now=False)
        where = ", ".join(
            ("tls " if address.tls is not None else "") + "%s:%d" % sock.getsockname()[:2]
            for address, sock in zip(self.addresses, self._sockets)
        )
        log.info("aura-proxy: {n} workers sharing {where}", n=len(self.workers), where=where)
        for worker in self.workers:
            self._spawn(worker)

    def stopService(self) -> "Deferred[None]":
        self._stopping = True
        for worker in self.workers:
            if worker.restart_call is not None and worker.restart_call.active():
                worker.restart_call.cancel()
            worker.restart_call = None
        Service.stopService(self)
        # The parent's copies of the listening sockets go first: once every
        # worker has closed its own (each drains with its listeners closed),
        # new connections are refused, so a load balancer sends them to
        # another instance instead of queueing them here.
        sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()

        refresh, self._metrics_refresh = self._metrics_refresh, None
        if refresh is not None and refresh.running:
            refresh.stop()

        def forget_sockets(result: object) -> None:
            directory, self._private_dir = self._private_dir, None
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)

        return self._drain().addCallback(forget_sockets)

    # -- workers ---------------------------------------------------------------

    def worker_argv(self, worker: WorkerState) -> list[str]:
        """The command line of C{worker}'s process."""
        argv = [
            self._executable, "-m", "aura_proxy.worker",
            "--index", str(worker.index),
            "--listen-fd", str(LISTEN_FD),
            "--config-fd", str(self.config_fd),
            "--source", self.config.source,
            "--watch-parent",
        ]
        # What each inherited socket is, in fd order: the worker reads it here,
        # not from its configuration text, whose listen a reload may have
        # changed (a restart-only key) before this worker (re)started.
        for description in self.descriptions:
            argv += ["--listen", description]
        path = self.private_socket(worker)
        if path is not None:
            argv += ["--private-socket", path]
        return argv

    def child_fds(self) -> dict[int, Union[int, str]]:
        """
        A worker's descriptors: 0, a pipe only the parent holds (EOF: the
        parent is gone); 1 and 2, the parent's own output; from 3, the
        listening sockets, in listen order; then the config pipe.
        """
        fds: dict[int, Union[int, str]] = {0: "w", 1: 1, 2: 2}
        for offset, sock in enumerate(self._sockets):
            fds[LISTEN_FD + offset] = sock.fileno()
        fds[self.config_fd] = "w"
        return fds

    def _spawn(self, worker: WorkerState) -> None:
        assert self._sockets
        worker.restart_call = None
        worker.started_at = self._reactor.seconds()
        try:
            process = self._reactor.spawnProcess(
                _WorkerProtocol(self, worker),
                self._executable,
                self.worker_argv(worker),
                env=_child_environment(),
                childFDs=self.child_fds(),
            )
        except Exception:
            log.failure("worker {index}: cannot start", index=worker.index)
            self._schedule_restart(worker)
            return
        worker.process = process
        worker.pid = process.pid
        log.info("worker {index} started (pid {pid})", index=worker.index, pid=worker.pid)

    def _ended(self, worker: WorkerState, reason: Failure) -> None:
        worker.process = None
        waiters, worker.waiters = worker.waiters or [], None
        for waiter in waiters:
            waiter.callback(None)
        if self._stopping:
            log.info("worker {index} (pid {pid}) stopped", index=worker.index, pid=worker.pid)
            return
        log.warn(
            "worker {index} (pid {pid}) ended unexpectedly: {reason}",
            index=worker.index, pid=worker.pid, reason=reason.getErrorMessage(),
        )
        self._schedule_restart(worker)

    def restart_delay(self, worker: WorkerState) -> float:
        """
        Seconds before C{worker} restarts: C{min_delay}, doubled for every
        death in a row that came less than C{stable_after} seconds after its
        start, at most C{max_delay}.
        """
        if self._reactor.seconds() - worker.started_at >= self.stable_after:
            worker.quick_failures = 0
        delay = min(self.min_delay * 2 ** worker.quick_failures, self.max_delay)
        worker.quick_failures = min(worker.quick_failures + 1, 32)
        return float(delay)

    def _schedule_restart(self, worker: WorkerState) -> None:
        delay = self.restart_delay(worker)
        log.info("worker {index}: restarting in {delay}s", index=worker.index, delay=delay)
        worker.restart_call = self._reactor.callLater(delay, self._restart, worker)

    def _restart(self, worker: WorkerState) -> None:
        worker.restart_call = None
        if self._stopping:
            return
        worker.restarts += 1
        self._spawn(worker)

    def _drain(self) -> "Deferred[None]":
        """SIGTERM every worker; wait for all, SIGKILL the rest after C{stop_timeout}."""
        waits: list[Deferred[None]] = []
        for worker in self.workers:
            if worker.process is None:
                continue
            d: Deferred[None] = Deferred()
            worker.waiters = (worker.waiters or []) + [d]
            waits.append(d)
            self._signal(worker, "TERM")
        if not waits:
            return succeed(None)

        def kill() -> None:
            for worker in self.workers:
                if worker.process is not None:
                    log.warn(
                        "worker {index} (pid {pid}) still running after {t}s: SIGKILL",
                        index=worker.index, pid=worker.pid, t=self.stop_timeout,
                    )
                    self._signal(worker, "KILL")

        killer = self._reactor.callLater(self.stop_timeout, kill)

        def done(result: object) -> None:
            if killer.active():
                killer.cancel()

        return DeferredList(waits).addCallback(done)

    def _signal(self, worker: WorkerState, name: Union[str, int]) -> None:
        if worker.process is None:
            return
        try:
            worker.process.signalProcess(name)
        except Exception:
            # Already gone: processEnded is on its way.
            pass


@implementer(IAgentEndpointFactory)
class _UnixSocket:
    """Every URL an agent asks for, over one Unix socket (a worker's private one)."""

    def __init__(self, reactor: Any, path: str) -> None:
        self._reactor = reactor
        self._path = path

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return UNIXClientEndpoint(self._reactor, self._path, timeout=METRICS_SCRAPE_TIMEOUT)


# -- the worker ----------------------------------------------------------------
