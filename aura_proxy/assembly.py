"""
The service tree, built from a configuration, in one place.

Every way to run the gateway goes through here: C{twistd aura-proxy}
(L{aura_proxy.tap.makeService}), C{twistd -y aura-proxy.tac}, each worker
process of C{workers > 1} (L{aura_proxy.worker}) and the integration tests.

  - L{make_service} decides, from the configuration alone, between one
    process serving the gateway and the supervisor of C{workers > 1};
  - L{gateway_service} is one process serving the gateway: process tuning,
    call history, the access log, the drain of open streams (and the resume
    log), the demo agent when asked, the public listener, the admin site
    (health, readiness, and the dashboard with its upstream prober);
  - L{supervisor_service} is the parent of C{workers > 1}: the supervisor,
    the demo agent when asked, the admin site reporting the workers (its
    dashboard reads every worker's calls from the history database).

Both trees stop in order, last child first, each once the one before it has
stopped (L{StopInOrder}): the listeners first, then open streams are ended
(and recorded), then the access log and call history are flushed.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable, NoReturn, Optional, Protocol

from prometheus_client import CollectorRegistry
from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger

from aura_proxy.access_log import AccessLogService, access_log_service, install_usr1
from aura_proxy.admin import MetricsText, admin_service, gateway_health
from aura_proxy.config import (
    DEFAULT_CONFIG_NAME,
    Config,
    ConfigError,
    SseConfig,
    default_config_text,
    load_certificates,
    parse_config,
)
from aura_proxy.dashboard import dashboard_service
from aura_proxy.history import HistoryService, make_history
from aura_proxy.history.spool import gather_orphans
from aura_proxy.metrics import GatewayMetrics, exposition
from aura_proxy.limits import make_limits
from aura_proxy.process import ProcessTuning
from aura_proxy.reload import Reloader, SighupReload
from aura_proxy.proxy import Gateway
from aura_proxy.readiness import gateway_readiness, supervisor_readiness
from aura_proxy.resume.log import MemoryResumeLog, ResumeLog
from aura_proxy.site import GatewaySite
from aura_proxy.tls_listen import ListenerCertificates, is_ssl, tls_server
from aura_proxy.upstream import UpstreamClient
from aura_proxy.upstream_tls import UpstreamTlsPolicy
from aura_proxy.workers import DEFAULT_STOP_TIMEOUT, WorkerSupervisor

__all__ = [
    "GatewayService",
    "StopInOrder",
    "exit_with",
    "gateway_service",
    "make_resume_log",
    "make_service",
    "read_config",
    "service_from_file",
    "supervisor_service",
]

_log = Logger()

#: Makes the public listener's service for the gateway's site.
Listener = Callable[[GatewaySite], IService]


class SiteFactory(Protocol):
    """Makes the gateway's client-facing site (L{GatewaySite} or a subclass)."""

    def __call__(self, gateway: Gateway, *, reactor: Any) -> GatewaySite: ...


class StopInOrder(MultiService):
    """
    A MultiService whose children stop one after the other, last added first,
    each once the one before it has finished stopping (Twisted's stops them
    all at once): streams must have ended, and been recorded, before call
    history flushes.
    """

    async def _stop_children(self) -> None:
        for service in reversed(list(self)):
            try:
                await maybeDeferred(service.stopService)
            except Exception:
                _log.failure("stopping {service} failed", service=service)

    def stopService(self) -> "Deferred[None]":
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_children())


class _Drain(Service):
    """
    On shutdown (SIGTERM), once the listener has closed: let calls in flight
    finish for up to C{[gateway] drain_timeout} seconds, then end the streams
    still open (recorded as C{shutdown}; SSE after a whole event, with a
    C{retry:} hint, their logs marked cut), stop the resume log (which
    releases this instance's lease and ends its replays), close the pool;
    stop the limits' store once the streams have ended (each frees its slot).
    """

    name = "drain"

    def __init__(
        self, gateway: Gateway, client: UpstreamClient, resume: Optional[ResumeLog], timeout: float = 0.0
    ) -> None:
        self._gateway = gateway
        self._client = client
        self._resume = resume
        self._timeout = timeout

    def startService(self) -> None:
        Service.startService(self)
        start = getattr(self._resume, "start", None)
        if start is not None:
            start()
        self._gateway.limits.start()

    async def _drain(self) -> None:
        if self._timeout > 0:
            _log.info(
                "draining: {calls} calls in flight, {streams} streams open; up to {timeout:g} s",
                calls=self._gateway.streams.calls, streams=len(self._gateway.streams),
                timeout=self._timeout,
            )
            await self._gateway.drain(self._timeout)
        resume = self._resume
        await self._gateway.shutdown(then=None if resume is None else lambda: maybeDeferred(resume.stop))
        await maybeDeferred(self._gateway.limits.stop)
        await maybeDeferred(self._client.close)

    def stopService(self) -> "Deferred[None]":
        Service.stopService(self)
        return Deferred.fromCoroutine(self._drain())


