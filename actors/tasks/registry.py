"""Task types are registered handlers. Built-ins: echo, sleep, fail, flaky, http.request and the
order fulfilment type. Users add their own by module path (setting `task_modules`) or by the
`jetsource.tasks` entry-point group; either way a module exposes `register(registry)`."""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp


class TaskFailure(Exception):
    """Raised by a handler to fail the attempt with a message (it will be retried)."""


@dataclass
class TaskContext:
    """What a handler gets: the task, and a way to report progress."""

    task_id: str
    attempt: int
    payload: Any
    report: Callable[[float, str], Awaitable[None]]

    async def progress(self, percent: float, message: str = "") -> None:
        """Report progress (0..100); visible in GET /tasks/{id} and on tasks.live.progress.<id>."""
        await self.report(percent, message)


Handler = Callable[[TaskContext], Awaitable[Any]]


class TaskRegistry:
    """Task type name → handler."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, name: str, handler: Handler | None = None) -> Any:
        """`registry.register("name", fn)` or `@registry.register("name")`."""
        if handler is not None:
            self._handlers[name] = handler
            return handler

        def decorate(fn: Handler) -> Handler:
            self._handlers[name] = fn
            return fn

        return decorate

    def get(self, name: str) -> Handler | None:
        return self._handlers.get(name)

    def names(self) -> frozenset[str]:
        return frozenset(self._handlers)


# ---- built-ins --------------------------------------------------------------------------------------


async def echo(ctx: TaskContext) -> Any:
    return ctx.payload


async def sleep(ctx: TaskContext) -> Any:
    seconds = float((ctx.payload or {}).get("seconds", 1.0))
    steps = max(1, min(20, int(seconds * 4)))
    for i in range(steps):
        await asyncio.sleep(seconds / steps)
        await ctx.progress(100 * (i + 1) / steps, f"slept {seconds * (i + 1) / steps:.2f}s")
    return {"slept": seconds}


async def fail(ctx: TaskContext) -> Any:
    raise TaskFailure(str((ctx.payload or {}).get("error", "failed on purpose")))


async def flaky(ctx: TaskContext) -> Any:
    """Fails the first `fail_times` attempts, then succeeds."""
    if ctx.attempt <= int((ctx.payload or {}).get("fail_times", 1)):
        raise TaskFailure(f"flaky failure on attempt {ctx.attempt}")
    return {"succeeded_on_attempt": ctx.attempt}


async def http_request(ctx: TaskContext) -> Any:
    """An HTTP call: payload {method, url, json?, headers?, timeout_s?}; 5xx and errors fail."""
    p = ctx.payload or {}
    if not isinstance(p, dict) or not isinstance(p.get("url"), str):
        raise TaskFailure("payload needs a url")
    timeout = aiohttp.ClientTimeout(total=float(p.get("timeout_s", 10)))
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            async with http.request(p.get("method", "GET"), p["url"], json=p.get("json"), headers=p.get("headers")) as resp:
                body = await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TaskFailure(f"request failed: {type(exc).__name__}: {exc}") from None
    if resp.status >= 500:
        raise TaskFailure(f"server answered {resp.status}")
    return {"status": resp.status, "body": body[:10_000]}


async def fulfil_order(ctx: TaskContext) -> Any:
    """Pick, pack and hand over an order (simulated warehouse steps with progress)."""
    p = ctx.payload or {}
    for percent, step in ((30, "picked"), (70, "packed"), (100, "handed to carrier")):
        await asyncio.sleep(float(p.get("step_s", 0.01)))
        await ctx.progress(percent, step)
    return {"order_id": p.get("order_id"), "carrier": "jetsource-post", "tracking": f"JS{ctx.task_id[:12].upper()}"}


FULFIL_ORDER = "order.fulfil"


def build_registry(modules: str = "") -> TaskRegistry:
    """Built-ins, then entry points (`jetsource.tasks`), then modules named in settings."""
    registry = TaskRegistry()
    for name, handler in (("echo", echo), ("sleep", sleep), ("fail", fail), ("flaky", flaky),
                          ("http.request", http_request), (FULFIL_ORDER, fulfil_order)):
        registry.register(name, handler)
    for ep in importlib.metadata.entry_points(group="jetsource.tasks"):
        ep.load()(registry)
    for module in (m.strip() for m in modules.split(",") if m.strip()):
        importlib.import_module(module).register(registry)
    return registry
