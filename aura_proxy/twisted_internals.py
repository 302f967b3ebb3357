"""
The one place where aura-proxy reaches Twisted's private names.

Some of the gateway's fast paths lean on how this Twisted is built inside:
where a header's values are kept, how the epoll reactor's poll step and a TCP
transport's write buffers look, what an endpoint keeps of its description.
Each such name is probed here once, at import, for the shape the fast path
expects (an L{Internal}); where one is missing or changed, that fast path is
switched off, L{unavailable} says which and why (the start-up line repeats
it), and stock Twisted serves through its public API instead.  A Twisted
release that renames a private name therefore costs speed, never a failed
start or bytes out of order.

Nothing outside this module names a private Twisted attribute or imports a
private Twisted name; C{tests/test_twisted_internals.py} has a canary per
probe that fails loudly when a tested Twisted no longer matches.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any, Callable, Dict, List, MutableMapping, NamedTuple, Optional, Sequence

from twisted.internet import abstract, tcp
from twisted.web.http_headers import Headers

from aura_proxy.descriptions import split_description

__all__ = [
    "Internal",
    "INTERNALS",
    "available",
    "unavailable",
    "raw_headers",
    "PollParts",
    "poll_parts",
    "NO_FILEDESC",
    "WRITE_BUFFER_ATTRIBUTES",
    "direct_send_transport",
    "send_queue_empty",
    "unsent_bytes",
    "intercept_start_writing",
    "replace_do_read",
    "unwrap_endpoint_protocol",
    "ParseError",
    "WrongBodyLength",
    "DataLoss",
    "channel_protocol_factory",
    "request_line",
    "answer_malformed_requests",
    "stop_stream_body",
    "hold_connection_timeout",
    "tcp_endpoint_address",
    "accept_one_at_a_time",
    "quiet_pool",
]


class Internal(NamedTuple):
    """One private Twisted name (or group of names) a fast path relies on."""

    #: What is reached, e.g. C{twisted.web.http_headers.Headers._rawHeaders}.
    name: str
    #: The fast path that uses it, in an operator's words.
    serves: str
    #: Whether this Twisted has it, with the expected shape.
    ok: bool
    #: Why not, when not C{ok}.
    why: str = ""


#: Every probe, by key; tests may replace an entry to switch a fast path off.
INTERNALS: Dict[str, Internal] = {}


def _probe(key: str, name: str, serves: str, check: Callable[[], Optional[str]]) -> None:
    try:
        problem = check()
    except Exception as e:  # a probe must never stop the import
        problem = f"{type(e).__name__}: {e}"
    INTERNALS[key] = Internal(name, serves, problem is None, problem or "")


def available(key: str) -> bool:
    """Whether the private name(s) probed under C{key} can be used."""
    return INTERNALS[key].ok


def unavailable() -> List[Internal]:
    """The probes that failed on this Twisted: their fast paths are off."""
    return [internal for internal in INTERNALS.values() if not internal.ok]


def _uses(function: Any, *names: str) -> Optional[str]:
    # A method still reading and writing these attributes is taken to keep
    # the layout the fast path relies on.
    code = getattr(function, "__code__", None)
    if code is None:
        return f"{getattr(function, '__qualname__', function)!r} is not Python code"
    missing = [n for n in names if n not in code.co_names]
    if missing:
        return f"{function.__qualname__} no longer uses {', '.join(missing)}"
    return None


# -- header values ---------------------------------------------------------------


def _check_raw_headers() -> Optional[str]:
    probe = Headers()
    for name in (b"x-request-id", b"Content-Length", b"ETag", b"x-forwarded-for"):
        probe.addRawHeader(name, b"v")
    raw = getattr(probe, "_rawHeaders", None)
    expected = {
        b"X-Request-Id": [b"v"], b"Content-Length": [b"v"], b"ETag": [b"v"],
        b"X-Forwarded-For": [b"v"],
    }
    if raw != expected:
        return "Headers._rawHeaders is not a dict of canonical name -> list of values"
    raw[b"X-Request-Id"] = [b"w"]
    if probe.getRawHeaders(b"x-request-id") != [b"w"]:
        return "a value written to Headers._rawHeaders is not what getRawHeaders returns"
    return None


_probe(
    "raw_headers", "twisted.web.http_headers.Headers._rawHeaders",
    "header values read and written without re-encoding (aura_proxy.header_store)",
    _check_raw_headers,
)

#: C{raw_headers(headers)}: the dict a L{Headers} keeps its values in, by
#: canonical name; None when this Twisted keeps them otherwise.
raw_headers: Optional[Callable[[Headers], MutableMapping[bytes, Sequence[bytes]]]] = (
    attrgetter("_rawHeaders") if available("raw_headers") else None
)


# -- the epoll reactor's poll step -----------------------------------------------


class PollParts(NamedTuple):
    """What L{aura_proxy.eventloop}'s lean poll step takes from an epoll reactor."""

    poller: Any
    selectables: Dict[int, Any]
    do_read_or_write: Callable[[Any, int, int], None]
    disconnect: Callable[[Any, Any, bool], None]


