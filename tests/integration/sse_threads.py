"""
Blocking SSE clients for the twistd integration tests: each stream read by a
thread with http.client (the test's reactor is not the gateway's).
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
from typing import Any, Optional

__all__ = ["SseClient", "post_json", "request"]


class SseClient(threading.Thread):
    """
    Reads one SSE stream to its end, keeping each event's index (C{token},
    C{tick}) and whether the C{done} event came.

    @ivar status: the response status (0 before the head).
    @ivar indexes: the token events' indexes, in arrival order.
    @ivar gaps: the longest silence between two events, in seconds.
    """

    def __init__(
        self, port: int, path: str, headers: dict[str, str], timeout: float = 60.0,
        tls: Optional[ssl.SSLContext] = None,
    ) -> None:
        """C{tls}: read the stream over HTTPS with this client context."""
        super().__init__(daemon=True)
        self._tls = tls
        self._port = port
        self._path = path
        self._headers = headers
        self._timeout = timeout
        self.status = 0
        self.indexes: list[int] = []
        self.done = False
        self.error: Optional[BaseException] = None
        self.longest_gap = 0.0
        self.body = b""
        self.headers: dict[str, str] = {}
        self._conn: Optional[http.client.HTTPConnection] = None

    def run(self) -> None:
        try:
            if self._tls is not None:
                conn = self._conn = http.client.HTTPSConnection(
                    "127.0.0.1", self._port, timeout=self._timeout, context=self._tls)
            else:
                conn = self._conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=self._timeout)
            conn.request("GET", self._path, headers=self._headers)
            response = conn.getresponse()
            self.status = response.status
            self.headers = {k.lower(): v for k, v in response.getheaders()}
            if response.status != 200:
                self.body = response.read()
                return
            event = None
            last = time.monotonic()
            while True:
                line = response.readline()
                if not line:
                    return
                line = line.rstrip(b"\r\n")
                if line.startswith(b"event:"):
                    event = line[6:].strip()
                elif line.startswith(b"data:") and event in (b"token", b"tick"):
                    now = time.monotonic()
                    self.longest_gap = max(self.longest_gap, now - last)
                    last = now
                    self.indexes.append(json.loads(line[5:])["index"])
                elif line.startswith(b"data:") and event == b"done":
                    self.done = True
                    return
        except BaseException as e:  # noqa: B036 - reported by the test
            if self._conn is not None and self._conn.sock is None and self.status:
                return  # closed by close()
            self.error = e

    def close(self) -> None:
        """Hang up (the stream ends for the gateway: its client left)."""
        conn = self._conn
        if conn is not None and conn.sock is not None:
            sock = conn.sock
            conn.sock = None
            try:
                import socket

                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


def request(port: int, method: str, path: str, headers: Optional[dict[str, str]] = None,
            body: Optional[bytes] = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection: status, headers (lower-case names), body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def post_json(port: int, path: str) -> tuple[int, Any]:
    """POST C{path} with no body; the status and the decoded JSON answer."""
    status, _, body = request(port, "POST", path)
    return status, json.loads(body)
