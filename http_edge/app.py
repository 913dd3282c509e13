"""The aiohttp application: routes → NATS commands and queries → HTTP statuses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web
from nats.aio.client import Client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bus import subjects as h
from bus.client import call
from bus.codec import decode_json, encode
from bus.errors import DeadlineError, UnavailableError, ValidationError
from bus.eventstore import EventStore, appended
from bus.ids import IdSource
from bus.subjects import Context
from http_edge.errors import json_error, to_response
from http_edge.guards import Guards
from http_edge.openapi import openapi_document


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    """What the edge needs to know, nothing more."""

    request_timeout: float = 5.0
    read_wait_timeout: float = 2.0
    max_body_bytes: int = 64 * 1024
    max_inflight: int = 2048
    rate_limit_per_s: float = 0.0
    api_tokens: tuple[str, ...] = ()
    api_read_tokens: tuple[str, ...] = ()
    metrics_open: bool = False


class _Written(msgspec.Struct):
    version: int
    seq: int
    order_id: str | None = None
    task_id: str | None = None


_written = msgspec.json.Decoder(_Written)

NATS: web.AppKey[Client] = web.AppKey("nats", Client)
ORDERS: web.AppKey[Context] = web.AppKey("orders", Context)
TASKS: web.AppKey[Context] = web.AppKey("tasks", Context)
ORDER_EVENTS: web.AppKey[EventStore] = web.AppKey("order_events", EventStore)
TASK_EVENTS: web.AppKey[EventStore] = web.AppKey("task_events", EventStore)
CONFIG: web.AppKey[EdgeConfig] = web.AppKey("config", EdgeConfig)


class Metrics:
    """Prometheus metrics of one edge process (label children cached: this is the hot path)."""

    def __init__(self, inflight: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
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
TRACE_ID: web.RequestKey[str] = web.RequestKey("trace_id", str)


def _command_headers(request: web.Request) -> dict[str, str]:
    headers: dict[str, str] = {}
    key = request.headers.get("Idempotency-Key")
    if key is not None:
        headers[h.IDEMPOTENCY_KEY] = key
    if_match = request.headers.get("If-Match")
    if if_match is not None:
        headers[h.EXPECTED_VERSION] = if_match.removeprefix("W/").strip().strip('"')
    headers[h.TRACE_ID] = request[TRACE_ID]
    return headers


def _min_seq(request: web.Request) -> int | None:
    raw = request.query.get("min_seq") or request.headers.get("X-Min-Sequence")
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError("min_seq must be an integer", field="min_seq") from None
    if value < 0:
        raise ValidationError("min_seq must be >= 0", field="min_seq")
    return value


async def _json_object(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    body = decode_json(raw)
    if not isinstance(body, dict):
        raise ValidationError("request body must be a JSON object")
    return body


def _written_response(request: web.Request, reply: bytes, status: int) -> web.Response:
    info = _written.decode(reply)
    headers = {"ETag": f'"{info.version}"', "X-Stream-Sequence": str(info.seq), "X-Trace-Id": request[TRACE_ID]}
    if status == 201 and info.order_id:
        headers["Location"] = f"/orders/{info.order_id}"
    if status == 202 and info.task_id:
        headers["Location"] = f"/tasks/{info.task_id}"
    return web.Response(status=status, body=reply, content_type="application/json", headers=headers)


async def _command(request: web.Request, name: str, body: bytes, ctx: web.AppKey[Context] = ORDERS) -> bytes:
    app = request.app
    try:
        return await call(
            app[NATS], app[ctx].command(name), body,
            headers=_command_headers(request), timeout=app[CONFIG].request_timeout,
        )
    except DeadlineError as exc:
        # The command may have been stored just before its deadline (the actor stores nothing
        # after it): only a retry under the same key tells, and it never stores twice.
        raise DeadlineError(f"{exc.message}; the outcome is unknown: retry with the same Idempotency-Key "
                            "(a retried request is never stored twice and gets the first answer)") from None


async def _order_command(request: web.Request, name: str, extra: dict[str, Any] | None = None) -> web.Response:
    body = await _json_object(request)
    body.update(extra or {})
    body["order_id"] = request.match_info["order_id"]
    reply = await _command(request, name, encode(body))
    return _written_response(request, reply, 200)


# ---- order routes ---------------------------------------------------------------------------------


async def place_order(request: web.Request) -> web.Response:
    reply = await _command(request, "place", await request.read())
    return _written_response(request, reply, 201)


async def add_item(request: web.Request) -> web.Response:
    return await _order_command(request, "add_item")


async def remove_item(request: web.Request) -> web.Response:
    return await _order_command(request, "remove_item", {"sku": request.match_info["sku"]})


def _transition(name: str) -> Any:
    async def handler(request: web.Request) -> web.Response:
        return await _order_command(request, name)

    handler.__name__ = f"{name}_order"
    return handler


async def _query(request: web.Request, name: str, query: dict[str, Any], ctx: web.AppKey[Context] = ORDERS) -> bytes:
    app = request.app
    timeout = app[CONFIG].request_timeout + (app[CONFIG].read_wait_timeout if query.get("min_seq") else 0)
    return await call(app[NATS], app[ctx].query(name), encode(query), timeout=timeout)


def _list_query(request: web.Request, keys: tuple[str, ...]) -> dict[str, Any]:
    query: dict[str, Any] = {k: request.query[k] for k in keys if k in request.query}
    if "limit" in request.query:
        try:
            query["limit"] = int(request.query["limit"])
        except ValueError:
            raise ValidationError("limit must be an integer", field="limit") from None
    if (min_seq := _min_seq(request)) is not None:
        query["min_seq"] = min_seq
    return query


class _Version(msgspec.Struct):
    version: int


async def _get_one(request: web.Request, id_key: str, ctx: web.AppKey[Context]) -> web.Response:
    """One aggregate's read-model view, with its version as the ETag."""
    query: dict[str, Any] = {id_key: request.match_info[id_key]}
    if (min_seq := _min_seq(request)) is not None:
        query["min_seq"] = min_seq
    reply = await _query(request, "get", query, ctx)
    version = msgspec.json.decode(reply, type=_Version).version
    return web.Response(body=reply, content_type="application/json", headers={"ETag": f'"{version}"'})