class GatewayService(StopInOrder):
    """
    One process serving the gateway, as L{gateway_service} builds it; its
    parts are at hand for the tests and the worker.

    @ivar gateway: the request path.
    @ivar site: the client-facing site.
    @ivar client: the upstream connection pool.
    @ivar history: call history, or None when disabled.
    @ivar resume: the stream log, or None when resume is off.
    @ivar access_log: the access log, or None when C{[log] access = off}.
    @ivar reloader: reloads the configuration (SIGHUP, C{POST /reload}).
    @ivar certificates: the certificates of the C{ssl:} listeners (none
        until a listener is made).
    """

    def __init__(
        self,
        gateway: Gateway,
        site: GatewaySite,
        client: UpstreamClient,
        history: Optional[HistoryService],
        resume: Optional[ResumeLog],
        access_log: Optional[AccessLogService] = None,
    ) -> None:
        super().__init__()
        self.gateway = gateway
        self.site = site
        self.client = client
        self.history = history
        self.resume = resume
        self.access_log = access_log
        self.reloader = Reloader(gateway)
        self.certificates = ListenerCertificates()


def make_resume_log(config: SseConfig, reactor: Any, fast_path: bool = True) -> Optional[ResumeLog]:
    """The stream log C{[sse] resume} names, or None for C{off}; C{fast_path}: its C store where built."""
    if config.resume == "off" or not config.inject_ids:
        return None
    if config.resume == "memory":
        return MemoryResumeLog(
            reactor, config.resume_ttl, config.resume_max_events, config.resume_max_bytes, accelerate=fast_path,
            max_total_bytes=config.resume_max_total_bytes,
        )
    from aura_proxy.resume.redis import RedisResumeLog

    return RedisResumeLog(
        reactor, config.resume, config.resume_ttl, config.resume_max_events, config.resume_max_bytes
    )


def _demo(reactor: Any, config: Config) -> IService:
    from aura_proxy.demo import demo_service

    # With [upstream_trust], the demo agent takes only what the gateway signed.
    return demo_service(reactor, trusted_keys=config.upstream_trust.keys)


