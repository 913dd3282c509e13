"""The aiohttp application: routes → NATS commands and queries → HTTP statuses."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from aiohttp import web
from nats.aio.client import Client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from actors.runtime import AggregateSpec
from bus import subjects as h
from bus import tracing
from bus.errors import UnavailableError
from bus.eventstore import PartitionedStore
from bus.ids import IdSource
from bus.subjects import Context
from http_edge.breaker import CLOSED, LEVEL, Breakers
from http_edge import dashboard
from http_edge.dashboard import DashboardConfig
from http_edge.errors import to_response
from http_edge.guards import Guards
from http_edge.kit import AGGREGATES, BREAKERS, CONFIG, CONTEXTS, NATS, SNAPSHOTS, STORES, TRACE_ID, EdgeConfig
from http_edge.openapi import OpenApi, openapi_document


class _Circuits(Collector):
    """The breakers' state and counts, read when scraped: a request pays nothing for them."""

    def __init__(self, breakers: Breakers) -> None:
        self._breakers = breakers

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state = GaugeMetricFamily("jetsource_edge_circuit_state",
                                  "each requested subject's circuit breaker: 0 closed, 1 half-open, 2 open",
                                  labels=["subject"])
        opened = CounterMetricFamily("jetsource_edge_circuit_opened",
                                     "times a subject's breaker opened (a failed probe opens it again)",
                                     labels=["subject"])
        refused = CounterMetricFamily("jetsource_edge_circuit_refused",
                                      "requests refused unsent because their subject's breaker was open",
                                      labels=["subject"])
        for circuit in self._breakers.states():
            state.add_metric([circuit.subject], LEVEL[circuit.state])
            opened.add_metric([circuit.subject], circuit.opened)
            refused.add_metric([circuit.subject], circuit.refused)
        yield from (state, opened, refused)


class Metrics:
    """Prometheus metrics of one edge process (label children cached: this is the hot path)."""

    def __init__(self, inflight: Callable[[], float], breakers: Breakers) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_Circuits(breakers))
        self._requests = Counter("jetsource_http_requests", "HTTP requests", ["route", "method", "status"], registry=self.registry)
        self._latency = Histogram(
            "jetsource_http_request_seconds", "HTTP request latency", ["route"], registry=self.registry,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        Gauge("jetsource_http_inflight", "HTTP requests in flight", registry=self.registry).set_function(inflight)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self._requests.labels(route, method, str(status)), self._latency.labels(route))
        children[0].inc()
        children[1].observe(seconds)


METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
OPENAPI: web.AppKey[bytes] = web.AppKey("openapi", bytes)
GUARDS: web.AppKey[Guards] = web.AppKey("guards", Guards)
ASYNCAPI: web.AppKey[bytes] = web.AppKey("asyncapi", bytes)


# ---- operations -----------------------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


READY_PING_S = 1  # a server that does not answer a ping this fast is not ready (stopped, overloaded)


async def readyz(request: web.Request) -> web.Response:
    nc = request.app[NATS]
    if not nc.is_connected:
        raise UnavailableError("not connected to NATS")
    try:
        await nc.flush(timeout=READY_PING_S)  # a PING answered by a PONG
    except Exception:
        raise UnavailableError(f"NATS did not answer a ping within {READY_PING_S:g}s") from None
    try:
        first = next(iter(request.app[CONTEXTS].values()))
        await asyncio.wait_for(nc.jetstream().stream_info(first.parts[0].stream), READY_PING_S)
    except Exception:
        raise UnavailableError("JetStream or the event streams are not available") from None
    # One subject's service being down leaves the edge ready (its other routes serve): such
    # circuits are listed, not a reason for 503.
    circuits = {c.subject: {"state": c.state, "retry_after_s": c.retry_after_s}
                for c in request.app[BREAKERS].states() if c.state != CLOSED}
    return web.json_response({"status": "ready", "nats": nc.connected_url.netloc if nc.connected_url else None,
                              "circuits": circuits})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def asyncapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[ASYNCAPI], content_type="application/json")


def create_app(
    nc: Client, contexts: Mapping[str, Context], config: EdgeConfig,
    routes: Sequence[Callable[[web.UrlDispatcher], None]], openapi_parts: Sequence[OpenApi] = (),
    aggregates: Mapping[str, AggregateSpec[Any, Any, Any]] | None = None, asyncapi_document: bytes | None = None,
    dashboard_config: DashboardConfig | None = None,
) -> web.Application:
    """Build the edge application around an injected NATS connection: each declared context's
    routes (`BoundedContext.routes`), plus health, readiness, metrics and OpenAPI; `aggregates`
    (each context's) serve time travel and history in the events' current shape;
    `asyncapi_document`, the NATS API's description (`infra.asyncapi`), is served as given;
    `dashboard_config` adds `/dashboard` (its recent lists only where a history route exists)."""
    guards = Guards(config.max_inflight, config.rate_limit_per_s, config.api_tokens, config.api_read_tokens,
                    config.metrics_open)
    breakers = Breakers(config.breaker_failures, config.breaker_cooldown_s)
    metrics_ = Metrics(lambda: guards.inflight, breakers)

    @web.middleware
    async def edge(request: web.Request, handler: Any) -> web.StreamResponse:
        """Trace id, admission, the error catch-all and metrics, in one layer."""
        headers = request.headers
        trace_id = headers.get("X-Trace-Id") or ""
        if not h.valid_token(trace_id):  # it is copied into every stored event: 1..128 safe characters
            trace_id = tracing.w3c_trace_id(headers.get("traceparent")) or headers.get("X-Request-Id") or ""
            if not h.valid_token(trace_id):
                trace_id = _trace_id()
        request[TRACE_ID] = trace_id
        tracing.follow(trace_id)
        start = time.perf_counter()
        response: web.StreamResponse | None
        try:
            response = guards.admit(request)
            if response is None:
                guards.inflight += 1
                try:
                    response = await handler(request)
                finally:
                    guards.inflight -= 1
        except Exception as exc:  # noqa: BLE001 - the edge's one catch-all, see to_response
            response = to_response(request, exc)
        resource = request.match_info.route.resource
        metrics_.observe(resource.canonical if resource else "unmatched", request.method, response.status,
                         time.perf_counter() - start)
        response.headers["X-Trace-Id"] = trace_id
        return response

    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[edge])
    app[NATS] = nc
    app[CONTEXTS] = dict(contexts)
    app[STORES] = {name: PartitionedStore.open(nc, ctx, timeout=config.request_timeout) for name, ctx in contexts.items()}
    app[AGGREGATES] = dict(aggregates or {})
    app[SNAPSHOTS] = {}
    app[CONFIG] = config
    app[BREAKERS] = breakers
    app[METRICS] = metrics_
    app[GUARDS] = guards
    app[OPENAPI] = openapi_document(openapi_parts)
    if asyncapi_document is not None:
        app[ASYNCAPI] = asyncapi_document
        app.router.add_get("/asyncapi.json", asyncapi)
    for add in routes:
        add(app.router)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    if dashboard_config is not None:
        paths = {r.canonical for r in app.router.resources()}
        recent = tuple(r for r in dashboard_config.recent if f"{r.prefix}/{{{r.id_field}}}/events" in paths)
        dashboard.setup(app, nc, app[CONTEXTS], breakers, dataclasses.replace(dashboard_config, recent=recent),
                        guards.session)
    return app


_ids = IdSource()


def _trace_id() -> str:
    return _ids.next()


__all__ = ["EdgeConfig", "create_app"]
