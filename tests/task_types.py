"""Task types used by the tests, registered the way users register theirs (`task_modules`)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from actors.tasks.registry import FULFIL_ORDER, TaskContext, TaskFailure, TaskRegistry, fulfil_order

STARTED: list[str] = []
GATES: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
STOPPED: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
UNFULFILLABLE: set[str] = set()
RUNNING: dict[str, int] = {"now": 0, "most": 0}
RUNS: defaultdict[str, int] = defaultdict(int)  # handler runs by task id


async def record(ctx: TaskContext) -> Any:
    STARTED.append(ctx.payload["name"])


async def gated(ctx: TaskContext) -> Any:
    """Reports 40%, then waits for its gate; notes when it is cancelled."""
    gate = ctx.payload["gate"]
    try:
        await ctx.progress(40, "almost half")
        await GATES[gate].wait()
        return {"by_attempt": ctx.attempt}
    except asyncio.CancelledError:
        STOPPED[gate].set()
        raise


async def quiet(ctx: TaskContext) -> Any:
    """Notes that it started, waits for its gate without reporting progress; notes when it is
    cancelled."""
    gate = ctx.payload["gate"]
    STARTED.append(gate)
    try:
        await GATES[gate].wait()
    except asyncio.CancelledError:
        STOPPED[gate].set()
        raise


async def counted(ctx: TaskContext) -> Any:
    """Counts its runs, waits for its gate, then fails if its payload asks it to."""
    RUNS[ctx.task_id] += 1
    await GATES[ctx.payload["gate"]].wait()
    if ctx.payload.get("fail"):
        raise TaskFailure("asked to fail")
    return ctx.attempt


async def overlapping(ctx: TaskContext) -> Any:
    """Runs 50 ms, counting how many of its kind run at once."""
    RUNNING["now"] += 1
    RUNNING["most"] = max(RUNNING["most"], RUNNING["now"])
    try:
        await asyncio.sleep(0.05)
    finally:
        RUNNING["now"] -= 1


async def stubborn(ctx: TaskContext) -> Any:
    """Ignores being cancelled once and returns anyway."""
    try:
        await asyncio.sleep(5)
    except asyncio.CancelledError:
        return "finished regardless"


async def fulfil_unless_unfulfillable(ctx: TaskContext) -> Any:
    if ctx.payload["order_id"] in UNFULFILLABLE:
        raise TaskFailure("warehouse has no stock")
    return await fulfil_order(ctx)


async def oversized(ctx: TaskContext) -> Any:
    """A result no event can hold."""
    return "x" * 300_000


async def unencodable(ctx: TaskContext) -> Any:
    """A result that is not JSON."""
    return object()


async def wordy(ctx: TaskContext) -> Any:
    """A failure message longer than `tasks.cmd.fail` takes."""
    raise TaskFailure("why " * 2000)


def register(registry: TaskRegistry) -> None:
    registry.register("test.oversized", oversized)
    registry.register("test.unencodable", unencodable)
    registry.register("test.wordy", wordy)
    registry.register("test.record", record)
    registry.register("test.gated", gated)
    registry.register("test.overlapping", overlapping)
    registry.register("test.counted", counted)
    registry.register("test.quiet", quiet)
    registry.register("test.stubborn", stubborn)
    registry.register(FULFIL_ORDER, fulfil_unless_unfulfillable)
