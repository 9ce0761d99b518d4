"""The proxy's own error responses, in FAPI's JSON error shape."""

from __future__ import annotations

import json

from twisted.web.server import Request

from ._twisted_compat import headers_from_raw

__all__ = ["respond_error"]


def _body(code: str, message: str) -> bytes:
    return json.dumps(
        {"errors": [{"code": code, "message": message}]}, separators=(",", ":")
    ).encode("ascii")


_BODIES = {
    "proxy_request_failed": _body(
        "proxy_request_failed", "The proxy could not reach Clerk's Frontend API."
    ),
    "proxy_upstream_timeout": _body(
        "proxy_upstream_timeout",
        "Clerk's Frontend API did not answer the proxy in time.",
    ),
    "proxy_body_timeout": _body(
        "proxy_body_timeout", "The request body did not arrive in time."
    ),
    "proxy_request_too_large": _body(
        "proxy_request_too_large", "The request body is larger than the proxy allows."
    ),
    "proxy_bad_request": _body(
        "proxy_bad_request", "The proxy cannot forward this request."
    ),
    "not_found": _body("resource_not_found", "Nothing is served at this path."),
    "misdirected_request": _body(
        "misdirected_request", "This server does not serve that host name."
    ),
}


def respond_error(request: Request, status: int, code: str) -> None:
    """
    Answer C{request} with one of the canned JSON errors and finish it.
    The bodies are fixed strings: nothing from the request or the upstream
    failure (which could carry header values) ever reaches them.
    """
    body = _BODIES[code]
    request.setResponseCode(status)
    request.responseHeaders = headers_from_raw(
        {
            b"Content-Type": [b"application/json"],
            b"Cache-Control": [b"no-store"],
            b"Content-Length": [b"%d" % len(body)],
        }
    )
    if request.method != b"HEAD":
        request.write(body)
    request.finish()
