"""
Reload: the configuration file read again while the gateway serves.

On SIGHUP, C{python -m aura_proxy reload PIDFILE} (which sends it) or
C{POST /reload} on the admin site, a L{Reloader} reads the file again and,
if it is valid, serves new requests on a pipeline built from it
(L{aura_proxy.proxy.Gateway.use}): routes, header rules, CORS, auth (its
keys and JWKS are fetched anew), upstream signing, limits and timeouts of
new requests change.  Requests and streams already in flight finish on the
pipeline they started on, untouched.  The key, certificate and chain files
of every C{ssl:} listener are read again too (L{aura_proxy.tls_listen}): new
connections get the new certificate, open ones keep theirs; files that
cannot be loaded leave the certificate in use and are reported
(L{ReloadResult.tls_problems}).

What the process built once at start cannot change live (L{RESTART_ONLY}:
the listeners, the number of workers, the upstream pool, call history, the
stream log, where limits are counted); a new value of such a key is kept
out, reported as "needs restart" and logged, and the rest is applied.

An invalid file is refused with the same lines as C{python -m aura_proxy
check}; it is logged, and the configuration in use stays.

With C{workers = N}, the parent checks the file and hands the text to every
worker (L{aura_proxy.workers.WorkerSupervisor.reload}), each of which
applies it with L{Reloader.apply_text}.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.logger import Logger

from aura_proxy.config import DEFAULT_CONFIG_NAME, Config, ConfigError, default_config_text, parse_config

__all__ = ["RESTART_ONLY", "ReloadResult", "Reloader", "SighupReload", "read_text", "restart_only_changes", "tell"]

log = Logger("aura_proxy.reload")

#: The keys a running process keeps until it restarts, by section (None:
#: the whole section).
RESTART_ONLY: dict[str, Optional[tuple[str, ...]]] = {
    # the listeners and the site, the workers, the upstream pool
    "gateway": ("listen", "admin_listen", "workers", "fast_path", "connect_timeout",
                "max_idle_connections", "max_request_body", "drain_timeout"),
    "history": None,
    "sse": ("resume", "resume_ttl", "resume_max_events", "resume_max_bytes", "resume_max_total_bytes"),
    "limits": ("store", "stream_lease", "key_prefix"),
    # the access log's file, the admin site, the metrics' registry
    "log": None,
    "admin": None,
    "metrics": None,
}


@dataclass(frozen=True)
class ReloadResult:
    """
    What a reload did.

    @ivar ok: whether the new configuration is in use.
    @ivar problems: why it was refused (the lines of C{check}).
    @ivar needs_restart: C{"[section] key"} of each new value kept out
        until a restart.
    @ivar tls_problems: one line per C{ssl:} listener whose new key,
        certificate or chain could not be loaded (naming it and the file):
        it keeps the certificate it had; the rest of the reload is applied.
    """

    ok: bool
    source: str
    problems: tuple[str, ...] = ()
    needs_restart: tuple[str, ...] = ()
    routes: int = 0
    workers: int = field(default=0)
    tls_problems: tuple[str, ...] = ()

    def to_json(self) -> dict[str, object]:
        """The admin endpoint's answer."""
        body: dict[str, object] = {"status": "reloaded" if self.ok else "refused", "source": self.source}
        if self.ok:
            body["routes"] = self.routes
            body["needs_restart"] = list(self.needs_restart)
            if self.workers:
                body["workers"] = self.workers
            if self.tls_problems:
                body["tls_problems"] = list(self.tls_problems)
        else:
            body["problems"] = list(self.problems)
        return body


