"""
The header contract: which headers go upstream, which come back, and CORS.

Everything here is a pure function of headers and configuration, so that the
rules can be tested without a network.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Union
from urllib.parse import unquote_to_bytes

from twisted.web.http_headers import Headers

from aura_proxy.config import CorsConfig, HeadersConfig
from aura_proxy.header_store import canonical, store

__all__ = [
    "HOP_BY_HOP",
    "HeaderContract",
    "Cors",
    "copy_end_to_end",
    "dropping",
    "TenantSources",
]

#: Headers that describe one connection, not the message (RFC 9110 7.6.1), plus
#: the ones the proxy hop recomputes itself.
HOP_BY_HOP = frozenset(
    name.lower()
    for name in (
        b"Connection",
        b"Keep-Alive",
        b"Proxy-Connection",
        b"Proxy-Authenticate",
        b"Proxy-Authorization",
        b"TE",
        b"Trailer",
        b"Transfer-Encoding",
        b"Upgrade",
    )
)

# The proxy hop sets these itself: Host from the upstream URL, Content-Length
# from the body it sends, Expect is answered by the gateway's own server.
_RECOMPUTED_REQUEST = frozenset((b"host", b"content-length", b"expect"))


def dropping(names: Iterable[bytes]) -> frozenset[bytes]:
    """What L{copy_end_to_end} leaves out: the hop-by-hop headers and C{names} (lower-case)."""
    return HOP_BY_HOP | frozenset(name.lower() for name in names)


# Only the gateway signs ([upstream_trust]): a client's signature never goes upstream.
_REQUEST_DROP = dropping(_RECOMPUTED_REQUEST | {b"x-dwp-gateway-signature"})
_CONNECTION = canonical(b"connection")
_XFF = canonical(b"x-forwarded-for")
_XFP = canonical(b"x-forwarded-proto")
_XFH = canonical(b"x-forwarded-host")
_ORIGIN = canonical(b"origin")


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", ()):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return frozenset(tokens)


def copy_end_to_end(source: Headers, target: Headers, removed: frozenset[bytes]) -> None:
    """
    Copy the end-to-end headers of C{source} into C{target}, each replacing
    any of the same name there, in order.

    @param removed: lower-case names not copied, hop-by-hop ones included
        (build it once with L{dropping}); headers named in C{source}'s
        C{Connection} are not copied either.
    """
    if _CONNECTION in store(source):
        removed = removed | _connection_tokens(source)
    out = store(target)
    for name, values in source.getAllRawHeaders():
        if name.lower() not in removed:
            out[name] = list(values)


class HeaderContract:
    """
    The C{[headers]} rules: required headers, defaults, and what goes upstream.
    """

    def __init__(self, config: HeadersConfig) -> None:
        self._required = tuple(
            (name, canonical(name.lower().encode("ascii"))) for name in config.required)
        self._public = config.public_paths
        self._defaults = tuple(
            (name.lower().encode("ascii"), value.encode("utf-8")) for name, value in config.defaults
        )
        # By stored name, with line breaks (an INI value may continue on the
        # next line) folded as Headers.setRawHeaders would fold them.
        self._stored_defaults = tuple(
            (canonical(name), [b" ".join(value.splitlines())]) for name, value in self._defaults
        )

    def default_for(self, name: bytes) -> Optional[str]:
        """The configured default of header C{name} (lower-case), if any."""
        for default_name, value in self._defaults:
            if default_name == name:
                return value.decode("utf-8")
        return None

    def is_public(self, segments: list[str]) -> bool:
        """Whether a path needs none of the required headers."""
        return any(p.matches(segments) for p in self._public)

    def missing(self, headers: Headers, segments: list[str]) -> Optional[str]:
        """The first required header that is missing or blank, or None."""
        if not self._required or self.is_public(segments):
            return None
        present = store(headers)
        for name, stored in self._required:
            values = present.get(stored)
            if not values or not any(v.strip() for v in values):
                return name
        return None

    def upstream_headers(
        self,
        incoming: Headers,
        client_ip: Optional[str],
        proto: bytes,
        host: Optional[bytes],
        extra: Iterable[tuple[bytes, bytes]] = (),
        trusted: bool = False,
    ) -> Headers:
        """
        The headers to send upstream.

        End-to-end headers pass unchanged (values and order); defaults are added
        where the client sent none; C{X-Forwarded-For} gets C{client_ip} (the
        TCP peer) appended, C{X-Forwarded-Proto} and C{X-Forwarded-Host}
        describe the client's hop, unless C{trusted} (the peer is a trusted
        proxy) and it sent them: then they are kept.
        """
        out = Headers()
        copy_end_to_end(incoming, out, _REQUEST_DROP)
        raw = store(out)
        for name, values in self._stored_defaults:
            if name not in raw:
                raw[name] = list(values)
        if client_ip is not None:
            forwarded = raw.get(_XFF)
            ip = client_ip.encode("ascii")
            raw[_XFF] = [b", ".join([*forwarded, ip])] if forwarded else [ip]
        if not trusted or _XFP not in raw:
            raw[_XFP] = [proto]
        if host is not None and (not trusted or _XFH not in raw):
            raw[_XFH] = [host]
        for name, value in extra:
            raw[canonical(name)] = [value]
        return out


_SIMPLE_VARY = b"Origin"


class Cors:
    """
    The C{[cors]} rules: the gateway answers preflights and owns the
    C{Access-Control-*} response headers (an upstream's are dropped).
    """

    def __init__(self, config: CorsConfig) -> None:
        self._any = "*" in config.allowed_origins
        self._origins = frozenset(o.encode("ascii") for o in config.allowed_origins if o != "*")
        # Never credentials for any origin ("*"): the configuration check
        # refuses that combination; a Config built in code gets none.
        self._credentials = config.allow_credentials and not self._any
        self._methods = ", ".join(config.allowed_methods).encode("ascii")
        self._method_names = frozenset(m.encode("ascii") for m in config.allowed_methods)
        self._headers = ", ".join(config.allowed_headers).encode("ascii")
        self._allowed_header_names = frozenset(h.lower() for h in config.allowed_headers)
        self._exposed = ", ".join(config.exposed_headers).encode("ascii")
        self._max_age = str(config.max_age).encode("ascii")

    def allows(self, origin: bytes) -> bool:
        """Whether a browser page from C{origin} may call the gateway."""
        return self._any or origin in self._origins

    @staticmethod
    def is_preflight(method: bytes, headers: Headers) -> bool:
        """A CORS preflight: C{OPTIONS} with C{Origin} and C{Access-Control-Request-Method}."""
        return (
            method == b"OPTIONS"
            and headers.hasHeader(b"origin")
            and headers.hasHeader(b"access-control-request-method")
        )

    def preflight(self, headers: Headers) -> Union[list[tuple[bytes, bytes]], str]:
        """
        The headers of a 204 answer to a preflight or, when the origin, the
        method or a requested header is not allowed, what was refused (text
        that never holds the origin: it is not to be echoed).
        """
        origin = (headers.getRawHeaders(b"origin") or [b""])[0]
        if not self.allows(origin):
            return "the origin is not allowed"
        method = (headers.getRawHeaders(b"access-control-request-method") or [b""])[0].strip()
        if method.upper() not in self._method_names:
            return f"the method {_shown(method)} is not allowed"
        requested = b",".join(headers.getRawHeaders(b"access-control-request-headers") or [])
        for name in requested.split(b","):
            name = name.strip().lower()
            if name and name.decode("latin-1") not in self._allowed_header_names:
                return f"the header {_shown(name)} is not allowed"
        out = [
            (b"Access-Control-Allow-Origin", origin),
            (b"Access-Control-Allow-Methods", self._methods),
            (b"Access-Control-Allow-Headers", self._headers),
            (b"Access-Control-Max-Age", self._max_age),
            (b"Vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
        ]
        if self._credentials:
            out.append((b"Access-Control-Allow-Credentials", b"true"))
        return out

    def response_headers(self, origin: Optional[bytes]) -> list[tuple[bytes, bytes]]:
        """The CORS headers of an actual (non-preflight) response."""
        if origin is None or not self.allows(origin):
            return [(b"Vary", _SIMPLE_VARY)]
        out = [(b"Access-Control-Allow-Origin", origin), (b"Vary", _SIMPLE_VARY)]
        if self._credentials:
            out.append((b"Access-Control-Allow-Credentials", b"true"))
        if self._exposed:
            out.append((b"Access-Control-Expose-Headers", self._exposed))
        return out

    def apply(self, request_headers: Headers, response_headers: Headers) -> None:
        """Add the CORS headers of an actual response to C{response_headers}."""
        origin = (store(request_headers).get(_ORIGIN) or (None,))[-1]
        for name, value in self.response_headers(origin):
            response_headers.addRawHeader(name, value)


def _shown(value: bytes) -> str:
    """A client-sent token as text for a message: printable ASCII only, cut short."""
    return repr(value[:64].decode("ascii", "backslashreplace"))


_TENANT = b"x-tenant-id"


class TenantSources:
    """
    C{[headers] tenant_from}: where a request's tenant may come from.

    A browser C{EventSource} cannot set headers, so a GET stream may carry its
    tenant in a query parameter or a cookie instead.  The first source found
    wins and becomes the request's C{X-Tenant-ID}; every query parameter named
    as a source is removed from the request before it goes anywhere (upstream,
    logs, history).
    """

    def __init__(self, sources: Sequence[str]) -> None:
        self._sources: list[tuple[str, bytes]] = []
        for source in sources:
            kind, _, name = source.partition(":")
            self._sources.append((kind, name.encode("utf-8")))
        self._query_names = frozenset(name for kind, name in self._sources if kind == "query")
        self._only_header = all(kind == "header" for kind, _ in self._sources)

    def apply(self, request: Any) -> None:
        """Resolve the tenant of C{request} in place (its headers and URI)."""
        if self._only_header:
            return
        found: dict[bytes, list[bytes]] = {}
        if self._query_names:
            path, sep, query = request.uri.partition(b"?")
            if sep:
                kept = []
                for pair in query.split(b"&"):
                    raw_name, _, raw_value = pair.partition(b"=")
                    name = unquote_to_bytes(raw_name.replace(b"+", b" "))
                    if name in self._query_names:
                        found.setdefault(name, []).append(
                            unquote_to_bytes(raw_value.replace(b"+", b" ")))
                    else:
                        kept.append(pair)
                request.uri = path + (b"?" + b"&".join(kept) if kept else b"")
                args = getattr(request, "args", None)
                if args:
                    for name in self._query_names:
                        args.pop(name, None)
        headers = request.requestHeaders
        for kind, name in self._sources:
            if kind == "header":
                values = headers.getRawHeaders(_TENANT)
                if values and (len(values) > 1 or values[0].strip()):
                    # Kept as sent: a repeated header is the Identity stage's to refuse.
                    return
                continue
            values = None
            if kind == "query":
                values = found.get(name)
            else:
                cookies = getattr(request, "received_cookies", None)
                value = cookies.get(name) if cookies else None
                if value is not None:
                    values = [value]
            if values and values[0].strip() and not any(b"\r" in v or b"\n" in v for v in values):
                # A repeated query parameter stays repeated: the Identity
                # stage refuses it as an ambiguous tenant.
                headers.setRawHeaders(_TENANT, [v.strip() for v in values])
                return
