"""
The responses being relayed now, and how they end on shutdown.

One L{OpenStreams} serves a gateway for its whole life: every pipeline the
gateway builds (one per configuration) adds its relays to the same registry,
so that a shutdown ends them all, old configuration or new.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime

if TYPE_CHECKING:
    from aura_proxy.relay import Relay

__all__ = ["OpenStreams"]


class OpenStreams:
    """
    The relays in progress.

    @param clock: times the drain on shutdown.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._relays: set["Relay"] = set()

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

    def shutdown(self, grace: float = 2.0) -> "Deferred[None]":
        """
        End every relayed response (on SIGTERM), each recorded as C{shutdown}.

        SSE clients get a clean end of stream.  The Deferred fires once every
        relay has ended and the clients' connections have drained (or after
        C{grace} seconds), so that the reactor does not cut the last bytes.
        """
        transports = [relay.client_transport() for relay in self._relays]
        ended = self.stop_all("shutdown")

        def drain(_: object) -> "Deferred[None]":
            open_transports = [t for t in transports if t is not None]
            for transport in open_transports:
                transport.loseConnection()
            deadline = self._clock.seconds() + grace
            done: Deferred[None] = Deferred()

            def check() -> None:
                if self._clock.seconds() >= deadline or all(
                    getattr(t, "disconnected", True) for t in open_transports
                ):
                    done.callback(None)
                else:
                    self._clock.callLater(0.05, check)

            check()
            return done

        return ended.addCallback(drain)
