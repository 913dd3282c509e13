"""The tasks context's HTTP routes and their OpenAPI paths."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from actors.tasks.messages import CancelTask, SubmitTask, TaskAccepted, TaskPage, TaskStatsView, TaskView
from actors.tasks.registry import FailPayload, FlakyPayload, HttpRequestPayload, SleepPayload
from http_edge import kit
from http_edge.openapi import MIN_SEQ, WRITE_HEADERS, errors, history_paths, json_body, path_param

TASKS = "tasks"
# The public built-in task types' payloads (checked at submit); internal types are not listed.
PAYLOADS = {"sleep": SleepPayload, "flaky": FlakyPayload, "fail": FailPayload, "http.request": HttpRequestPayload}


def routes(router: web.UrlDispatcher) -> None:
    router.add_post("/tasks", kit.create(TASKS, "submit", "/tasks", "task_id", status=202))
    router.add_get("/tasks", kit.listing(TASKS, filters=("status", "type", "priority", "cursor")))
    router.add_get("/tasks/stats", kit.listing(TASKS, "stats"))
    router.add_get("/tasks/{task_id}", kit.get_one(TASKS, "task_id"))
    router.add_post("/tasks/{task_id}/cancel", kit.change(TASKS, "cancel", "task_id"))
    router.add_post("/tasks/{task_id}/retry", kit.change(TASKS, "retry", "task_id"))
    kit.history_routes(router, TASKS, "/tasks/{task_id}", "task_id", "task")


def openapi() -> tuple[dict[str, Any], list[type]]:
    tid = path_param("task_id")
    paths = {
        "/tasks": {
            "post": {
                "summary": "Submit a task (type, payload, priority, delay_s | run_at, timeout_s, retry)",
                "description": "The payload is checked against its type's schema: "
                               + ", ".join(f"{name} → {t.__name__}" for name, t in PAYLOADS.items())
                               + "; echo and types without a schema take any JSON. run_at is at most 30 days ahead.",
                "parameters": WRITE_HEADERS[:1],
                "requestBody": {"required": True, "content": json_body(SubmitTask)},
                "responses": {"202": {"description": "accepted; Location is the task", "content": json_body(TaskAccepted)},
                              **errors(400, 401, 403, 413, 422, 429, 503, 504)},
            },
            "get": {
                "summary": "List tasks (newest first, keyset pagination)",
                "parameters": [
                    {"name": "status", "in": "query", "schema": {"type": "string"}},
                    {"name": "type", "in": "query", "schema": {"type": "string"}},
                    {"name": "priority", "in": "query", "schema": {"type": "string", "enum": ["high", "normal", "low"]}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                    {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                    MIN_SEQ,
                ],
                "responses": {"200": {"description": "a page", "content": json_body(TaskPage)}, **errors(422, 503, 504)},
            },
        },
        "/tasks/stats": {"get": {"summary": "Counts by status and priority, queue depth, oldest waiting",
                                 "responses": {"200": {"description": "stats", "content": json_body(TaskStatsView)},
                                               **errors(503, 504)}}},
        "/tasks/{task_id}": {"get": {
            "summary": "One task from the read model (status, attempt, progress, result, error)",
            "parameters": [tid, MIN_SEQ],
            "responses": {"200": {"description": "the task", "content": json_body(TaskView)}, **errors(404, 422, 503, 504)},
        }},
        "/tasks/{task_id}/cancel": {"post": {
            "summary": "Cancel: a pending task never runs; a running one is signalled",
            "parameters": [tid, *WRITE_HEADERS[:1]],
            "requestBody": {"required": False, "content": json_body(CancelTask)},
            "responses": {"200": {"description": "cancelled", "content": json_body(TaskAccepted)},
                          **errors(404, 409, 422, 503, 504)},
        }},
        "/tasks/{task_id}/retry": {"post": {
            "summary": "Bring a dead-lettered task back",
            "parameters": [tid, *WRITE_HEADERS[:1]],
            "responses": {"200": {"description": "requeued", "content": json_body(TaskAccepted)},
                          **errors(404, 409, 422, 503, 504)},
        }},
        **history_paths("/tasks/{task_id}", "task", tid),
    }
    return paths, [SubmitTask, CancelTask, TaskAccepted, TaskView, TaskPage, TaskStatsView, *PAYLOADS.values()]
