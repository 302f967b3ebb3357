"""
Errors the gateway answers itself: an HTTP status, a stable code, a message.

The JSON body a client gets and the log line an operator reads are built from
the same L{GatewayError}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

__all__ = [
    "GatewayError",
    "no_route",
    "missing_header",
    "ambiguous_header",
    "invalid_header",
    "body_too_large",
    "upstream_unavailable",
    "upstream_timeout",
    "bad_request",
    "cors_forbidden",
    "internal_error",
    # [auth] (JWT)
    "missing_token",
    "invalid_token",
    "tenant_mismatch",
    # the admin site
    "admin_token_required",
    # [limits]
    "too_many_streams",
    "rate_limited",
]


@dataclass(frozen=True)
class GatewayError(Exception):
    """
    A request the gateway answers with an error instead of a proxied response.

    @ivar status: the HTTP status code.
    @ivar code: a stable, machine-readable code (documented in docs/errors.md).
    @ivar message: what went wrong, for a person.
    """

    status: int
    code: str
    message: str
    #: The request header the error is about, if one is (C{"header"} in the body).
    header: Optional[str] = None

    def body(self, request_id: Optional[str] = None) -> bytes:
        """The JSON body: C{{"error": {"status", "code", "message", ["header",] "request_id"}}}."""
        error: dict[str, object] = {
            "status": self.status,
            "code": self.code,
            "message": self.message,
        }
        if self.header is not None:
            error["header"] = self.header
        if request_id is not None:
            error["request_id"] = request_id
        return json.dumps({"error": error}, separators=(",", ":")).encode("utf-8")

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


def no_route(path: str) -> GatewayError:
    """No route matches the request path (404)."""
    return GatewayError(404, "no_route", f"no route matches {path}")


def missing_header(name: str) -> GatewayError:
    """A required header is missing or blank (400)."""
    return GatewayError(400, "missing_header", f"the {name} header is required")


def ambiguous_header(name: str, count: int) -> GatewayError:
    """An identity header (or a required one) appears more than once (400)."""
    return GatewayError(
        400, "ambiguous_header", f"the {name} header may appear once, it appears {count} times", name
    )


def invalid_header(name: str, why: str) -> GatewayError:
    """A header value the gateway refuses to forward or record (400); C{why} says what is wrong."""
    return GatewayError(400, "invalid_header", f"the {name} header {why}", name)


def body_too_large(limit: int) -> GatewayError:
    """The request body exceeds C{max_request_body} (413)."""
    return GatewayError(413, "body_too_large", f"the request body exceeds {limit} bytes")


def upstream_unavailable(route: str, reason: str) -> GatewayError:
    """The upstream refused or dropped the connection before answering (502)."""
    return GatewayError(502, "upstream_unavailable", f"upstream of route {route} unavailable: {reason}")


def upstream_timeout(route: str, what: str, seconds: float) -> GatewayError:
    """The upstream did not connect or answer in time (504)."""
    return GatewayError(
        504, "upstream_timeout", f"upstream of route {route} did not {what} within {seconds:g} s"
    )


def bad_request(message: str) -> GatewayError:
    """A request the gateway cannot forward as it is (400)."""
    return GatewayError(400, "bad_request", message)


def malformed_http() -> GatewayError:
    """Malformed HTTP (a bad request line or header, bad framing): refused before routing (400)."""
    return GatewayError(400, "bad_request", "malformed HTTP request: bad request line, header or framing")


def cors_forbidden(refused: str) -> GatewayError:
    """
    A CORS preflight from an origin, or for a method or header, that is not
    allowed (403); C{refused} says which (never echoing the origin).
    """
    return GatewayError(403, "cors_forbidden", f"this cross-origin request is not allowed: {refused}")


def internal_error() -> GatewayError:
    """
    The gateway itself failed while serving the request (500); the log has
    the traceback, the client only the request id.
    """
    return GatewayError(500, "internal_error", "the gateway failed to serve this request")


def missing_token(reason: str) -> GatewayError:
    """
    No token where C{[auth] jwt = required} wants one, or a request that is
    not a token at all (401, with C{WWW-Authenticate: Bearer
    error="invalid_request"}).
    """
    return GatewayError(401, "missing_token", reason)


def invalid_token(reason: str) -> GatewayError:
    """
    A token that is expired, not yet valid, badly signed, for another issuer
    or audience, or lacks a claim (401, with C{WWW-Authenticate: Bearer
    error="invalid_token"}).
    """
    return GatewayError(401, "invalid_token", reason)


def tenant_mismatch() -> GatewayError:
    """The request's X-Tenant-ID is not the tenant its verified token names (403)."""
    return GatewayError(403, "tenant_mismatch", "X-Tenant-ID is not the tenant of the token")


def admin_token_required() -> GatewayError:
    """
    A request to the admin site without its bearer token, or with another
    one, while C{[admin] token_file} is set (401, with C{WWW-Authenticate: Bearer}).
    """
    return GatewayError(
        401, "admin_token_required", "the admin site needs Authorization: Bearer <admin token>"
    )
def too_many_streams() -> GatewayError:
    """
    The tenant has C{[limits] max_streams_per_tenant} streams open, or the
    gateway C{max_streams_total} (429, with C{Retry-After}).
    """
    return GatewayError(429, "too_many_streams", "too many open streams; retry when one has ended")


def rate_limited() -> GatewayError:
    """
    The tenant is over C{[limits] requests_per_second_per_tenant} (and its
    burst) (429, with C{Retry-After}).
    """
    return GatewayError(429, "rate_limited", "too many requests for this tenant; retry after Retry-After seconds")
