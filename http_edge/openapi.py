"""`/openapi.json`, generated from the message Structs so it cannot drift from the wire. Each
context declares its own paths (`BoundedContext.openapi`) with the helpers here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from bus.wire import ErrorReply

OpenApi = Callable[[], tuple[dict[str, Any], list[type]]]
API_VERSION = "0.2.0"  # of both descriptions: this document and the NATS API's (AsyncAPI)


def ref(t: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{t.__name__}"}


def json_body(t: type) -> dict[str, Any]:
    return {"application/json": {"schema": ref(t)}}


def errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": "coded error", "content": json_body(ErrorReply)} for s in statuses}


def path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


WRITE_HEADERS = [
    {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"},
     "description": "a retried request with the same key stores nothing twice and gets the same answer"},
    {"name": "If-Match", "in": "header", "schema": {"type": "string"},
     "description": "expected version (ETag, or * for any current version); 412 when the aggregate moved on"},
]
MIN_SEQ = {"name": "min_seq", "in": "query", "schema": {"type": "integer"},
           "description": "wait (bounded) until the read model has applied this stream sequence"}


def history_paths(prefix: str, noun: str, ident: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI of `kit.history_routes`: `{prefix}/events` and `{prefix}/state`."""
    def query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "schema": schema, "description": description}

    time = {"type": "string", "format": "date-time"}
    return {
        f"{prefix}/events": {"get": {
            "summary": f"The {noun}'s event history, from JetStream (each event upcast to its current version, "
                       "or as stored with form=stored)",
            "parameters": [ident,
                           query("from_seq", {"type": "integer", "minimum": 1}, "from this stream sequence on"),
                           query("since", time, "events stored at or after this time"),
                           query("limit", {"type": "integer", "minimum": 1, "maximum": 10_000},
                                 "at most this many; `next_from_seq` asks for the next page"),
                           query("form", {"type": "string", "enum": ["current", "stored"]},
                                 "current (default): upcast to the current schema; stored: as stored")],
            "responses": {"200": {"description": "events in stream order"}, **errors(404, 422)},
        }},
        f"{prefix}/state": {"get": {
            "summary": f"The {noun}'s state folded from its events (not the read model), now or at a version "
                       "or time, with the version and time it reflects",
            "parameters": [ident,
                           query("at_version", {"type": "integer", "minimum": 1},
                                 "as of this version (a stream sequence; beyond the last: 422)"),
                           query("at_time", time, "as of this time (before the first event: 404)")],
            "responses": {"200": {"description": "{id, version, time, events, state}"}, **errors(404, 422)},
        }},
    }


def write(summary: str, reply: type, body: type | None, ok: int = 200, *, ident: dict[str, Any] | None = None,
          more: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """A command route: `ident` is the aggregate's path parameter (none when it creates one)."""
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": ([ident] if ident else []) + list(more) + WRITE_HEADERS,
        "responses": {str(ok): {"description": "accepted; ETag is the new version", "content": json_body(reply)},
                      **errors(400, 401, 403, 404, 409, 412, 413, 422, 429, 503, 504)},
    }
    if body is not None:
        op["requestBody"] = {"required": ok == 201, "content": json_body(body)}
    return op


_OPERATIONS = {
    "/healthz": {"get": {"summary": "Liveness", "security": [], "responses": {"200": {"description": "alive"}}}},
    "/readyz": {"get": {"summary": "Readiness (NATS and JetStream reachable); `circuits` lists the subjects whose "
                                   "breaker is open or half-open, which leave the edge ready", "security": [],
                        "responses": {"200": {"description": "ready"}, **errors(503)}}},
    "/metrics": {"get": {"summary": "Prometheus metrics (without a token when JETSOURCE_METRICS_OPEN)",
                         "responses": {"200": {"description": "text format"}}}},
    "/openapi.json": {"get": {"summary": "This document (OpenAPI 3.1)",
                              "responses": {"200": {"description": "application/json"}}}},
    "/asyncapi.json": {"get": {"summary": "The NATS API: commands, queries and events of every context (AsyncAPI 3.0)",
                               "responses": {"200": {"description": "application/json"}}}},
}


def openapi_document(parts: Sequence[OpenApi]) -> bytes:
    """The document of every declared context's paths plus the operational ones."""
    paths: dict[str, Any] = {}
    types: list[type] = [ErrorReply]
    for part in parts:
        more, structs = part()
        paths.update(more)
        types.extend(t for t in structs if t not in types)
    paths.update(_OPERATIONS)
    names = [t.__name__ for t in types]
    if len(set(names)) != len(names):  # the paths refer to schemas by class name
        clashes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"two contexts' OpenAPI Structs share a class name: {clashes}; rename one")
    _, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    return msgspec.json.encode(
        {"openapi": "3.1.0", "info": {"title": "jetsource", "version": API_VERSION}, "paths": paths,
         # With tokens configured every other route needs one (401; a read-only token writing: 403);
         # without, the edge is open: hence the empty alternative.
         "security": [{"bearer": []}, {}],
         "components": {"schemas": components,
                        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}
    )
