"""The task decider: pure `decide(state, command) -> events`, `evolve(state, event) -> state`, and
`dispatches(events)`: the work messages stored atomically with the events that cause them."""

from __future__ import annotations

import zlib
import msgspec
from msgspec.structs import replace
from typing import Any, assert_never

from actors.errors import NotFoundError, RuleViolationError, ValidationError
from actors.tasks.messages import (
    CancelTask,
    ClaimTask,
    CompleteTask,
    Dispatch,
    FailTask,
    Priority,
    ReportProgress,
    RetryPolicy,
    RetryTask,
    StartTask,
    SubmitTask,
    TaskCancelled,
    TaskCommand,
    TaskCompleted,
    TaskDeadLettered,
    TaskEvent,
    TaskFailed,
    TaskProgressed,
    TaskRequeued,
    TaskStarted,
    TaskStatus,
    TaskSubmitted,
)

FINAL: frozenset[str] = frozenset({"completed", "dead", "cancelled"})


class Task(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The state of one task as folded from its events (untracked by the cyclic GC, see Order)."""

    task_id: str = ""
    exists: bool = False
    status: TaskStatus = "pending"
    task_type: str = ""
    payload: Any = None
    priority: Priority = "normal"
    run_at: float = 0.0
    timeout_s: float = 60.0
    retry: RetryPolicy = RetryPolicy()
    ref: str | None = None
    attempt: int = 1
    limit: int = 1


INITIAL = Task()


def backoff(task_id: str, attempt: int, policy: RetryPolicy) -> float:
    """Delay before the attempt after `attempt`: base * 2^(attempt-1), capped, with jitter.

    The jitter is drawn from a hash of (task, attempt) so the decider stays pure and replays
    give the same schedule.
    """
    delay = min(policy.backoff_max_s, policy.backoff_s * 2 ** (attempt - 1))
    unit = (zlib.crc32(f"{task_id}:{attempt}".encode()) % 10_000) / 10_000  # [0, 1)
    return max(0.0, delay * (1 + policy.jitter * (2 * unit - 1)))


def evolve(state: Task, event: TaskEvent) -> Task:
    """Apply one event to the state."""
    match event:
        case TaskSubmitted():
            return Task(
                task_id=event.task_id, exists=True,
                status="scheduled" if event.run_at > event.at else "pending",
                task_type=event.task_type, payload=event.payload, priority=event.priority, run_at=event.run_at,
                timeout_s=event.timeout_s, retry=event.retry, ref=event.ref, attempt=1, limit=event.retry.max_attempts,
            )
        case TaskStarted():
            return replace(state, status="running", attempt=event.attempt)
        case TaskProgressed():
            return state
        case TaskCompleted():
            return replace(state, status="completed")
        case TaskFailed():
            return replace(state, status="retrying", attempt=event.attempt + 1, run_at=event.retry_at)
        case TaskDeadLettered():
            return replace(state, status="dead", attempt=event.attempt)
        case TaskCancelled():
            return replace(state, status="cancelled")
        case TaskRequeued():
            return replace(state, status="pending", attempt=event.attempt, limit=event.limit, run_at=event.at)
        case _:
            assert_never(event)


def decide(state: Task, command: TaskCommand) -> list[TaskEvent]:
    """Decide which events a command causes, or raise a coded error (nothing is stored then)."""
    match command:
        case SubmitTask():
            if state.exists:
                raise RuleViolationError(f"task {command.task_id} already exists")
            if command.delay_s is not None and command.run_at is not None:
                raise ValidationError("give delay_s or run_at, not both", field="delay_s")
            run_at = command.run_at if command.run_at is not None else command.at + (command.delay_s or 0.0)
            assert command.task_id is not None
            return [TaskSubmitted(
                task_id=command.task_id, at=command.at, task_type=command.type, payload=command.payload,
                priority=command.priority, run_at=run_at, timeout_s=command.timeout_s, retry=command.retry, ref=command.ref,
            )]
        case CancelTask():
            _require_exists(state, command.task_id)
            if state.status in FINAL:
                raise RuleViolationError(f"a {state.status} task cannot be cancelled")
            return [TaskCancelled(task_id=command.task_id, at=command.at, reason=command.reason,
                                  was_running=state.status == "running")]
        case RetryTask():
            _require_exists(state, command.task_id)
            if state.status != "dead":
                raise RuleViolationError(f"only a dead-lettered task can be retried; this one is {state.status}")
            attempt = state.attempt + 1
            return [TaskRequeued(task_id=command.task_id, at=command.at, attempt=attempt,
                                 limit=attempt + state.retry.max_attempts - 1)]
        case ClaimTask():
            # Read-only: the reply (the state) tells the worker whether and when it may run.
            _require_current(state, command.task_id, command.attempt, ("pending", "scheduled", "retrying", "running"))
            return []
        case StartTask():
            _require_current(state, command.task_id, command.attempt, ("pending", "scheduled", "retrying", "running"))
            if command.at < state.run_at:
                return []  # not yet: the reply's run_at tells the worker how long to wait
            at = command.at if command.started_at is None else command.started_at
            return [TaskStarted(task_id=command.task_id, at=at, attempt=command.attempt, worker=command.worker)]
        case ReportProgress():
            _require_current(state, command.task_id, command.attempt, ("running",))
            return [TaskProgressed(task_id=command.task_id, at=command.at, attempt=command.attempt,
                                   percent=command.percent, message=command.message)]
        case CompleteTask():
            if state.status == "completed" and command.attempt == state.attempt:
                return []  # recorded once: a second report of the same attempt changes nothing
            started_at, worker = _unrecorded_start(state, command)
            return [TaskCompleted(task_id=command.task_id, at=command.at, attempt=command.attempt,
                                  task_type=state.task_type, ref=state.ref, result=command.result,
                                  started_at=started_at, worker=worker)]
        case FailTask():
            started_at, worker = _unrecorded_start(state, command)
            if command.attempt >= state.limit:
                return [TaskDeadLettered(task_id=command.task_id, at=command.at, attempt=command.attempt,
                                         error=command.error, task_type=state.task_type, ref=state.ref,
                                         started_at=started_at, worker=worker)]
            retry_at = command.at + backoff(command.task_id, command.attempt, state.retry)
            return [TaskFailed(task_id=command.task_id, at=command.at, attempt=command.attempt,
                               error=command.error, retry_at=retry_at, started_at=started_at, worker=worker)]
        case _:
            assert_never(command)


def dispatches(state: Task, events: list[TaskEvent]) -> list[tuple[Priority, Dispatch]]:
    """The work messages the events put on the queue (stored in the same atomic batch)."""
    out: list[tuple[Priority, Dispatch]] = []
    for event in events:
        match event:
            case TaskSubmitted():
                out.append((event.priority, Dispatch(task_id=event.task_id, attempt=1, run_at=event.run_at)))
            case TaskFailed():
                out.append((state.priority, Dispatch(task_id=event.task_id, attempt=event.attempt + 1, run_at=event.retry_at)))
            case TaskRequeued():
                out.append((state.priority, Dispatch(task_id=event.task_id, attempt=event.attempt, run_at=event.at)))
            case _:
                pass
    return out


def _unrecorded_start(state: Task, command: CompleteTask | FailTask) -> tuple[float | None, str | None]:
    """When and where an attempt that ends started, if its start is not stored: a claimed attempt
    that ended before its worker recorded the start (most do) has it stored in its outcome event
    instead of a `task.started` of its own. Refuses an outcome for an attempt nobody runs."""
    if state.status == "running" or command.started_at is None or command.worker is None:
        _require_current(state, command.task_id, command.attempt, ("running",))
        return None, None
    _require_current(state, command.task_id, command.attempt, ("pending", "scheduled", "retrying"))
    return command.started_at, command.worker


def _require_exists(state: Task, task_id: str) -> None:
    if not state.exists:
        raise NotFoundError(f"task {task_id} does not exist")


def _require_current(state: Task, task_id: str, attempt: int, statuses: tuple[str, ...]) -> None:
    _require_exists(state, task_id)
    if state.status not in statuses:
        raise RuleViolationError(f"task {task_id} is {state.status}")
    if attempt != state.attempt:
        raise RuleViolationError(f"attempt {attempt} of task {task_id} is stale (current: {state.attempt})")