NO_FILEDESC: Any = None


def _check_poll() -> Optional[str]:
    global NO_FILEDESC
    from twisted.internet import epollreactor, posixbase

    reactor_class = epollreactor.EPollReactor
    for name in ("_doReadOrWrite", "_disconnectSelectable"):
        if not callable(getattr(reactor_class, name, None)):
            return f"EPollReactor.{name} is gone"
    problem = _uses(reactor_class.doPoll, "_poller", "_selectables", "_doReadOrWrite")
    if problem is not None:
        return problem
    problem = _uses(reactor_class._doReadOrWrite, "doRead", "doWrite", "_disconnectSelectable")
    if problem is not None:
        return problem
    NO_FILEDESC = posixbase._NO_FILEDESC
    return None


_probe(
    "poll", "EPollReactor._poller, _selectables, _doReadOrWrite, _disconnectSelectable; "
    "posixbase._NO_FILEDESC",
    "the lean epoll loop (aura_proxy.eventloop)", _check_poll,
)


def poll_parts(reactor: Any) -> Optional[PollParts]:
    """The private parts of an epoll C{reactor} the lean loop drives, or None."""
    if not available("poll"):
        return None
    poller = getattr(reactor, "_poller", None)
    selectables = getattr(reactor, "_selectables", None)
    if not hasattr(poller, "poll") or not isinstance(selectables, dict):
        return None
    return PollParts(poller, selectables, reactor._doReadOrWrite, reactor._disconnectSelectable)


# -- TCP transports: write buffers, reads ------------------------------------------


def _check_write_buffers() -> Optional[str]:
    fd = abstract.FileDescriptor
    if not isinstance(getattr(fd, "dataBuffer", None), bytes):
        return "FileDescriptor.dataBuffer is not a bytes class attribute"
    if getattr(fd, "_writeDisconnected", None) is not False:
        return "FileDescriptor._writeDisconnected is not a class attribute False"
    return (
        _uses(fd.write, "_tempDataBuffer", "_tempDataLen", "_writeDisconnected", "startWriting")
        or _uses(fd.doWrite, "dataBuffer", "offset", "_tempDataBuffer", "_tempDataLen", "writeSomeData")
        or _uses(fd.__init__, "_tempDataBuffer", "_tempDataLen")
        or _uses(tcp.Connection.writeSomeData, "socket", "send")
    )


_probe(
    "write_buffers",
    "FileDescriptor.dataBuffer, _tempDataBuffer, _tempDataLen, _writeDisconnected, startWriting",
    "writes sent straight to the client's socket, and at the end of the loop turn",
    _check_write_buffers,
)


#: The attributes of a TCP transport a direct sender reads to know that
#: nothing is queued (L{send_queue_empty}; C{aura_proxy._relay_core} reads
#: the same names, checked at import).
WRITE_BUFFER_ATTRIBUTES = ("dataBuffer", "_tempDataBuffer", "connected", "_writeDisconnected")


def direct_send_transport(transport: Any) -> Optional[tcp.Connection]:
    """
    C{transport} if bytes may be sent straight to its socket: a connected
    plain TCP connection (not TLS) of a Twisted whose write buffers look as
    expected; else None (write through the transport).
    """
    if not available("write_buffers"):
        return None
    if not isinstance(transport, tcp.Connection) or transport.TLS or not transport.connected:
        return None
    return transport


def send_queue_empty(transport: Any) -> bool:
    """
    Whether nothing is queued in C{transport} (one L{direct_send_transport}
    gave) and it may still be written to: a direct send would not overtake.
    """
    return (
        not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport._writeDisconnected
    )


def unsent_bytes(transport: Any) -> bool:
    """Whether C{transport} still holds bytes its socket did not take."""
    return bool(transport.dataBuffer or transport._tempDataLen)


