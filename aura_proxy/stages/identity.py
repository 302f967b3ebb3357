"""
Unambiguous identity: the identity headers (and the required ones) appear
once, short and without control characters; no header value carries CR, LF
or NUL.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

from twisted.web.server import Request

from aura_proxy import errors
from aura_proxy.config import IDENTITY_HEADERS, HeadersConfig
from aura_proxy.errors import GatewayError
from aura_proxy.header_store import canonical, store
from aura_proxy.stages import GO_ON, Answer, Stage

if TYPE_CHECKING:
    from aura_proxy.call import Call

__all__ = ["Identity", "identity_problem"]

# Below 0x20 except tab, and DEL: no identity value may hold one.
_IDENTITY_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# Any other value: what could split or end a header line, or a string, downstream.
_LINE_BREAKING = re.compile(rb"[\x00\r\n]")


class Identity(Stage):
    """
    The checks that run before any identity is believed (tenant matching,
    JWT): C{X-Tenant-ID}, C{X-User-ID}, C{X-Agent-ID} and each
    C{[headers] required} header may appear once, with a value of at most
    C{max_identity_length} bytes and no control character (below 0x20 but
    tab, and DEL); any other header value with CR, LF or NUL is refused too.
    400 C{ambiguous_header} or C{invalid_header}, naming the header.

    A refused request loses its identity headers before it is answered, so
    that its history row names no tenant, user or agent.

    It runs after L{aura_proxy.stages.tenant.Tenant}, so that a tenant taken
    from a query parameter or a cookie is checked like a header one.
    """

    classifies = True

    def __init__(self, config: HeadersConfig) -> None:
        names: dict[bytes, str] = {}
        for name in (*IDENTITY_HEADERS, *config.required):
            names.setdefault(canonical(name.lower().encode("ascii")), name)
        #: Stored (canonical) name -> the name an error gives.
        self._identity = names
        self._identity_stored = tuple(canonical(n.lower().encode("ascii")) for n in IDENTITY_HEADERS)
        self._max = config.max_identity_length

    def run(self, request: Request, call: "Call") -> Answer:
        """Refuse an ambiguous or malformed identity, or a header value with CR, LF or NUL."""
        headers = store(request.requestHeaders)
        error = identity_problem(headers.items(), self._identity, self._max)
        if error is None:
            return GO_ON
        for name in self._identity_stored:
            headers.pop(name, None)
        if error.header is not None:
            headers.pop(canonical(error.header.lower().encode("latin-1")), None)
        return error


def identity_problem(
    headers: Iterable[tuple[bytes, Sequence[bytes]]],
    identity: dict[bytes, str],
    max_length: int,
) -> Optional[GatewayError]:
    """
    The first problem of C{headers} (stored names and their values), in one
    pass, or None.

    @param identity: the identity headers, by stored name, with the name an
        error gives.
    """
    for name, values in headers:
        shown = identity.get(name)
        if shown is None:
            for value in values:
                if _LINE_BREAKING.search(value) is not None:
                    return errors.invalid_header(
                        name.decode("latin-1"), "has a CR, LF or NUL character")
            continue
        if len(values) > 1:
            return errors.ambiguous_header(shown, len(values))
        for value in values:
            if len(value) > max_length:
                return errors.invalid_header(shown, f"is longer than {max_length} bytes")
            if _IDENTITY_CONTROL.search(value) is not None:
                return errors.invalid_header(shown, "has a control character")
    return None
