"""
Process tuning of a process that serves the gateway (the single process and
each worker; not the supervisor parent of C{workers > 1}, which serves no
stream): the lean epoll loop, the garbage collector's pace, and one start-up
log line saying which parts of the hot path run in C.

L{ProcessTuning} is the child service of the assembled tree
(L{aura_proxy.assembly}) that does it when the tree starts, so no entry point
has to remember it.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from aura_proxy.eventloop import use_lean_poll

__all__ = ["ProcessTuning", "log_hot_path", "prepare_process", "tune_gc"]

_log = Logger()


class ProcessTuning(Service):
    """Tunes the process (L{prepare_process}) when the service tree starts."""

    name = "process-tuning"

    def __init__(self, reactor: Any, fast_path: bool = True) -> None:
        """@param fast_path: C{[gateway] fast_path}; off keeps Twisted's own poll loop."""
        self._reactor = reactor
        self._fast_path = fast_path

    def startService(self) -> None:
        Service.startService(self)
        prepare_process(self._reactor, self._fast_path)


def prepare_process(reactor: Any, fast_path: bool = True) -> None:
    """
    Tune a process that serves the gateway: the lean epoll loop (with
    C{fast_path}), the garbage collector's pace, and one log line saying
    which fast paths of the hot path are on.
    """
    lean = use_lean_poll(reactor) if fast_path else False
    tune_gc()
    log_hot_path(lean, fast_path)


def log_hot_path(lean: bool, fast_path: bool = True) -> None:
    """
    The start-up line: with C{fast_path = on}, which parts of the hot path
    run in C, whether the lean epoll loop runs, and which fast paths this
    Twisted's internals switch off (L{aura_proxy.twisted_internals}); a
    warning when any is missing.
    """
    if not fast_path:
        _log.info(
            "hot path: fast_path = off: stock Twisted and pure Python (no C module, "
            "Twisted's own poll loop and transport writes)",
            fast_path="off",
        )
        return
    from aura_proxy import c_extensions, client_wire, fastclient, relay, sse, twisted_internals

    unused = [(name, reason) for name, used, reason in (
        ("aura_proxy._sse_stamp", sse.ACCELERATED, sse.C_DISABLED_REASON),
        ("aura_proxy._chunked_read", fastclient._ChunkedReader is not None, fastclient.C_DISABLED_REASON),
        ("aura_proxy._relay_core", relay.ACCELERATED, client_wire.C_DISABLED_REASON),
    ) if not used]
    internals = "; ".join(
        f"{internal.serves} off ({internal.name}: {internal.why})"
        for internal in twisted_internals.unavailable()
    )
    loop = "on" if lean else "off (not an epoll reactor)"
    if unused or internals:
        _log.warn(
            "hot path: fast_path = on, but C modules not used: {missing} ({why}): the "
            "Python code does that work, more slowly; lean epoll loop {lean}; this "
            "Twisted: {internals}",
            missing=", ".join(name for name, _ in unused) or "none",
            why="; ".join(f"{name}: {reason or c_extensions.NOT_BUILT}" for name, reason in unused)
            or "all used",
            lean=loop, internals=internals or "every internal found", fast_path="on",
        )
    else:
        _log.info(
            "hot path: fast_path = on: chunked reads, SSE rewriter, event store and client "
            "writes in C, lean epoll loop {lean}, every Twisted internal found",
            lean=loop, fast_path="on",
        )


def tune_gc() -> None:
    """
    Keep the garbage collector's pauses off the streams.

    A gateway holds many long-lived objects per open stream, and CPython's
    young collections, every 700 allocations by default, kept walking the
    survivors: with a thousand streams, p99 latency 42 ms.  What exists at
    start-up (modules, configuration) is frozen out of collection, and young
    collections run every 50,000 allocations.  Full collections keep their
    default pace: an ended stream leaves reference cycles (Twisted's
    request and channel objects) that only a full collection frees.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 10)
