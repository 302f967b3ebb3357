"""Type stub of the C extension aura_proxy/_sse_stamp.c (see there)."""

from typing import Callable, Optional

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
