"""
The proxy hop: one pooled HTTP/1.1 client shared by every request.

treq's L{treq.client.HTTPClient.request} always wraps its agent in a
C{CookieAgent} (one jar for every user: the cookie leak) and a
C{ContentDecoderAgent} (adds C{Accept-Encoding: gzip} and decodes the body).
A proxy must do neither, so the hop speaks to the same L{IAgent} that treq
would use, directly: a persistent L{HTTPConnectionPool}, no jar, no decoding,
no redirects, no buffering.  That agent is
L{aura_proxy.fastclient.FastAgent}, a lean streaming client (the stock one
spent most of the gateway's time per event parsing), for http:// and
https:// alike; https:// is verified by the routes' TLS settings
(L{aura_proxy.upstream_tls.UpstreamTlsPolicy}).  Tests swap the agent for treq's in-memory
L{treq.testing.RequestTraversalAgent}.
"""

from __future__ import annotations

from typing import IO, Any, Optional

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.task import Cooperator
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from aura_proxy.fastclient import FastAgent
from aura_proxy.twisted_internals import quiet_pool

__all__ = ["UpstreamClient", "BytesProducer", "body_producer"]

# Idle upstream connections close before a typical upstream keep-alive
# (uvicorn: 5 s) would, so that a reused one is rarely stale.
_IDLE_SECONDS = 4.0

# Bodies up to this size are sent in one write; larger ones are read from the
# request's temporary file in pieces, with backpressure.
_IN_MEMORY_BODY = 65536


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written in one piece."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> "Deferred[None]":
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def body_producer(
    content: IO[bytes], length: int, method: bytes, cooperator: Cooperator
) -> Optional[IBodyProducer]:
    """
    The body producer for a client's request body, or None for none at all.

    A C{GET}, C{HEAD}, C{DELETE} or C{OPTIONS} without a body sends no
    C{Content-Length}; any other method sends C{Content-Length: 0} for an
    empty body, as the client did.
    """
    if length == 0:
        if method in (b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"):
            return None
        return BytesProducer(b"")
    content.seek(0)
    if length <= _IN_MEMORY_BODY:
        return BytesProducer(content.read())
    return FileBodyProducer(content, cooperator=cooperator)


class UpstreamClient:
    """
    Sends proxied requests upstream over persistent connections.

    @ivar agent: the L{IAgent} used; any agent works (tests use treq's
        in-memory one).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        connect_timeout: float,
        max_idle_connections: int,
        agent: Optional[IAgent] = None,
        fast_path: bool = True,
        tls_policy: Optional[IPolicyForHTTPS] = None,
    ) -> None:
        """
        @param fast_path: whether L{FastAgent} reads its sockets directly
            (C{[gateway] fast_path}).
        @param tls_policy: the TLS options per https:// upstream (default:
            the system's CAs, Twisted's browser-like policy).
        """
        self.pool: Optional[HTTPConnectionPool] = None
        self._fast: Optional[FastAgent] = None
        if agent is None:
            self.pool = HTTPConnectionPool(reactor, persistent=max_idle_connections > 0)
            # One "Starting factory" log line per upstream connection is noise.
            quiet_pool(self.pool)
            self.pool.maxPersistentPerHost = max(max_idle_connections, 1)
            self.pool.cachedConnectionTimeout = int(_IDLE_SECONDS)
            # http:// and https:// go through the lean streaming client (the
            # stock one's parser was the largest cost per event; it also
            # drops the headers an upstream's Connection header names, which
            # the stock one keeps); any other scheme to the stock Agent,
            # which refuses it.
            stock = (
                Agent(reactor, connectTimeout=connect_timeout, pool=self.pool)
                if tls_policy is None
                else Agent(reactor, tls_policy, connectTimeout=connect_timeout, pool=self.pool)
            )
            agent = self._fast = FastAgent(
                reactor,
                connect_timeout,
                max_idle_connections,
                idle_timeout=_IDLE_SECONDS,
                fallback=stock,
                fast_path=fast_path,
                tls_policy=tls_policy,
            )
        self.agent = agent
        self.cooperator = Cooperator(
            scheduler=lambda f: reactor.callLater(0, f)  # type: ignore[arg-type,return-value]
        )

    def request(
        self, method: bytes, url: bytes, headers: Headers, body: Optional[IBodyProducer]
    ) -> "Deferred[IResponse]":
        """Send one request; the Deferred fires with the response headers."""
        return self.agent.request(method, url, headers, body)

    def idle_connections(self) -> int:
        """How many http:// connections wait in the pool now (for metrics; https:// ones are not counted)."""
        return self._fast.idle_connections() if self._fast is not None else 0

    def close(self) -> "Deferred[object]":
        """Close the idle pooled connections (on shutdown)."""
        closing: list[Deferred[Any]] = []
        if self._fast is not None:
            closing.append(self._fast.closeCachedConnections())
        if self.pool is not None:
            closing.append(self.pool.closeCachedConnections())
        return gatherResults(closing).addCallback(lambda _: None)
