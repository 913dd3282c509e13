"""The read model equals the fold of the stream, exactly once in effect."""

from __future__ import annotations

import pytest

import asyncio
from typing import Any

import asyncpg

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from actors.tasks.messages import (
    RetryPolicy,
    TaskCancelled,
    TaskCompleted,
    TaskDeadLettered,
    TaskEvent,
    TaskFailed,
    TaskProgressed,
    TaskRequeued,
    TaskStarted,
    TaskSubmitted,
)
from bus.eventstore import StoredEvent
from infra.status import rebuild
from bus.pull import Puller
from projections.runner import Checkpoints, Projector
from projections import inventory as inventory_model
from projections import orders as orders_model
from projections import tasks as tasks_model
from projections.schema import create_pool, ensure_schema
from projections.tasks import TasksProjection
from tests.conftest import System, eventually, until
from tests.integration.test_orders_http import PLACE, get, post

# One stream's mechanics: consumer definitions, sequences, parked positions.
pytestmark = pytest.mark.single_stream


async def _orders(system: System, seq: int) -> dict[str, tuple[Any, ...]]:
    _, _, page = await get(system, "/orders", limit=500, min_seq=seq)
    return {o["order_id"]: (o["status"], o["total"], o["version"], o["lines"]) for o in page["items"]}


async def _make_history(system: System) -> int:
    seq = 0
    for i in range(4):
        _, _, body = await post(system, "/orders", PLACE)
        oid = body["order_id"]
        for _ in range(3):
            _, headers, _ = await post(system, f"/orders/{oid}/items", {"sku": "nut", "quantity": 2, "unit_price": 5})
        if i % 2:
            _, headers, _ = await post(system, f"/orders/{oid}/confirm")
        seq = int(headers["X-Stream-Sequence"])
    return seq


class _Seen:
    """A read model that refuses to see an event twice (primary key on the sequence)."""

    name = "seen_once"

    @staticmethod
    def aggregate_id(event: object) -> None:
        return None

    def decode(self, stored: StoredEvent) -> int:
        return stored.seq

    async def apply(self, conn: asyncpg.Connection, batch: list[tuple[StoredEvent, int]]) -> None:
        await conn.executemany("INSERT INTO seen_once (seq) VALUES ($1)", [(seq,) for _, seq in batch])


async def test_redelivered_events_are_not_applied_twice(system: System) -> None:
    seq = await _make_history(system)
    pool = await create_pool(system.settings.resolved_database_url(), system.settings.db_schema)
    await pool.execute("CREATE TABLE seen_once (seq bigint PRIMARY KEY)")
    checkpoints = Checkpoints(pool)
    projector = Projector(system.nc, pool, system.orders, _Seen(), checkpoints)
    running = asyncio.get_running_loop().create_task(projector.run())
    try:
        await until(lambda: projector.checkpoint >= seq, every=0.02, failure="the projector never caught up")
    finally:
        projector.stop()
        await asyncio.wait_for(running, 10)
    applied = await pool.fetchval("SELECT count(*) FROM seen_once")
    assert applied > 0 and projector.checkpoint >= seq
    # Newer events, then the whole stream redelivered while the checkpoint in PostgreSQL stays
    # where it is: a second consumer from sequence 1, consumed by the projector's own batch
    # loop, so batches mix events applied already with new ones.
    last = await _make_history(system)
    js = system.nc.jetstream()
    durable = "seen_once_redelivery"
    await js.add_consumer(system.orders.stream, ConsumerConfig(
        durable_name=durable, filter_subject=system.orders.events_wildcard, deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.ALL,
    ))
    replayer = Projector(system.nc, pool, system.orders, _Seen(), checkpoints)
    replayer.checkpoint = await checkpoints.get(_Seen.name)
    puller = Puller(system.nc, system.orders.stream, durable)
    running = asyncio.get_running_loop().create_task(replayer._consume(puller))  # noqa: SLF001
    try:
        await eventually(lambda: js.consumer_info(system.orders.stream, durable),
                         lambda info: (info.ack_floor and info.ack_floor.stream_seq >= last) or running.done(),
                         failure="the projector did not consume the redelivered events")
        replayer.stop()
        await asyncio.wait_for(running, 10)  # a second insert of a sequence would raise here
        assert await pool.fetchval("SELECT count(*) FROM seen_once WHERE seq <= $1", seq) == applied
        assert await pool.fetchval("SELECT max(seq) FROM seen_once") == last
    finally:
        replayer.stop()
        await puller.close()
        await pool.close()


async def test_rebuild_reproduces_the_read_model_from_the_stream(system: System) -> None:
    seq = await _make_history(system)
    # a paid order puts an outbox message after the last event: rebuild must not wait for it
    _, _, body = await post(system, "/orders", PLACE)
    await post(system, f"/orders/{body['order_id']}/confirm")
    _, headers, _ = await post(system, f"/orders/{body['order_id']}/pay", {"amount": 300})
    seq = int(headers["X-Stream-Sequence"])
    before = await _orders(system, seq)
    assert await rebuild(system.settings) == 0
    assert await _orders(system, seq) == before


class _FailsOnce:
    """A read model of order-event sequences whose first batch fails after delivery."""

    name = "fails_once"

    def __init__(self) -> None:
        self.failed = False

    @staticmethod
    def aggregate_id(event: object) -> None:
        return None

    def decode(self, stored: StoredEvent) -> int:
        return stored.seq

    async def apply(self, conn: asyncpg.Connection, batch: list[tuple[StoredEvent, int]]) -> None:
        if not self.failed:
            self.failed = True
            raise ConnectionError("database went away mid-batch")
        await conn.executemany("INSERT INTO fails_once_seen (seq) VALUES ($1)", [(seq,) for _, seq in batch])


