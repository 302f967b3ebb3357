"""
INI configuration: parsed once into frozen, typed values.

Every mistake found is reported together, each as ``FILE: [SECTION] KEY: what is
wrong``, so that ``python -m aura_proxy check`` and a refused start say the same
thing and a user can fix a file in one pass.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from importlib import resources
from typing import TYPE_CHECKING, Callable, Mapping, Optional, TypeVar, Union

from hyperlink import URL, DecodedURL

from aura_proxy.routes import PathPattern, PatternError
from aura_proxy.upstream_trust import KeyFileError, TrustKey, load_keys

if TYPE_CHECKING:
    from aura_proxy.tls_listen import ListenerCertificates, TlsPems

__all__ = [
    "AdminConfig",
    "AuthConfig",
    "Config",
    "ConfigError",
    "CorsConfig",
    "GatewayConfig",
    "HeadersConfig",
    "HistoryConfig",
    "IDENTITY_HEADERS",
    "LogConfig",
    "MetricsConfig",
    "LimitsConfig",
    "Network",
    "RouteConfig",
    "SseConfig",
    "UpstreamTls",
    "UpstreamTrustConfig",
    "DEFAULT_CONFIG_NAME",
    "load_config",
    "parse_config",
    "default_config_text",
    "contract_cors_headers",
]

DEFAULT_CONFIG_NAME = "<embedded defaults>"

T = TypeVar("T")

#: The listen queue of a tcp: listener that names none: Twisted's default (50)
#: overflows when thousands of SSE clients (re)connect at once.
DEFAULT_BACKLOG = 4096


#: An address block of C{[gateway] trusted_proxies}.
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: The identity headers: each may appear once, with a short value and no control character.
IDENTITY_HEADERS = ("X-Tenant-ID", "X-User-ID", "X-Agent-ID")

#: What C{[cors] allowed_headers} holds when a file does not set it: the
#: headers the contract itself needs, before C{[headers] required} and the
#: C{default.*} names.
CONTRACT_CORS_HEADERS = ("Authorization", "Content-Type", "Last-Event-ID") + IDENTITY_HEADERS

#: An environment variable that, set to C{on} or C{off}, overrides every
#: configuration's C{[gateway] fast_path} (stock mode without editing files).
FAST_PATH_ENV = "AURA_PROXY_FAST_PATH"


class ConfigError(Exception):
    """
    A configuration that cannot be used.

    @ivar problems: one line per mistake, each naming file, section and key.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class _Invalid(ValueError):
    """A single value that does not parse; the message says what was expected."""


@dataclass(frozen=True)
class GatewayConfig:
    """The ``[gateway]`` section: listeners, timeouts and limits."""

    #: One or more Twisted server endpoint descriptions (C{listen} is a
    #: comma-separated list of them), each served by its own listener.
    listen: tuple[str, ...] = (f"tcp:8080:backlog={DEFAULT_BACKLOG}",)
    admin_listen: str = "tcp:8081:interface=127.0.0.1"
    connect_timeout: float = 10.0
    response_timeout: float = 300.0
    idle_timeout: float = 300.0
    heartbeat_interval: float = 15.0
    #: Seconds a SIGTERM lets open streams run before they are ended (after a
    #: whole event, with a C{retry:} hint); see L{aura_proxy.streams}.
    drain_timeout: float = 30.0
    max_request_body: int = 10485760
    max_idle_connections: int = 100
    #: Processes sharing the listening sockets (C{auto} is resolved to
    #: C{os.cpu_count()} when the file is parsed); see L{aura_proxy.workers}.
    workers: int = 1
    #: The hot path's fast paths (C modules, the lean epoll loop, direct
    #: socket writes and reads, Twisted internals): C{off} is stock Twisted.
    fast_path: bool = True
    #: Peers (load balancers) whose X-Forwarded-For, -Proto and -Host are believed.
    trusted_proxies: tuple[Network, ...] = ()


@dataclass(frozen=True)
class UpstreamTls:
    """
    How the gateway speaks TLS to one https:// upstream: C{[route:NAME]
    ca_file}, C{client_cert}, C{client_key}, read when the file is parsed
    (their contents are kept out of C{repr}).

    @ivar ca_pem: the PEM certificates the upstream's certificate must chain
        to; None: the system's trusted CAs.
    @ivar client_pem: the client certificate and its private key (PEM) the
        gateway presents (mutual TLS); None: none.
    """

    ca_file: Optional[str] = None
    client_cert: Optional[str] = None
    client_key: Optional[str] = None
    ca_pem: Optional[bytes] = field(default=None, repr=False)
    client_pem: Optional[bytes] = field(default=None, repr=False)


@dataclass(frozen=True)
class RouteConfig:
    """One ``[route:NAME]`` section."""

    name: str
    pattern: PathPattern
    upstream: DecodedURL
    strip_prefix: int = 0
    #: TLS to an https:// upstream (default: verified against the system's CAs).
    tls: UpstreamTls = field(default_factory=UpstreamTls)

    @cached_property
    def upstream_base(self) -> bytes:
        """
        The upstream's origin and base path as request-URL bytes, e.g.
        C{b"http://127.0.0.1:9000/base"} (computed once, used per request).
        """
        uri = self.upstream.to_uri()
        origin = f"{uri.scheme}://{uri.host}"
        if uri.port is not None and uri.port != {"http": 80, "https": 443}.get(uri.scheme):
            origin += f":{uri.port}"
        prefix = "/".join(uri.path).rstrip("/")
        if prefix:
            origin += "/" + prefix
        return origin.encode("ascii")


