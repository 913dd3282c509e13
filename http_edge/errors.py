"""The edge's one catch-all: coded errors (and aiohttp's own) become JSON bodies with statuses."""

from __future__ import annotations

import logging
from aiohttp import web

from bus.codec import encode
from bus.errors import JetsourceError
from bus.wire import ErrorBody, ErrorReply
from http_edge.breaker import CircuitOpenError

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "malformed",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "unavailable",
    504: "timeout",
}


def json_error(status: int, code: str, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    body = encode(ErrorReply(error=ErrorBody(code=code, message=message, field=field)))
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def error_response(exc: JetsourceError) -> web.Response:
    if isinstance(exc, CircuitOpenError):
        headers: dict[str, str] | None = {"Retry-After": str(exc.retry_after_s)}
    else:
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return json_error(exc.status, exc.code, exc.message, exc.field, headers)


def to_response(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The edge's one catch-all: any failure becomes a JSON error response."""
    if isinstance(exc, JetsourceError):
        return error_response(exc)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:  # redirects and the like: as they are
            return web.Response(status=exc.status, headers={k: v for k, v in exc.headers.items()
                                                            if k in ("Location", "Allow")})
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        return json_error(exc.status, code, message or exc.reason, headers=headers)
    log.error("unexpected failure on %s %s", request.method, request.path, exc_info=exc)
    return json_error(500, "internal", "internal error; see the edge log")
