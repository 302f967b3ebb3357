"""Type stub of the C extension aura_proxy/_relay_core.c (see there)."""

from typing import Any, Callable, Optional

CONSTANTS: dict[str, tuple[str, ...]]

class ClientWriter:
    sent: int
    chunked: bool
    @property
    def tcp(self) -> Any: ...
    @property
    def open(self) -> bool: ...
    def __init__(self, tcp: Any, chunked: bool) -> None: ...
    def write(self, data: bytes) -> None: ...
    def end(self) -> None: ...
    def lose(self) -> None: ...

class RelayCore:
    _seconds: Callable[[], float]
    _feed: Optional[Callable[[bytes], bytes]]
    _request: Any
    _writer: Any
    _client_gone: bool
    _beats: bool
    _at_boundary: bool
    _last_read: float
    first_write_at: Optional[float]
    sent: int
    def dataReceived(self, data: bytes) -> None: ...
    _metered: bool
    _stall_open: bool
    _event_source: Optional[object]
    _events_out: int
    _first_event_at: float
    _last_event_at: float
    _stall_after: float
    _gap_sum: float
    _stalls: int
    def _meter(self, bounds: tuple[float, ...], stall_after: float, event_source: Optional[object]) -> None: ...
    def _gap_counts(self) -> tuple[int, ...]: ...
