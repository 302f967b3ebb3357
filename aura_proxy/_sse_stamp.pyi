"""Type stub of the C extension aura_proxy/_sse_stamp.c (see there)."""

from typing import Any, Callable, Optional, Union

#: The values it was compiled with (aura_proxy.sse checks them at import).
CONSTANTS: dict[str, Union[int, bytes]]

class Stamper:
    seq: int
    slow: int
    upstream: Optional[bytes]
    def __init__(
        self,
        prefix: bytes,
        carry: bool,
        on_event: Optional[Callable[[int, bytes], object]],
        fallback: Callable[[bytes], bytes],
    ) -> None: ...
    def feed(self, data: bytes) -> bytes: ...
    def make_id(self, seq: int) -> bytes: ...

class EventStore:
    first_seq: int
    last_seq: int
    max_events: int
    max_bytes: int
    size: int
    capacity: int
    slots: int
    footprint: int
    ended: bool
    subscribers: Optional[set[Any]]
    on_grow: Optional[Callable[[int], object]]
    def __init__(self, max_events: int, max_bytes: int) -> None: ...
    def release(self) -> int: ...
    def add(self, seq: int, block: bytes) -> None: ...
    def __call__(self, seq: int, block: bytes) -> None: ...
    def events_after(self, after_seq: int) -> list[tuple[int, bytes]]: ...
    def __len__(self) -> int: ...
