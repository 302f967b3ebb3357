"""
Detached streams: relayed SSE streams whose client left while their upstream
is still read into the stream log (C{[sse] on_client_disconnect = detach}),
and the caps that bound them.

A client that opens and drops streams by the thousand would otherwise make the
gateway hold as many upstream streams, each for C{resume_ttl}.  Past
C{[sse] max_detached_streams} in all, or C{max_detached_streams_per_tenant}
for one tenant, the oldest detached stream (of that tenant) is cancelled: its
upstream is closed and its log dropped, as when its C{resume_ttl} runs out, so
a client resuming it goes upstream with the upstream's own last id.

One L{DetachedStreams} serves a gateway for its whole life (as
L{aura_proxy.streams.OpenStreams} does); each pipeline passes its own caps
with every stream it adds, so a new configuration's caps apply from its first
detached stream on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from twisted.logger import Logger

if TYPE_CHECKING:
    from aura_proxy.relay import Relay

__all__ = ["DetachedStreams"]

log = Logger()


class DetachedStreams:
    """
    The detached relays, oldest first, in all and per tenant.

    @ivar cancelled_total: detached streams cancelled by C{max_detached_streams}.
    @ivar cancelled_tenant: detached streams cancelled by
        C{max_detached_streams_per_tenant}.
    """

    def __init__(self) -> None:
        # Dicts as ordered sets: oldest detached first.
        self._all: dict["Relay", tuple[str, str]] = {}
        self._by_tenant: dict[str, dict["Relay", None]] = {}
        self._by_stream: dict[str, "Relay"] = {}
        self.cancelled_total = 0
        self.cancelled_tenant = 0

    def __len__(self) -> int:
        """How many streams are detached now."""
        return len(self._all)

    def add(self, relay: "Relay", tenant: str, stream_id: str, max_total: int, max_per_tenant: int) -> None:
        """
        C{relay}'s client left and its upstream goes on into stream
        C{stream_id}'s log: count it, then cancel the oldest detached streams
        of its tenant past C{max_per_tenant}, and the oldest of all past
        C{max_total} (C{relay} itself, when a cap is 0).
        """
        self._all[relay] = (tenant, stream_id)
        self._by_stream[stream_id] = relay
        of_tenant = self._by_tenant.setdefault(tenant, {})
        of_tenant[relay] = None
        while len(of_tenant) > max_per_tenant:
            self.cancelled_tenant += 1
            self._cancel(next(iter(of_tenant)), "max_detached_streams_per_tenant")
        while len(self._all) > max_total:
            self.cancelled_total += 1
            self._cancel(next(iter(self._all)), "max_detached_streams")

    def discard(self, relay: "Relay") -> None:
        """C{relay} has ended (or was cancelled): it is no longer detached."""
        entry = self._all.pop(relay, None)
        if entry is None:
            return
        tenant, stream_id = entry
        self._by_stream.pop(stream_id, None)
        of_tenant = self._by_tenant.get(tenant)
        if of_tenant is not None:
            of_tenant.pop(relay, None)
            if not of_tenant:
                del self._by_tenant[tenant]

    def stream_ids(self) -> Iterator[str]:
        """The detached streams' ids, oldest detached first (a snapshot)."""
        return iter([stream_id for _, stream_id in self._all.values()])

    def cancel_stream(self, stream_id: str) -> bool:
        """
        Cancel the detached stream C{stream_id} (its log was dropped, so its
        upstream is read for nothing); False if it is not detached.
        """
        relay = self._by_stream.get(stream_id)
        if relay is None:
            return False
        self._cancel(relay, None)
        return True

    def _cancel(self, relay: "Relay", cap: "str | None") -> None:
        self.discard(relay)
        cancelled = self.cancelled_total + self.cancelled_tenant
        if cap is not None and cancelled & (cancelled - 1) == 0:
            # The 1st, 2nd, 4th, 8th...: news for the log, not one line per stream under abuse.
            log.warn(
                "[sse] {cap} reached: oldest detached stream cancelled ({cancelled} so far)",
                cap=cap, cancelled=cancelled,
            )
        relay.stop("client_disconnect")

    def stats(self) -> dict[str, int]:
        """
        Plain figures for health and metrics: detached streams now, tenants
        with detached streams, the most one tenant has, and streams cancelled
        by each cap so far.
        """
        return {
            "detached": len(self._all),
            "detached_tenants": len(self._by_tenant),
            "detached_max_per_tenant": max(map(len, self._by_tenant.values()), default=0),
            "cancelled_by_max_detached_streams": self.cancelled_total,
            "cancelled_by_max_detached_streams_per_tenant": self.cancelled_tenant,
        }
