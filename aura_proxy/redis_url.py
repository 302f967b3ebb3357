"""
Where a C{redis://[:password@]host[:port][/db]} URL points: one reading for
every Redis client of the gateway (the resume log, the limits store, the
readiness probe).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional
from urllib.parse import unquote, urlsplit

__all__ = ["RedisAddress", "redis_address"]


@dataclass(frozen=True)
class RedisAddress:
    """
    @ivar host: the server's host (default 127.0.0.1).
    @ivar port: its port (default 6379).
    @ivar dbid: the database number, or None for the server's default.
    @ivar password: the password (percent-decoded), or None.
    """

    host: str
    port: int
    dbid: Optional[int]
    password: Optional[str]


def redis_address(url: str) -> RedisAddress:
    """
    Read C{url}.

    @raise ValueError: not a C{redis://} URL, or a database that is not a number.
    """
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ValueError(f"not a redis:// URL: {url!r}")
    path = parts.path.strip("/")
    return RedisAddress(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 6379,
        dbid=int(path) if path else None,
        password=unquote(parts.password) if parts.password else None,
    )
