"""
Where a request's token is: C{[auth] token_from}, the first source found.

C{header} is C{Authorization: Bearer TOKEN}; C{cookie:NAME} is for a
browser C{EventSource}, which cannot send C{Authorization}.  A token is
never taken from a query parameter (URLs are logged and recorded).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from aura_proxy.auth.verify import TokenRefused

__all__ = ["TokenSources"]


class TokenSources:
    """C{[auth] token_from}, parsed once."""

    def __init__(self, sources: Sequence[str]) -> None:
        self._sources = tuple(
            (kind, name.encode("utf-8")) for kind, _, name in (s.partition(":") for s in sources)
        )

    def find(self, request: Any) -> Optional[bytes]:
        """
        The request's token, or None when it carries none.

        @raise TokenRefused: (C{invalid_request}) several C{Authorization}
            headers, or a Bearer one without a token.
        """
        for kind, name in self._sources:
            if kind == "header":
                token = _bearer(request.requestHeaders.getRawHeaders(b"authorization"))
            else:
                cookies = getattr(request, "received_cookies", None)
                token = cookies.get(name) if cookies else None
            if token:
                return token
        return None


def _bearer(values: Optional[list[bytes]]) -> Optional[bytes]:
    if not values:
        return None
    if len(values) > 1:
        raise TokenRefused("invalid_request", "more than one Authorization header")
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None  # another scheme is not a token of ours
    token = token.strip()
    if not token:
        raise TokenRefused("invalid_request", "an Authorization: Bearer header without a token")
    return token