def intercept_start_writing(transport: Any, start_writing: Callable[[], None]) -> bool:
    """
    Have C{transport}'s C{write} and C{loseConnection} call C{start_writing}
    instead of registering the socket with the reactor, where Twisted's own
    TCP connections do that through C{startWriting}.

    @return: whether it was done.
    """
    if not available("write_buffers") or type(transport) not in (tcp.Server, tcp.Client):
        return False
    transport.startWriting = start_writing
    return True


def _check_do_read() -> Optional[str]:
    return _uses(tcp.Connection.doRead, "socket", "recv", "bufferSize", "_dataReceived")


_probe(
    "do_read", "tcp.Connection.doRead reading self.socket",
    "upstream reads handed straight to the HTTP parser (aura_proxy.fastclient)", _check_do_read,
)


def replace_do_read(transport: Any, do_read: Callable[[], object]) -> bool:
    """
    Give a plain TCP connection its own C{doRead} (same contract: None, or
    the reason the connection is lost), reading its C{socket}.

    @return: whether it was done.
    """
    if not available("do_read"):
        return False
    transport.doRead = do_read  # type: ignore[method-assign,assignment]
    return True


# -- client endpoints and the HTTP client's errors ---------------------------------


def _check_wrapping_protocol() -> Optional[str]:
    from twisted.internet.defer import Deferred
    from twisted.internet.endpoints import _WrappingProtocol
    from twisted.internet.protocol import Protocol

    wrapped = Protocol()
    wrapper = _WrappingProtocol(Deferred(), wrapped)
    if getattr(wrapper, "_wrappedProtocol", None) is not wrapped:
        return "_WrappingProtocol keeps its protocol elsewhere than _wrappedProtocol"
    return None


_probe(
    "wrapping_protocol", "twisted.internet.endpoints._WrappingProtocol._wrappedProtocol",
    "upstream reads without the endpoint wrapper's extra call", _check_wrapping_protocol,
)


def unwrap_endpoint_protocol(transport: Any, protocol: object) -> bool:
    """
    Let C{transport} call C{protocol} directly instead of through the
    client endpoint's wrapper around it.

    @return: whether it was done.
    """
    if not available("wrapping_protocol"):
        return False
    from twisted.internet.endpoints import _WrappingProtocol

    wrapper = getattr(transport, "protocol", None)
    if isinstance(wrapper, _WrappingProtocol) and wrapper._wrappedProtocol is protocol:
        transport.protocol = protocol
        return True
    return False


class _ParseError(Exception):
    """An upstream's response head could not be parsed (stock-Twisted fallback)."""


class _WrongBodyLength(Exception):
    """A request body producer wrote more or less than its length (stock-Twisted fallback)."""


class _DataLoss(Exception):
    """A response body ended before its framing said (stock-Twisted fallback)."""


def _client_errors() -> tuple[type[Exception], type[Exception], type[Exception], Optional[str]]:
    try:
        from twisted.web._newclient import ParseError as parse_error
        from twisted.web._newclient import WrongBodyLength as wrong_length
        from twisted.web.http import _DataLoss as data_loss
    except ImportError as e:
        return _ParseError, _WrongBodyLength, _DataLoss, f"ImportError: {e}"
    return parse_error, wrong_length, data_loss, None


ParseError, WrongBodyLength, DataLoss, _errors_problem = _client_errors()
_probe(
    "client_errors", "twisted.web._newclient.ParseError, WrongBodyLength; twisted.web.http._DataLoss",
    "the upstream client's failures are Twisted's own classes (else equivalents)",
    lambda: _errors_problem,
)


# -- the client-facing HTTP channel ------------------------------------------------


def _check_channel_protocol() -> Optional[str]:
    from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol

    channel = HTTPChannel()
    protocol = _GenericHTTPChannelProtocol(channel)
    if getattr(protocol, "_channel", None) is not channel:
        return "_GenericHTTPChannelProtocol keeps its channel elsewhere than _channel"
    return None


_probe(
    "channel_protocol", "twisted.web.http._GenericHTTPChannelProtocol",
    "the gateway's own HTTP/1.1 channel (a response head in one write)", _check_channel_protocol,
)


def channel_protocol_factory() -> Optional[Callable[[Any], Any]]:
    """
    What wraps a new channel for a site's connection (the protocol that can
    switch to HTTP/2 after TLS negotiation), or None: use the site's default.
    """
    if not available("channel_protocol"):
        return None
    from twisted.web.http import _GenericHTTPChannelProtocol

    return _GenericHTTPChannelProtocol  # type: ignore[no-any-return]


def _check_request_line() -> Optional[str]:
    from twisted.web.http import HTTPChannel

    return _uses(HTTPChannel.lineReceived, "_command", "_path", "_version")


