"""
The admin site behind a bearer token (C{[admin] token_file}): L{TokenGuard}.
"""

from __future__ import annotations

import hmac
from typing import Any

from twisted.web.resource import IResource, getChildForRequest
from twisted.web.server import Request
from zope.interface import implementer

from aura_proxy import errors

__all__ = ["TokenGuard"]


@implementer(IResource)
class TokenGuard:
    """
    The admin site behind a bearer token: a request without
    C{Authorization: Bearer TOKEN} (compared in constant time) gets 401 and
    a JSON error; any other is served by the wrapped resource tree, whatever
    its routes (Klein's, or twisted.web children added by anyone).
    """

    isLeaf = True

    def __init__(self, wrapped: IResource, token: bytes) -> None:
        self._wrapped = wrapped
        self._expected = b"bearer " + token

    def getChildWithDefault(self, name: bytes, request: Request) -> IResource:
        raise RuntimeError("a leaf resource has no children")  # isLeaf: never called

    def putChild(self, path: bytes, child: IResource) -> None:
        """Add C{child} to the wrapped tree: it is behind the token too."""
        self._wrapped.putChild(path, child)

    def allowed(self, request: Request) -> bool:
        """Whether C{request} carries the admin token."""
        values = request.requestHeaders.getRawHeaders(b"authorization") or []
        if len(values) != 1:
            return False
        scheme, _, token = values[0].strip().partition(b" ")
        given = scheme.lower() + b" " + token.strip()
        return hmac.compare_digest(given, self._expected)

    def render(self, request: Request) -> Any:
        """Serve C{request} from the wrapped tree, or refuse it (401)."""
        if not self.allowed(request):
            error = errors.admin_token_required()
            request.setResponseCode(error.status)
            request.setHeader(b"www-authenticate", b'Bearer realm="aura-proxy admin"')
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            return error.body()
        return getChildForRequest(self._wrapped, request).render(request)
