"""
A tiny demo agent upstream, so a newcomer can see a stream through the gateway.

It stands in for the Aura agent platform: plain C{twisted.web}, no FastAPI, no
model.  It answers under C{/api/aura/} because the gateway forwards
C{/api/aura/**} without stripping the prefix.  Start both in one process with::

    twistd -n aura-proxy --demo        # gateway on :8080, demo agent on 127.0.0.1:9000

then, in another terminal (the gateway's default C{[headers]} config requires
C{X-Tenant-ID} on every request; the demo agent itself does not care)::

    # stream an answer, one token every ~100 ms (-N: do not buffer)
    curl -N -H 'X-Tenant-ID: demo' \
        'http://127.0.0.1:8080/api/aura/chat/stream?q=what+is+twisted'

    # the same as a POST with a JSON body
    curl -N -H 'X-Tenant-ID: demo' -H 'Content-Type: application/json' \
        -d '{"message": "what is twisted"}' http://127.0.0.1:8080/api/aura/chat/stream

    # resume after event 5 (what a browser EventSource does on reconnect)
    curl -N -H 'X-Tenant-ID: demo' -H 'Last-Event-ID: 5' \
        'http://127.0.0.1:8080/api/aura/chat/stream?q=hi'
    curl -N -H 'X-Tenant-ID: demo' \
        'http://127.0.0.1:8080/api/aura/chat/stream?q=hi&last_event_id=5'

    # liveness, and what the gateway actually forwarded upstream
    curl -H 'X-Tenant-ID: demo' http://127.0.0.1:8080/api/aura/health
    curl -H 'X-Tenant-ID: demo' -X PUT -d 'hello' 'http://127.0.0.1:8080/api/aura/echo?a=1&a=2'

(Use port 9000, and drop the header, to talk to the demo agent directly.)

With C{[upstream_trust] key_file} configured, the demo agent takes only what the
gateway signed (L{aura_proxy.upstream_trust}, docs/identity.md): a direct call
to port 9000 is answered 401.

The stream is C{text/event-stream}; each token is one event::

    id: 1
    event: token
    data: {"token": "You", "index": 1}

and the stream ends with C{event: done} / C{data: {"tokens": N}} (N is the
number of tokens in the whole answer, whatever Last-Event-ID skipped), after
which the response is finished.  The done event carries no id, so a client
that reconnects after it resumes after the last token and gets only C{done}.

Every timer goes through the injected reactor's C{callLater}, so tests drive
the stream with a fake clock.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional, Sequence, cast
from urllib.parse import parse_qs

from twisted.application.service import Service
from twisted.application.strports import service as strports_service
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from aura_proxy.upstream_trust import (
    GatewaySignatureVerifier,
    InvalidSignature,
    TrustKey,
    refusal_body,
)

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_INTERVAL",
    "DemoAgentResource",
    "answer_tokens",
    "demo_resource",
    "demo_service",
    "format_event",
]

#: Where C{twistd aura-proxy --demo} listens: the gateway's default upstream.
DEFAULT_ENDPOINT = "tcp:9000:interface=127.0.0.1"

#: Seconds between two token events.
DEFAULT_INTERVAL = 0.1

#: At most this many words of the question are echoed back.
MAX_ECHOED_WORDS = 12

_API_PREFIX = b"/api/aura"

_CANNED = (
    "This answer comes from the aura-proxy demo agent, one token at a time,"
    " so you can watch Server-Sent Events flow through the gateway."
)


def answer_tokens(question: str) -> list[str]:
    """
    The tokens of the demo answer to C{question}: fixed for a given question.

    The answer echoes up to L{MAX_ECHOED_WORDS} words of the question and adds
    a canned sentence, between 25 and 40 tokens in all.  Every token but the
    first carries its leading space, so joining the tokens gives the text.
    """
    words = question.split()[:MAX_ECHOED_WORDS] or ["nothing", "in", "particular"]
    echoed = " ".join(words).strip().rstrip("?!.") or "nothing in particular"
    text = f'You asked: "{echoed}". {_CANNED}'
    parts = text.split(" ")
    return [parts[0]] + [" " + part for part in parts[1:]]


def format_event(
    data: Any, event: Optional[str] = None, event_id: Optional[int] = None
) -> bytes:
    """
    One SSE event: optional C{id:} and C{event:} fields, C{data:} as one line
    of compact JSON (JSON escapes newlines, so one line is always enough),
    and the blank line that ends the event.
    """
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.append("data: " + json.dumps(data, ensure_ascii=False, separators=(", ", ": ")))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def _json_response(request: Request, code: int, body: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body, ensure_ascii=False).encode("utf-8") + b"\n"


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _query(request: Request) -> dict[str, list[str]]:
    """The query string of the request's own URI (never the form body)."""
    uri: bytes = request.uri or b""
    _, _, query = uri.partition(b"?")
    return parse_qs(_text(query), keep_blank_values=True)


