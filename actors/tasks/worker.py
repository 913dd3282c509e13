"""A task worker process: takes the highest-priority runnable task, holds its lease while the
handler runs, reports progress, and completes or fails it through the task actor.

A pull is claimed with one `claim_batch` request, which stores nothing. An attempt's start is
stored as a `task.started` event once the handler has run for `record_start_after_s` or before
its first progress report; an attempt that ends sooner records when and where it started in its
outcome event instead. A quick task so costs two stored events (and its work item) in two
group commits, and shows `running` only once it has run that long.

`concurrency` bounds the handlers running at once. A slot takes new work as soon as its handler
returns; the outcome is stored meanwhile (at most `concurrency` outcomes at a time) and the work
item is acked once it is. An outcome that cannot be stored for a transient reason (the task actor
unavailable, a JetStream leader failover) is tried again in place while the work item's lease is
renewed, so a handler never runs again because of an outage.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from nats.aio.client import Client

from actors.tasks.messages import (
    PRIORITIES,
    ClaimTask,
    CompleteTask,
    Dispatch,
    FailTask,
    ReportProgress,
    StartTask,
    TaskAccepted,
)
from actors.tasks.registry import TaskContext, TaskFailure, TaskRegistry
from bus.client import call
from bus import metrics
from bus.codec import encode
from bus.errors import (
    ConflictError,
    DeadlineError,
    InternalError,
    JetsourceError,
    NotFoundError,
    RateLimitedError,
    RuleViolationError,
    UnavailableError,
    from_code,
)
from bus import parking, tracing
from bus.outage import Outage
from bus import subjects as h
from bus.pull import position
from bus.wire import CommandBatch, ErrorBody
from bus.subjects import Context, Parked
from bus.workqueue import PriorityQueues, WorkItem

log = logging.getLogger(__name__)

_dispatch = msgspec.json.Decoder(Dispatch)
PARKED_READER = "workers"  # work items no worker could read are parked under this reader
class _Outcome(msgspec.Struct, frozen=True):
    accepted: TaskAccepted | None = None
    refused: ErrorBody | None = None


class _BatchReply(msgspec.Struct, frozen=True):
    """The worker's view of a `tasks.cmd.<claim|start|complete>_batch` reply (the runtime's
    BatchReply of TaskAccepted)."""

    results: list[_Outcome]


_batch = msgspec.json.Decoder(_BatchReply)
# Refusals that mean the attempt must not run (cancelled, finished, stale); others are transient.
_NOTHING_TO_RUN = ("rule_violation", "not_found")
REPORTERS = 4  # complete_batch requests a worker keeps in flight
# Failures to store an outcome that a later try may not meet: the actor or JetStream away or slow
# (a 7 s leader failover dropped 244 of 500 outcomes when these were given up at once).
_TRANSIENT = (UnavailableError, DeadlineError, ConflictError, RateLimitedError, InternalError)
RETRY_FIRST_S, RETRY_MAX_S = 0.2, 2.0  # back-off between tries to store an outcome
INTERNAL_TRIES = 5  # an `internal` refusal this many times in a row is not an outage


def _timed_out(task: TaskAccepted) -> tuple[str, Any]:
    return ("fail", f"timed out after {task.timeout_s:g}s")


MAX_RESULT_BYTES = 256 * 1024  # a result is stored in an event; NATS messages are at most 1 MB
MAX_ERROR_CHARS = 2000  # what `tasks.cmd.fail` accepts
MAX_BATCH_BYTES = 512 * 1024  # results in one complete_batch request (plus one result more, at most)


def _storable(outcome: tuple[str, Any] | None) -> tuple[str, Any] | None:
    """The outcome as it can be stored: a result encoded once (kept as raw JSON), or, for one that
    cannot be encoded or is too large, a failure saying why; an error cut to what `fail` takes.
    Unstorable outcomes retried as transient would never be stored and would hold the worker."""
    if outcome is None:
        return None
    kind, value = outcome
    if kind != "complete":
        return (kind, str(value)[:MAX_ERROR_CHARS])
    try:
        raw = encode(value)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        return ("fail", f"the result cannot be stored as JSON: {exc}"[:MAX_ERROR_CHARS])
    if len(raw) > MAX_RESULT_BYTES:
        return ("fail", f"the result is {len(raw)} bytes, more than the {MAX_RESULT_BYTES} a task result may be")
    return (kind, msgspec.Raw(raw))


_Completions = list[tuple[CompleteTask, asyncio.Future[None]]]


def _take_bytes(completions: _Completions, limit: int) -> tuple[_Completions, _Completions]:
    """The completions that fit in one request of about `limit` bytes of results (at least one),
    and the rest."""
    total = 0
    for n, (command, _) in enumerate(completions):
        result = command.result
        total += len(result) if isinstance(result, msgspec.Raw) else 0
        if total > limit and n:
            return completions[:n], completions[n:]
    return completions, []


class _Capacity:
    """A count of free units and a way to wait for one (asyncio.Semaphore cost ~8 % of the
    worker's CPU with no-op tasks, and it almost never has to wait); units are taken many at
    a time."""

    __slots__ = ("free", "size", "_freed")

    def __init__(self, size: int) -> None:
        self.free = size
        self.size = size
        self._freed = asyncio.Event()

    def resize(self, size: int) -> None:
        """Lowered, units in use stay in use (free goes below 0 until enough come back)."""
        self.free += size - self.size
        self.size = size
        if self.free > 0:
            self._freed.set()

    async def available(self) -> None:
        while self.free <= 0:
            self._freed.clear()
            await self._freed.wait()

    def take(self, n: int = 1) -> None:
        self.free -= n

    def give(self) -> None:
        self.free += 1
        self._freed.set()


class _Slot:
    """One unit of a worker's concurrency, held by one claimed task and released exactly once."""

    __slots__ = ("_release", "_held")

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release
        self._held = True

    def release(self, _task: Any = None) -> None:
        if self._held:
            self._held = False
            self._release()


class Worker:
    """Runs task handlers, at most `concurrency` at once; one pull fills every free slot."""

    def __init__(
        self, nc: Client, ctx: Context, registry: TaskRegistry, *, concurrency: int = 16, lease_s: float = 30.0,
        name: str = "worker", request_timeout: float = 5.0, record_start_after_s: float = 0.5,
    ) -> None:
        self._nc = nc
        self._ctx = ctx
        self._parked = Parked(ctx.namespace)
        self._registry = registry
        self._slots = _Capacity(concurrency)  # handlers running
        self._storing = _Capacity(concurrency)  # outcomes being stored
        self._finished: dict[tuple[str, str], Any] = {}  # metric children by (type, outcome)
        self._lease_s = lease_s
        self.name = name
        self._timeout = request_timeout
        self._queues = PriorityQueues(nc, ctx, PRIORITIES, timeout=request_timeout)
        self._outage = Outage(log, f"worker {name}: taking work")
        self._claims = Outage(log, f"worker {name}: claiming tasks")
        self._ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        # Handlers at work, by task id: for cancel signals and lease renewal.
        self._handlers: dict[str, tuple[asyncio.Future[Any], WorkItem]] = {}
        self._cancelled: set[str] = set()
        # Cancel signals seen lately, oldest first (an ordered set): a task cancelled between its
        # claim and its handler's start never runs.
        self._recently_cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()
        # Running attempts whose start is not stored yet: task id -> (task, monotonic, epoch start).
        self._unrecorded: dict[str, tuple[TaskAccepted, float, float]] = {}
        self._record_start_after_s = record_start_after_s
        self._completions: _Completions = []
        self._reporters: set[asyncio.Task[None]] = set()
        # Work items whose outcome is being stored, by task id: their leases are renewed too.
        self._recording: dict[str, WorkItem] = {}
        self._retrying = 0  # outcomes waiting to be stored again
        self._stop_by = 0.0  # once stopping: when outcomes not stored yet are left to their lease
        self._leases: asyncio.Task[None] | None = None
        metrics.TASKS_RUNNING.set_function(lambda: len(self._handlers))

    @property
    def concurrency(self) -> int:
        return self._slots.size

    def resize(self, concurrency: int) -> None:
        """Run at most this many tasks at once from now on (live configuration): lowered, the
        running ones finish and no new one starts until fewer run."""
        self._slots.resize(concurrency)
        self._storing.resize(concurrency)

    async def run(self) -> None:
        sub = await self._nc.subscribe(self._ctx.live("ready"), cb=self._on_ready)
        cancels = await self._nc.subscribe(self._ctx.live("cancel", "*"), cb=self._on_cancel)
        leases = self._leases = asyncio.get_running_loop().create_task(self._keep_leases())
        starts = asyncio.get_running_loop().create_task(self._record_long_starts())
        try:
            while not self._stopping.is_set():
                await self._slots.available()
                try:
                    items = await self._queues.take(self._slots.free)
                    self._outage.ok()
                except JetsourceError as exc:
                    self._outage.failed(exc.message)
                    items = []
                self._slots.take(len(items))
                if not items:
                    self._ready.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._ready.wait(), 0.25)
                    continue
                self._spawn(self._start(items))
        finally:
            if not self._stopping.is_set():
                leases.cancel()  # else `stop` does, once what runs has finished
            starts.cancel()
            await sub.unsubscribe()
            await cancels.unsubscribe()
            await self._queues.close()

    async def _on_ready(self, _msg: Any) -> None:
        self._ready.set()

    async def _on_cancel(self, msg: Any) -> None:
        task_id = msg.subject.rsplit(".", 1)[1]
        self._recently_cancelled[task_id] = None
        if len(self._recently_cancelled) > 10_000:
            self._recently_cancelled.popitem(last=False)
        running = self._handlers.get(task_id)
        if running is not None:
            self._cancelled.add(task_id)
            running[0].cancel()

    async def _keep_leases(self) -> None:
        """Renew the lease (ack wait) of every running task and of every task whose outcome is
        being stored, three times per lease."""
        while True:
            await asyncio.sleep(self._lease_s / 3)
            for _, item in list(self._handlers.values()):
                await item.extend()
            for item in list(self._recording.values()):
                await item.extend()

    async def _record_long_starts(self) -> None:
        """Store the start of every attempt that has run for `record_start_after_s`."""
        while True:
            await asyncio.sleep(self._record_start_after_s / 2)
            horizon = time.monotonic() - self._record_start_after_s
            due = [task_id for task_id, (_, since, _) in self._unrecorded.items() if since <= horizon]
            if due:
                await self._record_starts(due)

    async def _record_starts(self, task_ids: list[str]) -> None:
        """Store these attempts' starts (one request); a refusal means the task was cancelled
        or finished elsewhere meanwhile, so its handler is stopped."""
        entries = [(task_id, entry) for task_id in task_ids if (entry := self._unrecorded.pop(task_id, None))]
        if not entries:
            return
        try:
            results = await self._store_starts([(task, at) for _, (task, _, at) in entries])
        except JetsourceError as exc:
            log.warning("could not record the start of %d tasks: %s", len(entries), exc.message)
            return  # stored with their outcome instead
        for (task_id, _), result in zip(entries, results, strict=True):
            if result.refused is not None and result.refused.code in _NOTHING_TO_RUN:
                running = self._handlers.get(task_id)
                if running is not None:
                    self._cancelled.add(task_id)
                    running[0].cancel()

    async def _store_starts(self, attempts: list[tuple[TaskAccepted, float | None]]) -> list[_Outcome]:
        """One `start_batch` request: these attempts are running (since the given times)."""
        batch = CommandBatch(items=[StartTask(task_id=task.task_id, attempt=task.attempt, worker=self.name,
                                              started_at=at) for task, at in attempts])
        return _batch.decode(await self._command("start_batch", batch)).results

    def _spawn(self, work: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    @staticmethod
    async def _refused(item: WorkItem, code: str) -> None:
        """A refused claim or start: drop the item if the attempt must not run, else retry soon."""
        await (item.ack() if code in _NOTHING_TO_RUN else item.nak(1.0))

    @property
    def stopping(self) -> bool:
        """Whether stop() was called."""
        return self._stopping.is_set()

    async def stop(self) -> None:
        """Stop taking work; let running handlers finish and their outcomes be stored, for at most
        a lease (their leases are renewed meanwhile and cover a crash)."""
        self._stopping.set()
        self._ready.set()
        self._stop_by = time.monotonic() + self._lease_s
        try:
            if self._running:
                await asyncio.wait(self._running, timeout=self._lease_s)
        finally:
            if self._leases is not None:
                self._leases.cancel()

    async def _command(self, name: str, body: msgspec.Struct) -> bytes:
        sent = time.perf_counter()
        try:
            return await call(self._nc, self._ctx.command(name), encode(body), timeout=self._timeout)
        finally:
            metrics.WORKER_REQUEST_SECONDS.labels(name).observe(time.perf_counter() - sent)

    async def _start(self, items: list[WorkItem]) -> None:
        """Claim everything one pull gave us with one request, then run what may run now."""
        settled = 0  # items whose slot is accounted for (released, or held by a running handler)
        taken = len(items)
        try:
            dispatches: list[Dispatch] = []
            readable: list[WorkItem] = []
            for item in items:
                try:
                    dispatches.append(_dispatch.decode(item.data))
                    readable.append(item)
                except msgspec.DecodeError as exc:  # redelivered, it would come back forever
                    await self._park(item, exc)
                    self._slots.give()
                    settled += 1
            items = readable
            if not items:
                return
            claims = CommandBatch(items=[ClaimTask(task_id=d.task_id, attempt=d.attempt) for d in dispatches])
            try:
                results = _batch.decode(await self._command("claim_batch", claims)).results
                self._claims.ok()
            except JetsourceError as exc:
                self._claims.failed(exc.message)
                for item in items:
                    await item.nak(1.0)
                return
            now = time.time()
            for item, result in zip(items, results, strict=True):
                task = result.accepted
                if result.refused is not None:
                    await self._refused(item, result.refused.code)
                elif task is None:
                    await item.ack()
                elif task.run_at > now:
                    await item.nak(task.run_at - now)  # not yet due: come back then
                else:
                    slot = _Slot(self._slots.give)
                    run = self._spawn(self._run(item, task, slot))
                    run.add_done_callback(slot.release)
                    settled += 1
                    continue
                self._slots.give()
                settled += 1
        finally:
            for _ in range(taken - settled):
                self._slots.give()

    async def _park(self, item: WorkItem, error: Exception) -> None:
        """Park a work item this code cannot read (reader `workers`) and drop it from the queue."""
        msg = item.msg
        try:
            await parking.park(self._nc, self._parked, reader=PARKED_READER, stream=item.stream,
                               seq=position(msg).stream_seq, subject=msg.subject, data=msg.data,
                               headers=msg.headers or {}, error=error, timeout=self._timeout)
        except JetsourceError as exc:
            log.warning("could not park an unreadable work item: %s; it will come back", exc.message)
            await item.nak(1.0)
            return
        await item.ack()

    async def _started_first(self, item: WorkItem, task: TaskAccepted) -> bool:
        """Store a claimed attempt's start before running it; False (the item settled) when the
        store refuses it: cancelled meanwhile, so it never runs. A stray signal costs one stored
        start, never the task."""
        try:
            [result] = await self._store_starts([(task, None)])
        except JetsourceError as exc:
            log.warning("could not start %s: %s", task.task_id, exc.message)
            await item.nak(1.0)
            return False
        if result.refused is not None:
            await self._refused(item, result.refused.code)
            return False
        if result.accepted is None or result.accepted.status != "running":
            await item.nak(1.0)  # not due by the actor's clock yet
            return False
        return True

    async def _run(self, item: WorkItem, task: TaskAccepted, slot: _Slot) -> None:
        # Its own asyncio task: every line logged from here on (the handler's too) is the task's trace.
        headers = item.msg.headers
        if headers:
            tracing.follow(headers.get(h.EV_TRACE_ID), headers.get(h.EV_CORRELATION_ID))
        start_recorded = False
        while task.task_id in self._recently_cancelled:
            # A cancel signal came after the claim was answered: let the store decide with a
            # recorded start (it conflicts with, and then sees, the cancel). Checked here, with
            # nothing awaited between the last check and the handler's registration in
            # `_execute`, so no signal falls between the two.
            del self._recently_cancelled[task.task_id]
            if not await self._started_first(item, task):
                return
            start_recorded = True
        started_at = time.time()
        if not start_recorded:
            self._unrecorded[task.task_id] = (task, time.monotonic(), started_at)
        try:
            outcome = _storable(await self._execute(item, task))
        finally:
            # Its start, unless stored meanwhile, goes with the outcome.
            self._unrecorded.pop(task.task_id, None)
        kind_label = "cancelled" if outcome is None else ("completed" if outcome[0] == "complete" else "failed")
        counter = self._finished.get((task.task_type, kind_label))
        if counter is None:
            counter = self._finished[task.task_type, kind_label] = metrics.TASKS_FINISHED.labels(task.task_type, kind_label)
        counter.inc()
        self._recording[task.task_id] = item  # its lease is renewed until it is settled
        try:
            await self._storing.available()
            # The handler is done: its slot takes new work while this outcome is stored (one group
            # commit, ~25 ms under load). Holding it until then made a worker run in waves of
            # `concurrency` tasks, idle between them. Outcomes being stored are bounded too, so a
            # worker that cannot store them stops taking work.
            self._storing.take()
            slot.release()
            try:
                await self._record(item, task, outcome, started_at)
            finally:
                self._storing.give()
        finally:
            self._recording.pop(task.task_id, None)

    async def _record(self, item: WorkItem, task: TaskAccepted, outcome: tuple[str, Any] | None,
                      started_at: float) -> None:
        """Store an attempt's outcome and settle its work item. A transient failure is tried
        again with back-off (the lease is renewed meanwhile) until the outcome is stored or
        refused; a stopping worker gives up after its lease and leaves the item un-acked, so it
        runs again elsewhere (at least once)."""
        if outcome is not None:
            kind, value = outcome
            command: CompleteTask | FailTask = (
                CompleteTask(task_id=task.task_id, attempt=task.attempt, result=value, started_at=started_at,
                             worker=self.name) if kind == "complete"
                else FailTask(task_id=task.task_id, attempt=task.attempt, error=value, started_at=started_at,
                              worker=self.name))
            delay = RETRY_FIRST_S
            retrying, internal = False, 0
            try:
                while True:
                    try:
                        if isinstance(command, CompleteTask):
                            await self._complete(command)
                        else:
                            await self._command("fail", command)
                        break
                    except (RuleViolationError, NotFoundError):
                        # Cancelled meanwhile, finished by another worker, or stored by an
                        # earlier try whose reply was lost.
                        break
                    except _TRANSIENT as exc:
                        error = exc
                        internal += isinstance(exc, InternalError)
                        if internal >= INTERNAL_TRIES:  # not an outage: a fault that stays
                            log.warning("the outcome of %s keeps failing: %s; it will run again", task.task_id,
                                        exc.message)
                            await item.nak(1.0)
                            return
                    except JetsourceError as exc:
                        log.warning("the outcome of %s was refused: %s; it will run again", task.task_id, exc.message)
                        await item.nak(1.0)
                        return
                    if not retrying:
                        retrying = True
                        if not self._retrying:  # one line per outage, not one per outcome
                            log.warning("could not store the outcome of %s: %s; retrying while its lease is held",
                                        task.task_id, error.message)
                        self._retrying += 1
                    now = time.monotonic()
                    if self._nc.is_closed or (self._stopping.is_set() and now >= self._stop_by):
                        log.warning("gave up storing the outcome of %s (%s); it will run again elsewhere",
                                    task.task_id, error.message)
                        return
                    await asyncio.sleep(min(delay, self._stop_by - now) if self._stopping.is_set() else delay)
                    delay = min(delay * 2, RETRY_MAX_S)
            finally:
                if retrying:
                    self._retrying -= 1
                    if not self._retrying:
                        log.info("no outcome waits to be stored any more")
        await item.ack()

    async def _complete(self, command: CompleteTask) -> None:
        """Report a completion; concurrent ones share a `complete_batch` request (group commit:
        while requests are in flight the next batch gathers, no timer). Up to REPORTERS requests
        are in flight: with one, a worker completed at most one batch per actor round trip
        (measured: 76 per 28 ms, the whole pipeline's limit)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._completions.append((command, future))
        if len(self._reporters) < REPORTERS:
            # Its own context: it stores many tasks' outcomes, so its lines are no one task's trace.
            reporter = asyncio.get_running_loop().create_task(self._report_completions(), context=contextvars.Context())
            self._reporters.add(reporter)
            reporter.add_done_callback(self._reporters.discard)
        await future

    async def _report_completions(self) -> None:
        while self._completions:
            batch, self._completions = _take_bytes(self._completions, MAX_BATCH_BYTES)
            try:
                completes = CommandBatch(items=[command for command, _ in batch])
                results = _batch.decode(await self._command("complete_batch", completes)).results
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
            if task.task_id in self._unrecorded:
                await self._record_starts([task.task_id])  # progress belongs to a running task
            with contextlib.suppress(JetsourceError):
                await self._command("progress", ReportProgress(task_id=task.task_id, attempt=task.attempt,
                                                               percent=percent, message=message))

        trace = tracing.CURRENT.get()
        ctx = TaskContext(task_id=task.task_id, attempt=task.attempt, payload=task.payload, report=report,
                          trace_id=trace[0] if trace else None)
        run = asyncio.ensure_future(handler(ctx))  # handlers may return any awaitable
        self._handlers[task.task_id] = (run, item)
        # The timeout cancels the handler, not this coroutine: a timer handle (asyncio.timeout
        # cost ~8 % of the worker's CPU with no-op tasks). A handler that swallows the
        # cancellation has still timed out.
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            run.cancel()

        timer = asyncio.get_running_loop().call_later(task.timeout_s, expire)
        try:
            result = await run
            return _timed_out(task) if expired else ("complete", result)
        except asyncio.CancelledError:
            if task.task_id in self._cancelled:
                return None
            if expired:
                return _timed_out(task)
            raise
        except TaskFailure as exc:
            return _timed_out(task) if expired else ("fail", str(exc) or "failed")
        except Exception as exc:  # noqa: BLE001 - a handler's crash is the attempt's failure
            if expired:
                return _timed_out(task)
            log.exception("task %s (%s) crashed", task.task_id, task.task_type)
            return ("fail", f"{type(exc).__name__}: {exc}"[:2000])
        finally:
            timer.cancel()
            self._handlers.pop(task.task_id, None)
            self._cancelled.discard(task.task_id)
