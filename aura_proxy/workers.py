"""
Several gateway processes sharing one listening socket: C{[gateway] workers = N}.

With C{workers > 1}, C{twistd aura-proxy} runs a L{WorkerSupervisor} instead of
the gateway itself.  The supervisor (the I{parent}):

  - binds the public C{listen} socket (a plain C{tcp:} endpoint) once;
  - spawns N worker processes, C{python -m aura_proxy.workers}, handing each
    the listening socket as file descriptor 3 and the configuration text on a
    pipe (fd 4), so every worker runs exactly the configuration the parent
    checked even if the file changes later;
  - restarts a worker that ends while the parent is running, after a delay
    that doubles for each worker that dies soon after it started (so a worker
    that cannot start does not spin);
  - serves C{admin_listen} itself: C{GET /healthz} reports every worker;
  - on shutdown (SIGTERM/SIGINT to twistd) sends SIGTERM to every worker and
    waits for them to end (each ends its open streams and flushes its history
    like a single-process gateway), then SIGKILLs whatever is left after
    C{stop_timeout} seconds.

A I{worker} builds the same service as L{aura_proxy.tap.build_service}, with
the listener replaced by C{reactor.adoptStreamPort} on the inherited socket
(the kernel spreads connections over the processes accepting on it), without
the admin port, and with its own history spool directory
(C{spool_dir/worker-INDEX}).  It stops on SIGTERM or SIGINT, and also when its
parent disappears (its stdin pipe, whose other end only the parent holds,
reaches end of file), so a killed parent never leaves orphans holding the port.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred, succeed
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IProcessTransport, IReadDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import ILogObserver, LogEvent, Logger
from zope.interface import implementer
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from aura_proxy.twisted_internals import accept_one_at_a_time, tcp_endpoint_address
from aura_proxy.config import (
    DEFAULT_CONFIG_NAME,
    Config,
    ConfigError,
    default_config_text,
    parse_config,
)

__all__ = [
    "ListenAddress",
    "WorkerState",
    "WorkerSupervisor",
    "bind_socket",
    "listen_address",
    "main",
    "worker_config",
    "worker_service",
]

log = Logger("aura_proxy.workers")

#: Seconds the parent waits for its workers after SIGTERM before SIGKILL.
DEFAULT_STOP_TIMEOUT = 30.0
#: Seconds before the first restart of a worker that died.
DEFAULT_MIN_DELAY = 0.5
#: Longest delay between restarts of a worker that keeps dying at start.
DEFAULT_MAX_DELAY = 30.0
#: A worker that ran at least this many seconds restarts after MIN_DELAY again.
DEFAULT_STABLE_AFTER = 10.0

#: The child's file descriptors: the shared listening socket and the config pipe.
LISTEN_FD = 3
CONFIG_FD = 4


# -- the shared socket ---------------------------------------------------------


@dataclass(frozen=True)
class ListenAddress:
    """Where a plain C{tcp:} endpoint description listens."""

    port: int
    interface: str
    backlog: int
    family: socket.AddressFamily


def listen_address(description: str) -> ListenAddress:
    """
    Parse a plain C{tcp:PORT[:interface=ADDRESS][:backlog=N]} description
    (the same syntax, and the same defaults, as Twisted's C{tcp:} endpoint).

    @raise ValueError: for any other kind of endpoint.
    """
    from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
    from twisted.internet.testing import MemoryReactor

    endpoint = serverFromString(MemoryReactor(), description)
    if type(endpoint) is not TCP4ServerEndpoint:
        raise ValueError(f"workers need a plain tcp: endpoint, got {description!r}")
    port, interface, backlog = tcp_endpoint_address(endpoint, description)
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    return ListenAddress(port, interface, backlog, family)


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
        self.transport.writeToChild(CONFIG_FD, self._supervisor.config_text.encode("utf-8"))
        self.transport.closeChildFD(CONFIG_FD)

    def processEnded(self, reason: Failure) -> None:
        self._supervisor._ended(self._worker, reason)


class _Health(Resource):
    """C{GET /healthz} of the parent: every worker's index, pid, restarts and liveness."""

    isLeaf = True

    def __init__(self, supervisor: "WorkerSupervisor") -> None:
        super().__init__()
        self._supervisor = supervisor

    def render_GET(self, request: Request) -> bytes:
        workers = [w.summary() for w in self._supervisor.workers]
        ok = any(w["alive"] for w in workers)
        if not ok:
            request.setResponseCode(503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        body = {"status": "ok" if ok else "unavailable", "workers": workers}
        return json.dumps(body).encode("utf-8")

    render_HEAD = render_GET


def _child_environment() -> dict[str, str]:
    """The parent's environment, with this package importable by C{python -m}."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


class WorkerSupervisor(MultiService):
    """
    The parent process of C{workers > 1}: owns the listening socket and the
    admin port, runs, restarts and drains the worker processes.

    @ivar workers: one L{WorkerState} per slot, indexes 1 to N.
    """

    def __init__(
        self,
        config: Config,
        config_text: str,
        reactor: Any,
        demo: bool = False,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        min_delay: float = DEFAULT_MIN_DELAY,
        max_delay: float = DEFAULT_MAX_DELAY,
        stable_after: float = DEFAULT_STABLE_AFTER,
        executable: str = sys.executable,
    ) -> None:
        """
        @param config_text: the INI text of C{config}, handed to every worker
            (which parses it with C{config.source} as the file name).
        """
        super().__init__()
        self.config = config
        self.config_text = config_text
        self.address = listen_address(config.gateway.listen)
        self.workers = [WorkerState(i) for i in range(1, config.gateway.workers + 1)]
        self.stop_timeout = stop_timeout
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.stable_after = stable_after
        self._reactor = reactor
        self._executable = executable
        self._socket: Optional[socket.socket] = None
        self._stopping = False
        root = Resource()
        root.putChild(b"healthz", _Health(self))
        admin = Site(root, reactor=reactor)
        admin.noisy = False
        admin.log = lambda request: None  # type: ignore[method-assign]  # health probes are not news
        strports.service(config.gateway.admin_listen, admin, reactor=reactor).setServiceParent(self)
        if demo:
            from aura_proxy.demo import demo_service

            demo_service(reactor).setServiceParent(self)

    @classmethod
    def from_file(cls, path: Optional[str], reactor: Any, **kwargs: Any) -> "WorkerSupervisor":
        """
        A supervisor for the configuration file C{path} (None: the embedded
        defaults), read once here: workers started later get this very text.

        @raise ConfigError: if it cannot be read or is not valid.
        """
        if path is None:
            text, source = default_config_text(), DEFAULT_CONFIG_NAME
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError([f"{path}: cannot read ({e})"])
            source = os.fspath(path)
        return cls(parse_config(text, source), text, reactor, **kwargs)

    # -- service ---------------------------------------------------------------

    def _bind(self) -> None:
        if self._socket is None:
            self._socket = bind_socket(self.address)

    def privilegedStartService(self) -> None:
        # Bind before twistd drops privileges (--uid), as strports does.
        self._bind()
        super().privilegedStartService()

    def startService(self) -> None:
        self._bind()
        super().startService()
        self._stopping = False
        assert self._socket is not None
        host, port = self._socket.getsockname()[:2]
        log.info(
            "aura-proxy: {n} workers sharing {host}:{port}",
            n=len(self.workers), host=host, port=port,
        )
        for worker in self.workers:
            self._spawn(worker)

    def stopService(self) -> "Deferred[None]":
        self._stopping = True
        for worker in self.workers:
            if worker.restart_call is not None and worker.restart_call.active():
                worker.restart_call.cancel()
            worker.restart_call = None
        admin = maybeDeferred(super().stopService)
        drained = self._drain()

        def close(result: object) -> None:
            sock, self._socket = self._socket, None
            if sock is not None:
                sock.close()

        return gatherResults([admin, drained]).addCallback(close)

    # -- workers ---------------------------------------------------------------

    def worker_argv(self, worker: WorkerState) -> list[str]:
        """The command line of C{worker}'s process."""
        return [
            self._executable, "-m", "aura_proxy.workers",
            "--index", str(worker.index),
            "--listen-fd", str(LISTEN_FD),
            "--config-fd", str(CONFIG_FD),
            "--source", self.config.source,
            "--watch-parent",
        ]

    def _spawn(self, worker: WorkerState) -> None:
        assert self._socket is not None
        worker.restart_call = None
        worker.started_at = self._reactor.seconds()
        try:
            process = self._reactor.spawnProcess(
                _WorkerProtocol(self, worker),
                self._executable,
                self.worker_argv(worker),
                env=_child_environment(),
                # 0: a pipe only the parent holds (EOF = the parent is gone);
                # 1, 2: the parent's own output; 3: the socket; 4: the config.
                childFDs={0: "w", 1: 1, 2: 2, LISTEN_FD: self._socket.fileno(), CONFIG_FD: "w"},
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

    def _signal(self, worker: WorkerState, name: str) -> None:
        if worker.process is None:
            return
        try:
            worker.process.signalProcess(name)
        except Exception:
            # Already gone: processEnded is on its way.
            pass


# -- the worker ----------------------------------------------------------------


def worker_config(config: Config, index: int) -> Config:
    """C{config} as worker C{index} runs it: with its own spool directory."""
    spool_dir = os.path.join(config.history.spool_dir, f"worker-{index}")
    return replace(config, history=replace(config.history, spool_dir=spool_dir))


class _AdoptedPort(Service):
    """Accepts on an inherited listening socket (the parent's) while running."""

    def __init__(self, reactor: Any, fd: int, factory: Site) -> None:
        self._reactor = reactor
        self._fd = fd
        self._factory = factory
        self._port: Optional[IListeningPort] = None

    def startService(self) -> None:
        Service.startService(self)
        probe = socket.socket(fileno=self._fd)
        family = probe.family
        probe.detach()
        self._port = port = self._reactor.adoptStreamPort(self._fd, family, self._factory)
        # The port holds a duplicate of the descriptor.
        os.close(self._fd)
        _accept_one_at_a_time(port)

    def stopService(self) -> Optional["Deferred[None]"]:
        Service.stopService(self)
        port, self._port = self._port, None
        if port is None:
            return None
        return port.stopListening()


def _accept_one_at_a_time(port: Any) -> None:
    """
    Make a shared listening port accept one connection per readiness event.

    Twisted's port accepts up to a hundred connections each time the socket
    is readable, growing that number while clients keep coming: the worker
    that wakes first takes a whole burst (wrk's 50 connections all went to
    one of two workers), and the others idle.  Accepting one at a time lets
    every worker that is waiting in its poll take its share; a worker busy
    with its streams polls later and so takes fewer.  (Where this Twisted's
    port is not as expected, it accepts as Twisted does.)
    """
    accept_one_at_a_time(port)


def worker_service(config: Config, index: int, reactor: Any, listen_fd: int = LISTEN_FD) -> MultiService:
    """The gateway of worker C{index}, accepting on the inherited C{listen_fd}."""
    from aura_proxy.tap import build_service

    return build_service(
        worker_config(config, index),
        reactor,
        listener=lambda site: _AdoptedPort(reactor, listen_fd, site),
        admin=False,
    )


@implementer(ILogObserver)
class _NamedObserver:
    """Puts the worker's name in every event's system (C{[worker-2,...]})."""

    def __init__(self, name: str, observer: ILogObserver) -> None:
        self._name = name
        self._observer = observer

    def __call__(self, event: LogEvent) -> None:
        system = event.get("log_system", "-")
        named = self._name if system in (None, "-") else f"{self._name},{system}"
        self._observer(dict(event, log_system=named))


@implementer(IReadDescriptor)
class _ParentWatch:
    """Reads the worker's stdin; end of file means the parent is gone."""

    def __init__(self, fd: int, gone: Callable[[], None]) -> None:
        self._fd = fd
        self._gone = gone
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "parent-watch"

    def doRead(self) -> Optional[Exception]:  # type: ignore[override]  # the reactor wants exceptions
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            return CONNECTION_LOST
        return None if data else CONNECTION_DONE

    def connectionLost(self, reason: Failure) -> None:
        # The reactor has removed this reader already.
        self._gone()


def _arguments(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m aura_proxy.workers",
        description="One aura-proxy worker process (started by the gateway when [gateway] workers > 1).",
    )
    parser.add_argument("--index", type=int, required=True, help="the worker's index, from 1")
    parser.add_argument("--listen-fd", type=int, default=LISTEN_FD, help="the inherited listening socket")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config-fd", type=int, help="read the configuration text from this descriptor")
    source.add_argument("--config", help="read the configuration from this file (default: embedded)")
    parser.add_argument("--source", default=None, help="the configuration's file name, for messages")
    parser.add_argument(
        "--watch-parent", action="store_true",
        help="stop when stdin reaches end of file (a pipe from the parent process)",
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one worker until SIGTERM, SIGINT or its parent's end; the exit status."""
    args = _arguments(argv)
    try:
        if args.config_fd is not None:
            with os.fdopen(args.config_fd, "rb") as pipe:
                text = pipe.read().decode("utf-8")
            config = parse_config(text, args.source or DEFAULT_CONFIG_NAME)
        elif args.config:
            with open(args.config, encoding="utf-8") as f:
                config = parse_config(f.read(), args.source or args.config)
        else:
            config = parse_config(default_config_text(), DEFAULT_CONFIG_NAME)
    except (ConfigError, OSError, UnicodeDecodeError) as e:
        sys.stderr.write(f"aura-proxy worker {args.index}: invalid configuration:\n{e}\n")
        return 2

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    name = f"worker-{args.index}"
    globalLogBeginner.beginLoggingTo(
        [_NamedObserver(name, textFileLogObserver(sys.stdout))], redirectStandardIO=False
    )

    status = [0]
    stopping = [False]

    def stop() -> None:
        if not stopping[0]:
            stopping[0] = True
            reactor.stop()  # type: ignore[attr-defined]

    def on_signal(number: int, frame: Any) -> None:
        log.info("{name}: received {sig}, shutting down", name=name, sig=signal.Signals(number).name)
        reactor.callFromThread(stop)  # type: ignore[attr-defined]

    def parent_gone() -> None:
        if stopping[0]:
            return  # the reactor's shutdown disconnects every reader: not news
        log.warn("{name}: the parent process is gone, shutting down", name=name)
        stop()

    try:
        service = worker_service(config, args.index, reactor, args.listen_fd)
        from aura_proxy.tap import prepare_process

        prepare_process(reactor)
        service.privilegedStartService()
    except Exception:
        log.failure("{name}: cannot start", name=name)
        return 1

    def start() -> None:
        # Replace the reactor's handlers: a second signal (the parent's
        # SIGTERM after a terminal's SIGINT) must not stop it twice.
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            service.startService()
        except Exception:
            log.failure("{name}: cannot start", name=name)
            status[0] = 1
            stop()
            return
        if args.watch_parent:
            reactor.addReader(_ParentWatch(0, parent_gone))  # type: ignore[attr-defined,arg-type]
        log.info("{name} serving (pid {pid})", name=name, pid=os.getpid())

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
