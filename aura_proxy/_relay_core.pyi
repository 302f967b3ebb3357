"""Type stub of the C extension aura_proxy/_relay_core.c (see there)."""

from typing import Any, Callable, Optional

class RelayCore:
    _seconds: Callable[[], float]
    _feed: Optional[Callable[[bytes], bytes]]
    _request: Any
    _tcp: Any
    _chunked: bool
    _client_gone: bool
    _beats: bool
    _at_boundary: bool
    _last_read: float
    first_write_at: Optional[float]
    sent: int
    def dataReceived(self, data: bytes) -> None: ...
