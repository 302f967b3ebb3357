"""
Readiness (C{GET /readyz} on the admin site): named checks run together.

  - C{config}: the configuration is loaded;
  - C{listening}: the public port listens;
  - C{history}: the history writer is not failing (rows are written, not spooled);
  - C{resume}: the resume store answers (Redis: a PING within L{REDIS_PING_TIMEOUT});
  - C{workers} (the parent of C{workers > 1}): at least one worker runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Optional, Union

from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from aura_proxy.redis_url import redis_address

if TYPE_CHECKING:
    from twisted.web.server import Site as _Site

    from aura_proxy.config import Config
    from aura_proxy.history import HistoryService
    from aura_proxy.workers import WorkerSupervisor

__all__ = [
    "Check",
    "REDIS_PING_TIMEOUT",
    "Readiness",
    "gateway_readiness",
    "redis_ping",
    "supervisor_readiness",
]

_log = Logger()

#: One readiness check: a JSON object whose C{ok} says whether it passes,
#: now or once its Deferred fires (a check that raises fails, its error named).
Check = Callable[[], Union[dict[str, object], "Deferred[dict[str, object]]", Awaitable[dict[str, object]]]]

#: Seconds a readiness probe waits for Redis's PONG.
REDIS_PING_TIMEOUT = 1.0


class Readiness:
    """
    Named readiness checks, run together for each C{GET /readyz}.

    @ivar checks: name -> check, in the order the body lists them.
    """

    def __init__(self, checks: Mapping[str, Check]) -> None:
        self.checks = dict(checks)

    async def report(self) -> dict[str, object]:
        """
        C{{"status": "ready" | "not_ready", "failing": [NAME...], "checks": {NAME: {"ok": ...}}}}:
        every check run at once, each one's own failure caught and named.
        """
        running = {name: ensureDeferred(_run(check)) for name, check in self.checks.items()}
        results: dict[str, object] = {}
        failing = []
        for name, running_check in running.items():
            result = await running_check
            results[name] = result
            if not result.get("ok"):
                failing.append(name)
        return {"status": "not_ready" if failing else "ready", "failing": failing, "checks": results}


async def _run(check: Check) -> dict[str, object]:
    try:
        result = check()
        if isinstance(result, dict):
            return result
        return await result  # type: ignore[no-any-return,misc]
    except Exception as e:
        _log.failure("readiness check failed", Failure())
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


# -- readiness checks ----------------------------------------------------------


def _config_check(config: "Config") -> Check:
    def check() -> dict[str, object]:
        return {"ok": True, "source": config.source}

    return check


def _resume_check(config: "Config", reactor: Any) -> Optional[Check]:
    """The resume store's check: C{redis://} is pinged; memory always answers; off: no check."""
    resume = config.sse.resume
    if resume == "off" or not config.sse.inject_ids:
        return None
    if resume == "memory":
        return lambda: {"ok": True, "store": "memory"}
    address = redis_address(resume)
    where = f"redis {address.host}:{address.port}"

    async def check() -> dict[str, object]:
        try:
            await redis_ping(reactor, resume, REDIS_PING_TIMEOUT)
        except Exception as e:
            return {"ok": False, "store": where, "error": _why(e)}
        return {"ok": True, "store": where}

    return check


def _why(error: BaseException) -> str:
    from twisted.internet.defer import CancelledError, TimeoutError

    if isinstance(error, (CancelledError, TimeoutError)):
        return f"no answer within {REDIS_PING_TIMEOUT:g} s"
    return str(error) or type(error).__name__


def gateway_readiness(
    config: "Config", site: "_Site", history: Optional["HistoryService"], reactor: Any
) -> Readiness:
    """
    The readiness checks of a gateway process: C{config} (loaded),
    C{listening} (the public site has a listening port), C{history} (when
    on: its database is up, so rows are written, not spooled) and C{resume}
    (when on: the store answers; Redis within L{REDIS_PING_TIMEOUT}).
    """
    checks: dict[str, Check] = {"config": _config_check(config)}

    def listening() -> dict[str, object]:
        # Factory.doStart/doStop count the ports that serve the site.
        return {"ok": site.numPorts > 0, "listen": config.gateway.listen}

    checks["listening"] = listening
    if history is not None:
        def history_check() -> dict[str, object]:
            stats = history.stats()
            up = bool(stats.get("db_up"))
            result: dict[str, object] = {
                "ok": up,
                "db_up": up,
                "queue_length": stats.get("queue_length"),
                "spool_pending": stats.get("spool_pending"),
            }
            if not up:
                result["error"] = "the history database is unavailable: rows go to the spool"
            return result

        checks["history"] = history_check
    resume = _resume_check(config, reactor)
    if resume is not None:
        checks["resume"] = resume
    return Readiness(checks)


