"""
A real FastAPI + sse-starlette upstream, shaped like the Aura platform, for
integration tests of the gateway.

Run it in a subprocess (see L{tests.integration.upstreams.start_fastapi_upstream})::

    python -m uvicorn tests.integration.upstream_app:app --port P --log-level warning

Endpoints (all under C{/api/aura/}, as the gateway forwards them unstripped):

    GET  /api/aura/stream?count=N&interval=S   N token events (id 1..N), then done
    POST /api/aura/stream                      same, JSON body {count, interval, prompt}
    GET  /api/aura/silent?seconds=S            one event, S seconds of silence, one event
    GET  /api/aura/endless                     an event every 50 ms until the client goes
    GET  /api/aura/_active                     {"active": n, ...}: live SSE generators
    ANY  /api/aura/echo[/anything]             what was received: method, path, query,
                                               headers ([name, value] pairs), body
    GET  /api/aura/json                        a small JSON document
    GET  /api/aura/gzip                        raw gzip bytes, Content-Encoding: gzip
    GET  /api/aura/status/{code}               that status, JSON body
    GET  /api/aura/cookie                      two Set-Cookie headers; echoes Cookie
    GET  /api/aura/die                         two events, then the connection is aborted
    GET  /api/aura/hop[?sse=1]                 Connection: X-Secret with X-Secret: 1 (and
                                               X-Kept: 2): JSON, or one SSE event

Streams honour C{Last-Event-ID} (start after it).  sse-starlette's own ping is
pushed out to an hour so that no C{: ping} comment appears unasked.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

__all__ = ["app", "ACTIVE", "GZIP_PLAIN", "JSON_DOC", "token_text"]

#: sse-starlette's keep-alive comment interval: effectively off.
PING_SECONDS = 3600

#: Live SSE generators by endpoint name, and how many ever started.
ACTIVE: dict[str, int] = {}
STARTED: dict[str, int] = {}

JSON_DOC: dict[str, Any] = {"service": "aura", "ok": True, "items": [1, 2, 3]}
GZIP_PLAIN = json.dumps({"compressed": True, "text": "aura " * 20}).encode()
_GZIP_BODY = gzip.compress(GZIP_PLAIN, mtime=0)

app = FastAPI(title="aura test upstream")


def token_text(index: int) -> str:
    """The token of event C{index} (1-based) of C{/api/aura/stream}."""
    return f"tok{index}"


def _last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id")
    if raw is None:
        return 0
    try:
        return max(int(raw.strip()), 0)
    except ValueError:
        return 0


class _Tracked:
    """Count a generator as active between its start and its end or cancellation."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        ACTIVE[self.name] = ACTIVE.get(self.name, 0) + 1
        STARTED[self.name] = STARTED.get(self.name, 0) + 1

    def __exit__(self, *exc: object) -> None:
        ACTIVE[self.name] -= 1


def _sse(content: AsyncIterator[dict[str, Any]]) -> EventSourceResponse:
    return EventSourceResponse(
        content, ping=PING_SECONDS, headers={"Cache-Control": "no-cache"}
    )


async def _tokens(
    count: int, interval: float, after: int, prompt: Optional[str]
) -> AsyncIterator[dict[str, Any]]:
    with _Tracked("stream"):
        for i in range(after + 1, count + 1):
            if interval > 0:
                await asyncio.sleep(interval)
            data: dict[str, Any] = {"index": i, "token": token_text(i)}
            if prompt is not None:
                data["prompt"] = prompt
            yield {"id": str(i), "event": "token", "data": json.dumps(data)}
        yield {"event": "done", "data": json.dumps({"count": count})}


@app.get("/api/aura/stream")
async def stream_get(
    request: Request, count: int = 5, interval: float = 0.05
) -> EventSourceResponse:
    return _sse(_tokens(count, interval, _last_event_id(request), None))


@app.post("/api/aura/stream")
async def stream_post(request: Request) -> EventSourceResponse:
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    count = int(body.get("count", 5))
    interval = float(body.get("interval", 0.05))
    prompt = body.get("prompt")
    return _sse(
        _tokens(count, interval, _last_event_id(request), str(prompt) if prompt else None)
    )