async def get_order(request: web.Request) -> web.Response:
    return await _get_one(request, "order_id", ORDERS)


async def list_orders(request: web.Request) -> web.Response:
    query = _list_query(request, ("status", "customer_id", "cursor"))
    return web.Response(body=await _query(request, "list", query), content_type="application/json")


class EventOut(msgspec.Struct, frozen=True, kw_only=True):
    """One stored event as `GET /orders/{id}/events` shows it."""

    seq: int
    time: str
    type: str
    event: msgspec.Raw
    command_id: str | None = None
    trace_id: str | None = None
    correlation_id: str | None = None


class _Tag(msgspec.Struct):
    """What history shows of an event without knowing its context's types: its tag and the
    aggregate it names."""

    type: str = ""
    order_id: str | None = None
    task_id: str | None = None


_tag = msgspec.json.Decoder(_Tag)


def event_out(stored: Any, id_key: str, aggregate_id: str) -> EventOut | None:
    """One stored event as history shows it; None for a message that is not one of this
    aggregate's appended events (a reply NATS was made to store on its subject, or a body that
    is not JSON, which a projection parks): history shows what the aggregate folds."""
    if not appended(stored.headers):
        return None
    try:
        tag = _tag.decode(stored.data)
    except msgspec.DecodeError:
        return None
    if getattr(tag, id_key) != aggregate_id:
        return None
    return EventOut(
        seq=stored.seq, time=stored.headers.get(h.EV_TIME, stored.time), type=tag.type,
        event=msgspec.Raw(stored.data), command_id=stored.headers.get(h.EV_COMMAND_ID),
        trace_id=stored.headers.get(h.EV_TRACE_ID), correlation_id=stored.headers.get(h.EV_CORRELATION_ID),
    )


async def _history(request: web.Request, id_key: str, ctx: web.AppKey[Context], store: web.AppKey[EventStore]) -> web.Response:
    aggregate_id = request.match_info[id_key]
    if not h.valid_token(aggregate_id):
        raise ValidationError(f"{id_key} must be 1..64 letters, digits, '-' or '_'", field=id_key)
    stored = await request.app[store].load(request.app[ctx].events(aggregate_id))
    events = [out for e in stored if (out := event_out(e, id_key, aggregate_id)) is not None]
    if not events:
        return json_error(404, "not_found", f"{request.app[ctx].name[:-1]} {aggregate_id} has no events")
    body = {id_key: aggregate_id, "events": events}
    return web.Response(body=encode(body), content_type="application/json")