def _read_body(request: Request) -> bytes:
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    body: bytes = content.read()
    return body


def _resume_after(request: Request) -> int:
    """
    The id to resume after: the C{Last-Event-ID} header, else the
    C{last_event_id} query parameter, else 0.  Unparseable or negative
    values count as 0 (start from the beginning).
    """
    raw: Optional[str] = None
    header = request.getHeader(b"Last-Event-ID")
    if header is not None and header.strip():
        raw = _text(header)
    else:
        values = _query(request).get("last_event_id")
        if values:
            raw = values[-1]
    if raw is None:
        return 0
    try:
        value = int(raw.strip())
    except ValueError:
        return 0
    return max(value, 0)


def _question(request: Request, method: bytes) -> str:
    """
    The question: for POST, the JSON body's C{message} (or C{q}/C{prompt}),
    else the whole body as text; for GET (or an empty POST body), C{q}.
    """
    if method == b"POST":
        body = _read_body(request)
        if body.strip():
            try:
                parsed = json.loads(body)
            except ValueError:
                return _text(body)
            if isinstance(parsed, dict):
                for key in ("message", "q", "prompt"):
                    if isinstance(parsed.get(key), str):
                        return str(parsed[key])
            if isinstance(parsed, str):
                return parsed
            return _text(body)
    values = _query(request).get("q")
    return values[-1] if values else ""


