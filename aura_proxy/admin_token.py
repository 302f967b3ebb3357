"""
The admin site behind a bearer token (C{[admin] token_file}): L{TokenGuard}.

Scripts and Prometheus send C{Authorization: Bearer TOKEN}.  A browser's
C{EventSource} (the dashboard's feed) cannot send that header: a person
opening the dashboard gets a one-field form instead, whose C{POST /login}
sets a session cookie (HttpOnly, SameSite=Strict) holding an HMAC of the
token, never the token itself; the page and its feed then carry the cookie.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any
from urllib.parse import parse_qs

from twisted.web.resource import IResource, getChildForRequest
from twisted.web.server import Request
from zope.interface import implementer

from aura_proxy import errors

__all__ = ["COOKIE", "TokenGuard"]

#: The admin session cookie's name.
COOKIE = b"aura_proxy_admin"

_LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>aura-proxy admin</title>
<style>body{font:16px system-ui,sans-serif;margin:4em auto;max-width:26em}
input{font:inherit;width:100%%;margin:.4em 0;padding:.3em}p.e{color:#b00}</style></head>
<body><h1>aura-proxy admin</h1>%s
<form method="post" action="/login"><label>Admin token
<input type="password" name="token" autocomplete="current-password" autofocus required></label>
<input type="submit" value="Open the dashboard"></form>
<p>The token is the one in <code>[admin] token_file</code>.</p></body></html>
"""


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
        self._session = hmac.new(token, b"aura-proxy admin session", hashlib.sha256).hexdigest().encode("ascii")

    def getChildWithDefault(self, name: bytes, request: Request) -> IResource:
        raise RuntimeError("a leaf resource has no children")  # isLeaf: never called

    def putChild(self, path: bytes, child: IResource) -> None:
        """Add C{child} to the wrapped tree: it is behind the token too."""
        self._wrapped.putChild(path, child)

    def allowed(self, request: Request) -> bool:
        """Whether C{request} carries the admin token, or the session cookie made from it."""
        values = request.requestHeaders.getRawHeaders(b"authorization") or []
        if not values:
            cookie = request.getCookie(COOKIE)
            return cookie is not None and hmac.compare_digest(cookie, self._session)
        if len(values) != 1:
            return False
        scheme, _, token = values[0].strip().partition(b" ")
        given = scheme.lower() + b" " + token.strip()
        return hmac.compare_digest(given, self._expected)

    def render(self, request: Request) -> Any:
        """Serve C{request} from the wrapped tree, or refuse it (401)."""
        if request.path == b"/login" and request.method == b"POST":
            return self._login(request)
        if not self.allowed(request):
            if request.method == b"GET" and request.path == b"/" and _wants_html(request):
                return self._login_page(request, b"")
            error = errors.admin_token_required()
            request.setResponseCode(error.status)
            request.setHeader(b"www-authenticate", b'Bearer realm="aura-proxy admin"')
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            return error.body()
        return getChildForRequest(self._wrapped, request).render(request)

    def _login(self, request: Request) -> bytes:
        """C{POST /login} (form field C{token}): the session cookie and back to C{/}, or the form again."""
        assert request.content is not None
        form = parse_qs(request.content.read(4096).decode("utf-8", "replace"))
        token = form.get("token", [""])[0].strip().encode("utf-8")
        if not hmac.compare_digest(b"bearer " + token, self._expected):
            return self._login_page(request, b'<p class="e">That is not the admin token.</p>')
        request.addCookie(
            COOKIE, self._session, path=b"/", httpOnly=True, sameSite="strict", secure=request.isSecure()
        )
        request.setResponseCode(303)
        request.setHeader(b"location", b"/")
        request.setHeader(b"cache-control", b"no-store")
        return b""

    def _login_page(self, request: Request, note: bytes) -> bytes:
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", b'Bearer realm="aura-proxy admin"')
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return (_LOGIN_PAGE % note.decode("utf-8")).encode("utf-8")


def _wants_html(request: Request) -> bool:
    accept = request.getHeader(b"accept") or b""
    return b"text/html" in accept
