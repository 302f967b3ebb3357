"""
One worker process of C{[gateway] workers = N}: C{python -m aura_proxy.worker},
started by the supervisor (L{aura_proxy.workers.WorkerSupervisor}), never by hand.

A worker builds the gateway through the same assembly as a single process
(L{aura_proxy.assembly.gateway_service}, process tuning included), with the
listeners replaced by C{reactor.adoptStreamPort} on the inherited sockets, one
per C{listen} endpoint from fd 3 on (the kernel spreads connections over the
processes accepting on each); an C{ssl:} one's connections are wrapped in TLS
(L{twisted.protocols.tls.TLSMemoryBIOFactory}, offering h2 and http/1.1 by
ALPN, as Twisted's own C{ssl:} listener does) with a certificate built from
the bytes the parent read (L{aura_proxy.tls_listen}): a worker never opens
the key files, and takes new bytes on reload.  It runs without the admin
port (the parent serves it), and with its own history spool directory
(C{spool_dir/worker-INDEX}).  It reads its configuration text from a pipe
(the descriptor after the sockets), so it runs exactly what the parent
checked.  It stops on SIGTERM or SIGINT, and also when its parent disappears (its stdin pipe, whose other end
only the parent holds, reaches end of file), so a killed parent never leaves
orphans holding the port.  On that same pipe the parent sends a new
configuration text on reload (L{aura_proxy.workers.config_frame}), which the
worker applies (L{aura_proxy.reload.Reloader.apply_text}); it ignores SIGHUP
itself (a terminal's hang-up reaches the whole process group: the parent
reloads, and tells it).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from dataclasses import replace
from typing import Any, Callable, Mapping, Optional, Sequence

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReadDescriptor
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.logger import ILogObserver, LogEvent, Logger
from twisted.python.failure import Failure
from twisted.web.server import Site
from zope.interface import implementer

from aura_proxy.assembly import GatewayService, gateway_service
from aura_proxy.reload import Reloader
from aura_proxy.twisted_internals import accept_one_at_a_time
from aura_proxy.config import DEFAULT_CONFIG_NAME, Config, ConfigError, default_config_text, parse_config
from aura_proxy.tls_listen import ListenerCertificates, TlsPems, is_ssl, tls_factory
from aura_proxy.workers import LISTEN_FD, read_tls_frame

__all__ = ["adopted_ports", "main", "worker_config", "worker_service"]

log = Logger("aura_proxy.worker")


def worker_config(config: Config, index: int) -> Config:
    """C{config} as worker C{index} runs it: with its own spool directory."""
    spool_dir = os.path.join(config.history.spool_dir, f"worker-{index}")
    return replace(config, history=replace(config.history, spool_dir=spool_dir))


class _AdoptedPort(Service):
    """Accepts on an inherited listening socket (the parent's) while running."""

    def __init__(self, reactor: Any, fd: int, factory: IProtocolFactory) -> None:
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


class _AdoptedPorts(MultiService):
    """A worker's listeners: one L{_AdoptedPort} per inherited socket."""


def adopted_ports(
    reactor: Any,
    listen_fd: int,
    listen: Sequence[str],
    site: Site,
    certificates: Optional[ListenerCertificates] = None,
) -> _AdoptedPorts:
    """
    The listeners of a worker whose parent bound C{listen} (endpoint
    descriptions) as C{listen_fd}, C{listen_fd + 1}, ...: an C{ssl:}
    socket serves C{site} through TLS with its certificate's swappable
    context from C{certificates} (default: loaded from the description's
    files), offering h2 and http/1.1 by ALPN (the site offers both); a
    C{tcp:} one serves it as it is.
    """
    if certificates is None:
        certificates = ListenerCertificates.load(listen)
    ports = _AdoptedPorts()
    for offset, description in enumerate(listen):
        # The parent shares only the bound socket: TLS lives in each worker
        # (a TLS session cannot cross processes).
        factory: IProtocolFactory = site
        if is_ssl(description):
            factory = tls_factory(certificates[description], site)
        _AdoptedPort(reactor, listen_fd + offset, factory).setServiceParent(ports)
    return ports


def worker_service(
    config: Config,
    index: int,
    reactor: Any,
    listen_fd: int = LISTEN_FD,
    private_socket: Optional[str] = None,
    listen: Optional[Sequence[str]] = None,
    pems: Optional[Mapping[str, TlsPems]] = None,
) -> GatewayService:
    """
    The gateway of worker C{index}, accepting on the inherited sockets from
    C{listen_fd} on, one per description of C{listen} (default: the
    configuration's), and answering its parent on the Unix socket
    C{private_socket}, when given (its readiness, and its figures for the
    parent to sum); its reloader gives every new configuration the worker's
    spool directory.

    @param pems: the bytes of the C{ssl:} listeners' files, by description,
        as the parent read them; the files of one not given are read here.
    @raise TlsFileError: if an C{ssl:} listener's certificate cannot be loaded.
    """
    descriptions = tuple(listen) if listen is not None else config.gateway.listen
    certificates = ListenerCertificates.load(descriptions, pems)
    private_listen = None
    if private_socket is not None:
        # A socket a dead predecessor left behind would refuse the bind.
        try:
            os.unlink(private_socket)
        except FileNotFoundError:
            pass
        escaped = private_socket.replace("\\", "\\\\").replace(":", "\\:")
        private_listen = f"unix:{escaped}:mode=600"
    service = gateway_service(
        worker_config(config, index),
        reactor,
        listener=lambda site: adopted_ports(reactor, listen_fd, descriptions, site, certificates),
        admin=False,
        private_listen=private_listen,
        reload_signal=False,
    )
    # No certificates hook: a worker's come from its parent (ConfigFrames).
    service.reloader = Reloader(service.gateway, lambda c: worker_config(c, index))
    service.certificates = certificates
    return service


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


class ConfigFrames:
    """
    Cuts what the parent writes (on stdin, and on the config pipe at start)
    into configuration texts (L{config_frame}) and certificates' bytes
    (L{tls_frame}), each handed on in the order written.
    """

    def __init__(
        self, received: Callable[[str], object], tls: Optional[Callable[[dict[str, TlsPems]], object]] = None
    ) -> None:
        self._received = received
        self._tls = tls
        self._buffer = b""

    def feed(self, data: bytes) -> None:
        """Bytes from the pipe: each whole frame goes to C{received} (a text) or C{tls}."""
        self._buffer += data
        while True:
            head, newline, rest = self._buffer.partition(b"\n")
            if not newline:
                return
            kind, _, size_text = head.rpartition(b" ")
            size = int(size_text)
            if len(rest) < size:
                return
            payload, self._buffer = rest[:size], rest[size:]
            try:
                if kind == b"tls":
                    if self._tls is not None:
                        self._tls(read_tls_frame(payload))
                else:
                    self._received(payload.decode("utf-8"))
            except Exception:
                log.failure("applying the configuration from the parent failed")


@implementer(IReadDescriptor)
class _ParentWatch:
    """
    Reads the worker's stdin: configuration texts on reload (to C{frames});
    end of file means the parent is gone.
    """

    def __init__(self, fd: int, gone: Callable[[], None], frames: Optional[ConfigFrames] = None) -> None:
        self._fd = fd
        self._gone = gone
        self._frames = frames
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
        if not data:
            return CONNECTION_DONE
        if self._frames is not None:
            self._frames.feed(data)
        return None

    def connectionLost(self, reason: Failure) -> None:
        # The reactor has removed this reader already.
        self._gone()


def _arguments(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m aura_proxy.worker",
        description="One aura-proxy worker process (started by the gateway when [gateway] workers > 1).",
    )
    parser.add_argument("--index", type=int, required=True, help="the worker's index, from 1")
    parser.add_argument(
        "--listen-fd", type=int, default=LISTEN_FD,
        help="the first inherited listening socket (the others follow it)",
    )
    parser.add_argument(
        "--listen", action="append", default=None, metavar="DESCRIPTION",
        help="the endpoint the parent bound as the next inherited socket, in order "
             "(default: [gateway] listen of the configuration)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config-fd", type=int, help="read the configuration text from this descriptor")
    source.add_argument("--config", help="read the configuration from this file (default: embedded)")
    parser.add_argument("--source", default=None, help="the configuration's file name, for messages")
    parser.add_argument(
        "--private-socket", default=None,
        help="answer the parent on this Unix socket: this worker's /readyz, and /metrics for it to sum",
    )
    parser.add_argument(
        "--watch-parent", action="store_true",
        help="stop when stdin reaches end of file (a pipe from the parent process)",
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one worker until SIGTERM, SIGINT or its parent's end; the exit status."""
    args = _arguments(argv)
    try:
        pems: Optional[dict[str, TlsPems]] = None
        if args.config_fd is not None:
            with os.fdopen(args.config_fd, "rb") as pipe:
                texts: list[str] = []
                given: list[dict[str, TlsPems]] = []
                ConfigFrames(texts.append, given.append).feed(pipe.read())
            if not texts:
                raise ConfigError(["the parent handed no configuration"])
            pems = given[-1] if given else None
            config = parse_config(texts[-1], args.source or DEFAULT_CONFIG_NAME)
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
        service = worker_service(
            config, args.index, reactor, args.listen_fd, args.private_socket, args.listen, pems
        )
        service.privilegedStartService()
    except Exception:
        log.failure("{name}: cannot start", name=name)
        return 1

    def start() -> None:
        # Replace the reactor's handlers: a second signal (the parent's
        # SIGTERM after a terminal's SIGINT) must not stop it twice.
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            service.startService()
        except Exception:
            log.failure("{name}: cannot start", name=name)
            status[0] = 1
            stop()
            return
        if args.watch_parent:
            # On reload the parent sends the certificates, then the text.
            frames = ConfigFrames(service.reloader.apply_text, service.certificates.use)
            reactor.addReader(_ParentWatch(0, parent_gone, frames))  # type: ignore[attr-defined,arg-type]
        log.info("{name} serving (pid {pid})", name=name, pid=os.getpid())

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
