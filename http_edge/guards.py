"""Admission control at the edge: bearer auth for writes, per-client rate limits, and a bound
on requests in flight (503 + Retry-After instead of queueing without end). Applied by the
edge's middleware (`http_edge.app`)."""

from __future__ import annotations

import hmac
import time
from aiohttp import web

from bus.errors import RateLimitedError, UnavailableError
from http_edge.errors import json_error

_OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/openapi.json")


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class Guards:
    """The edge's admission middleware."""

    def __init__(self, max_inflight: int, rate_per_s: float, tokens: tuple[str, ...]) -> None:
        self._max_inflight = max_inflight
        self.inflight = 0
        self._rate = rate_per_s
        self._burst = max(rate_per_s, 1.0)
        self._buckets: dict[str, _Bucket] = {}
        self._tokens = tuple(t.encode() for t in tokens if t)

    def _authorized(self, request: web.Request) -> bool:
        if not self._tokens or request.method in ("GET", "HEAD", "OPTIONS"):
            return True
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return False
        given = auth[7:].strip().encode()
        return any(hmac.compare_digest(given, t) for t in self._tokens)

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
        if request.path in _OPEN_PATHS:
            return None
        if not self._authorized(request):
            return json_error(401, "unauthorized", "writes need 'Authorization: Bearer <token>'",
                              headers={"WWW-Authenticate": "Bearer"})
        if self._rate > 0:
            self._admit_rate(request.remote or "unknown")
        if self.inflight >= self._max_inflight:
            raise UnavailableError(f"overloaded: {self.inflight} requests in flight")
        return None
