"""The task actor: `tasks.cmd.*` endpoints. Work items go on `tasks.queue.<priority>` in the same
atomic batch as the events that cause them; cancel and progress signals go out live."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import msgspec
from nats.aio.client import Client

from actors.runtime import Actor, AggregateSpec
from actors.tasks import domain
from actors.tasks.messages import (
    COMMANDS,
    HORIZON_S,
    ClaimTask,
    CompleteTask,
    FailTask,
    ReportProgress,
    StartTask,
    SubmitInternalTask,
    SubmitTask,
    TaskAccepted,
    TaskCancelled,
    TaskCommand,
    TaskCompleted,
    TaskDeadLettered,
    TASK_EVENTS,
    TaskEvent,
    TaskProgressed,
)
from actors.tasks.registry import TaskType
from bus.codec import encode, validation_error
from bus.errors import ValidationError
from bus.eventstore import PartitionedStore
from bus.subjects import Context


class _ReadySignal:
    """`<ctx>.live.ready`, at most once per group commit: it only wakes idle workers (which also
    poll), so the commands of one stored batch share a single signal instead of one each."""

    def __init__(self, subject: str) -> None:
        self._subject = subject
        self._pending = False

    async def send(self, nc: Client) -> None:
        if self._pending:
            return
        self._pending = True
        try:
            await asyncio.sleep(0)  # the rest of this batch's commands resume meanwhile
        finally:
            self._pending = False
        await nc.publish(self._subject, b"")


class _SubmitRules:
    """What a submit must satisfy beyond its wire type: a known type, not internal unless on
    `submit_internal`, a payload that fits the type's schema, a run_at within the horizon."""

    def __init__(self, types: Mapping[str, TaskType]) -> None:
        self._types = dict(types)
        self._public = ", ".join(sorted(n for n, t in self._types.items() if not t.internal))
        # Converting against a Struct type is the cost of decoding it again: cheap.
        self._schemas: dict[str, Any] = {n: t.payload for n, t in self._types.items() if t.payload is not None}

    def check(self, command: SubmitTask, now: float) -> None:
        task_type = self._types.get(command.type)
        if task_type is None:
            raise ValidationError(f"unknown task type {command.type!r}; known: {self._public}", field="type")
        if task_type.internal and not isinstance(command, SubmitInternalTask):
            raise ValidationError(f"task type {command.type!r} is internal: only process managers submit it",
                                  field="type")
        if command.run_at is not None and command.run_at > now + HORIZON_S:
            raise ValidationError(f"run_at is more than {HORIZON_S // 86400} days ahead", field="run_at")
        schema = self._schemas.get(command.type)
        if schema is not None:
            payload = {} if command.payload is None and _is_struct(schema) else command.payload
            try:
                msgspec.convert(payload, schema)
            except msgspec.ValidationError as exc:
                raise validation_error(exc, within="payload") from None


def _is_struct(schema: Any) -> bool:
    return isinstance(schema, type) and issubclass(schema, msgspec.Struct)


def task_spec(ctx: Context, types: Mapping[str, TaskType]) -> AggregateSpec[domain.Task, TaskCommand, TaskEvent]:
    """The task aggregate as the actor runtime drives it; `types` are the registered task types."""
    rules = _SubmitRules(types)

    def prepare(command: TaskCommand) -> TaskCommand:
        now = time.time()
        if isinstance(command, SubmitTask):
            rules.check(command, now)
        return msgspec.structs.replace(command, at=now)

    def outbox(part: Context, state: domain.Task, events: list[TaskEvent]) -> list[tuple[str, bytes]]:
        work = [(part.queue(p), encode(d)) for p, d in domain.dispatches(state, events)]
        # Tasks submitted with a `ref` (a process manager's) report how they ended.
        ended = [(part.outbox("ended"), encode(e)) for e in events
                 if isinstance(e, TaskCompleted | TaskDeadLettered) and e.ref]
        return work + ended

    ready = _ReadySignal(ctx.live("ready"))

    async def after_commit(nc: Client, state: domain.Task, events: list[TaskEvent]) -> None:
        for event in events:
            if isinstance(event, TaskCancelled):
                # Also when not recorded as running: a worker may have claimed it and not
                # stored the start yet (that is stored with the outcome, or after a while).
                await nc.publish(ctx.live("cancel", event.task_id), b"")
            elif isinstance(event, TaskProgressed):
                await nc.publish(ctx.live("progress", event.task_id), encode(event))
        if domain.dispatches(state, events):
            await ready.send(nc)

    def reply(task_id: str, state: domain.Task, version: int) -> TaskAccepted:
        return TaskAccepted(task_id=task_id, status=state.status, task_type=state.task_type, attempt=state.attempt,
                            run_at=state.run_at, timeout_s=state.timeout_s, payload=state.payload,
                            version=version, seq=version)

    return AggregateSpec(
        ctx=ctx, initial=domain.INITIAL, evolve=domain.evolve, decide=domain.decide, event_type=TASK_EVENTS,
        commands=COMMANDS, aggregate_id=lambda c: c.task_id,
        with_id=lambda c, task_id: msgspec.structs.replace(c, task_id=task_id),
        reply=reply, prepare=prepare, outbox=outbox, after_commit=after_commit,
        batchable=("submit", "claim", "start", "complete"),
        # A claim stores nothing, so a cache that missed a cancel stored by another task-actor
        # process would grant it: the cancel's signal makes every process reload the task first.
        invalidations=ctx.live("cancel", "*"),
        read_only=(ClaimTask,),
        # A worker's commands, batched across tasks, continue each task's own trace.
        inherits_trace=(StartTask, ReportProgress, CompleteTask, FailTask),
        event_id=lambda e: e.task_id,
    )


def task_actor(nc: Client, store: PartitionedStore, ctx: Context, types: Mapping[str, TaskType], *,
               concurrency: int, max_retries: int) -> Actor:
    """Build (not start) the task actor."""
    return Actor(nc, store, task_spec(ctx, types), concurrency=concurrency, max_retries=max_retries)


