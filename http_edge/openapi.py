"""`/openapi.json`, generated from the message Structs so it cannot drift from the wire."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from actors.orders.messages import (
    AddItem,
    CancelOrder,
    OrderAccepted,
    OrderPage,
    OrderView,
    PayOrder,
    PlaceOrder,
    ShipOrder,
)
from actors.tasks.messages import CancelTask, SubmitTask, TaskAccepted, TaskPage, TaskStatsView, TaskView
from actors.tasks.registry import FailPayload, FlakyPayload, HttpRequestPayload, SleepPayload
from bus.runtime import ErrorReply

# The public built-in task types' payloads (checked at submit); internal types are not listed.
_PAYLOADS = {"sleep": SleepPayload, "flaky": FlakyPayload, "fail": FailPayload, "http.request": HttpRequestPayload}
_TYPES = [PlaceOrder, AddItem, PayOrder, ShipOrder, CancelOrder, OrderAccepted, OrderView, OrderPage, ErrorReply,
          SubmitTask, CancelTask, TaskAccepted, TaskView, TaskPage, TaskStatsView, *_PAYLOADS.values()]


def _ref(t: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{t.__name__}"}


def _json(t: type) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(t)}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": "coded error", "content": _json(ErrorReply)} for s in statuses}


_ID = {"name": "order_id", "in": "path", "required": True, "schema": {"type": "string"}}
_WRITE_HEADERS = [
    {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"},
     "description": "a retried request with the same key stores nothing twice and gets the same answer"},
    {"name": "If-Match", "in": "header", "schema": {"type": "string"},
     "description": "expected version (ETag); 412 when the order moved on"},
]
_MIN_SEQ = {"name": "min_seq", "in": "query", "schema": {"type": "integer"},
            "description": "wait (bounded) until the read model has applied this stream sequence"}


def _write(summary: str, body: type | None, ok: int = 200) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": ([_ID] if ok == 200 else []) + _WRITE_HEADERS,
        "responses": {str(ok): {"description": "accepted; ETag is the new version", "content": _json(OrderAccepted)},
                      **_errors(400, 401, 403, 404, 409, 412, 413, 422, 429, 503, 504)},
    }
    if body is not None:
        op["requestBody"] = {"required": ok == 201, "content": _json(body)}
    return op


@functools.cache
def openapi_document() -> bytes:
    _, components = msgspec.json.schema_components(_TYPES, ref_template="#/components/schemas/{name}")
    paths = {
        "/orders": {
            "post": _write("Place an order", PlaceOrder, ok=201),
            "get": {
                "summary": "List orders (newest first, keyset pagination)",
                "parameters": [
                    {"name": "status", "in": "query", "schema": {"type": "string"}},
                    {"name": "customer_id", "in": "query", "schema": {"type": "string"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    _MIN_SEQ,
                ],
                "responses": {"200": {"description": "a page", "content": _json(OrderPage)}, **_errors(422, 503, 504)},
            },
        },
        "/orders/{order_id}": {
            "get": {
                "summary": "One order from the read model",
                "parameters": [_ID, _MIN_SEQ],
                "responses": {"200": {"description": "the order", "content": _json(OrderView)}, **_errors(404, 422, 503, 504)},
            }
        },
        "/orders/{order_id}/items": {"post": _write("Add an item", AddItem)},
        "/orders/{order_id}/items/{sku}": {
            "delete": {**_write("Remove an item", None),
                       "parameters": [_ID, {"name": "sku", "in": "path", "required": True, "schema": {"type": "string"}}, *_WRITE_HEADERS]}
        },
        "/orders/{order_id}/confirm": {"post": _write("Confirm the order", None)},
        "/orders/{order_id}/pay": {"post": _write("Pay the order total", PayOrder)},
        "/orders/{order_id}/ship": {"post": _write("Ship a paid order", ShipOrder)},
        "/orders/{order_id}/cancel": {"post": _write("Cancel an order that has not shipped", CancelOrder)},
        "/orders/{order_id}/events": {
            "get": {"summary": "The order's event history, from JetStream", "parameters": [_ID],
                    "responses": {"200": {"description": "events in order"}, **_errors(404, 422)}}
        },
        "/tasks": {
            "post": {
                "summary": "Submit a task (type, payload, priority, delay_s | run_at, timeout_s, retry)",
                "description": "The payload is checked against its type's schema: "
                               + ", ".join(f"{name} → {t.__name__}" for name, t in _PAYLOADS.items())
                               + "; echo and types without a schema take any JSON. run_at is at most 30 days ahead.",
                "parameters": _WRITE_HEADERS[:1],
                "requestBody": {"required": True, "content": _json(SubmitTask)},
                "responses": {"202": {"description": "accepted; Location is the task", "content": _json(TaskAccepted)},
                              **_errors(400, 401, 403, 413, 422, 429, 503, 504)},
            },
            "get": {
                "summary": "List tasks (newest first, keyset pagination)",
                "parameters": [
                    {"name": "status", "in": "query", "schema": {"type": "string"}},
                    {"name": "type", "in": "query", "schema": {"type": "string"}},
                    {"name": "priority", "in": "query", "schema": {"type": "string", "enum": ["high", "normal", "low"]}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    _MIN_SEQ,
                ],
                "responses": {"200": {"description": "a page", "content": _json(TaskPage)}, **_errors(422, 503, 504)},
            },
        },
        "/tasks/stats": {"get": {"summary": "Counts by status and priority, queue depth, oldest waiting",
                                 "responses": {"200": {"description": "stats", "content": _json(TaskStatsView)}}}},
        "/tasks/{task_id}": {"get": {
            "summary": "One task from the read model (status, attempt, progress, result, error)",
            "parameters": [{**_ID, "name": "task_id"}, _MIN_SEQ],
            "responses": {"200": {"description": "the task", "content": _json(TaskView)}, **_errors(404, 422, 503, 504)},
        }},
        "/tasks/{task_id}/cancel": {"post": {
            "summary": "Cancel: a pending task never runs; a running one is signalled",
            "parameters": [{**_ID, "name": "task_id"}, *_WRITE_HEADERS[:1]],
            "requestBody": {"required": False, "content": _json(CancelTask)},
            "responses": {"200": {"description": "cancelled", "content": _json(TaskAccepted)}, **_errors(404, 409, 422)},
        }},
        "/tasks/{task_id}/retry": {"post": {
            "summary": "Bring a dead-lettered task back",
            "parameters": [{**_ID, "name": "task_id"}, *_WRITE_HEADERS[:1]],
            "responses": {"200": {"description": "requeued", "content": _json(TaskAccepted)}, **_errors(404, 409, 422)},
        }},
        "/tasks/{task_id}/events": {"get": {
            "summary": "The task's event history, from JetStream", "parameters": [{**_ID, "name": "task_id"}],
            "responses": {"200": {"description": "events in order"}, **_errors(404, 422)},
        }},
        "/healthz": {"get": {"summary": "Liveness", "security": [], "responses": {"200": {"description": "alive"}}}},
        "/readyz": {"get": {"summary": "Readiness (NATS and JetStream reachable)", "security": [],
                            "responses": {"200": {"description": "ready"}, **_errors(503)}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (without a token when JETSOURCE_METRICS_OPEN)",
                             "responses": {"200": {"description": "text format"}}}},
    }
    return msgspec.json.encode(
        {"openapi": "3.1.0", "info": {"title": "jetsource", "version": "0.1.0"}, "paths": paths,
         # With tokens configured every other route needs one (401; a read-only token writing: 403);
         # without, the edge is open: hence the empty alternative.
         "security": [{"bearer": []}, {}],
         "components": {"schemas": components,
                        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}
    )