_probe(
    "request_line", "HTTPChannel._command, _path, _version",
    "the method and path of a request refused for its body size, for its history row",
    _check_request_line,
)


def request_line(channel: Any) -> tuple[bytes, bytes, bytes]:
    """
    The method, target and version of the request C{channel} is reading the
    headers or body of (before twisted.web hands it to the request).
    """
    if not available("request_line"):
        return b"", b"", b"HTTP/1.1"
    return (
        getattr(channel, "_command", b""),
        getattr(channel, "_path", b""),
        getattr(channel, "_version", b"HTTP/1.1"),
    )


def _check_bad_request() -> Optional[str]:
    from twisted.web.http import HTTPChannel

    if not callable(getattr(HTTPChannel, "_respondToBadRequestAndDisconnect", None)):
        return "HTTPChannel has no _respondToBadRequestAndDisconnect"
    return _uses(HTTPChannel.lineReceived, "_respondToBadRequestAndDisconnect")


_probe(
    "bad_request", "HTTPChannel._respondToBadRequestAndDisconnect",
    "the gateway's JSON 400 (with a request id) for malformed HTTP, instead of a bare 400",
    _check_bad_request,
)


def answer_malformed_requests(channel_class: type, answer: Callable[[Any], None]) -> bool:
    """
    Make C{channel_class} (the gateway's own subclass of C{HTTPChannel})
    answer malformed HTTP (a bad request line or header, bad framing) with
    C{answer(channel)}, which must write the answer and close the
    connection.  False: unavailable on this Twisted, and twisted.web's bare
    C{400 Bad Request} stays.
    """
    if not available("bad_request"):
        return False
    setattr(channel_class, "_respondToBadRequestAndDisconnect", answer)
    return True


# -- HTTP/2 streams ------------------------------------------------------------------


def _check_h2_stream_done() -> Optional[str]:
    from twisted.web._http2 import H2Connection, H2Stream

    return (
        _uses(H2Connection._requestDone, "_streamCleanupCallbacks")
        or _uses(H2Connection.abortRequest, "conn", "reset_stream", "_tryToWriteControlData")
        or _uses(H2Stream.__init__, "_conn", "streamID")
    )


_probe(
    "h2_stream_done", "H2Connection._streamCleanupCallbacks, conn, _tryToWriteControlData; H2Stream._conn",
    "an HTTP/2 request body refused (413) stops without ending the connection's other streams",
    _check_h2_stream_done,
)


def stop_stream_body(stream: Any) -> bool:
    """
    Once the response on the HTTP/2 C{stream} (an H2Stream) has been sent
    whole, reset the stream with C{NO_ERROR} (RFC 9113 8.1): the client
    stops sending its request body, and DATA frames already on their way are
    dropped by the h2 state machine.  Without it, Twisted's H2Connection
    meets DATA for a stream it has forgotten and drops the whole connection.

    @return: whether it will be done.
    """
    if not available("h2_stream_done"):
        return False
    conn: Any = getattr(stream, "_conn", None)
    done = getattr(conn, "_streamCleanupCallbacks", {}).get(getattr(stream, "streamID", None))
    if done is None:
        return False
    stream_id = stream.streamID

    def reset(result: object) -> object:
        try:
            conn.conn.reset_stream(stream_id, error_code=0)
        except Exception:
            return result  # the client ended or reset it already
        conn._tryToWriteControlData()
        return result

    done.addCallback(reset)
    return True


def _check_h2_idle() -> Optional[str]:
    from twisted.protocols.policies import TimeoutMixin
    from twisted.web._http2 import H2Connection, H2Stream

    if not issubclass(H2Connection, TimeoutMixin):
        return "H2Connection is no longer a TimeoutMixin"
    return _uses(H2Stream.__init__, "_conn")


_probe(
    "h2_idle", "H2Stream._conn (an H2Connection, a TimeoutMixin)",
    "an HTTP/2 connection is not timed out while one of its requests is served "
    "(as twisted.web's HTTP/1.1 channel)",
    _check_h2_idle,
)


