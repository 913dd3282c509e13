"""The tasks read model: one row per task, folded from task events; list, get and stats."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, assert_never

import asyncpg
import msgspec

from actors.tasks.messages import (
    GetTask,
    ListTasks,
    TaskCancelled,
    TaskCompleted,
    TaskDeadLettered,
    TASK_EVENTS,
    TaskEvent,
    TaskFailed,
    TaskPage,
    TaskProgressed,
    TaskRequeued,
    TaskStarted,
    TaskStats,
    TaskStatsView,
    TaskSubmitted,
    TaskView,
)
from bus.errors import NotFoundError
from bus.eventstore import StoredEvent
from projections.paging import keyset_page

_COLUMNS = ("task_id", "type", "status", "priority", "payload", "attempt", "max_attempts", "run_at", "timeout_s",
            "progress", "progress_message", "result", "error", "worker", "ref", "submitted_at", "started_at",
            "finished_at", "version")
_TYPES = ("text", "text", "text", "text", "jsonb", "int", "int", "timestamptz", "float8", "float8", "text", "jsonb",
          "text", "text", "text", "timestamptz", "timestamptz", "timestamptz", "bigint")
_TYPE = dict(zip(_COLUMNS, _TYPES, strict=True))
_ARRAYS = ", ".join(f"${i}::{'text' if t == 'jsonb' else t}[]" for i, t in enumerate(_TYPES, 1))
_SELECTED = ", ".join(f"{c}::jsonb" if t == "jsonb" else c for c, t in zip(_COLUMNS, _TYPES, strict=True))
_UPSERT = (
    f"INSERT INTO tasks ({', '.join(_COLUMNS)}) SELECT {_SELECTED} FROM unnest({_ARRAYS}) AS u({', '.join(_COLUMNS)}) "
    f"ON CONFLICT (task_id) DO UPDATE SET {', '.join(f'{c} = EXCLUDED.{c}' for c in _COLUMNS[1:])}"
)


DDL = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id          text PRIMARY KEY,
    type             text NOT NULL,
    status           text NOT NULL,
    priority         text NOT NULL,
    payload          jsonb,
    attempt          integer NOT NULL,
    max_attempts     integer NOT NULL,
    run_at           timestamptz NOT NULL,
    timeout_s        double precision NOT NULL,
    progress         double precision,
    progress_message text,
    result           jsonb,
    error            text,
    worker           text,
    ref              text,
    submitted_at     timestamptz NOT NULL,
    started_at       timestamptz,
    finished_at      timestamptz,
    version          bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_by_time ON tasks (submitted_at DESC, task_id DESC);
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status, submitted_at DESC, task_id DESC);
"""
TABLES = ("tasks",)


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


@dataclass(slots=True)
class _Row:
    task_id: str
    type: str
    status: str
    priority: str
    payload: str | None
    attempt: int
    max_attempts: int
    run_at: datetime
    timeout_s: float
    progress: float | None
    progress_message: str | None
    result: str | None
    error: str | None
    worker: str | None
    ref: str | None
    submitted_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    version: int


def _json(value: Any) -> str | None:
    return None if value is None else msgspec.json.encode(value).decode()


class TasksProjection:
    """Folds a batch of task events into the `tasks` table."""

    name = "tasks"

    def __init__(self) -> None:
        self._decoder = TASK_EVENTS

    @staticmethod
    def aggregate_id(event: TaskEvent) -> str:
        return event.task_id

    def decode(self, stored: StoredEvent) -> TaskEvent:
        return self._decoder.decode(stored.data)

    async def apply(self, conn: asyncpg.Connection, batch: list[tuple[StoredEvent, TaskEvent]]) -> None:
        """Tasks submitted in this batch are folded in memory and inserted whole; the others get
        only the columns their events set (one UPDATE per set of columns, no read first)."""
        rows: dict[str, _Row] = {}
        patches: dict[str, dict[str, Any]] = {}
        for stored, event in batch:
            if isinstance(event, TaskSubmitted):
                rows[event.task_id] = _Row(
                    event.task_id, event.task_type, "scheduled" if event.run_at > event.at else "pending",
                    event.priority, _json(event.payload), 1, event.retry.max_attempts, _ts(event.run_at),
                    event.timeout_s, None, None, None, None, None, event.ref, _ts(event.at), None, None, stored.seq,
                )
                continue
            changes = _changes(event)
            changes["version"] = stored.seq
            row = rows.get(event.task_id)
            if row is None:
                patches.setdefault(event.task_id, {}).update(changes)
            else:
                for column, value in changes.items():
                    setattr(row, column, value)
        if rows:
            columns = list(zip(*(
                (r.task_id, r.type, r.status, r.priority, r.payload, r.attempt, r.max_attempts, r.run_at, r.timeout_s,
                 r.progress, r.progress_message, r.result, r.error, r.worker, r.ref, r.submitted_at, r.started_at,
                 r.finished_at, r.version)
                for r in rows.values()
            ), strict=True))
            await conn.execute(_UPSERT, *map(list, columns))
        by_shape: dict[tuple[str, ...], list[tuple[str, dict[str, Any]]]] = {}
        for task_id, patch in patches.items():
            by_shape.setdefault(tuple(sorted(patch)), []).append((task_id, patch))
        for shape, group in by_shape.items():
            await conn.execute(_update(shape), [t for t, _ in group], *([p[c] for _, p in group] for c in shape))


