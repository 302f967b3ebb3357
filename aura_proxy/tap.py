"""
The twistd service: C{twistd -n aura-proxy [--config FILE] [--demo]}.

L{makeService} is all the plugin calls; L{build_service} assembles the gateway
from a configuration and a reactor, and is what the C{.tac} file and the tests
use too.
"""

from __future__ import annotations

import gc
from typing import Any, Callable, Optional

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.server import Site

from aura_proxy.admin import Admin
from aura_proxy.eventloop import use_lean_poll
from aura_proxy.config import Config, ConfigError, SseConfig, load_config
from aura_proxy.proxy import Gateway
from aura_proxy.site import GatewaySite
from aura_proxy.resume.log import MemoryResumeLog, ResumeLog
from aura_proxy.upstream import UpstreamClient

__all__ = ["Options", "makeService", "build_service", "prepare_process", "StopInOrder"]

_log = Logger()


class Options(usage.Options):
    """Command line of C{twistd aura-proxy}."""

    synopsis = "[--config FILE] [--demo]"
    optParameters = [
        ["config", "c", None, "INI configuration file (default: the embedded defaults, "
         "identical to etc/aura-proxy.ini)"],
    ]
    optFlags = [
        ["demo", None, "also start the demo agent upstream on 127.0.0.1:9000"],
    ]

    def postOptions(self) -> None:
        try:
            self["parsed"] = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError("invalid configuration:\n" + str(e))


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
    """On shutdown: end every open stream (recorded as C{shutdown}), close the pool."""

    def __init__(self, gateway: Gateway, client: UpstreamClient, resume: Optional[ResumeLog]) -> None:
        self._gateway = gateway
        self._client = client
        self._resume = resume

    def startService(self) -> None:
        Service.startService(self)
        start = getattr(self._resume, "start", None)
        if start is not None:
            start()

    def stopService(self) -> "Deferred[object]":
        Service.stopService(self)
        done: list[Deferred[Any]] = [self._gateway.shutdown(), maybeDeferred(self._client.close)]
        if self._resume is not None:
            done.append(maybeDeferred(self._resume.stop))
        return gatherResults(done).addCallback(lambda _: None)


def make_resume_log(config: SseConfig, reactor: Any) -> Optional[ResumeLog]:
    """The stream log C{[sse] resume} names, or None for C{off}."""
    if config.resume == "off" or not config.inject_ids:
        return None
    if config.resume == "memory":
        return MemoryResumeLog(reactor, config.resume_ttl, config.resume_max_events, config.resume_max_bytes)
    from aura_proxy.resume.redis import RedisResumeLog

    return RedisResumeLog(
        reactor, config.resume, config.resume_ttl, config.resume_max_events, config.resume_max_bytes
    )


def build_service(
    config: Config,
    reactor: Any,
    demo: bool = False,
    listener: Optional[Callable[[Site], IService]] = None,
    admin: bool = True,
) -> MultiService:
    """
    The whole gateway as one service.

    Children stop in reverse order: listeners first, then open streams are
    ended, then call history is flushed.

    @param listener: makes the public listener's service for the site
        (default: C{[gateway] listen} through strports); a worker process
        adopts its parent's socket instead (L{aura_proxy.workers}).
    @param admin: whether to serve C{admin_listen} (worker processes do not:
        their parent does).
    """
    from aura_proxy.history import make_history

    top = StopInOrder()
    history = make_history(config.history, reactor)
    if history is not None:
        history.setServiceParent(top)
    g = config.gateway
    client = UpstreamClient(reactor, g.connect_timeout, g.max_idle_connections)
    resume = make_resume_log(config.sse, reactor)
    gateway = Gateway(config, reactor, client, history, resume)
    _Drain(gateway, client, resume).setServiceParent(top)
    if demo:
        from aura_proxy.demo import demo_service

        demo_service(reactor).setServiceParent(top)
    site = GatewaySite(gateway, reactor=reactor)
    if listener is None:
        strports.service(g.listen, site, reactor=reactor).setServiceParent(top)
    else:
        listener(site).setServiceParent(top)
    if not admin:
        return top
    admin_site = Site(Admin(gateway, history).resource(), reactor=reactor)
    admin_site.noisy = False
    admin_site.log = lambda request: None  # type: ignore[method-assign]  # health probes are not news
    strports.service(g.admin_listen, admin_site, reactor=reactor).setServiceParent(top)
    return top


def makeService(options: Options) -> IService:
    """Build the service twistd runs (the plugin's entry point)."""
    from twisted.internet import reactor  # twistd has installed the reactor by now

    parsed: Optional[Config] = options["parsed"]
    assert parsed is not None
    if parsed.gateway.workers > 1:
        from aura_proxy.workers import WorkerSupervisor

        return WorkerSupervisor.from_file(options["config"], reactor, demo=bool(options["demo"]))
    service = build_service(parsed, reactor, demo=bool(options["demo"]))
    prepare_process(reactor)
    return service


def prepare_process(reactor: Any) -> None:
    """
    Tune a process that serves the gateway (the single process, each worker,
    a C{.tac}): the lean epoll loop, the garbage collector's pace, and one
    log line saying which parts of the hot path run in C.
    """
    from aura_proxy import c_extensions, fastclient, relay, sse

    lean = use_lean_poll(reactor)
    tune_gc()
    unused = [(name, reason) for name, used, reason in (
        ("aura_proxy._sse_stamp", sse.ACCELERATED, sse.C_DISABLED_REASON),
        ("aura_proxy._chunked_read", fastclient._ChunkedReader is not None, fastclient.C_DISABLED_REASON),
        ("aura_proxy._relay_core", relay.ACCELERATED, None),
    ) if not used]
    if unused:
        _log.warn(
            "hot path: {missing} not used ({why}): the Python code does that work, more "
            "slowly; lean epoll loop {lean}",
            missing=", ".join(name for name, _ in unused),
            why="; ".join(f"{name}: {reason or c_extensions.NOT_BUILT}" for name, reason in unused),
            lean="on" if lean else "off (not an epoll reactor)",
        )
    else:
        _log.info(
            "hot path: chunked reads, SSE rewriter, event store and client writes in C, lean epoll loop {lean}",
            lean="on" if lean else "off (not an epoll reactor)",
        )


def tune_gc() -> None:
    """
    Keep the garbage collector's pauses off the streams.

    A gateway holds many long-lived objects per open stream, and CPython's
    young collections, every 700 allocations by default, kept walking the
    survivors: with a thousand streams, p99 latency 42 ms.  What exists at
    start-up (modules, configuration) is frozen out of collection, and young
    collections run every 50,000 allocations.  Full collections keep their
    default pace: an ended stream leaves reference cycles (Twisted's
    request and channel objects) that only a full collection frees.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 10)