def supervisor_readiness(config: "Config", supervisor: "WorkerSupervisor", reactor: Any) -> Readiness:
    """
    The readiness checks of the parent of C{workers > 1}: C{config},
    C{listening} (every shared socket is bound), C{workers} (at least one
    worker process runs, and every running one is ready by its own checks:
    its history database up, its resume store answering; those that are not
    are listed with their failing checks) and C{resume} (Redis answers).
    """
    checks: dict[str, Check] = {"config": _config_check(config)}

    def listening() -> dict[str, object]:
        return {"ok": supervisor.listening, "listen": config.gateway.listen}

    async def workers() -> dict[str, object]:
        running = [w for w in supervisor.workers if w.alive]
        reports = await gatherResults([supervisor.worker_readiness(w) for w in running])
        not_ready: list[dict[str, object]] = []
        for worker, report in zip(running, reports):
            if report.get("status") != "ready":
                entry: dict[str, object] = {
                    "worker": worker.index, "pid": worker.pid, "failing": report.get("failing", []),
                }
                checks_of = report.get("checks")
                if isinstance(checks_of, dict):
                    errors = {name: c.get("error") for name, c in checks_of.items()
                              if isinstance(c, dict) and not c.get("ok")}
                    entry["errors"] = errors
                elif "error" in report:
                    entry["error"] = report["error"]
                not_ready.append(entry)
        result: dict[str, object] = {
            "ok": bool(running) and not not_ready,
            "alive": len(running),
            "ready": len(running) - len(not_ready),
            "workers": len(supervisor.workers),
        }
        if not_ready:
            result["not_ready"] = not_ready
        return result

    checks["listening"] = listening
    checks["workers"] = workers
    resume = _resume_check(config, reactor)
    if resume is not None:
        checks["resume"] = resume
    return Readiness(checks)


class _Ping(Protocol):
    """Sends (AUTH and) PING; C{done} fires on PONG, fails on an error reply or a lost connection."""

    def __init__(self, password: Optional[str]) -> None:
        self._password = password
        self._buffer = b""
        self.done: Deferred[None] = Deferred(lambda d: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionMade(self) -> None:
        assert self.transport is not None
        out = b""
        if self._password is not None:
            pw = self._password.encode("utf-8")
            out += b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw)
        self.transport.write(out + b"*1\r\n$4\r\nPING\r\n")

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\r\n" in self._buffer and not self.done.called:
            line, self._buffer = self._buffer.split(b"\r\n", 1)
            if line.startswith(b"-"):
                self._end(ConnectionError("Redis answered " + line[1:].decode("utf-8", "replace")))
            elif line == b"+PONG":
                self._end(None)

    def _end(self, error: Optional[Exception]) -> None:
        assert self.transport is not None
        self.transport.loseConnection()
        if error is None:
            self.done.callback(None)
        else:
            self.done.errback(error)

    def connectionLost(self, reason: Failure = Failure(ConnectionError("lost"))) -> None:
        if not self.done.called:
            self.done.errback(ConnectionError("Redis closed the connection before PONG"))


def redis_ping(reactor: Any, url: str, timeout: float = REDIS_PING_TIMEOUT) -> "Deferred[None]":
    """
    Connect to the Redis of C{url} (C{redis://[:password@]host[:port][/db]}),
    send C{PING} (after C{AUTH} when the URL has a password) and fire on its
    C{PONG}; fail on an error reply, a refused connection or after
    C{timeout} seconds, whichever comes first.  The connection is closed.
    """
    address = redis_address(url)
    host, port = address.host, address.port
    protocol = _Ping(address.password)
    factory = Factory.forProtocol(lambda: protocol)
    factory.noisy = False  # a probe every few seconds is not news
    d: Deferred[Any] = HostnameEndpoint(reactor, host, port, timeout=timeout).connect(factory)
    d.addCallback(lambda _: protocol.done)
    d.addTimeout(timeout, reactor)
    return d


# -- the site ------------------------------------------------------------------
