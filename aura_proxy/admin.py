"""
The admin site (C{admin_listen}): health and readiness for load balancers and operators.

Kept off the client-facing port so that probes never need a tenant and the
public can never see it.  Built here, and only here, for the single process
and for the supervisor parent of C{workers > 1}: each hands it its own
health report (L{gateway_health}, L{aura_proxy.workers.WorkerSupervisor.health})
and its own readiness checks (L{gateway_readiness}, L{supervisor_readiness}).

  - C{GET /healthz}: the process is alive and serving (liveness);
  - C{GET /readyz}: every readiness check passes (the configuration is
    loaded, the public port listens, the history writer is not failing,
    the resume store answers), each named in the JSON body; 503 otherwise.

With C{[admin] token_file}, the whole site (every route, whoever adds it)
answers only requests with C{Authorization: Bearer TOKEN} (L{TokenGuard}).
"""

from __future__ import annotations

import hmac
import json
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Optional, Union
from urllib.parse import unquote, urlsplit

from klein import Klein
from twisted.application import strports
from twisted.application.service import IService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, getChildForRequest
from twisted.web.server import Request, Site
from zope.interface import implementer

from aura_proxy import errors

if TYPE_CHECKING:
    from twisted.web.server import Site as _Site

    from aura_proxy.config import Config
    from aura_proxy.history import HistoryService
    from aura_proxy.proxy import Gateway
    from aura_proxy.workers import WorkerSupervisor

__all__ = [
    "Admin",
    "Check",
    "HealthReport",
    "REDIS_PING_TIMEOUT",
    "Readiness",
    "TokenGuard",
    "admin_service",
    "admin_site",
    "gateway_health",
    "gateway_readiness",
    "redis_ping",
    "supervisor_readiness",
]

_log = Logger()

#: What C{GET /healthz} answers: a JSON object whose C{status} is C{"ok"}
#: while the process serves (anything else answers 503).
HealthReport = Callable[[], dict[str, object]]

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


class Admin:
    """Klein application of the admin port."""

    app = Klein()

    def __init__(self, report: HealthReport, readiness: Optional[Readiness] = None) -> None:
        self._report = report
        self._readiness = readiness if readiness is not None else Readiness({})

    def resource(self) -> IResource:
        """The admin site's root resource."""
        return self.app.resource()

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: Request) -> bytes:
        """C{200} and the JSON health report while serving; C{503} otherwise."""
        body = self._report()
        if body.get("status") != "ok":
            request.setResponseCode(503)
        return _json(request, body)

    @app.route("/readyz", methods=["GET", "HEAD"])
    async def readyz(self, request: Request) -> bytes:
        """C{200} when every readiness check passes, else C{503}; the JSON body names each."""
        body = await self._readiness.report()
        if body["status"] != "ready":
            request.setResponseCode(503)
        return _json(request, body)


def _json(request: Request, body: object) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8")


# -- the admin token -----------------------------------------------------------


@implementer(IResource)
class TokenGuard:
    """
    The admin site behind a bearer token: a request without
    C{Authorization: Bearer TOKEN} (compared in constant time) gets 401 and
    a JSON error; any other is served by the wrapped resource tree, whatever
    its routes (Klein's, or twisted.web children added by anyone).
    """

    isLeaf = True

    def __init__(self, wrapped: IResource, token: bytes) -> None:
        self._wrapped = wrapped
        self._expected = b"bearer " + token

    def getChildWithDefault(self, name: bytes, request: Request) -> IResource:
        raise RuntimeError("a leaf resource has no children")  # isLeaf: never called

    def putChild(self, path: bytes, child: IResource) -> None:
        """Add C{child} to the wrapped tree: it is behind the token too."""
        self._wrapped.putChild(path, child)

    def allowed(self, request: Request) -> bool:
        """Whether C{request} carries the admin token."""
        values = request.requestHeaders.getRawHeaders(b"authorization") or []
        if len(values) != 1:
            return False
        scheme, _, token = values[0].strip().partition(b" ")
        given = scheme.lower() + b" " + token.strip()
        return hmac.compare_digest(given, self._expected)

    def render(self, request: Request) -> Any:
        """Serve C{request} from the wrapped tree, or refuse it (401)."""
        if not self.allowed(request):
            error = errors.admin_token_required()
            request.setResponseCode(error.status)
            request.setHeader(b"www-authenticate", b'Bearer realm="aura-proxy admin"')
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            return error.body()
        return getChildForRequest(self._wrapped, request).render(request)


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
    parts = urlsplit(resume)
    where = f"redis {parts.hostname or '127.0.0.1'}:{parts.port or 6379}"

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
    C{listening} (the shared socket is bound), C{workers} (at least one
    worker process runs; each is listed) and C{resume} (Redis answers).
    """
    checks: dict[str, Check] = {"config": _config_check(config)}

    def listening() -> dict[str, object]:
        return {"ok": supervisor.listening, "listen": config.gateway.listen}

    def workers() -> dict[str, object]:
        alive = sum(1 for w in supervisor.workers if w.alive)
        return {"ok": alive > 0, "alive": alive, "workers": len(supervisor.workers)}

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
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 6379
    password = unquote(parts.password) if parts.password else None
    protocol = _Ping(password)
    factory = Factory.forProtocol(lambda: protocol)
    factory.noisy = False  # a probe every few seconds is not news
    d: Deferred[Any] = HostnameEndpoint(reactor, host, port, timeout=timeout).connect(factory)
    d.addCallback(lambda _: protocol.done)
    d.addTimeout(timeout, reactor)
    return d


# -- the site ------------------------------------------------------------------


def gateway_health(gateway: "Gateway", history: Optional["HistoryService"] = None) -> HealthReport:
    """The health report of a gateway process: open streams, and call history's state."""

    def report() -> dict[str, object]:
        body: dict[str, object] = {"status": "ok", "active_streams": gateway.active_streams()}
        if history is not None:
            body["history"] = history.stats()
        return body

    return report


def admin_site(
    report: HealthReport,
    reactor: Any,
    *,
    readiness: Optional[Readiness] = None,
    token: Optional[bytes] = None,
) -> Site:
    """
    The admin site serving C{report} at C{/healthz} and C{readiness} at
    C{/readyz}, without an access log; behind C{token} (L{TokenGuard}) when given.
    """
    resource = Admin(report, readiness).resource()
    if token is not None:
        resource = TokenGuard(resource, token)
    site = Site(resource, reactor=reactor)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # health probes are not news
    return site


def admin_service(
    listen: str,
    report: HealthReport,
    reactor: Any,
    *,
    readiness: Optional[Readiness] = None,
    token: Optional[bytes] = None,
) -> IService:
    """The admin site listening on C{listen} (an endpoint description) while running."""
    site = admin_site(report, reactor, readiness=readiness, token=token)
    return strports.service(listen, site, reactor=reactor)