class _TokenStream:
    """
    One streaming answer: writes token events one C{interval} apart through
    C{reactor.callLater}, then C{done}, then finishes the request; stops its
    timer if the client goes away first.
    """

    def __init__(
        self,
        request: Request,
        reactor: IReactorTime,
        tokens: Sequence[str],
        after: int,
        interval: float,
    ) -> None:
        self._request = request
        # Any: without the mypy-zope plugin, mypy reads zope interface methods
        # as if their first argument were self.
        self._reactor: Any = reactor
        self._tokens = tokens
        self._next = after + 1  # 1-based id of the next token event
        self._interval = interval
        self._call: Optional[Any] = None  # an IDelayedCall
        self._stopped = False

    def start(self) -> None:
        self._request.notifyFinish().addErrback(self._connectionLost)
        # Send the status line and headers now, so the client sees the
        # stream open before the first token.
        self._request.write(b"")
        if self._next > len(self._tokens):
            self._finish()
        else:
            self._schedule()

    def _schedule(self) -> None:
        self._call = self._reactor.callLater(self._interval, self._tick)

    def _tick(self) -> None:
        self._call = None
        if self._stopped:
            return
        index = self._next
        self._next += 1
        self._request.write(
            format_event(
                {"token": self._tokens[index - 1], "index": index},
                event="token",
                event_id=index,
            )
        )
        if self._next > len(self._tokens):
            self._finish()
        else:
            self._schedule()

    def _finish(self) -> None:
        self._stopped = True
        self._request.write(format_event({"tokens": len(self._tokens)}, event="done"))
        self._request.finish()

    def _connectionLost(self, reason: Failure) -> None:
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class DemoAgentResource(Resource):
    """
    The whole demo agent as one leaf resource, dispatching on the full path
    (it is mounted at the root and sees C{/api/aura/...} unchanged).

    @ivar interval: seconds between two token events.
    @ivar verifier: checks the gateway's signature on every request, when a
        key is configured; None: every request is served.
    """

    isLeaf = True

    def __init__(
        self,
        reactor: IReactorTime,
        interval: float = DEFAULT_INTERVAL,
        trusted_keys: Sequence[TrustKey] = (),
    ) -> None:
        super().__init__()
        self._reactor: IReactorTime = reactor
        self.interval = interval
        self.verifier = (
            GatewaySignatureVerifier(trusted_keys, clock=reactor.seconds) if trusted_keys else None
        )
        self._routes: dict[bytes, tuple[Optional[frozenset[bytes]], Callable[[Request], Any]]] = {
            _API_PREFIX + b"/chat/stream": (frozenset([b"GET", b"HEAD", b"POST"]), self._stream),
            _API_PREFIX + b"/health": (frozenset([b"GET", b"HEAD"]), self._health),
            _API_PREFIX + b"/echo": (None, self._echo),
        }

    def render(self, request: Request) -> Any:
        if self.verifier is not None:
            refusal = self._unsigned(request, self.verifier)
            if refusal is not None:
                return refusal
        path: bytes = request.path or b"/"
        if len(path) > 1 and path.endswith(b"/"):
            path = path[:-1]
        route = self._routes.get(path)
        if route is None:
            return _json_response(
                request, 404, {"error": "not found", "path": _text(request.path or b"")}
            )
        methods, handler = route
        method: bytes = request.method
        if methods is not None and method not in methods:
            allowed = b", ".join(sorted(methods))
            request.setHeader(b"Allow", allowed)
            return _json_response(
                request,
                405,
                {"error": "method not allowed", "method": _text(method), "allow": _text(allowed)},
            )
        return handler(request)

    @staticmethod
    def _unsigned(request: Request, verifier: GatewaySignatureVerifier) -> Optional[bytes]:
        """The 401 body for a request the gateway did not sign, or None."""
        path, _, query = (request.uri or b"").partition(b"?")
        pairs = [
            (name.lower(), value)
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        ]
        try:
            verifier.verify_headers(request.method, path, query, pairs)
        except InvalidSignature as e:
            request.setResponseCode(401)
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Cache-Control", b"no-store")
            return refusal_body(e.reason)
        return None

    def _health(self, request: Request) -> bytes:
        return _json_response(request, 200, {"status": "ok"})

    def _echo(self, request: Request) -> bytes:
        headers: dict[str, list[str]] = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            headers.setdefault(_text(name).lower(), []).extend(_text(v) for v in values)
        path: bytes = request.path or b""
        return _json_response(
            request,
            200,
            {
                "method": _text(request.method),
                "path": _text(path),
                "uri": _text(request.uri or b""),
                "query": _query(request),
                "headers": headers,
                "body": _text(_read_body(request)),
            },
        )

    def _stream(self, request: Request) -> object:
        method: bytes = request.method
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")
        if method == b"HEAD":
            return b""
        tokens = answer_tokens(_question(request, method))
        _TokenStream(
            request, self._reactor, tokens, _resume_after(request), self.interval
        ).start()
        return NOT_DONE_YET


def demo_resource(
    reactor: IReactorTime,
    interval: float = DEFAULT_INTERVAL,
    trusted_keys: Sequence[TrustKey] = (),
) -> IResource:
    """
    The demo agent's root resource; mount it at C{/} of a L{Site}.

    @param reactor: the clock for the token timers and signature timestamps.
    @param interval: seconds between two token events.
    @param trusted_keys: the gateway's signing keys (C{[upstream_trust]});
        when given, a request without a valid signature is answered 401.
    """
    return cast(IResource, DemoAgentResource(reactor, interval, trusted_keys))


def demo_service(
    reactor: Any,
    endpoint_description: str = DEFAULT_ENDPOINT,
    interval: float = DEFAULT_INTERVAL,
    trusted_keys: Sequence[TrustKey] = (),
) -> Service:
    """
    A service that listens on C{endpoint_description} and serves the demo agent
    (only what the gateway signed, when C{trusted_keys} are given).

    @param reactor: the reactor to listen with and to time tokens with; it
        must provide C{IReactorTime} and whatever the endpoint needs
        (C{IReactorTCP} for C{tcp:}).
    """
    site = Site(demo_resource(reactor, interval, trusted_keys), reactor=reactor)
    site.noisy = False
    return strports_service(endpoint_description, cast(IProtocolFactory, site), reactor=reactor)