@dataclass(frozen=True)
class HeadersConfig:
    """The ``[headers]`` section: the header contract."""

    required: tuple[str, ...] = ("X-Tenant-ID",)
    public_paths: tuple[PathPattern, ...] = ()
    defaults: tuple[tuple[str, str], ...] = ()
    tenant_from: tuple[str, ...] = ("header",)
    #: Longest identity header value accepted, in bytes.
    max_identity_length: int = 128


@dataclass(frozen=True)
class CorsConfig:
    """The ``[cors]`` section."""

    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
    allowed_headers: tuple[str, ...] = CONTRACT_CORS_HEADERS
    exposed_headers: tuple[str, ...] = ()
    allow_credentials: bool = True
    max_age: int = 3600


@dataclass(frozen=True)
class HistoryConfig:
    """The ``[history]`` section: where call history goes and how it is batched."""

    enabled: bool = True
    dsn: str = "sqlite:///aura-proxy-history.db"
    table: str = "sys_api_call_histories"
    batch_size: int = 1000
    flush_interval: float = 1.0
    queue_size: int = 10000
    spool_dir: str = "aura-proxy-spool"
    max_value_length: int = 2048


@dataclass(frozen=True)
class SseConfig:
    """The ``[sse]`` section: event ids and resumable streams."""

    inject_ids: bool = True
    resume: str = "memory"
    resume_ttl: float = 300.0
    resume_max_events: int = 2000
    resume_max_bytes: int = 262144
    resume_max_total_bytes: int = 536870912
    on_client_disconnect: str = "detach"
    max_detached_streams: int = 1000
    max_detached_streams_per_tenant: int = 100


@dataclass(frozen=True)
class MetricsConfig:
    """The C{[metrics]} section: Prometheus figures on the admin port (docs/operations.md)."""

    enabled: bool = True
    stall_after: float = 15.0


#: The JWT algorithms C{[auth] algorithms} may name (C{none} never is).
JWT_ALGORITHMS = ("RS256", "ES256", "HS256")


@dataclass(frozen=True)
class AuthConfig:
    """
    The C{[auth]} section: JWT verification at the edge (docs/identity.md).

    The key files are read when the file is parsed (a key that cannot be
    used is a configuration mistake); their contents are kept out of C{repr}.
    """

    jwt: str = "off"
    jwks_url: Optional[str] = None
    jwks_min_refresh: float = 60.0
    public_key_file: Optional[str] = None
    hs256_secret_file: Optional[str] = None
    issuer: Optional[str] = None
    audience: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = ("RS256",)
    leeway: float = 30.0
    tenant_claim: str = "tenant_id"
    user_claim: str = "sub"
    agent_claim: Optional[str] = None
    token_from: tuple[str, ...] = ("header",)
    #: The PEM of C{public_key_file}, read when the file was parsed.
    public_key_pem: Optional[bytes] = field(default=None, repr=False)
    #: The contents of C{hs256_secret_file} (trailing line break removed).
    hs256_secret: Optional[bytes] = field(default=None, repr=False)


@dataclass(frozen=True)
class UpstreamTrustConfig:
    """
    The ``[upstream_trust]`` section: signing what the gateway forwards.

    @ivar key_file: the key file, as configured; empty: requests are not signed.
    @ivar keys: its keys, read when the configuration is loaded: the current
        one (the gateway signs with it) first, then the previous one.
    """

    key_file: str = ""
    keys: tuple[TrustKey, ...] = ()


#: What C{[log] access} may name besides a file path.
ACCESS_LOG_OFF, ACCESS_LOG_STDOUT = "off", "stdout"
#: The shortest C{[admin] token_file} token accepted, in bytes.
ADMIN_TOKEN_MIN = 16


@dataclass(frozen=True)
class LogConfig:
    """
    The C{[log]} section: the access log (L{aura_proxy.access_log}).

    @ivar access: C{off}, C{stdout} or the path of a file (appended to,
        reopened on SIGUSR1).
    @ivar format: C{json} (one object per line) or C{text}.
    """

    access: str = ACCESS_LOG_STDOUT
    format: str = "text"


@dataclass(frozen=True)
class AdminConfig:
    """
    The C{[admin]} section: who may use the admin site.

    @ivar token_file: the file holding the admin bearer token, as configured;
        empty: the admin site asks for no token.
    @ivar token: its token, read when the configuration is loaded (kept out
        of C{repr}); None without a token file.
    """

    token_file: str = ""
    token: Optional[bytes] = field(default=None, repr=False)


