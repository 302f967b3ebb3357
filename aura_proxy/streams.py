"""
The responses being relayed now, the calls in flight, and how they end on
shutdown.

One L{OpenStreams} serves a gateway for its whole life: every pipeline the
gateway builds (one per configuration) adds its relays to the same registry,
so that a shutdown ends them all, old configuration or new.

A SIGTERM drains (L{OpenStreams.drain}, then L{OpenStreams.shutdown}): the
listener has closed already (the service tree stops it first); streams whose
client is gone (detached into the resume log) end at once; every other call
(plain requests, streams, replays) gets up to C{[gateway] drain_timeout}
seconds to finish on its own.  Relays still open then end: an SSE stream
after its last whole event, with a C{retry:} hint (L{aura_proxy.relay}), its
log marked cut so that the client resumes on another instance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime

if TYPE_CHECKING:
    from aura_proxy.relay import Relay

__all__ = ["OpenStreams"]

_T = TypeVar("_T")


class OpenStreams:
    """
    The relays in progress.

    @param clock: times the drain on shutdown.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._relays: set["Relay"] = set()
        #: Requests being served now (relayed, replayed or waiting upstream).
        self.calls = 0
        #: Whether a drain has begun: relays ending now are cut, not failed.
        self.draining = False

    def track(self, served: "Deferred[_T]") -> "Deferred[_T]":
        """Count the call C{served} fires for as in flight until it fires."""
        self.calls += 1
        return served.addBoth(self._call_ended)

    def _call_ended(self, result: _T) -> _T:
        self.calls -= 1
        return result

    def _until(self, done: Callable[[], bool], seconds: float) -> "Deferred[None]":
        """Fires once C{done()} is true (polled every 50 ms) or after C{seconds}."""
        deadline = self._clock.seconds() + seconds
        fired: Deferred[None] = Deferred()

        def check() -> None:
            if done() or self._clock.seconds() >= deadline:
                fired.callback(None)
            else:
                self._clock.callLater(0.05, check)

        check()
        return fired

    def drain(self, timeout: float) -> "Deferred[None]":
        """
        The first half of a SIGTERM, once the listener has closed: streams
        whose client is gone end now; the Deferred fires once no call is in
        flight, or after C{timeout} seconds.  L{shutdown} ends the rest.
        """
        self.draining = True
        for relay in list(self._relays):
            if relay.detached:
                relay.stop("shutdown")
        return self._until(lambda: self.calls <= 0, timeout)

    def add(self, relay: "Relay") -> None:
        """A relay has started."""
        self._relays.add(relay)

    def discard(self, relay: "Relay") -> None:
        """A relay has ended."""
        self._relays.discard(relay)

    def __len__(self) -> int:
        """How many responses are being relayed now."""
        return len(self._relays)

    def stop_all(self, reason: str) -> "Deferred[list[str]]":
        """
        End every relay now, each recorded with end reason C{reason}; the
        Deferred fires once each has ended.
        """
        relays = list(self._relays)
        for relay in relays:
            relay.stop(reason)
        return gatherResults([relay.done for relay in relays])

    def shutdown(
        self, grace: float = 2.0, then: Optional[Callable[[], "Deferred[Any]"]] = None
    ) -> "Deferred[None]":
        """
        End every relayed response (on SIGTERM), each recorded as C{shutdown}.

        SSE clients get a clean end of stream, after a whole event, with a
        C{retry:} hint.  Once every relay has ended, C{then()} runs (the
        resume log's stop: it marks cut logs, releases the lease and ends
        replays).  The Deferred fires once that is done and the clients'
        connections have drained and no call is in flight (or after C{grace}
        seconds), so that the reactor does not cut the last bytes.
        """
        self.draining = True
        transports = [relay.client_transport() for relay in self._relays]
        ended = self.stop_all("shutdown")

        def drain(_: object) -> "Deferred[Any]":
            stopping = then() if then is not None else succeed(None)
            open_transports = [t for t in transports if t is not None]
            for transport in open_transports:
                transport.loseConnection()
            drained = self._until(
                lambda: self.calls <= 0
                and all(getattr(t, "disconnected", True) for t in open_transports),
                grace,
            )
            return gatherResults([stopping, drained], consumeErrors=True)

        return ended.addCallback(drain).addCallback(lambda _: None)