def _changes(event: TaskEvent) -> dict[str, Any]:
    """The columns an event (other than the submission) sets, to their new values."""
    match event:
        case TaskSubmitted():
            raise AssertionError("a submission builds the whole row")
        case TaskStarted():
            return {"status": "running", "attempt": event.attempt, "worker": event.worker, "started_at": _ts(event.at),
                    "progress": None, "progress_message": None}
        case TaskProgressed():
            return {"progress": event.percent, "progress_message": event.message}
        case TaskCompleted():
            return {"status": "completed", "result": _json(event.result), "finished_at": _ts(event.at), "error": None,
                    "progress": 100.0, **_start(event.started_at, event.worker)}
        case TaskFailed():
            return {"status": "retrying", "error": event.error, "attempt": event.attempt + 1,
                    "run_at": _ts(event.retry_at), **_start(event.started_at, event.worker)}
        case TaskDeadLettered():
            return {"status": "dead", "error": event.error, "finished_at": _ts(event.at),
                    **_start(event.started_at, event.worker)}
        case TaskCancelled():
            return {"status": "cancelled", "finished_at": _ts(event.at)}
        case TaskRequeued():
            return {"status": "pending", "attempt": event.attempt, "run_at": _ts(event.at), "finished_at": None,
                    "max_attempts": event.limit}
        case _:
            assert_never(event)


def _start(started_at: float | None, worker: str | None) -> dict[str, Any]:
    """An outcome that carries its attempt's start (no `task.started` was stored for it)."""
    return {} if started_at is None else {"started_at": _ts(started_at), "worker": worker}


@functools.cache
def _update(shape: tuple[str, ...]) -> str:
    """UPDATE of these columns (and nothing else) for many tasks: $1 ids, then one array each."""
    arrays = ", ".join(f"${i}::{'text' if _TYPE[c] == 'jsonb' else _TYPE[c]}[]" for i, c in enumerate(shape, 2))
    sets = ", ".join(f"{c} = u.{c}::jsonb" if _TYPE[c] == "jsonb" else f"{c} = u.{c}" for c in shape)
    return (f"UPDATE tasks SET {sets} FROM unnest($1::text[], {arrays}) AS u(task_id, {', '.join(shape)}) "
            "WHERE tasks.task_id = u.task_id")


# ---- queries -------------------------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _view(r: asyncpg.Record) -> TaskView:
    return TaskView(
        task_id=r["task_id"], type=r["type"], status=r["status"], priority=r["priority"],
        payload=msgspec.json.decode(r["payload"]) if r["payload"] else None, attempt=r["attempt"],
        max_attempts=r["max_attempts"], run_at=_iso(r["run_at"]) or "", timeout_s=r["timeout_s"],
        progress=r["progress"], progress_message=r["progress_message"],
        result=msgspec.json.decode(r["result"]) if r["result"] else None, error=r["error"], worker=r["worker"],
        ref=r["ref"], submitted_at=_iso(r["submitted_at"]) or "", started_at=_iso(r["started_at"]),
        finished_at=_iso(r["finished_at"]), version=r["version"],
    )


_SELECT = "SELECT *, payload::text AS payload, result::text AS result FROM tasks"


async def get_task(pool: asyncpg.Pool, query: GetTask) -> TaskView:
    row = await pool.fetchrow(_SELECT + " WHERE task_id = $1", query.task_id)
    if row is None:
        raise NotFoundError(f"task {query.task_id} not found")
    return _view(row)


async def list_tasks(pool: asyncpg.Pool, query: ListTasks) -> TaskPage:
    rows, cursor = await keyset_page(
        pool, _SELECT, (("status", query.status), ("type", query.type), ("priority", query.priority)),
        time_column="submitted_at", id_column="task_id", cursor=query.cursor, limit=query.limit,
    )
    return TaskPage(items=[_view(r) for r in rows], next_cursor=cursor)


async def task_stats(pool: asyncpg.Pool, query: TaskStats) -> TaskStatsView:
    by_status: dict[str, int] = {}
    by_priority: dict[str, dict[str, int]] = {}
    for r in await pool.fetch("SELECT status, priority, count(*) AS n FROM tasks GROUP BY status, priority"):
        by_status[r["status"]] = by_status.get(r["status"], 0) + r["n"]
        by_priority.setdefault(r["priority"], {})[r["status"]] = r["n"]
    waiting = ("pending", "scheduled", "retrying")
    due = await pool.fetch(
        "SELECT priority, count(*) AS n, min(run_at) AS oldest FROM tasks "
        "WHERE status = ANY($1::text[]) AND run_at <= now() GROUP BY priority", list(waiting))
    now = datetime.now(UTC)
    oldest = min((r["oldest"] for r in due), default=None)
    return TaskStatsView(
        by_status=by_status, by_priority=by_priority, queue_depth=sum(by_status.get(s, 0) for s in waiting),
        oldest_waiting_s=(now - oldest).total_seconds() if oldest else None,
        waiting_by_priority={r["priority"]: r["n"] for r in due},
        oldest_waiting_s_by_priority={r["priority"]: (now - r["oldest"]).total_seconds() for r in due},
    )