async def test_a_failed_batch_is_applied_later_even_when_newer_events_arrive_first(system: System) -> None:
    pool = await create_pool(system.settings.resolved_database_url(), system.settings.db_schema)
    projection = _FailsOnce()
    await pool.execute("CREATE TABLE fails_once_seen (seq bigint PRIMARY KEY)")
    projector = Projector(system.nc, pool, system.orders, projection, Checkpoints(pool))
    first = await post(system, "/orders", PLACE)  # delivered to the projector, which fails on it
    running = asyncio.get_running_loop().create_task(projector.run())
    try:
        await until(lambda: projection.failed, every=0.02, failure="the first batch never failed")
        _, headers, _ = await post(system, "/orders", PLACE)  # newer, arrives while it recovers
        last = int(headers["X-Stream-Sequence"])

        async def seen_now() -> list[int]:
            return [r["seq"] for r in await pool.fetch("SELECT seq FROM fails_once_seen ORDER BY seq")]

        seen = await eventually(seen_now, lambda seen: bool(seen) and seen[-1] >= last,
                                failure="the newer event was never applied")
        assert first[1]["X-Stream-Sequence"] and seen == list(range(1, last + 1))
    finally:
        projector.stop()
        await asyncio.wait_for(running, 10)
        await pool.close()


def _task_history() -> list[TaskEvent]:
    """Every kind of task event: a task that retries then completes, a quick one whose start
    comes with its outcome, one dead-lettered, brought back and cancelled."""
    policy = RetryPolicy(max_attempts=2)
    a, b, c = "task-a", "task-b", "task-c"
    return [
        TaskSubmitted(task_id=a, at=100.0, task_type="echo", payload={"n": 1}, priority="high", run_at=100.0,
                      timeout_s=5.0, retry=policy),
        TaskSubmitted(task_id=b, at=101.0, task_type="echo", priority="low", run_at=150.0, timeout_s=5.0,
                      retry=policy, ref="order-1"),
        TaskSubmitted(task_id=c, at=102.0, task_type="sleep", priority="normal", run_at=102.0, timeout_s=5.0,
                      retry=policy),
        TaskStarted(task_id=a, at=103.0, attempt=1, worker="w1"),
        TaskProgressed(task_id=a, at=104.0, attempt=1, percent=40.0, message="reading"),
        TaskFailed(task_id=a, at=105.0, attempt=1, error="boom", retry_at=107.0),
        TaskFailed(task_id=c, at=105.5, attempt=1, error="slow", retry_at=106.0, started_at=105.2, worker="w2"),
        TaskStarted(task_id=a, at=108.0, attempt=2, worker="w2"),
        TaskCompleted(task_id=b, at=151.0, attempt=1, task_type="echo", result=[1, "x"], started_at=150.5, worker="w1"),
        TaskDeadLettered(task_id=c, at=107.0, attempt=2, error="slow again", task_type="sleep", started_at=106.5,
                         worker="w1"),
        TaskCompleted(task_id=a, at=109.0, attempt=2, task_type="echo", result={"ok": True}),
        TaskRequeued(task_id=c, at=110.0, attempt=3, limit=4),
        TaskCancelled(task_id=c, at=111.0, reason="no longer needed"),
    ]


async def _fold_tasks(database_url: str, schema: str, batches: list[list[TaskEvent]]) -> list[dict[str, Any]]:
    await ensure_schema(database_url, schema, [m.DDL for m in (orders_model, tasks_model, inventory_model)])
    pool = await create_pool(database_url, schema)
    projection = TasksProjection()
    seq = 0
    try:
        for events in batches:
            stored = []
            for event in events:
                seq += 1
                stored.append((StoredEvent(subject=f"tasks.events.{event.task_id}", seq=seq, time="", data=b"",
                                           headers={}), event))
            async with pool.acquire() as conn, conn.transaction():
                await projection.apply(conn, stored)
        return [dict(r) for r in await pool.fetch("SELECT * FROM tasks ORDER BY task_id")]
    finally:
        await pool.close()


async def test_the_tasks_read_model_is_the_same_however_its_events_are_batched(
    database_url: str, namespace: str,
) -> None:
    history = _task_history()
    whole = await _fold_tasks(database_url, f"{namespace}_whole", [history])
    # One event per batch: every change after a submission goes through the column UPDATEs.
    one_by_one = await _fold_tasks(database_url, f"{namespace}_single", [[e] for e in history])
    halves = await _fold_tasks(database_url, f"{namespace}_halves", [history[:5], history[5:]])
    assert one_by_one == whole
    assert halves == whole
    a, b, c = whole
    assert (a["status"], a["attempt"], a["worker"], a["progress"], a["error"], a["result"]) == (
        "completed", 2, "w2", 100.0, None, '{"ok": true}')
    assert a["started_at"].timestamp() == 108.0 and a["version"] == 11
    assert (b["status"], b["worker"], b["started_at"].timestamp(), b["ref"]) == ("completed", "w1", 150.5, "order-1")
    assert (c["status"], c["attempt"], c["max_attempts"], c["error"], c["finished_at"].timestamp()) == (
        "cancelled", 3, 4, "slow again", 111.0)
