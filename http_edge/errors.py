"""The edge's one catch-all: coded errors (and aiohttp's own) become JSON bodies with statuses."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from bus.codec import encode
from bus.errors import JetsourceError
from bus.runtime import ErrorBody, ErrorReply

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

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
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return json_error(exc.status, exc.code, exc.message, exc.field, headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except JetsourceError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        return json_error(exc.status, code, message or exc.reason, headers={k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")})
    except Exception:
        log.exception("unexpected failure on %s %s", request.method, request.path)
        return json_error(500, "internal", "internal error; see the edge log")