def hold_connection_timeout(stream: Any) -> Optional[Callable[[], None]]:
    """
    Suspend the idle timeout of the HTTP/2 connection C{stream} (an H2Stream)
    belongs to while its request is served, as twisted.web's HTTP/1.1 channel
    suspends its own; the returned function releases the hold (the timeout
    comes back with the connection's last request).  Twisted's H2Connection
    would otherwise close the connection, every stream with it, after its
    timeout (the site's, 60 s by default) without a frame: a slow upstream,
    or an SSE stream silent longer than that without heartbeats.

    @return: the release, or None when this Twisted has not the names (the
        connection keeps Twisted's own timeout).
    """
    if not available("h2_idle"):
        return None
    conn: Any = getattr(stream, "_conn", None)
    if conn is None or not hasattr(conn, "setTimeout"):
        return None
    held = getattr(conn, "_aura_held", 0)
    if not held:
        conn._aura_saved_timeout = conn.setTimeout(None)
    conn._aura_held = held + 1
    released: list[bool] = []

    def release() -> None:
        if released:
            return
        released.append(True)
        conn._aura_held -= 1
        if not conn._aura_held:
            saved = conn._aura_saved_timeout
            # Not on a connection being lost (its streams are released from
            # its connectionLost, after it cancelled its timer): no timer on
            # a dead connection.
            if saved is not None and getattr(getattr(conn, "transport", None), "connected", False):
                conn.setTimeout(saved)

    return release


# -- listening ports -----------------------------------------------------------------


def _check_endpoint_address() -> Optional[str]:
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    endpoint = serverFromString(MemoryReactor(), "tcp:8123:interface=127.0.0.2:backlog=7")
    found = tuple(getattr(endpoint, n, None) for n in ("_port", "_interface", "_backlog"))
    if found != (8123, "127.0.0.2", 7):
        return f"a tcp: server endpoint keeps (port, interface, backlog) elsewhere (found {found!r})"
    return None


_probe(
    "endpoint_address", "TCP4ServerEndpoint._port, _interface, _backlog",
    "reading a tcp: listen description (else aura-proxy parses it itself)", _check_endpoint_address,
)


def tcp_endpoint_address(endpoint: Any, description: str) -> tuple[int, str, int]:
    """
    The port, interface and backlog of C{endpoint}, a plain C{tcp:} server
    endpoint made from C{description}.
    """
    if available("endpoint_address"):
        return endpoint._port, endpoint._interface, endpoint._backlog
    return _parse_tcp_description(description)


def _parse_tcp_description(description: str) -> tuple[int, str, int]:
    # tcp:PORT[:interface=ADDRESS][:backlog=N], or tcp:port=PORT:...; the
    # positional order is Twisted's (_parseTCP: port, interface, backlog).
    positional, named = split_description(description, "tcp")
    args = dict(zip(("port", "interface", "backlog"), positional))
    args.update(named)
    if "port" not in args:
        raise ValueError(f"no port in {description!r}")
    return int(args["port"]), args.get("interface", ""), int(args.get("backlog", 50))


def _check_accepts() -> Optional[str]:
    return _uses(tcp.Port.startListening, "numberAccepts") or _uses(tcp.Port.doRead, "numberAccepts")


_probe(
    "accepts", "tcp.Port.numberAccepts",
    "workers take turns accepting connections on their shared socket", _check_accepts,
)


def accept_one_at_a_time(port: Any) -> bool:
    """
    Make a listening TCP port accept one connection per readiness event
    (Twisted's accepts up to a hundred, growing while clients keep coming).

    @return: whether it was done.
    """
    if not available("accepts") or not isinstance(port, tcp.Port):
        return False
    base = type(port)
    if not getattr(base, "_aura_one_accept", False):
        port.__class__ = type(
            "OneAccept" + base.__name__,
            (base,),
            {"_aura_one_accept": True, "numberAccepts": property(lambda self: 1, lambda self, value: None)},
        )
    return True


# -- the stock HTTP client's pool ------------------------------------------------------


def _check_pool_factory() -> Optional[str]:
    from twisted.internet.testing import MemoryReactor
    from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

    pool = HTTPConnectionPool(MemoryReactor())
    if getattr(pool, "_factory", None) is not _HTTP11ClientFactory:
        return "HTTPConnectionPool._factory is not _HTTP11ClientFactory"
    return None


_probe(
    "pool_factory", "HTTPConnectionPool._factory, twisted.web.client._HTTP11ClientFactory",
    "no log line per https:// upstream connection", _check_pool_factory,
)


def quiet_pool(pool: Any) -> bool:
    """
    Stop C{pool} (an L{HTTPConnectionPool}) logging a line for every
    connection it makes.

    @return: whether it was done.
    """
    if not available("pool_factory"):
        return False
    from twisted.web.client import _HTTP11ClientFactory

    pool._factory = type("QuietHTTP11ClientFactory", (_HTTP11ClientFactory,), {"noisy": False})
    return True