def gateway_service(
    config: Config,
    reactor: Any,
    *,
    demo: bool = False,
    listener: Optional[Listener] = None,
    site_factory: SiteFactory = GatewaySite,
    admin: bool = True,
    tuning: bool = True,
    registry: Optional[CollectorRegistry] = None,
    private_listen: Optional[str] = None,
    reload_signal: bool = True,
) -> GatewayService:
    """
    One process serving the gateway.

    Children, in start order (they stop in the reverse one): process tuning,
    call history, the access log, the drain of open streams (and the resume
    log), the demo agent, the public listener, the admin site.

    @param demo: also serve the demo agent on 127.0.0.1:9000.
    @param listener: makes the public listener's service for the site
        (default: C{[gateway] listen}, C{ssl:} ones with reloadable
        certificates, L{aura_proxy.tls_listen}, the others through
        strports); a worker process
        adopts its parent's socket instead (L{aura_proxy.worker}).
    @param site_factory: makes the client-facing site (the integration tests
        use one that tracks its connections).
    @param admin: whether to serve C{admin_listen} (worker processes do not:
        their parent does).
    @param tuning: whether starting the tree tunes the process
        (L{aura_proxy.process}) and handles SIGUSR1 (reopen the access
        log); off only for tests run inside trial's process.
    @param registry: the process's metrics (L{aura_proxy.metrics}, with
        C{[metrics]} on), which C{/metrics} and the admin site's dashboard
        read (default: a new one; one per process, never the global one).
    @param private_listen: where a worker answers its parent (a private
        C{unix:} endpoint): its own C{/readyz}, and C{/metrics} for the
        parent to sum; None: nowhere but the admin site.
    @param reload_signal: whether SIGHUP reloads the configuration (a worker
        process is told by its parent instead).
    @raise ConfigError: if an C{ssl:} listener's key, certificate or chain
        cannot be loaded (read here: twistd builds the tree before it drops
        privileges).
    """
    g = config.gateway
    if registry is None:
        registry = CollectorRegistry()
    history = make_history(config.history, reactor)
    client = UpstreamClient(
        reactor, g.connect_timeout, g.max_idle_connections, fast_path=g.fast_path,
        tls_policy=UpstreamTlsPolicy(config.routes),
    )
    resume = make_resume_log(config.sse, reactor, g.fast_path)
    metrics = None
    if config.metrics.enabled:
        metrics = GatewayMetrics(
            reactor, registry, config.metrics.stall_after,
            worker="main" if admin else None, fast_path=g.fast_path,
        )
        metrics.history, metrics.resume, metrics.client = history, resume, client
    access_log = access_log_service(config.log, reactor, signals=tuning)
    limits = make_limits(config.limits, reactor)
    gateway = Gateway(
        config, reactor, client, history, resume, access_log.write if access_log is not None else None,
        metrics=metrics, limits=limits,
    )
    if metrics is not None:
        metrics.detached = gateway.detached
    site = site_factory(gateway, reactor=reactor)
    top = GatewayService(gateway, site, client, history, resume, access_log)
    if tuning:
        ProcessTuning(reactor, g.fast_path).setServiceParent(top)
    if history is not None:
        history.setServiceParent(top)
    if access_log is not None:
        access_log.setServiceParent(top)
    _Drain(gateway, client, resume, g.drain_timeout).setServiceParent(top)
    if reload_signal:
        SighupReload(reactor, top.reloader.reload).setServiceParent(top)
    if demo:
        _demo(reactor, config).setServiceParent(top)
    if listener is None:
        # One listener per endpoint of [gateway] listen, all serving one site;
        # an ssl: one with a certificate that reloads (strports' cannot).
        certificates = load_certificates(config)
        top.certificates = certificates
        top.reloader.certificates = certificates.reload
        for description in g.listen:
            if is_ssl(description):
                tls_server(certificates[description], site, reactor).setServiceParent(top)
            else:
                strports.service(description, site, reactor=reactor).setServiceParent(top)
    else:
        listener(site).setServiceParent(top)
    text = _metrics_text(metrics)
    if admin:
        health = gateway_health(gateway, history)
        dashboard = dashboard_service(config, registry, reactor, health)
        top.reloader.listeners.append(lambda new: dashboard.use_routes(new.routes))
        admin_service(
            g.admin_listen, health, reactor, dashboard,
            readiness=gateway_readiness(config, site, history, reactor), token=config.admin.token,
            metrics=text, reload=top.reloader.reload,
        ).setServiceParent(top)
    if private_listen is not None:
        # The worker's own readiness and figures, for its parent only (no dashboard, no log).
        admin_service(
            private_listen, lambda: {"status": "ok"}, reactor,
            readiness=gateway_readiness(config, site, history, reactor), metrics=text,
        ).setServiceParent(top)
    return top


def _metrics_text(metrics: Optional[GatewayMetrics]) -> Optional[MetricsText]:
    """What C{/metrics} answers for C{metrics}: its registry's text; None when off."""
    if metrics is None:
        return None
    registry = metrics.registry
    return lambda: succeed(exposition(registry))


class _ForwardUsr1(Service):
    """The parent of C{workers > 1}: SIGUSR1 (logrotate) goes on to every worker."""

    name = "forward-sigusr1"

    def __init__(self, reactor: Any, workers: WorkerSupervisor) -> None:
        self._reactor = reactor
        self._workers = workers
        self._restore: Optional[Callable[[], None]] = None

    def startService(self) -> None:
        Service.startService(self)
        self._restore = install_usr1(self._reactor, lambda: self._workers.signal_workers(signal.SIGUSR1))

    def stopService(self) -> None:
        Service.stopService(self)
        if self._restore is not None:
            self._restore()
            self._restore = None


