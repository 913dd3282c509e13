"""Task commands, events, replies and views. Stored event tags are pinned: history is forever."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from actors.upcasting import EventCodec

TaskId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
TaskType = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
Priority = Literal["high", "normal", "low"]
TaskStatus = Literal["scheduled", "pending", "running", "retrying", "completed", "dead", "cancelled"]
# How far ahead a task may be scheduled, by delay_s or run_at (run_at is checked at submit,
# against the actor's clock).
HORIZON_S = 30 * 24 * 3600
Seconds = Annotated[float, msgspec.Meta(ge=0, le=HORIZON_S)]
EpochSeconds = Annotated[float, msgspec.Meta(ge=0, description="seconds since the epoch, at most 30 days ahead")]
ShortText = Annotated[str, msgspec.Meta(max_length=2000)]
# When the actor took the command: it stamps every command (the decider stays pure and
# replayable), so a value a caller sends is replaced. `readOnly` tells OpenAPI readers so.
StampedAt = Annotated[float, msgspec.Meta(extra_json_schema={
    "readOnly": True, "description": "set by the task actor (seconds since the epoch); a value sent is replaced"})]
PRIORITIES: tuple[Priority, ...] = ("high", "normal", "low")


class Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False, tag_field="kind"):
    """Base of every task message (`type` is the task type, so the tag field is `kind`). Its
    encoding is what keyed requests are fingerprinted by: changing it (omitting defaults, say)
    would make a retry across an upgrade look like another request under the same key."""


class RetryPolicy(Message, frozen=True, kw_only=True):
    """How failures are retried: exponential backoff base * 2^(attempt-1), capped, with jitter."""

    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    backoff_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 1.0
    backoff_max_s: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 300.0
    jitter: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.2


# ---- public commands -----------------------------------------------------------------------------


class SubmitTask(Message, frozen=True, kw_only=True, tag="task.submit"):
    """tasks.cmd.submit: queue a task of a registered, non-internal type (optionally delayed)."""

    type: TaskType
    payload: Any = None
    priority: Priority = "normal"
    delay_s: Seconds | None = None
    run_at: EpochSeconds | None = None
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 60.0
    retry: RetryPolicy = RetryPolicy()
    ref: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    idempotency_key: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    task_id: TaskId | None = None
    at: StampedAt = 0.0


class SubmitInternalTask(SubmitTask, frozen=True, kw_only=True, tag="task.submit_internal"):
    """tasks.cmd.submit_internal (process managers): as submit, and internal types (`order.fulfil`)
    are accepted too. Its own subject, so NATS permissions decide who may publish it."""


class CancelTask(Message, frozen=True, kw_only=True, tag="task.cancel"):
    """tasks.cmd.cancel: a pending task never runs; a running one is signalled to stop."""

    task_id: TaskId
    reason: ShortText = ""
    at: StampedAt = 0.0


class RetryTask(Message, frozen=True, kw_only=True, tag="task.retry"):
    """tasks.cmd.retry: bring a dead-lettered task back with a fresh set of attempts."""

    task_id: TaskId
    at: StampedAt = 0.0


# ---- worker commands -------------------------------------------------------------------------------


WorkerName = Annotated[str, msgspec.Meta(max_length=100)]


class ClaimTask(Message, frozen=True, kw_only=True, tag="task.claim"):
    """tasks.cmd.claim (workers): may this attempt run now? Refused when stale, cancelled or done;
    stores nothing (the start is stored once the handler has run a while, or with the outcome)."""

    task_id: TaskId
    attempt: int
    at: StampedAt = 0.0


class StartTask(Message, frozen=True, kw_only=True, tag="task.start"):
    """tasks.cmd.start (workers): record that an attempt is running (since `started_at`, when
    it was claimed earlier); refused when stale, cancelled or done."""

    task_id: TaskId
    attempt: int
    worker: WorkerName
    started_at: float | None = None
    at: StampedAt = 0.0


class ReportProgress(Message, frozen=True, kw_only=True, tag="task.progress"):
    """tasks.cmd.progress (workers): percent done and a message, also sent live."""

    task_id: TaskId
    attempt: int
    percent: Annotated[float, msgspec.Meta(ge=0, le=100)]
    message: ShortText = ""
    at: StampedAt = 0.0


class CompleteTask(Message, frozen=True, kw_only=True, tag="task.complete"):
    """tasks.cmd.complete (workers): the attempt succeeded with a result. A claimed attempt
    whose start was not recorded gives `started_at` and `worker`, stored in the outcome event."""

    task_id: TaskId
    attempt: int
    result: Any = None
    started_at: float | None = None
    worker: WorkerName | None = None
    at: StampedAt = 0.0


class FailTask(Message, frozen=True, kw_only=True, tag="task.fail"):
    """tasks.cmd.fail (workers): the attempt failed or timed out (`started_at`, `worker`: as
    for complete)."""

    task_id: TaskId
    attempt: int
    error: ShortText
    started_at: float | None = None
    worker: WorkerName | None = None
    at: StampedAt = 0.0


TaskCommand = (
    SubmitTask | SubmitInternalTask | CancelTask | RetryTask | ClaimTask | StartTask | ReportProgress | CompleteTask | FailTask
)

COMMANDS: dict[str, type[TaskCommand]] = {
    "submit": SubmitTask,
    "submit_internal": SubmitInternalTask,
    "cancel": CancelTask,
    "retry": RetryTask,
    "claim": ClaimTask,
    "start": StartTask,
    "progress": ReportProgress,
    "complete": CompleteTask,
    "fail": FailTask,
}


# ---- events (stored on tasks.events.<task_id>) --------------------------------------------------------


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False):
    """Base of stored task events; `v` is the schema version of the event type."""

    v: int = 1
    task_id: str
    at: float


class TaskSubmitted(Event, frozen=True, kw_only=True, tag="task.submitted"):
    """A task was accepted; it runs at run_at or later."""

    task_type: str
    payload: Any = None
    priority: Priority
    run_at: float
    timeout_s: float
    retry: RetryPolicy
    ref: str | None = None


class TaskStarted(Event, frozen=True, kw_only=True, tag="task.started"):
    """An attempt is running (stored once its handler has run 0.5 s or reports progress; again
    if a previous worker lost its lease). Quicker attempts record their start in the outcome."""

    attempt: int
    worker: str


class TaskProgressed(Event, frozen=True, kw_only=True, tag="task.progressed"):
    """The handler reported progress."""

    attempt: int
    percent: float
    message: str = ""


class TaskCompleted(Event, frozen=True, kw_only=True, tag="task.completed"):
    """The attempt succeeded. `started_at` and `worker` are set when no `task.started` was
    stored for the attempt (it ended before its start was recorded)."""

    attempt: int
    task_type: str
    ref: str | None = None
    result: Any = None
    started_at: float | None = None
    worker: str | None = None


class TaskFailed(Event, frozen=True, kw_only=True, tag="task.failed"):
    """The attempt failed; the next one runs at retry_at (`started_at`, `worker`: as for
    task.completed)."""

    attempt: int
    error: str
    retry_at: float
    started_at: float | None = None
    worker: str | None = None


class TaskDeadLettered(Event, frozen=True, kw_only=True, tag="task.dead_lettered"):
    """The last attempt failed; the task waits for a retry command (`started_at`, `worker`: as
    for task.completed)."""

    attempt: int
    error: str
    task_type: str
    ref: str | None = None
    started_at: float | None = None
    worker: str | None = None


class TaskCancelled(Event, frozen=True, kw_only=True, tag="task.cancelled"):
    """The task was cancelled; a running handler is signalled."""

    reason: str = ""
    was_running: bool = False


class TaskRequeued(Event, frozen=True, kw_only=True, tag="task.requeued"):
    """A dead-lettered task was brought back; attempts up to `limit` are allowed."""

    attempt: int
    limit: int


TaskEvent = (
    TaskSubmitted | TaskStarted | TaskProgressed | TaskCompleted | TaskFailed | TaskDeadLettered | TaskCancelled | TaskRequeued
)
# Every reader of task events decodes through this (see actors.upcasting: how an event evolves).
TASK_EVENTS: EventCodec[TaskEvent] = EventCodec(TaskEvent)


class Dispatch(msgspec.Struct, frozen=True, kw_only=True, tag="task.dispatch", tag_field="type"):
    """A unit of work on tasks.queue.<priority>, stored atomically with the event that caused it."""

    task_id: str
    attempt: int
    run_at: float


# ---- replies and queries ----------------------------------------------------------------------------


class TaskAccepted(msgspec.Struct, frozen=True, kw_only=True, tag="task.accepted", tag_field="type"):
    """Reply to a task command: the task's state after it."""

    task_id: str
    status: TaskStatus
    task_type: str
    attempt: int
    run_at: float
    timeout_s: float
    payload: Any = None
    version: int
    seq: int


