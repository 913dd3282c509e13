"""Admission control at the edge: bearer auth (read-only and read-write tokens), per-client rate
limits, and a bound on requests in flight (503 + Retry-After instead of queueing without end).
Applied by the edge's middleware (`http_edge.app`)."""

from __future__ import annotations

import hmac
import time
from aiohttp import web

from bus.errors import RateLimitedError, UnavailableError
from http_edge.errors import json_error

# Probes must answer without credentials (load balancers, orchestrators).
_PROBES = ("/healthz", "/readyz")
# Never rate limited nor counted in flight (but they need a token, /metrics unless opened).
_OPERATIONS = (*_PROBES, "/metrics", "/openapi.json", "/asyncapi.json")
_READ_METHODS = ("GET", "HEAD")
_NONE, _READ, _WRITE = 0, 1, 2


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
        self._open = _PROBES + (("/metrics",) if metrics_open else ())

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
        """What the request's bearer token allows: _NONE, _READ or _WRITE."""
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return _NONE
        given = credentials.strip().encode()
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
        if grant == _NONE:
            return json_error(401, "unauthorized", "this route needs 'Authorization: Bearer <token>'",
                              headers={"WWW-Authenticate": "Bearer"})
        if grant == _READ and request.method not in _READ_METHODS:
            return json_error(403, "forbidden", "this token may only read (GET, HEAD)")
        return None

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
