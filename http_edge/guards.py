"""Admission control at the edge: bearer auth (read-only and read-write tokens), per-client rate
limits, and a bound on requests in flight (503 + Retry-After instead of queueing without end).
Applied by the edge's middleware (`http_edge.app`)."""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

from aiohttp import web

from bus.errors import RateLimitedError, UnavailableError, ValidationError
from http_edge import dashboard
from http_edge.errors import json_error

# Probes must answer without credentials (load balancers, orchestrators); so do the dashboard's
# login page and its token exchange (which hold no data).
_PROBES = ("/healthz", "/readyz")
_OPEN = (*_PROBES, *dashboard.OPEN_PATHS)
# Never rate limited nor counted in flight (but they need a token, /metrics unless opened): the
# dashboard's event stream lasts as long as its page is open.
_OPERATIONS = frozenset((*_PROBES, "/metrics", "/openapi.json", "/asyncapi.json", *dashboard.PATHS))
_READ_METHODS = ("GET", "HEAD")
_NONE, _READ, _WRITE = 0, 1, 2


SESSION_S = 12 * 3600  # a dashboard session lasts this long; then the token is asked for again


def _mac(token: bytes, expires: int) -> str:
    return hmac.new(token, b"jetsource-dashboard-session:%d" % expires, hashlib.sha256).hexdigest()


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class Guards:
    """The edge's admission middleware. With any token configured every route but the probes
    needs one (and /metrics, unless `metrics_open`); read-only tokens may only GET/HEAD."""

    def __init__(self, max_inflight: int, rate_per_s: float, tokens: tuple[str, ...],
                 read_tokens: tuple[str, ...] = (), metrics_open: bool = False) -> None:
        self._max_inflight = max_inflight
        self.inflight = 0
        self._rate = rate_per_s
        self._burst = max(rate_per_s, 1.0)
        self._buckets: dict[str, _Bucket] = {}
        self._tokens = tuple((t.encode(), _WRITE) for t in tokens if t) + tuple(
            (t.encode(), _READ) for t in read_tokens if t)
        self._open = _OPEN + (("/metrics",) if metrics_open else ())

    def configure(self, *, max_inflight: int | None = None, rate_per_s: float | None = None) -> None:
        """Change the limits of a running edge (live configuration)."""
        if max_inflight is not None:
            self._max_inflight = max_inflight
        if rate_per_s is not None:
            self._rate = rate_per_s
            self._burst = max(rate_per_s, 1.0)
            for bucket in self._buckets.values():
                bucket.tokens = min(bucket.tokens, self._burst)

    def _grant(self, request: web.Request) -> int:
        """What the request's bearer token allows: _NONE, _READ or _WRITE. Without one, the
        dashboard's cookie: for reads, and for writes that carry its header (which a page of
        another site cannot send without a CORS preflight, which the edge never answers)."""
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            return self._match(credentials.strip().encode(errors="surrogateescape"))  # any bytes sent
        cookie = request.cookies.get(dashboard.COOKIE)
        if cookie and (request.method in _READ_METHODS or request.headers.get(dashboard.CSRF_HEADER) == "1"):
            return self._session_grant(cookie)
        return _NONE

    def session_cookie(self, token: bytes, expires: int) -> str:
        """The dashboard's session: when it ends, and a MAC of that under the token — not the
        token itself (a cookie goes to every port of its host), and any edge with the same
        tokens accepts it, with no state kept."""
        return f"{expires}.{_mac(token, expires)}"

    def _session_grant(self, cookie: str) -> int:
        expires_text, _, mac = cookie.partition(".")
        try:
            expires = int(expires_text)
        except ValueError:
            return _NONE
        if expires < time.time():
            return _NONE
        given = mac.encode(errors="surrogateescape")
        grant = _NONE
        for token, level in self._tokens:  # every token, no early exit (as `_match`)
            grant = max(grant, level * hmac.compare_digest(given, _mac(token, expires).encode()))
        return grant

    def _match(self, given: bytes) -> int:
        grant = _NONE
        for token, level in self._tokens:
            # Every token is compared, without an early exit: the time taken does not tell
            # whether (or which) one matched.
            grant = max(grant, level * hmac.compare_digest(given, token))
        return grant

    def _refusal(self, request: web.Request) -> web.Response | None:
        if not self._tokens or request.path in self._open:
            return None
        grant = self._grant(request)
        if grant == _NONE and request.path == "/dashboard" and request.method in _READ_METHODS:
            raise web.HTTPSeeOther("/dashboard/login")  # a browser: to the page that asks for a token
        if grant == _NONE:
            return json_error(401, "unauthorized", "this route needs 'Authorization: Bearer <token>'",
                              headers={"WWW-Authenticate": "Bearer"})
        if grant == _READ and request.method not in _READ_METHODS:
            return json_error(403, "forbidden", "this token may only read (GET, HEAD)")
        return None

    async def session(self, request: web.Request) -> web.Response:
        """`POST /dashboard/session` with `token` (the login page's form, or JSON): a valid token
        comes back as the dashboard's cookie (HttpOnly, SameSite=Strict), for the page and its
        event stream. The form is sent on to the dashboard, or back to the login page."""
        form = request.content_type == "application/x-www-form-urlencoded"
        try:
            body: Any = await request.post() if form else await request.json()
            token = body.get("token") if hasattr(body, "get") else None
        except ValueError:
            token = None
        if not isinstance(token, str) or not token.strip():
            if form:
                return web.Response(status=303, headers={"Location": "/dashboard/login"})
            raise ValidationError('the body is {"token": "<one of the edge\'s API tokens>"}', field="token")
        secret = token.strip().encode()
        grant = self._match(secret) if self._tokens else _NONE
        if form:
            ok = not self._tokens or grant != _NONE
            response = web.Response(status=303, headers={"Location": "/dashboard" if ok else "/dashboard/login"})
        elif not self._tokens:
            return web.json_response({"session": "open", "grant": "write"})  # an open edge needs none
        elif grant == _NONE:
            return json_error(401, "unauthorized", "that is not one of the edge's tokens")
        else:
            response = web.json_response({"session": "cookie", "grant": "write" if grant == _WRITE else "read"})
        if grant == _NONE:
            return response
        response.set_cookie(dashboard.COOKIE, self.session_cookie(secret, int(time.time()) + SESSION_S),
                            max_age=SESSION_S, httponly=True, samesite="Strict", path="/", secure=request.secure)
        return response

    def _admit_rate(self, client: str) -> None:
        now = time.monotonic()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) > 100_000:
                self._buckets.clear()
            bucket = self._buckets[client] = _Bucket(self._burst, now)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
        bucket.stamp = now
        if bucket.tokens < 1:
            raise RateLimitedError(f"more than {self._rate:g} requests per second from {client}")
        bucket.tokens -= 1

    def admit(self, request: web.Request) -> web.Response | None:
        """None to let the request in (count it as in flight), else the refusal."""
        refusal = self._refusal(request)
        if refusal is not None or request.path in _OPERATIONS:
            return refusal
        if self._rate > 0:
            self._admit_rate(request.remote or "unknown")
        if self.inflight >= self._max_inflight:
            raise UnavailableError(f"overloaded: {self.inflight} requests in flight")
        return None