def read_text(source: str) -> str:
    """
    The text of the configuration file C{source} (the embedded defaults for
    L{DEFAULT_CONFIG_NAME}).

    @raise ConfigError: if it cannot be read (as C{check} says it).
    """
    if source == DEFAULT_CONFIG_NAME:
        return default_config_text()
    try:
        with open(source, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{source}: cannot read ({e})"])


def restart_only_changes(old: Config, new: Config) -> tuple[Config, tuple[str, ...]]:
    """
    C{new} with the values of L{RESTART_ONLY} keys taken from C{old}, and the
    C{"[section] key"} of each that differed.
    """
    changed: list[str] = []
    merged = new
    for section, keys in RESTART_ONLY.items():
        before, after = getattr(old, section), getattr(new, section)
        names = keys if keys is not None else tuple(f.name for f in fields(before))
        kept: dict[str, Any] = {}
        for name in names:
            if getattr(before, name) != getattr(after, name):
                changed.append(f"[{section}] {name}")
                kept[name] = getattr(before, name)
        if kept:
            merged = replace(merged, **{section: replace(after, **kept)})
    return merged, tuple(changed)


def tell(listeners: list[Callable[[Config], object]], config: Config) -> None:
    """Call each of C{listeners} with the configuration now in use; a failure is logged."""
    for listener in listeners:
        try:
            listener(config)
        except Exception:
            log.failure("reload: {listener} failed on the new configuration", listener=listener)


class Reloader:
    """
    Reloads one gateway process.

    @param gateway: has C{config} and C{use(config)} (L{aura_proxy.proxy.Gateway}).
    @param adapt: what this process does to every configuration before it
        uses it (a worker's own spool directory).
    """

    def __init__(self, gateway: Any, adapt: Callable[[Config], Config] = lambda c: c) -> None:
        self._gateway = gateway
        self._adapt = adapt
        #: Called with each configuration put in use (the dashboard's routes).
        self.listeners: list[Callable[[Config], object]] = []
        #: Reads the C{ssl:} listeners' files again, for new connections;
        #: the problems (L{aura_proxy.tls_listen.ListenerCertificates.reload}).
        #: None where the process is handed its certificates (a worker).
        self.certificates: Optional[Callable[[], tuple[str, ...]]] = None

    def reload(self) -> ReloadResult:
        """Read the configuration's file again and use it (L{apply_text})."""
        source = self._gateway.config.source
        try:
            text = read_text(source)
        except ConfigError as e:
            return self._refused(source, e)
        return self.apply_text(text)

    def apply_text(self, text: str) -> ReloadResult:
        """Use the configuration C{text} (of the same file) for new requests, or refuse it."""
        old: Config = self._gateway.config
        source = old.source
        try:
            new = self._adapt(parse_config(text, source))
        except ConfigError as e:
            return self._refused(source, e)
        merged, needs_restart = restart_only_changes(old, new)
        try:
            self._gateway.use(merged)
        except Exception:
            log.failure("reload of {source} failed; the configuration in use stays", source=source)
            return ReloadResult(False, source, ("the new configuration could not be applied (see the log)",))
        tell(self.listeners, merged)
        # The certificates of the listeners kept (listen is restart-only),
        # read again on every reload: certbot renews the files in place.
        tls_problems = self.certificates() if self.certificates is not None else ()
        log.info(
            "reloaded {source}: {routes} routes; new requests use it, open streams keep theirs",
            source=source, routes=len(merged.routes),
        )
        if needs_restart:
            log.warn(
                "reload of {source}: needs restart, kept as they were: {keys}",
                source=source, keys=", ".join(needs_restart),
            )
        return ReloadResult(
            True, source, needs_restart=needs_restart, routes=len(merged.routes), tls_problems=tls_problems
        )

    def _refused(self, source: str, error: ConfigError) -> ReloadResult:
        log.warn(
            "reload of {source} refused, the configuration in use stays:\n{problems}",
            source=source, problems=str(error),
        )
        return ReloadResult(False, source, tuple(error.problems))


class SighupReload(Service):
    """
    While running, SIGHUP calls C{reload} (in the reactor's thread); the
    previous handler is put back on stop.
    """

    name = "reload"

    def __init__(self, reactor: Any, reload: Callable[[], object]) -> None:
        self._reactor = reactor
        self._reload = reload
        self._previous: Any = None

    def startService(self) -> None:
        Service.startService(self)
        if hasattr(signal, "SIGHUP"):
            self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> None:
        Service.stopService(self)
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _on_signal(self, number: int, frame: Any) -> None:
        log.info("received SIGHUP (pid {pid}): reloading", pid=os.getpid())
        self._reactor.callFromThread(self._reload)
