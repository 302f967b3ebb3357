"""Type stub of the C extension aura_proxy/_chunked_read.c (see there)."""

#: The values it was compiled with (aura_proxy.fastclient checks them at import).
CONSTANTS: dict[str, int]
#: The fastclient._Connection attributes it reads and calls.
CONNECTION_ATTRIBUTES: tuple[str, ...]

class ChunkedReader:
    def __init__(self, sock: object, conn: object, done: object, lost: object, size: int = 65536) -> None: ...
    def do_read(self) -> object: ...