@dataclass(frozen=True)
class LimitsConfig:
    """
    The C{[limits]} section: per-tenant stream and request-rate limits
    (0 = unlimited; all off by default).

    @ivar burst: the token bucket's size; 0: C{requests_per_second_per_tenant}
        rounded up (at least 1).
    @ivar store: C{memory} (this process) or C{redis://host:port/db}
        (shared by every process and host using that Redis).
    @ivar stream_lease: seconds a stream's slot in Redis lives without being
        renewed (its process renews it every third of that): the slots of a
        process that died free themselves after at most this long.
    @ivar key_prefix: the Redis keys' prefix (gateways sharing it share
        their counts).
    """

    max_streams_per_tenant: int = 0
    max_streams_total: int = 0
    requests_per_second_per_tenant: float = 0.0
    burst: int = 0
    store: str = "memory"
    stream_lease: float = 30.0
    key_prefix: str = "aura-proxy:limits:"

    @property
    def enabled(self) -> bool:
        """Whether any limit is set."""
        return bool(
            self.max_streams_per_tenant or self.max_streams_total or self.requests_per_second_per_tenant
        )

    @property
    def bucket_size(self) -> int:
        """The token bucket's size: C{burst}, or the rate rounded up (at least 1)."""
        if self.burst:
            return self.burst
        return max(1, int(-(-self.requests_per_second_per_tenant // 1)))


@dataclass(frozen=True)
class Config:
    """A whole, valid gateway configuration."""

    source: str
    gateway: GatewayConfig
    routes: tuple[RouteConfig, ...]
    headers: HeadersConfig = field(default_factory=HeadersConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    sse: SseConfig = field(default_factory=SseConfig)
    upstream_trust: UpstreamTrustConfig = field(default_factory=UpstreamTrustConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    #: What the file asks for in a way that still works but will not for
    #: ever (a deprecated key), one line each: logged at start, printed by
    #: the check command.
    deprecations: tuple[str, ...] = ()
    limits: LimitsConfig = field(default_factory=LimitsConfig)


# -- value parsers -----------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _Invalid(f"expected a number of seconds, got {text!r}")
    if value < 0 or value != value or value == float("inf"):
        raise _Invalid(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise _Invalid(f"expected a number of seconds > 0, got {text!r}")
    return value


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise _Invalid(f"expected a whole number, got {text!r}")
        if value < minimum:
            raise _Invalid(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    return parse


_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise _Invalid(f"expected true or false, got {text!r}")


def _list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _header_name(text: str) -> str:
    if not text or not set(text) <= _TOKEN_CHARS:
        raise _Invalid(f"{text!r} is not a valid HTTP header name")
    return text


def _header_list(text: str) -> tuple[str, ...]:
    return tuple(_header_name(item) for item in _list(text))


def _networks(text: str) -> tuple[Network, ...]:
    networks = []
    for item in _list(text):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise _Invalid(
                f"expected IP addresses or CIDR blocks (10.0.0.5, 10.0.0.0/8, fd00::/8), got {item!r}"
            )
    return tuple(networks)


def _endpoint(text: str) -> str:
    # Parse (but do not listen) with a reactor that is never used.
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    try:
        serverFromString(MemoryReactor(), text)
    except Exception as e:
        raise _Invalid(f"{text!r} is not a Twisted server endpoint description ({e})")
    return text


def _workers(text: str) -> int:
    if text == "auto":
        return os.cpu_count() or 1
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise _Invalid(f"expected a whole number >= 1 or auto, got {text!r}")
    return value


def _shareable(text: str) -> bool:
    # What the parent of workers can bind and hand on: tcp: and ssl:
    # (aura_proxy.workers.listen_address reads them the same way).
    from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
    from twisted.internet.testing import MemoryReactor

    from aura_proxy.tls_listen import is_ssl

    if is_ssl(text):
        return True  # its syntax is checked by _listen
    try:
        return type(serverFromString(MemoryReactor(), text)) is TCP4ServerEndpoint
    except Exception:
        return False


def _listen_endpoint(text: str) -> None:
    # An ssl: listener's files are not read here: a reload must be able to
    # keep the certificate in use when they are bad (and apply the rest), and
    # a worker may not be allowed to read the key.  load_config (check) and
    # the start read them (aura_proxy.tls_listen).
    from aura_proxy.tls_listen import is_ssl, parse_ssl_listen

    if not is_ssl(text):
        _endpoint(text)
        return
    try:
        parse_ssl_listen(text)
    except ValueError as e:
        raise _Invalid(f"{text!r} is not a Twisted server endpoint description ({e})")


def _listen(text: str) -> tuple[str, ...]:
    # Comma-separated: a comma is never part of a description this accepts
    # (docs/configuration.md), so a file name with a comma cannot be listed.
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise _Invalid("expected one or more Twisted server endpoint descriptions, got nothing")
    if not all(items):
        raise _Invalid(f"an empty endpoint description in {text!r} (endpoints are separated by single commas)")
    out: list[str] = []
    for item in items:
        _listen_endpoint(item)
        kind = item.split(":", 1)[0]
        if kind in ("tcp", "tcp6") and "backlog=" not in item:
            item = f"{item}:backlog={DEFAULT_BACKLOG}"
        if item in out:
            raise _Invalid(f"{item!r} is listed twice")
        out.append(item)
    return tuple(out)


def _pattern(text: str) -> PathPattern:
    try:
        return PathPattern.parse(text)
    except PatternError as e:
        raise _Invalid(str(e))


def _patterns(text: str) -> tuple[PathPattern, ...]:
    return tuple(_pattern(item) for item in _list(text))


def _http_url_of(text: str) -> URL:
    """C{text} as an http:// or https:// URL with a host."""
    try:
        url = URL.from_text(text)
    except Exception as e:
        raise _Invalid(f"{text!r} is not a URL ({e})")
    if url.scheme not in ("http", "https") or not url.host:
        raise _Invalid(f"expected an http:// or https:// URL with a host, got {text!r}")
    return url


def _upstream(text: str) -> DecodedURL:
    url = _http_url_of(text)
    if url.query or url.fragment:
        raise _Invalid(f"an upstream URL takes no query or fragment, got {text!r}")
    return DecodedURL(url)


def _origins(text: str) -> tuple[str, ...]:
    origins = _list(text)
    for origin in origins:
        if origin == "*":
            continue
        url = URL.from_text(origin)
        if url.scheme not in ("http", "https") or not url.host or url.path not in ((), ("",)):
            raise _Invalid(f"expected origins like https://app.example.com or *, got {origin!r}")
    return origins


def _methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.upper() for m in _list(text))
    for method in methods:
        if not set(method) <= _TOKEN_CHARS:
            raise _Invalid(f"{method!r} is not an HTTP method")
    return methods


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise _Invalid(f"expected one of {', '.join(choices)}, got {text!r}")
        return text

    return parse


def _sources(kinds: tuple[str, ...], refused: Optional[dict[str, str]] = None) -> Callable[[str], tuple[str, ...]]:
    """
    A parser of a list of sources: C{header}, or C{KIND:NAME} for each of
    C{kinds}; C{refused} maps a kind to the reason it is never one.
    """
    expected = " or ".join(["header", *(f"{kind}:NAME" for kind in kinds)])

    def parse(text: str) -> tuple[str, ...]:
        sources = _list(text)
        if not sources:
            raise _Invalid(f"expected at least one of {expected}")
        for source in sources:
            kind, _, name = source.partition(":")
            if source == "header" or (kind in kinds and name):
                continue
            if refused and kind in refused:
                raise _Invalid(refused[kind])
            raise _Invalid(f"expected {expected}, got {source!r}")
        return sources

    return parse


_tenant_sources = _sources(("query", "cookie"))


def _history_dsn(text: str) -> str:
    if text.startswith("sqlite:///") and len(text) > len("sqlite:///"):
        return text
    if text.startswith(("postgresql://", "postgres://")):
        return text
    raise _Invalid(
        f"expected sqlite:///PATH or postgresql://user@host:port/db, got {text!r}"
    )


def _sql_identifier(text: str) -> str:
    if not text or not (text[0].isalpha() or text[0] == "_") or not all(
        c.isalnum() or c == "_" for c in text
    ) or not text.isascii():
        raise _Invalid(f"expected a plain SQL table name (letters, digits, _), got {text!r}")
    return text


def _resume_backend(text: str) -> str:
    if text in ("memory", "off") or text.startswith("redis://"):
        return text
    raise _Invalid(f"expected memory, off or redis://host:port/db, got {text!r}")


def _limits_store(text: str) -> str:
    if text == "memory" or text.startswith("redis://"):
        return text
    raise _Invalid(f"expected memory or redis://host:port/db, got {text!r}")


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise _Invalid(f"expected a number of requests per second, got {text!r}")
    if value < 0 or value != value or value == float("inf"):
        raise _Invalid(f"expected a number of requests per second >= 0, got {text!r}")
    return value


def _jwt_algorithms(text: str) -> tuple[str, ...]:
    algorithms = _list(text)
    if not algorithms:
        raise _Invalid(f"expected one or more of {', '.join(JWT_ALGORITHMS)}")
    for algorithm in algorithms:
        if algorithm.lower() == "none":
            raise _Invalid("none is never accepted: an unsigned token proves nothing")
        if algorithm not in JWT_ALGORITHMS:
            raise _Invalid(f"expected some of {', '.join(JWT_ALGORITHMS)}, got {algorithm!r}")
    return algorithms


_token_sources = _sources(("cookie",), {
    "query": "a token is never taken from a query parameter (URLs end up in logs, "
    "history and browser history); use header or cookie:NAME",
})


def _claim(text: str) -> str:
    if not text:
        raise _Invalid("expected a claim name")
    return text


def _http_url(text: str) -> str:
    _http_url_of(text)
    return text


# -- sections ----------------------------------------------------------------

_Schema = dict[str, Callable[[str], object]]

_GATEWAY: _Schema = {
    "listen": _listen,
    "admin_listen": _endpoint,
    "connect_timeout": _positive_seconds,
    "response_timeout": _positive_seconds,
    "idle_timeout": _positive_seconds,
    "heartbeat_interval": _seconds,
    "drain_timeout": _seconds,
    "max_request_body": _count(0),
    "max_idle_connections": _count(0),
    # Deprecated: read into [log] access (see _log).
    "access_log": _boolean,
    "workers": _workers,
    "fast_path": _boolean,
    "trusted_proxies": _networks,
}

_ROUTE: _Schema = {
    "path": _pattern,
    "upstream": _upstream,
    "strip_prefix": _count(0),
    "ca_file": str,
    "client_cert": str,
    "client_key": str,
}

#: The C{[route:NAME]} keys of TLS to an https:// upstream.
_ROUTE_TLS_KEYS = ("ca_file", "client_cert", "client_key")

_HEADERS: _Schema = {
    "required": _header_list,
    "public_paths": _patterns,
    "tenant_from": _tenant_sources,
    "max_identity_length": _count(1),
}

_CORS: _Schema = {
    "allowed_origins": _origins,
    "allowed_methods": _methods,
    "allowed_headers": _header_list,
    "exposed_headers": _header_list,
    "allow_credentials": _boolean,
    "max_age": _count(0),
}

_HISTORY: _Schema = {
    "enabled": _boolean,
    "dsn": _history_dsn,
    "table": _sql_identifier,
    "batch_size": _count(1),
    "flush_interval": _positive_seconds,
    "queue_size": _count(1),
    "spool_dir": str,
    "max_value_length": _count(16),
}

_SSE: _Schema = {
    "inject_ids": _boolean,
    "resume": _resume_backend,
    "resume_ttl": _positive_seconds,
    "resume_max_events": _count(1),
    "resume_max_bytes": _count(1),
    "resume_max_total_bytes": _count(1),
    "on_client_disconnect": _one_of("detach", "cancel"),
    "max_detached_streams": _count(0),
    "max_detached_streams_per_tenant": _count(0),
}

_UPSTREAM_TRUST: _Schema = {
    "key_file": str,
}

_AUTH: _Schema = {
    "jwt": _one_of("required", "optional", "off"),
    "jwks_url": _http_url,
    "jwks_min_refresh": _seconds,
    "public_key_file": str,
    "hs256_secret_file": str,
    "issuer": str,
    "audience": _list,
    "algorithms": _jwt_algorithms,
    "leeway": _seconds,
    "tenant_claim": _claim,
    "user_claim": _claim,
    "agent_claim": _claim,
    "token_from": _token_sources,
}

def _access_target(text: str) -> str:
    if not text:
        raise _Invalid("expected off, stdout or the path of a file, got nothing")
    if text in (ACCESS_LOG_OFF, ACCESS_LOG_STDOUT):
        return text
    if text.lower() in ("on", "true", "yes", "1", "false", "no", "0", "none", "-"):
        raise _Invalid(f"expected off, stdout or the path of a file, got {text!r}")
    directory = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(directory):
        raise _Invalid(f"{text!r}: the directory {directory!r} does not exist")
    if os.path.isdir(text):
        raise _Invalid(f"{text!r} is a directory, not a file")
    return text


_LOG: _Schema = {
    "access": _access_target,
    "format": _one_of("json", "text"),
}

_ADMIN: _Schema = {
    "token_file": str,
}

_METRICS: _Schema = {
    "enabled": _boolean,
    "stall_after": _positive_seconds,
}

_LIMITS: _Schema = {
    "max_streams_per_tenant": _count(0),
    "max_streams_total": _count(0),
    "requests_per_second_per_tenant": _rate,
    "burst": _count(0),
    "store": _limits_store,
    "stream_lease": _positive_seconds,
    "key_prefix": str,
}

_SECTIONS = {
    "gateway": _GATEWAY,
    "headers": _HEADERS,
    "cors": _CORS,
    "history": _HISTORY,
    "sse": _SSE,
    "upstream_trust": _UPSTREAM_TRUST,
    "auth": _AUTH,
    "log": _LOG,
    "admin": _ADMIN,
    "metrics": _METRICS,
    "limits": _LIMITS,
}


class _Reader:
    """Collects every problem in one file instead of stopping at the first."""

    def __init__(self, source: str, parser: configparser.ConfigParser) -> None:
        self.source = source
        self.parser = parser
        self.problems: list[str] = []

    def problem(self, section: str, key: Optional[str], message: str) -> None:
        where = f"[{section}] {key}" if key else f"[{section}]"
        self.problems.append(f"{self.source}: {where}: {message}")

    def section(self, name: str, schema: _Schema, extra: Callable[[str], bool] = lambda key: False) -> dict[str, object]:
        values: dict[str, object] = {}
        if not self.parser.has_section(name):
            return values
        for key, raw in self.parser.items(name, raw=True):
            if key not in schema:
                if not extra(key):
                    known = ", ".join(sorted(schema))
                    self.problem(name, key, f"unknown key (known keys: {known})")
                continue
            try:
                values[key] = schema[key](raw.strip())
            except _Invalid as e:
                self.problem(name, key, str(e))
        return values


def _make(cls: Callable[..., T], values: dict[str, object]) -> T:
    return cls(**values)


def parse_config(text: str, source: str) -> Config:
    """
    Parse the INI text of a gateway configuration.

    @param source: the file name to put in error messages.
    @raise ConfigError: naming file, section and key of every mistake.
    """
    parser = configparser.ConfigParser(
        interpolation=None,
        inline_comment_prefixes=(";",),
        comment_prefixes=(";", "#"),
        empty_lines_in_values=False,
        default_section="\x00no-defaults",
        strict=True,
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text, source=source)
    except configparser.Error as e:
        raise ConfigError([f"{source}: {_describe_parse_error(e)}"])

    reader = _Reader(source, parser)

    for name in parser.sections():
        if name not in _SECTIONS and not name.startswith("route:"):
            reader.problem(
                name, None,
                "unknown section (known: gateway, route:NAME, headers, cors, history, sse, "
                "upstream_trust, auth, log, admin, metrics, limits)",
            )

    gateway_values = reader.section("gateway", _GATEWAY)
    old_access_log = gateway_values.pop("access_log", None)
    gateway = _make(GatewayConfig, gateway_values)
    forced = os.environ.get(FAST_PATH_ENV, "").strip()
    if forced:
        # An operator's (and CI's) switch to stock mode without editing files.
        try:
            gateway = replace(gateway, fast_path=_boolean(forced))
        except _Invalid as e:
            reader.problems.append(f"{source}: environment {FAST_PATH_ENV}: {e}")

    defaults: list[tuple[str, str]] = []

    def default_header(key: str) -> bool:
        if not key.startswith("default."):
            return False
        name = key[len("default."):]
        try:
            _header_name(name)
        except _Invalid as e:
            reader.problem("headers", key, str(e))
            return True
        defaults.append((name, parser.get("headers", key, raw=True).strip()))
        return True

    headers_values = reader.section("headers", _HEADERS, default_header)
    headers = _make(HeadersConfig, dict(headers_values, defaults=tuple(defaults)))
    cors = _cors(reader, headers)
    history = _make(HistoryConfig, reader.section("history", _HISTORY))
    sse = _make(SseConfig, reader.section("sse", _SSE))
    upstream_trust = _upstream_trust(reader)
    auth = _auth(reader, _make(AuthConfig, reader.section("auth", _AUTH)))
    metrics = _make(MetricsConfig, reader.section("metrics", _METRICS))
    deprecations: list[str] = []
    log = _log(reader, old_access_log, deprecations)
    admin = _admin(reader)
    limits = _make(LimitsConfig, reader.section("limits", _LIMITS))

    routes: list[RouteConfig] = []
    seen: dict[str, str] = {}
    tls_by_origin: dict[tuple[str, int], tuple[str, UpstreamTls]] = {}
    for section in parser.sections():
        if not section.startswith("route:"):
            continue
        name = section[len("route:"):].strip()
        if not name:
            reader.problem(section, None, "a route section needs a name: [route:NAME]")
            continue
        values = reader.section(section, _ROUTE)
        for key in ("path", "upstream"):
            if key not in values and not parser.has_option(section, key):
                reader.problem(section, key, "missing (every route needs path and upstream)")
        if "path" not in values or "upstream" not in values:
            continue
        pattern = values.pop("path")
        assert isinstance(pattern, PathPattern)
        if pattern.text in seen:
            reader.problem(
                section, "path",
                f"duplicate route: {pattern.text} is already routed by [{seen[pattern.text]}]",
            )
            continue
        seen[pattern.text] = section
        tls = _route_tls(reader, section, values, tls_by_origin)
        routes.append(_make(RouteConfig, dict(values, name=name, pattern=pattern, tls=tls)))
        strip = values.get("strip_prefix", 0)
        assert isinstance(strip, int)
        if strip > len(pattern.segments) and not pattern.open_ended:
            reader.problem(
                section, "strip_prefix",
                f"strips {strip} segments but {pattern.text} matches fewer",
            )

    if not any(section.startswith("route:") for section in parser.sections()):
        # A gateway without routes answers every request 404: not a configuration to start.
        reader.problem(
            "route:NAME", None,
            "no route: every request would be answered 404 (add at least one "
            "[route:NAME] section with path and upstream)",
        )

    if gateway.workers > 1:
        _check_workers(reader, gateway, sse, limits)

    if reader.problems:
        raise ConfigError(reader.problems)
    return Config(
        source=source,
        gateway=gateway,
        routes=tuple(routes),
        headers=headers,
        cors=cors,
        history=history,
        sse=sse,
        upstream_trust=upstream_trust,
        auth=auth,
        metrics=metrics,
        log=log,
        admin=admin,
        deprecations=tuple(deprecations),
        limits=limits,
    )


def _cors(reader: _Reader, headers: HeadersConfig) -> CorsConfig:
    """The C{[cors]} section; C{allowed_headers} left out: the contract's own headers."""
    values = reader.section("cors", _CORS)
    if "allowed_headers" not in values and not reader.parser.has_option("cors", "allowed_headers"):
        values["allowed_headers"] = contract_cors_headers(headers)
    cors = _make(CorsConfig, values)
    if "*" in cors.allowed_origins and cors.allow_credentials:
        # Browsers refuse "*" with credentials; reflecting every origin instead
        # would let any website make credentialed calls (cross-site request forgery).
        reader.problem(
            "cors", "allowed_origins",
            "* cannot be used with allow_credentials = true (every website could make "
            "credentialed calls with the user's cookies): list the origins, or set "
            "[cors] allow_credentials = false",
        )
    return cors


def contract_cors_headers(headers: HeadersConfig) -> tuple[str, ...]:
    """
    The request headers a browser page needs to follow the contract: the
    default of C{[cors] allowed_headers} (L{CONTRACT_CORS_HEADERS}, the
    C{[headers] required} names and the C{default.*} names, each once).
    """
    out: list[str] = []
    seen: set[str] = set()
    for name in (*CONTRACT_CORS_HEADERS, *headers.required, *(n for n, _ in headers.defaults)):
        if name.lower() not in seen:
            seen.add(name.lower())
            out.append(name)
    return tuple(out)


def _upstream_trust(reader: _Reader) -> UpstreamTrustConfig:
    """The C{[upstream_trust]} section, its key file read now (a start-up error, not a 500 later)."""
    values = reader.section("upstream_trust", _UPSTREAM_TRUST)
    key_file = values.get("key_file", "")
    assert isinstance(key_file, str)
    if not key_file:
        return UpstreamTrustConfig()
    try:
        keys = load_keys(key_file)
    except KeyFileError as e:
        reader.problem("upstream_trust", "key_file", str(e))
        return UpstreamTrustConfig()
    return UpstreamTrustConfig(key_file, keys)


def _log(reader: _Reader, old_access_log: object, deprecations: list[str]) -> LogConfig:
    """
    The C{[log]} section; the deprecated C{[gateway] access_log} still read
    (true: C{access = stdout}, false: C{off}) with a deprecation line, but
    refused next to C{[log] access}: which one would win is not obvious.
    """
    values = reader.section("log", _LOG)
    if old_access_log is not None:
        if reader.parser.has_option("log", "access"):
            reader.problem(
                "gateway", "access_log",
                "replaced by [log] access, which this file sets too: remove access_log",
            )
        else:
            access = ACCESS_LOG_STDOUT if old_access_log else ACCESS_LOG_OFF
            values["access"] = access
            deprecations.append(
                f"{reader.source}: [gateway] access_log is deprecated and will be refused in a "
                f"later release: write [log] access = {access} instead (read as that; "
                "access = PATH writes to a file)"
            )
    return _make(LogConfig, values)


def _admin(reader: _Reader) -> AdminConfig:
    """The C{[admin]} section, its token file read now (a start-up error, not a 401 for everyone later)."""
    values = reader.section("admin", _ADMIN)
    token_file = values.get("token_file", "")
    assert isinstance(token_file, str)
    if not token_file:
        return AdminConfig()
    try:
        with open(token_file, "rb") as f:
            token = f.read().strip()
    except OSError as e:
        reader.problem("admin", "token_file", f"cannot read {token_file!r} ({e.strerror or e})")
        return AdminConfig()
    if len(token) < ADMIN_TOKEN_MIN:
        reader.problem(
            "admin", "token_file",
            f"{token_file!r} holds a token of {len(token)} bytes; at least {ADMIN_TOKEN_MIN} "
            "are needed (e.g. `openssl rand -hex 32 > FILE`)",
        )
        return AdminConfig()
    if any(b < 0x21 or b > 0x7E for b in token):
        reader.problem(
            "admin", "token_file",
            f"{token_file!r}: the token must be one line of printable ASCII without spaces "
            "(it is sent as Authorization: Bearer TOKEN)",
        )
        return AdminConfig()
    return AdminConfig(token_file, token)


def _auth(reader: _Reader, auth: AuthConfig) -> AuthConfig:
    """C{[auth]} with its key files read, or the problems of an inconsistent section."""
    problems = len(reader.problems)
    public_pem = secret = None
    if auth.public_key_file:
        public_pem = _read_key(reader, "public_key_file", auth.public_key_file)
    if auth.hs256_secret_file:
        secret = _read_key(reader, "hs256_secret_file", auth.hs256_secret_file)
        if secret is not None:
            secret = secret.rstrip(b"\r\n")
            if len(secret) < _HS256_MIN_SECRET:
                reader.problem(
                    "auth", "hs256_secret_file",
                    f"the secret is {len(secret)} bytes; HS256 needs at least "
                    f"{_HS256_MIN_SECRET} (RFC 7518 3.2: as long as the hash)",
                )
                secret = None
    if public_pem is not None:
        _check_public_key(reader, auth, public_pem)
    if auth.jwt == "off":
        return auth
    if auth.jwks_url and auth.public_key_file:
        reader.problem(
            "auth", "public_key_file",
            "give jwks_url or public_key_file, not both (one source of public keys)",
        )
    public = bool(auth.jwks_url or auth.public_key_file)
    if not public and not auth.hs256_secret_file:
        reader.problem(
            "auth", "jwt",
            f"jwt = {auth.jwt} needs a key source: jwks_url, public_key_file or hs256_secret_file",
        )
    asymmetric = [a for a in auth.algorithms if a != "HS256"]
    if "HS256" in auth.algorithms and not auth.hs256_secret_file:
        reader.problem(
            "auth", "algorithms",
            "HS256 needs hs256_secret_file: an HS256 token is never checked against a public key",
        )
    if asymmetric and not public:
        reader.problem(
            "auth", "algorithms",
            f"{', '.join(asymmetric)} need jwks_url or public_key_file",
        )
    if auth.hs256_secret_file and "HS256" not in auth.algorithms:
        reader.problem("auth", "hs256_secret_file", "given, but algorithms does not list HS256")
    if public and not asymmetric:
        key = "jwks_url" if auth.jwks_url else "public_key_file"
        reader.problem("auth", key, "given, but algorithms lists neither RS256 nor ES256")
    if len(reader.problems) > problems:
        return auth
    return replace(auth, public_key_pem=public_pem, hs256_secret=secret)


#: The shortest HS256 secret accepted, in bytes (RFC 7518 3.2: the hash's size).
_HS256_MIN_SECRET = 32


def _read_key(reader: _Reader, key: str, path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        reader.problem("auth", key, f"cannot read {path!r} ({e.strerror or e})")
        return None


def _check_public_key(reader: _Reader, auth: AuthConfig, pem: bytes) -> None:
    """A public key file must hold an RSA or P-256 key that an algorithm listed uses."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem)
    except ValueError:
        reader.problem("auth", "public_key_file", f"{auth.public_key_file!r} is not a PEM public key")
        return
    if isinstance(key, rsa.RSAPublicKey):
        algorithm = "RS256"
    elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        algorithm = "ES256"
    else:
        reader.problem(
            "auth", "public_key_file",
            f"{auth.public_key_file!r} is neither an RSA nor a P-256 (ES256) public key",
        )
        return
    if algorithm not in auth.algorithms:
        reader.problem(
            "auth", "public_key_file",
            f"holds an {algorithm} key but algorithms does not list {algorithm}",
        )
    for other in auth.algorithms:
        if other not in (algorithm, "HS256") and not auth.jwks_url:
            reader.problem(
                "auth", "algorithms",
                f"lists {other}, but public_key_file holds an {algorithm} key: "
                f"no {other} token could be verified",
            )


def _route_tls(
    reader: _Reader,
    section: str,
    values: dict[str, object],
    by_origin: dict[tuple[str, int], tuple[str, "UpstreamTls"]],
) -> UpstreamTls:
    """
    A route's TLS to its upstream (C{ca_file}, C{client_cert},
    C{client_key} taken out of C{values}), its files read and checked now.

    One upstream origin (host and port) has one TLS setting: the gateway's
    connections to it are pooled whichever route they serve.
    """
    given = {key: values.pop(key) for key in _ROUTE_TLS_KEYS if key in values}
    upstream = values["upstream"]
    assert isinstance(upstream, DecodedURL)
    if upstream.scheme != "https":
        for key in given:
            reader.problem(section, key, f"only for an https:// upstream (upstream is {upstream.to_text()})")
        return UpstreamTls()
    ca_file, client_cert, client_key = (
        str(given[k]) if given.get(k) else None for k in _ROUTE_TLS_KEYS
    )
    problems = len(reader.problems)
    ca_pem = client_pem = None
    if ca_file:
        ca_pem = _read_file(reader, section, "ca_file", ca_file)
        if ca_pem is not None:
            _check_ca(reader, section, ca_file, ca_pem)
    if client_key and not client_cert:
        reader.problem(section, "client_key", "given without client_cert")
    if client_cert:
        cert_pem = _read_file(reader, section, "client_cert", client_cert)
        key_pem = _read_file(reader, section, "client_key", client_key) if client_key else b""
        if cert_pem is not None and key_pem is not None:
            client_pem = _check_client_pair(reader, section, client_cert, client_key, cert_pem + b"\n" + key_pem)
    if len(reader.problems) > problems:
        return UpstreamTls()
    tls = UpstreamTls(ca_file, client_cert, client_key, ca_pem, client_pem)
    origin = (upstream.host, upstream.port or 443)
    other = by_origin.setdefault(origin, (section, tls))
    if other[1] != tls:
        reader.problem(
            section, "ca_file" if tls.ca_pem != other[1].ca_pem else "client_cert",
            f"{upstream.host}:{origin[1]} is also the upstream of [{other[0]}] with other TLS "
            "settings: routes to one upstream share its connections, so they need the same "
            "ca_file, client_cert and client_key",
        )
    return tls


def _read_file(reader: _Reader, section: str, key: str, path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        reader.problem(section, key, f"cannot read {path!r} ({e.strerror or e})")
        return None


def _check_ca(reader: _Reader, section: str, path: str, pem: bytes) -> None:
    from cryptography.x509 import load_pem_x509_certificates

    try:
        load_pem_x509_certificates(pem)
    except ValueError:
        reader.problem(section, "ca_file", f"{path!r} holds no PEM certificate")


def _check_client_pair(
    reader: _Reader, section: str, cert_path: str, key_path: Optional[str], pem: bytes
) -> Optional[bytes]:
    from OpenSSL.crypto import Error as OpenSSLError
    from twisted.internet.error import VerifyError
    from twisted.internet.ssl import PrivateCertificate

    try:
        PrivateCertificate.loadPEM(pem)
    except (OpenSSLError, ValueError, VerifyError) as e:
        where = f"{cert_path!r}" + (f" and {key_path!r}" if key_path else "")
        reader.problem(
            section, "client_key" if key_path else "client_cert",
            f"{where}: expected a PEM certificate and its private key ({e or 'unreadable'})",
        )
        return None
    return pem


def _check_workers(reader: _Reader, gateway: GatewayConfig, sse: SseConfig, limits: LimitsConfig) -> None:
    """What several worker processes (C{workers > 1}) cannot share."""
    raw = reader.parser.get("gateway", "workers", raw=True, fallback="").strip()
    if raw == "auto":
        workers = (
            f"workers = auto ({gateway.workers} processes: os.cpu_count() on this machine, "
            "decided when the configuration is checked)"
        )
    else:
        workers = f"workers = {gateway.workers}"
    if sse.resume == "memory":
        reader.problem(
            "gateway", "workers",
            f"{workers} cannot be used with [sse] resume = memory: a client resuming a "
            "stream may reconnect to another worker process; set [sse] resume = "
            "redis://host:port/db (or off), or workers = 1",
        )
    if limits.enabled and limits.store == "memory":
        reader.problem(
            "limits", "store",
            f"store = memory cannot be used with [gateway] {workers}: each worker process "
            "would count only its own streams and requests; set [limits] store = "
            "redis://host:port/db, or workers = 1",
        )
    refused = [description for description in gateway.listen if not _shareable(description)]
    if refused:
        reader.problem(
            "gateway", "listen",
            f"{workers} needs tcp: or ssl: endpoints (tcp:PORT[:interface=ADDRESS]"
            "[:backlog=N], ssl:PORT:privateKey=KEY:certKey=CERT[...]) that the parent "
            f"process binds and shares, got {', '.join(refused)!r} (tcp6:, unix: and other "
            "endpoints need workers = 1; docs/operations.md)",
        )


def _describe_parse_error(error: configparser.Error) -> str:
    if isinstance(error, configparser.DuplicateSectionError):
        return f"[{error.section}]: duplicate section (line {error.lineno})"
    if isinstance(error, configparser.DuplicateOptionError):
        return f"[{error.section}] {error.option}: duplicate key (line {error.lineno})"
    if isinstance(error, configparser.MissingSectionHeaderError):
        return f"line {error.lineno}: a key before any [section]"
    if isinstance(error, configparser.ParsingError):
        lines = ", ".join(str(lineno) for lineno, _ in error.errors)
        return f"cannot parse line(s) {lines}"
    return str(error)


def default_config_text() -> str:
    """The embedded default configuration (identical to etc/aura-proxy.ini)."""
    return resources.files("aura_proxy").joinpath("defaults.ini").read_text("utf-8")


def load_config(path: Optional[str] = None) -> Config:
    """
    Load a configuration file, or the embedded defaults when C{path} is None;
    the key, certificate and chain files of its C{ssl:} listeners are loaded
    too (which L{parse_config} leaves to the start and to reloads).

    @raise ConfigError: when the file cannot be read or is not valid.
    """
    if path is None:
        return parse_config(default_config_text(), DEFAULT_CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot read ({e})"])
    config = parse_config(text, os.fspath(path))
    # The ssl: listeners' key, certificate and chain, as the start reads them.
    load_certificates(config)
    return config


def load_certificates(config: Config, pems: Optional[Mapping[str, "TlsPems"]] = None) -> "ListenerCertificates":
    """
    The certificates of C{config}'s C{ssl:} listeners
    (L{aura_proxy.tls_listen.ListenerCertificates.load}: from C{pems} where
    given, else from the files).

    @raise ConfigError: naming file, section and key, and the TLS file, as C{check} does.
    """
    from aura_proxy.tls_listen import ListenerCertificates, TlsFileError

    try:
        return ListenerCertificates.load(config.gateway.listen, pems)
    except TlsFileError as e:
        raise ConfigError([f"{config.source}: [gateway] listen: {e}"]) from None