async def order_events(request: web.Request) -> web.Response:
    return await _history(request, "order_id", ORDERS, ORDER_EVENTS)


# ---- task routes ----------------------------------------------------------------------------------


async def submit_task(request: web.Request) -> web.Response:
    reply = await _command(request, "submit", await request.read(), TASKS)
    return _written_response(request, reply, 202)


def _task_command(name: str) -> Any:
    async def handler(request: web.Request) -> web.Response:
        body = await _json_object(request)
        body["task_id"] = request.match_info["task_id"]
        reply = await _command(request, name, encode(body), TASKS)
        return _written_response(request, reply, 200)

    handler.__name__ = f"{name}_task"
    return handler


async def get_task(request: web.Request) -> web.Response:
    return await _get_one(request, "task_id", TASKS)


async def list_tasks(request: web.Request) -> web.Response:
    query = _list_query(request, ("status", "type", "priority", "cursor"))
    return web.Response(body=await _query(request, "list", query, TASKS), content_type="application/json")


async def task_stats(request: web.Request) -> web.Response:
    query = _list_query(request, ())
    return web.Response(body=await _query(request, "stats", query, TASKS), content_type="application/json")


async def task_events(request: web.Request) -> web.Response:
    return await _history(request, "task_id", TASKS, TASK_EVENTS)


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
        await asyncio.wait_for(nc.jetstream().stream_info(request.app[ORDERS].stream), READY_PING_S)
    except Exception:
        raise UnavailableError("JetStream or the order stream is not available") from None
    return web.json_response({"status": "ready", "nats": nc.connected_url.netloc if nc.connected_url else None})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=openapi_document(), content_type="application/json")


def create_app(nc: Client, orders: Context, tasks: Context, config: EdgeConfig) -> web.Application:
    """Build the edge application around an injected NATS connection."""
    guards = Guards(config.max_inflight, config.rate_limit_per_s, config.api_tokens, config.api_read_tokens,
                    config.metrics_open)
    metrics_ = Metrics(lambda: guards.inflight)

    @web.middleware
    async def edge(request: web.Request, handler: Any) -> web.StreamResponse:
        """Trace id, admission, the error catch-all and metrics, in one layer."""
        trace_id = request.headers.get("X-Trace-Id") or request.headers.get("X-Request-Id") or ""
        if not h.valid_token(trace_id):  # it is copied into every stored event: 1..128 safe characters
            trace_id = _trace_id()
        request[TRACE_ID] = trace_id
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
    app[ORDERS] = orders
    app[TASKS] = tasks
    app[ORDER_EVENTS] = EventStore(nc, orders.stream, timeout=config.request_timeout)
    app[TASK_EVENTS] = EventStore(nc, tasks.stream, timeout=config.request_timeout)
    app[CONFIG] = config
    app[METRICS] = metrics_
    app.router.add_post("/orders", place_order)
    app.router.add_get("/orders", list_orders)
    app.router.add_get("/orders/{order_id}", get_order)
    app.router.add_post("/orders/{order_id}/items", add_item)
    app.router.add_delete("/orders/{order_id}/items/{sku}", remove_item)
    for name in ("confirm", "pay", "ship", "cancel"):
        app.router.add_post(f"/orders/{{order_id}}/{name}", _transition(name))
    app.router.add_get("/orders/{order_id}/events", order_events)
    app.router.add_post("/tasks", submit_task)
    app.router.add_get("/tasks", list_tasks)
    app.router.add_get("/tasks/stats", task_stats)
    app.router.add_get("/tasks/{task_id}", get_task)
    app.router.add_post("/tasks/{task_id}/cancel", _task_command("cancel"))
    app.router.add_post("/tasks/{task_id}/retry", _task_command("retry"))
    app.router.add_get("/tasks/{task_id}/events", task_events)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    return app


_ids = IdSource()


def _trace_id() -> str:
    return _ids.next()


__all__ = ["EdgeConfig", "create_app"]
