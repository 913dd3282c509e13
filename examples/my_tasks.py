"""An example task module: `JETSOURCE_TASK_MODULES=examples.my_tasks jetsource up`."""

from __future__ import annotations

from typing import Any

from actors.tasks.registry import TaskContext, TaskFailure, TaskRegistry


async def resize_image(ctx: TaskContext) -> Any:
    url = (ctx.payload or {}).get("url")
    if not url:
        raise TaskFailure("payload.url is required")  # retried with backoff, then dead-lettered
    for percent in (25, 50, 75, 100):
        await ctx.progress(percent, f"resizing {url}")
    return {"url": url, "sizes": [64, 256, 1024]}


def register(registry: TaskRegistry) -> None:
    registry.register("images.resize", resize_image)