def supervisor_service(
    config: Config,
    config_text: str,
    reactor: Any,
    *,
    demo: bool = False,
    registry: Optional[CollectorRegistry] = None,
    **supervisor: Any,
) -> StopInOrder:
    """
    The parent process of C{workers > 1}: the L{WorkerSupervisor}, the demo
    agent when asked, and the admin site reporting every worker.

    @param config_text: the text C{config} was parsed from, handed to workers.
    @param registry: the whole gateway's metrics, which the admin site's
        dashboard reads (default: a new, empty one).
    @param supervisor: more keyword arguments of L{WorkerSupervisor} (timeouts).
    """
    top = StopInOrder()
    # Each worker drains for up to drain_timeout before it exits: wait longer.
    supervisor.setdefault(
        "stop_timeout", max(DEFAULT_STOP_TIMEOUT, config.gateway.drain_timeout + 15.0)
    )
    if registry is None:
        registry = CollectorRegistry()
    # With [metrics] on, the workers' figures, summed, land in registry.
    workers = WorkerSupervisor(config, config_text, reactor, registry=registry, **supervisor)
    workers.setServiceParent(top)
    SighupReload(reactor, workers.reload).setServiceParent(top)
    if config.log.access != "off":
        # Each worker reopens its own descriptor of the file (or, for stdout, flushes).
        _ForwardUsr1(reactor, workers).setServiceParent(top)
    if demo:
        _demo(reactor, config).setServiceParent(top)
    dashboard = dashboard_service(config, registry, reactor, workers.health)
    workers.reload_listeners.append(lambda new: dashboard.use_routes(new.routes))
    admin_service(
        config.gateway.admin_listen, workers.health, reactor, dashboard,
        readiness=supervisor_readiness(config, workers, reactor), token=config.admin.token,
        metrics=workers.metrics if config.metrics.enabled else None, reload=workers.reload,
    ).setServiceParent(top)
    return top


def make_service(config: Config, config_text: str, reactor: Any, *, demo: bool = False) -> MultiService:
    """
    The service that runs C{config}: one gateway process, or with
    C{[gateway] workers > 1} the supervisor of that many worker processes.

    @param config_text: the text C{config} was parsed from (the supervisor
        hands it to its workers).
    """
    for line in config.deprecations:
        _log.warn("{deprecation}", deprecation=line)
    if config.admin.token is None and not _loopback_only(config.gateway.admin_listen):
        _log.warn(
            "the admin site listens on {listen}, beyond loopback, without [admin] token_file: "
            "anyone who reaches that address can read it",
            listen=config.gateway.admin_listen,
        )
    if config.history.enabled:
        _gather_spools(config)
    if config.gateway.workers > 1:
        return supervisor_service(config, config_text, reactor, demo=demo)
    return gateway_service(config, reactor, demo=demo)


def _gather_spools(config: Config) -> None:
    """
    Rows spooled under another C{workers} setting (a single process's spool,
    or a worker's that this run does not start) go where this run replays them.
    """
    try:
        gather_orphans(config.history.spool_dir, config.gateway.workers)
    except OSError as e:
        _log.error(
            "history: spool segments in {dir} left by another process layout not moved ({why}); "
            "they are replayed once the gateway runs with that layout again",
            dir=config.history.spool_dir, why=e,
        )


def _loopback_only(listen: str) -> bool:
    """Whether the endpoint description C{listen} binds a loopback address (or a UNIX socket)."""
    import ipaddress

    if listen.startswith("unix:"):
        return True
    for part in listen.replace("\\:", "\x00").split(":"):
        if part.startswith("interface="):
            address = part[len("interface="):].replace("\x00", ":").strip("[]")
            try:
                return ipaddress.ip_address(address).is_loopback
            except ValueError:
                return address == "localhost"
    return False


def read_config(path: Optional[str]) -> tuple[Config, str]:
    """
    The configuration in the file C{path} (None: the embedded defaults) and
    its text, read once.

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
    return parse_config(text, source), text


def service_from_file(path: Optional[str], reactor: Any, *, demo: bool = False) -> MultiService:
    """
    L{make_service} for the configuration file C{path} (None: the embedded
    defaults): what C{twistd aura-proxy} and the C{.tac} file run.

    @raise ConfigError: if it cannot be read or is not valid.
    """
    config, text = read_config(path)
    return make_service(config, text, reactor, demo=demo)


def exit_with(error: ConfigError) -> NoReturn:
    """
    Refuse to start: every problem of C{error} on stderr, one line each
    (file, section, key: what is wrong), and exit status 1.
    """
    sys.stderr.write(f"{error}\n")
    raise SystemExit(1)