@app.get("/api/aura/silent")
async def silent(request: Request, seconds: float = 5.0) -> EventSourceResponse:
    async def gen() -> AsyncIterator[dict[str, Any]]:
        with _Tracked("silent"):
            if _last_event_id(request) < 1:
                yield {"id": "1", "event": "token", "data": json.dumps({"phase": "before"})}
            await asyncio.sleep(seconds)
            yield {"id": "2", "event": "token", "data": json.dumps({"phase": "after"})}

    return _sse(gen())


@app.get("/api/aura/slow_head")
async def slow_head(seconds: float = 5.0) -> EventSourceResponse:
    """A stream whose response head comes only after C{seconds} (a response timeout)."""
    await asyncio.sleep(seconds)

    async def gen() -> AsyncIterator[dict[str, Any]]:
        yield {"id": "1", "event": "token", "data": json.dumps({"late": True})}

    return _sse(gen())


@app.get("/api/aura/endless")
async def endless(request: Request, interval: float = 0.05) -> EventSourceResponse:
    async def gen() -> AsyncIterator[dict[str, Any]]:
        with _Tracked("endless"):
            i = _last_event_id(request)
            while True:
                i += 1
                yield {"id": str(i), "event": "tick", "data": json.dumps({"index": i})}
                await asyncio.sleep(interval)

    return _sse(gen())


@app.get("/api/aura/_active")
async def active() -> dict[str, Any]:
    return {
        "active": sum(ACTIVE.values()),
        "by_endpoint": dict(ACTIVE),
        "started": dict(STARTED),
    }


@app.api_route(
    "/api/aura/echo",
    methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
)
@app.api_route(
    "/api/aura/echo/{rest:path}",
    methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
)
async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    scope = request.scope
    return JSONResponse(
        {
            "method": request.method,
            "path": scope["path"],
            "raw_path": scope.get("raw_path", b"").decode("latin-1"),
            "query": scope.get("query_string", b"").decode("latin-1"),
            "headers": [
                [name.decode("latin-1"), value.decode("latin-1")]
                for name, value in scope["headers"]
            ],
            "body": body.decode("utf-8", errors="replace"),
        }
    )


@app.get("/api/aura/json")
async def json_doc() -> dict[str, Any]:
    return JSON_DOC


@app.get("/api/aura/gzip")
async def gzipped() -> Response:
    return Response(
        content=_GZIP_BODY,
        media_type="application/json",
        headers={"Content-Encoding": "gzip"},
    )


@app.api_route("/api/aura/status/{code}", methods=["GET", "POST", "PUT", "DELETE"])
async def status(code: int) -> Response:
    if not 200 <= code <= 599:
        return JSONResponse({"error": "status must be 200-599"}, status_code=400)
    if code in (204, 304):
        return Response(status_code=code)
    return JSONResponse({"status": code}, status_code=code)


@app.get("/api/aura/cookie")
async def cookie(request: Request) -> JSONResponse:
    response = JSONResponse({"cookie": request.headers.get("cookie")})
    response.set_cookie("aura_session", "s3ss10n", path="/", httponly=True)
    response.set_cookie("aura_pref", "dark", path="/api/aura")
    return response


class UpstreamDied(Exception):
    """Raised on purpose by C{/api/aura/die} to abort its connection mid-stream."""


@app.get("/api/aura/die")
async def die() -> EventSourceResponse:
    async def gen() -> AsyncIterator[dict[str, Any]]:
        with _Tracked("die"):
            for i in (1, 2):
                yield {"id": str(i), "event": "token", "data": json.dumps({"index": i})}
                await asyncio.sleep(0.05)
            # An exception after the response has started: uvicorn can only
            # drop the connection, without the terminating chunk.
            raise UpstreamDied("upstream died mid-stream (on purpose)")

    return _sse(gen())


@app.get("/api/aura/hop")
async def hop(sse: int = 0) -> Response:
    headers = {"Connection": "X-Secret", "X-Secret": "1", "X-Kept": "2"}
    if sse:
        return Response(
            content=b"event: token\ndata: {}\n\n", media_type="text/event-stream", headers=headers
        )
    return JSONResponse({"hop": True}, headers=headers)