class GetTask(Message, frozen=True, kw_only=True, tag="task.get"):
    """tasks.query.get: one task from the read model."""

    task_id: TaskId
    min_seq: Annotated[int, msgspec.Meta(ge=0)] | None = None


class ListTasks(Message, frozen=True, kw_only=True, tag="task.list"):
    """tasks.query.list: tasks newest first, filtered, keyset-paginated."""

    status: TaskStatus | None = None
    type: TaskType | None = None
    priority: Priority | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50
    cursor: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    min_seq: Annotated[int, msgspec.Meta(ge=0)] | None = None


class TaskStats(Message, frozen=True, kw_only=True, tag="task.stats"):
    """tasks.query.stats: counts by status and priority, queue depth, oldest waiting."""

    min_seq: Annotated[int, msgspec.Meta(ge=0)] | None = None


class TaskView(msgspec.Struct, frozen=True, kw_only=True):
    """A task as the read model shows it."""

    task_id: str
    type: str
    status: str
    priority: str
    payload: Any = None
    attempt: int
    max_attempts: int
    run_at: str
    timeout_s: float
    progress: float | None = None
    progress_message: str | None = None
    result: Any = None
    error: str | None = None
    worker: str | None = None
    ref: str | None = None
    submitted_at: str
    started_at: str | None = None
    finished_at: str | None = None
    version: int


class TaskPage(msgspec.Struct, frozen=True, kw_only=True):
    """A page of tasks and the cursor of the next page (null at the end)."""

    items: list[TaskView]
    next_cursor: str | None = None


class TaskStatsView(msgspec.Struct, frozen=True, kw_only=True):
    """Queue health at a glance."""

    by_status: dict[str, int]
    by_priority: dict[str, dict[str, int]]
    queue_depth: int
    oldest_waiting_s: float | None = None
    # Per priority: tasks due and not running (pending, or retrying/scheduled and due), and how
    # long the oldest of them has waited since it was due.
    waiting_by_priority: dict[str, int] = {}
    oldest_waiting_s_by_priority: dict[str, float] = {}
