"""The tasks read model: one row per task, folded from task events; list, get and stats."""

from __future__ import annotations

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
_ARRAYS = ", ".join(f"${i}::{'text' if t == 'jsonb' else t}[]" for i, t in enumerate(_TYPES, 1))
_SELECTED = ", ".join(f"{c}::jsonb" if t == "jsonb" else c for c, t in zip(_COLUMNS, _TYPES, strict=True))
_UPSERT = (
    f"INSERT INTO tasks ({', '.join(_COLUMNS)}) SELECT {_SELECTED} FROM unnest({_ARRAYS}) AS u({', '.join(_COLUMNS)}) "
    f"ON CONFLICT (task_id) DO UPDATE SET {', '.join(f'{c} = EXCLUDED.{c}' for c in _COLUMNS[1:])}"
)


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
        self._decoder = msgspec.json.Decoder(TaskEvent)

    def decode(self, stored: StoredEvent) -> TaskEvent:
        return self._decoder.decode(stored.data)

    async def apply(self, conn: asyncpg.Connection, batch: list[tuple[StoredEvent, TaskEvent]]) -> None:
        new = {e.task_id for _, e in batch if isinstance(e, TaskSubmitted)}
        existing = list({e.task_id for _, e in batch} - new)
        rows: dict[str, _Row] = {}
        if existing:
            for r in await conn.fetch(
                f"SELECT {', '.join(c + '::text' if c in ('payload', 'result') else c for c in _COLUMNS)} "
                "FROM tasks WHERE task_id = ANY($1::text[])", existing,
            ):
                rows[r["task_id"]] = _Row(*r.values())
        touched: set[str] = set()
        for stored, event in batch:
            row = rows.get(event.task_id)
            if isinstance(event, TaskSubmitted):
                row = rows[event.task_id] = _Row(
                    event.task_id, event.task_type, "scheduled" if event.run_at > event.at else "pending",
                    event.priority, _json(event.payload), 1, event.retry.max_attempts, _ts(event.run_at),
                    event.timeout_s, None, None, None, None, None, event.ref, _ts(event.at), None, None, stored.seq,
                )
            elif row is None:
                continue
            else:
                self._fold(row, event)
            row.version = stored.seq
            touched.add(event.task_id)
        changed = [rows[i] for i in touched]
        if not changed:
            return
        columns = list(zip(*(
            (r.task_id, r.type, r.status, r.priority, r.payload, r.attempt, r.max_attempts, r.run_at, r.timeout_s,
             r.progress, r.progress_message, r.result, r.error, r.worker, r.ref, r.submitted_at, r.started_at,
             r.finished_at, r.version)
            for r in changed
        ), strict=True))
        await conn.execute(_UPSERT, *map(list, columns))

    @staticmethod
    def _started(row: _Row, started_at: float | None, worker: str | None) -> None:
        """An outcome that carries its attempt's start (no `task.started` was stored for it)."""
        if started_at is not None:
            row.started_at, row.worker = _ts(started_at), worker

    @staticmethod
    def _fold(row: _Row, event: TaskEvent) -> None:
        match event:
            case TaskSubmitted():
                pass
            case TaskStarted():
                row.status, row.attempt, row.worker, row.started_at = "running", event.attempt, event.worker, _ts(event.at)
                row.progress, row.progress_message = None, None
            case TaskProgressed():
                row.progress, row.progress_message = event.percent, event.message
            case TaskCompleted():
                row.status, row.result, row.finished_at, row.error = "completed", _json(event.result), _ts(event.at), None
                row.progress = 100.0
                TasksProjection._started(row, event.started_at, event.worker)
            case TaskFailed():
                row.status, row.error, row.attempt, row.run_at = "retrying", event.error, event.attempt + 1, _ts(event.retry_at)
                TasksProjection._started(row, event.started_at, event.worker)
            case TaskDeadLettered():
                row.status, row.error, row.finished_at = "dead", event.error, _ts(event.at)
                TasksProjection._started(row, event.started_at, event.worker)
            case TaskCancelled():
                row.status, row.finished_at = "cancelled", _ts(event.at)
            case TaskRequeued():
                row.status, row.attempt, row.run_at, row.finished_at = "pending", event.attempt, _ts(event.at), None
                row.max_attempts = event.limit
            case _:
                assert_never(event)


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
    oldest = await pool.fetchval(
        "SELECT min(run_at) FROM tasks WHERE status = ANY($1::text[]) AND run_at <= now()", list(waiting))
    return TaskStatsView(
        by_status=by_status, by_priority=by_priority, queue_depth=sum(by_status.get(s, 0) for s in waiting),
        oldest_waiting_s=(datetime.now(UTC) - oldest).total_seconds() if oldest else None,
    )
