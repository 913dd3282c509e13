"""A task worker process: takes the highest-priority runnable task, holds its lease while the
handler runs, reports progress, and completes or fails it through the task actor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec
from nats.aio.client import Client

from actors.tasks.messages import PRIORITIES, Dispatch, TaskAccepted
from actors.tasks.registry import TaskContext, TaskFailure, TaskRegistry
from bus.client import call
from bus import metrics
from bus.codec import encode
from bus.errors import JetsourceError, NotFoundError, RuleViolationError, UnavailableError, from_code
from bus.runtime import ErrorBody
from bus.subjects import Context
from bus.workqueue import PriorityQueues, WorkItem

log = logging.getLogger(__name__)

_dispatch = msgspec.json.Decoder(Dispatch)
class _Started(msgspec.Struct, frozen=True):
    accepted: TaskAccepted | None = None
    refused: ErrorBody | None = None


class _StartReply(msgspec.Struct, frozen=True):
    """The worker's view of a `tasks.cmd.start_batch` reply (a BatchReply of TaskAccepted)."""

    results: list[_Started]


_batch = msgspec.json.Decoder(_StartReply)


class Worker:
    """Runs task handlers, at most `concurrency` at once; one pull fills every free slot."""

    def __init__(
        self, nc: Client, ctx: Context, registry: TaskRegistry, *, concurrency: int = 16, lease_s: float = 30.0,
        name: str = "worker", request_timeout: float = 5.0,
    ) -> None:
        self._nc = nc
        self._ctx = ctx
        self._registry = registry
        self._free = concurrency
        self._slot_freed = asyncio.Event()
        self._lease_s = lease_s
        self.name = name
        self._timeout = request_timeout
        self._queues = PriorityQueues(nc, ctx.stream, PRIORITIES, timeout=request_timeout)
        self._ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        # Handlers at work, by task id: for cancel signals and lease renewal.
        self._handlers: dict[str, tuple[asyncio.Future[Any], WorkItem]] = {}
        self._cancelled: set[str] = set()
        self._completions: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._reporter: asyncio.Task[None] | None = None
        metrics.TASKS_RUNNING.set_function(lambda: len(self._handlers))

    async def run(self) -> None:
        sub = await self._nc.subscribe(self._ctx.live("ready"), cb=self._on_ready)
        cancels = await self._nc.subscribe(self._ctx.live("cancel", "*"), cb=self._on_cancel)
        leases = asyncio.get_running_loop().create_task(self._keep_leases())
        try:
            while not self._stopping.is_set():
                while self._free == 0:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                try:
                    items = await self._queues.take(self._free)
                except JetsourceError as exc:
                    log.warning("worker %s: %s", self.name, exc.message)
                    items = []
                self._free -= len(items)
                if not items:
                    self._ready.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._ready.wait(), 0.25)
                    continue
                self._spawn(self._start(items))
        finally:
            leases.cancel()
            await sub.unsubscribe()
            await cancels.unsubscribe()
            await self._queues.close()

    async def _on_ready(self, _msg: Any) -> None:
        self._ready.set()

    async def _on_cancel(self, msg: Any) -> None:
        task_id = msg.subject.rsplit(".", 1)[1]
        running = self._handlers.get(task_id)
        if running is not None:
            self._cancelled.add(task_id)
            running[0].cancel()

    async def _keep_leases(self) -> None:
        """Renew the lease (ack wait) of every running task, three times per lease."""
        while True:
            await asyncio.sleep(self._lease_s / 3)
            for _, item in list(self._handlers.values()):
                await item.extend()

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _release(self, _task: Any = None) -> None:
        self._free += 1
        self._slot_freed.set()

    async def stop(self) -> None:
        """Stop taking work; let running handlers finish (their leases cover a crash)."""
        self._stopping.set()
        self._ready.set()
        if self._running:
            await asyncio.wait(self._running, timeout=self._lease_s)

    async def _command(self, name: str, body: dict[str, Any]) -> bytes:
        return await call(self._nc, self._ctx.command(name), encode(body), timeout=self._timeout)

    async def _start(self, items: list[WorkItem]) -> None:
        """Claim everything one pull gave us with one request, then run what was granted."""
        settled = 0  # items whose slot is accounted for (released, or held by a running handler)
        try:
            dispatches = [_dispatch.decode(item.data) for item in items]
            body = {"items": [{"task_id": d.task_id, "attempt": d.attempt, "worker": self.name} for d in dispatches]}
            try:
                results = _batch.decode(await self._command("start_batch", body)).results
            except JetsourceError as exc:
                log.warning("could not start %d tasks: %s", len(items), exc.message)
                for item in items:
                    await item.nak(1.0)
                return
            for item, result in zip(items, results, strict=True):
                if result.refused is not None:
                    if result.refused.code in ("rule_violation", "not_found"):
                        await item.ack()  # cancelled, finished, or a stale attempt: nothing to run
                    else:
                        await item.nak(1.0)
                elif (task := result.accepted) is None or task.status != "running":
                    # not yet due: come back then
                    await item.nak(max(0.0, task.run_at - time.time()) if task else 1.0)
                else:
                    run = asyncio.get_running_loop().create_task(self._run(item, task))
                    self._running.add(run)
                    run.add_done_callback(self._running.discard)
                    run.add_done_callback(self._release)
                    settled += 1
                    continue
                self._release()
                settled += 1
        finally:
            for _ in range(len(items) - settled):
                self._release()

    async def _run(self, item: WorkItem, task: TaskAccepted) -> None:
        outcome = await self._execute(item, task)
        kind_label = "cancelled" if outcome is None else ("completed" if outcome[0] == "complete" else "failed")
        metrics.TASKS_FINISHED.labels(task.task_type, kind_label).inc()
        try:
            if outcome is not None:
                kind, value = outcome
                if kind == "complete":
                    await self._complete({"task_id": task.task_id, "attempt": task.attempt, "result": value})
                else:
                    await self._command("fail", {"task_id": task.task_id, "attempt": task.attempt, "error": value})
            await item.ack()
        except (RuleViolationError, NotFoundError):
            await item.ack()  # cancelled meanwhile, or another worker finished this attempt
        except JetsourceError as exc:
            log.warning("could not record the outcome of %s: %s; it will run again", task.task_id, exc.message)
            await item.nak(1.0)

    async def _complete(self, body: dict[str, Any]) -> None:
        """Report a completion; concurrent ones share one `complete_batch` request (group commit:
        while one batch is in flight the next gathers, no timer)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._completions.append((body, future))
        if self._reporter is None or self._reporter.done():
            self._reporter = asyncio.get_running_loop().create_task(self._report_completions())
        await future

    async def _report_completions(self) -> None:
        while self._completions:
            batch, self._completions = self._completions, []
            try:
                results = _batch.decode(await self._command("complete_batch", {"items": [b for b, _ in batch]})).results
            except Exception as exc:  # noqa: BLE001 - handed to each waiting handler run
                err = exc if isinstance(exc, JetsourceError) else UnavailableError(f"complete_batch failed: {exc}")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if result.refused is not None:
                    future.set_exception(from_code(result.refused.code, result.refused.message, result.refused.field))
                else:
                    future.set_result(None)

    async def _execute(self, item: WorkItem, task: TaskAccepted) -> tuple[str, Any] | None:
        """Run the handler under its timeout, keeping the lease; None when cancelled."""
        handler = self._registry.get(task.task_type)
        if handler is None:
            return ("fail", f"no handler for task type {task.task_type!r} on worker {self.name}")

        async def report(percent: float, message: str) -> None:
            with contextlib.suppress(JetsourceError):
                await self._command("progress", {"task_id": task.task_id, "attempt": task.attempt,
                                                 "percent": percent, "message": message})

        ctx = TaskContext(task_id=task.task_id, attempt=task.attempt, payload=task.payload, report=report)
        run = asyncio.ensure_future(handler(ctx))  # handlers may return any awaitable
        self._handlers[task.task_id] = (run, item)
        try:
            async with asyncio.timeout(task.timeout_s):
                result = await run
            return ("complete", result)
        except asyncio.CancelledError:
            if task.task_id in self._cancelled:
                return None
            raise
        except TimeoutError:
            return ("fail", f"timed out after {task.timeout_s:g}s")
        except TaskFailure as exc:
            return ("fail", str(exc) or "failed")
        except Exception as exc:  # noqa: BLE001 - a handler's crash is the attempt's failure
            log.exception("task %s (%s) crashed", task.task_id, task.task_type)
            return ("fail", f"{type(exc).__name__}: {exc}"[:2000])
        finally:
            self._handlers.pop(task.task_id, None)
            self._cancelled.discard(task.task_id)
