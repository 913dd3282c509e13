"""Task types are registered handlers. Built-ins: echo, sleep, fail, flaky, http.request and the
order fulfilment type. Users add their own by module path (setting `task_modules`) or by the
`jetsource.tasks` entry-point group; either way a module exposes `register(registry)`."""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import aiohttp
import msgspec

P = TypeVar("P")
log = logging.getLogger(__name__)


class TaskFailure(Exception):
    """Raised by a handler to fail the attempt with a message (it will be retried)."""


@dataclass
class TaskContext:
    """What a handler gets: the task, and a way to report progress."""

    task_id: str
    attempt: int
    payload: Any
    report: Callable[[float, str], Awaitable[None]]
    # The trace the task belongs to (what submitted it: an HTTP request, a process manager's
    # event); the handler's log lines carry it already. Pass it on in the `X-Trace-Id` of calls
    # the handler makes, to carry the trace further.
    trace_id: str | None = None

    async def progress(self, percent: float, message: str = "") -> None:
        """Report progress (0..100); visible in GET /tasks/{id} and on tasks.live.progress.<id>."""
        await self.report(percent, message)


Handler = Callable[[TaskContext], Awaitable[Any]]


@dataclass(frozen=True)
class TaskType:
    """What the task actor checks at submit: the payload's schema (any msgspec-decodable type;
    None = any payload) and whether only process managers may submit it (`internal`)."""

    name: str
    payload: Any = None
    internal: bool = False


class TaskRegistry:
    """Task type name → handler, payload schema and whether it is internal."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._types: dict[str, TaskType] = {}

    def register(self, name: str, handler: Handler | None = None, *, payload: Any = None,
                 internal: bool = False) -> Any:
        """`registry.register("name", fn)` or `@registry.register("name")`; `payload=` a schema
        checked at submit, `internal=True` for types only process managers submit.

        Registering a name again replaces its handler but keeps a schema and the internal flag
        registered before (an override, e.g. in tests, cannot widen what submit accepts)."""
        before = self._types.get(name)
        self._types[name] = TaskType(
            name, payload if payload is not None else (before.payload if before else None),
            internal or (before.internal if before else False))
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

    def types(self) -> Mapping[str, TaskType]:
        """Every registered type's submit rules, by name (what the task actor needs)."""
        return dict(self._types)


def read_payload(ctx: TaskContext, schema: type[P]) -> P:
    """The handler's payload as its schema's type. Submit validated it already; a task stored
    before its type had a schema may still not fit, which fails the attempt (no crash)."""
    try:
        return msgspec.convert({} if ctx.payload is None else ctx.payload, schema)
    except msgspec.ValidationError as exc:
        raise TaskFailure(f"payload does not fit the task type: {exc}") from None


# ---- built-in payloads --------------------------------------------------------------------------------


class Payload(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of the built-in task types' payloads (a missing payload is `{}`)."""


class SleepPayload(Payload, frozen=True, kw_only=True):
    """`sleep`: how long to sleep, reporting progress."""

    seconds: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 1.0


class FlakyPayload(Payload, frozen=True, kw_only=True):
    """`flaky`: how many first attempts fail."""

    fail_times: Annotated[int, msgspec.Meta(ge=0, le=100)] = 1


class FailPayload(Payload, frozen=True, kw_only=True):
    """`fail`: the error every attempt fails with."""

    error: Annotated[str, msgspec.Meta(max_length=2000)] = "failed on purpose"


HttpUrl = Annotated[str, msgspec.Meta(pattern=r"^https?://[^\s/]+\S*$", max_length=2000,
                                      description="an http:// or https:// URL")]


class HttpRequestPayload(Payload, frozen=True, kw_only=True):
    """`http.request`: one HTTP call; 5xx answers and transport errors fail the attempt."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = "GET"
    url: HttpUrl
    json: Any = None
    headers: dict[str, str] | None = None
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0


class FulfilOrderPayload(Payload, frozen=True, kw_only=True):
    """`order.fulfil` (internal): the paid order to pick, pack and hand over."""

    order_id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
    step_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.01


# ---- built-ins --------------------------------------------------------------------------------------


async def echo(ctx: TaskContext) -> Any:
    return ctx.payload


async def sleep(ctx: TaskContext) -> Any:
    seconds = read_payload(ctx, SleepPayload).seconds
    steps = max(1, min(20, int(seconds * 4)))
    for i in range(steps):
        await asyncio.sleep(seconds / steps)
        await ctx.progress(100 * (i + 1) / steps, f"slept {seconds * (i + 1) / steps:.2f}s")
    return {"slept": seconds}


async def fail(ctx: TaskContext) -> Any:
    raise TaskFailure(read_payload(ctx, FailPayload).error)


async def flaky(ctx: TaskContext) -> Any:
    """Fails the first `fail_times` attempts, then succeeds."""
    if ctx.attempt <= read_payload(ctx, FlakyPayload).fail_times:
        raise TaskFailure(f"flaky failure on attempt {ctx.attempt}")
    return {"succeeded_on_attempt": ctx.attempt}


async def http_request(ctx: TaskContext) -> Any:
    """An HTTP call: payload {method, url, json?, headers?, timeout_s?}; 5xx and errors fail."""
    p = read_payload(ctx, HttpRequestPayload)
    timeout = aiohttp.ClientTimeout(total=p.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            async with http.request(p.method, p.url, json=p.json, headers=p.headers) as resp:
                body = await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TaskFailure(f"request failed: {type(exc).__name__}: {exc}") from None
    if resp.status >= 500:
        raise TaskFailure(f"server answered {resp.status}")
    return {"status": resp.status, "body": body[:10_000]}


async def fulfil_order(ctx: TaskContext) -> Any:
    """Pick, pack and hand over an order (simulated warehouse steps with progress)."""
    p = read_payload(ctx, FulfilOrderPayload)
    log.debug("fulfilling order %s (attempt %d)", p.order_id, ctx.attempt)
    for percent, step in ((30, "picked"), (70, "packed"), (100, "handed to carrier")):
        await asyncio.sleep(p.step_s)
        await ctx.progress(percent, step)
    return {"order_id": p.order_id, "carrier": "jetsource-post", "tracking": f"JS{ctx.task_id[:12].upper()}"}


FULFIL_ORDER = "order.fulfil"


def build_registry(modules: str = "") -> TaskRegistry:
    """Built-ins, then entry points (`jetsource.tasks`), then modules named in settings."""
    registry = TaskRegistry()
    registry.register("echo", echo)
    registry.register("sleep", sleep, payload=SleepPayload)
    registry.register("fail", fail, payload=FailPayload)
    registry.register("flaky", flaky, payload=FlakyPayload)
    registry.register("http.request", http_request, payload=HttpRequestPayload)
    registry.register(FULFIL_ORDER, fulfil_order, payload=FulfilOrderPayload, internal=True)
    for ep in importlib.metadata.entry_points(group="jetsource.tasks"):
        ep.load()(registry)
    for module in (m.strip() for m in modules.split(",") if m.strip()):
        importlib.import_module(module).register(registry)
    return registry
