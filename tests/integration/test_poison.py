"""Poison never stops a reader: an event a projection or the process manager cannot decode or
apply is parked (listed, counted, retried or skipped) and the reader moves on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path

import asyncpg
import msgspec
import pytest
from prometheus_client import REGISTRY

from actors.fulfilment import DURABLE as FULFILMENT_READER
from actors.order_saga import READER as SAGA_READER
from actors.orders.messages import OrderLine, OrderPlaced
from actors.tasks.messages import RetryPolicy, TaskSubmitted
from actors.tasks.worker import PARKED_READER as WORKERS_READER
from bus import parking
from bus import subjects as h
from bus.eventstore import StoredEvent
from bus.parking import ParkedEvent
from infra import parked as parked_cli
from infra.bootstrap import ensure_streams, nats_connection, orders_context, parked_subjects, run_orders_actor
from infra.embedded import EmbeddedPostgres, free_port
from infra.status import rebuild
from infra.status import status as status_command
from projections.orders import OrdersProjection
from projections.runner import Checkpoints, Projector
from projections import inventory as inventory_model
from projections import orders as orders_model
from projections import tasks as tasks_model
from projections.schema import create_pool, ensure_schema
from tests.conftest import System, eventually, make_settings, until
from tests.integration.test_fulfilment import _paid_order, _wait_order
from tests.integration.test_orders_http import PLACE, get, post

# One stream's mechanics: consumer definitions, sequences, parked positions.
pytestmark = pytest.mark.single_stream


def _parked_total(reader: str) -> float:
    return REGISTRY.get_sample_value("jetsource_parked_events_total", {"reader": reader}) or 0.0


async def _publish(system: System, subject: str, data: bytes) -> int:
    """Store data as an actor would have appended it (with a command id): poison from a writer."""
    headers = {h.EV_COMMAND_ID: f"poison-{subject}"}
    return int((await system.nc.jetstream().publish(subject, data, headers=headers)).seq)


async def _parked(system: System, reader: str, count: int) -> list[ParkedEvent]:
    """Once `reader` has exactly `count` parked events: them, by sequence."""
    return await eventually(lambda: parking.unresolved(system.nc, parked_subjects(system.settings), reader),
                            lambda found: len(found) == count, failure=f"{reader} did not park {count} events")


def _by_seq(events: list[ParkedEvent]) -> dict[int, ParkedEvent]:
    return {e.seq: e for e in events}


async def test_the_orders_projection_parks_poison_and_keeps_up(system: System) -> None:
    reader, stream = "orders_projection", system.orders.stream
    counted = _parked_total(reader)
    placed = msgspec.json.encode(OrderPlaced(order_id="poison-e", customer_id="c-1", currency="EUR",
                                             lines=[OrderLine(sku="apple", quantity=1, unit_price=100)]))
    first = await _publish(system, system.orders.events("poison-e"), placed)
    assert (await get(system, "/orders/poison-e", min_seq=first))[0] == 200
    # The same order placed again, on its own batch: its line collides with the stored one.
    again = placed.replace(b'"unit_price":100', b'"unit_price":777')
    poison = {
        await _publish(system, system.orders.events("poison-a"), b"\xff{not json"): "DecodeError",
        await _publish(system, system.orders.events("poison-b"), b'{"type":"order.placed","order_id":"poison-b"}'):
            "ValidationError",
        await _publish(system, system.orders.events("poison-c"), b'{"type":"order.exploded","order_id":"poison-c"}'):
            "ValidationError",
        await _publish(system, system.orders.events("poison-d"),
                       b'{"type":"order.confirmed","v":2,"order_id":"poison-d","total":0}'): "EventVersionError",
        await _publish(system, system.orders.events("poison-e"), again): "UniqueViolationError",
    }
    # After the poison, the projection still follows what the actor stores.
    status, headers, body = await post(system, "/orders", PLACE)
    assert status == 201
    status, _, view = await get(system, f"/orders/{body['order_id']}", min_seq=headers["X-Stream-Sequence"])
    assert (status, view["status"], view["total"]) == (200, "placed", 300)

    found = _by_seq(await _parked(system, reader, len(poison)))
    assert set(found) == set(poison)
    for seq, error in poison.items():
        assert (found[seq].reader, found[seq].stream) == (reader, stream)
        assert found[seq].error.startswith(error), found[seq].error
    assert found[min(poison)].subject == system.orders.events("poison-a")
    assert found[min(poison)].data == b"\xff{not json"
    assert _parked_total(reader) - counted >= len(poison)

    # Retrying the collision while it still collides keeps it parked, with the new attempt's error.
    collision = found[max(poison)]
    code = await parked_cli.command(system.settings, "retry", target=(reader, stream, collision.seq))
    assert code == 1
    still = await parking.get(system.nc, parked_subjects(system.settings), reader, stream, collision.seq)
    assert still is not None and still.parked_seq > collision.parked_seq and "UniqueViolationError" in still.error
    # After a fix (the colliding line removed), a retry applies it and resolves it.
    pool = await create_pool(system.settings.resolved_database_url(), system.settings.db_schema)
    try:
        await pool.execute("DELETE FROM order_lines WHERE order_id = 'poison-e'")
    finally:
        await pool.close()
    assert await parked_cli.command(system.settings, "retry", target=(reader, stream, collision.seq)) == 0
    _, _, fixed = await get(system, "/orders/poison-e")
    assert fixed["lines"] == [{"sku": "apple", "quantity": 1, "unit_price": 777}]
    # Skipping the rest removes them.
    assert await parked_cli.command(system.settings, "skip", everything=True, reader=reader) == 0
    assert await parking.unresolved(system.nc, parked_subjects(system.settings), reader) == []


def _submitted(task_id: str, run_at: float) -> bytes:
    return msgspec.json.encode(TaskSubmitted(task_id=task_id, at=1.0, task_type="echo", priority="normal",
                                             run_at=run_at, timeout_s=5.0, retry=RetryPolicy()))


async def test_the_tasks_projection_parks_poison_and_keeps_up(system: System) -> None:
    reader, stream = "tasks_projection", system.tasks.stream
    counted = _parked_total(reader)
    cases = [
        ("poison-a", b"{{{", "DecodeError"),
        ("poison-b", b'{"type":"task.submitted","task_id":"poison-b"}', "ValidationError"),
        ("poison-c", b'{"type":"task.teleported","task_id":"poison-c"}', "ValidationError"),
        ("poison-d", b'{"type":"task.started","v":2,"task_id":"poison-d","at":1.0,"attempt":1,"worker":"w"}',
         "EventVersionError"),
        ("poison-e", _submitted("poison-e", -1e300), "OverflowError"),
    ]
    poison = {await _publish(system, system.tasks.events(name), data): (name, error) for name, data, error in cases}
    good = await _publish(system, system.tasks.events("good-f"), _submitted("good-f", 2.0))
    reply = await system.request(system.tasks.command("submit"), {"type": "echo", "payload": {"n": 1}})
    accepted = msgspec.json.decode(reply.data)

    async def task(task_id: str) -> dict[str, object]:
        return msgspec.json.decode((await system.request(system.tasks.query("get"), {"task_id": task_id})).data)

    view = await eventually(lambda: task(accepted["task_id"]), lambda v: v.get("status") == "pending",
                            failure="the task submitted after the poison never showed")
    assert view["version"] == accepted["seq"] > good
    assert (await task("good-f"))["version"] == good  # stored right after the poison

    found = _by_seq(await _parked(system, reader, len(poison)))
    assert set(found) == set(poison)
    for seq, (name, error) in poison.items():
        assert (found[seq].reader, found[seq].stream, found[seq].subject) == (reader, stream, system.tasks.events(name))
        assert found[seq].error.startswith(error), found[seq].error
    assert _parked_total(reader) - counted >= len(poison)

    overflow = found[max(poison)]
    assert await parked_cli.command(system.settings, "retry", target=(reader, stream, overflow.seq)) == 1
    still = await parking.get(system.nc, parked_subjects(system.settings), reader, stream, overflow.seq)
    assert still is not None and still.parked_seq > overflow.parked_seq and still.error.startswith("OverflowError")
    assert await parked_cli.command(system.settings, "skip", target=(reader, stream, overflow.seq)) == 0
    assert overflow.seq not in _by_seq(await parking.unresolved(system.nc, parked_subjects(system.settings), reader))
    assert await parked_cli.command(system.settings, "skip", everything=True, reader=reader) == 0
    assert await parking.unresolved(system.nc, parked_subjects(system.settings), reader) == []


class _Picky:
    """A read model of order-stream sequences that cannot apply events whose body is `bad`."""

    name = "picky"

    @staticmethod
    def aggregate_id(event: object) -> None:
        return None

    def decode(self, stored: StoredEvent) -> bytes:
        return stored.data

    async def apply(self, conn: asyncpg.Connection, batch: list[tuple[StoredEvent, bytes]]) -> None:
        await conn.executemany("INSERT INTO picky_seen (seq) VALUES ($1)", [(e.seq,) for e, _ in batch])
        if any(body == b"bad" for _, body in batch):
            raise ValueError("cannot apply a bad event")


async def test_a_batch_that_fails_to_apply_parks_only_its_poison(system: System) -> None:
    bodies = [b"good", b"bad", b"good", b"good", b"bad", b"good"]
    seqs = [await _publish(system, system.orders.events(f"picky-{i}"), body) for i, body in enumerate(bodies)]
    pool = await create_pool(system.settings.resolved_database_url(), system.settings.db_schema)
    await pool.execute("CREATE TABLE picky_seen (seq bigint PRIMARY KEY)")
    projector = Projector(system.nc, pool, system.orders, _Picky(), Checkpoints(pool))
    running = asyncio.get_running_loop().create_task(projector.run())  # the events wait: one batch
    try:
        await until(lambda: projector.checkpoint >= seqs[-1], failure="the projector never moved past the poison")
        seen = [r["seq"] for r in await pool.fetch("SELECT seq FROM picky_seen ORDER BY seq")]
        assert seen == [s for s, body in zip(seqs, bodies, strict=True) if body == b"good"]
        found = await _parked(system, "picky_projection", 2)
        assert [e.seq for e in found] == [seqs[1], seqs[4]]
        assert all(e.error == "ValueError: cannot apply a bad event" for e in found)
    finally:
        projector.stop()
        await asyncio.wait_for(running, 10)
        await pool.close()


async def test_the_fulfilment_manager_parks_a_malformed_outbox_event_and_fulfils_the_next_order(
    system: System,
) -> None:
    await system.start_worker()
    seq = await _publish(system, system.orders.outbox("paid"), b"\x00 not an event")
    oid = await _paid_order(system)
    await _wait_order(system, oid, lambda v: v.get("status") == "shipped")
    [found] = await _parked(system, FULFILMENT_READER, 1)
    assert (found.stream, found.seq, found.subject) == (system.orders.stream, seq, system.orders.outbox("paid"))
    assert found.error.startswith("MalformedError: undecodable order event")
    target = (FULFILMENT_READER, system.orders.stream, seq)
    assert await parked_cli.command(system.settings, "retry", target=target) == 1
    still = await parking.get(system.nc, parked_subjects(system.settings), *target)
    assert still is not None and still.parked_seq > found.parked_seq
    assert await parked_cli.command(system.settings, "skip", target=target) == 0
    assert await parking.get(system.nc, parked_subjects(system.settings), *target) is None


async def test_a_worker_parks_an_unreadable_work_item_and_runs_the_tasks_after_it(system: System) -> None:
    queue = system.tasks.queue("high")
    seq = await _publish(system, queue, b'{"type": "task.dispatch", "task_id": 7}')
    await system.start_worker()
    status, _, accepted = await post(system, "/tasks", {"type": "echo", "priority": "high", "payload": {"n": 1}})
    assert status == 202
    await eventually(lambda: get(system, f"/tasks/{accepted['task_id']}"),
                     lambda r: r[0] == 200 and r[2]["status"] == "completed", failure="the task never ran")
    [found] = await _parked(system, WORKERS_READER, 1)
    assert (found.stream, found.seq, found.subject) == (system.tasks.stream, seq, queue)
    # retried, it goes back on its queue and is parked again (still unreadable)
    target = (WORKERS_READER, system.tasks.stream, seq)
    assert await parked_cli.command(system.settings, "retry", target=target) == 0
    [again] = await _parked(system, WORKERS_READER, 1)
    assert again.subject == queue and again.seq > seq


async def test_a_rebuild_with_poison_in_the_stream_completes_and_parks_it_again(
    system: System, capsys: pytest.CaptureFixture[str],
) -> None:
    seq = await _publish(system, system.orders.events("poison-r"), b"not json")
    status, headers, body = await post(system, "/orders", PLACE)
    [before] = await _parked(system, "orders_projection", 1)
    assert before.seq == seq
    # The operator sees it in `jetsource status` and in `jetsource projections parked`.
    capsys.readouterr()
    assert await status_command(system.settings, system.nc) == 0
    shown = capsys.readouterr().out
    section = shown.split("\nparked")[-1].splitlines()
    assert section[1].split() == ["orders_projection", "1"] and "jetsource projections parked" in section[2]
    assert await parked_cli.command(system.settings, "list") == 0
    [listed] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (listed["reader"], listed["seq"], listed["body"], listed["size"]) == ("orders_projection", seq, "not json", 8)
    assert await rebuild(system.settings, "orders") == 0
    [after] = await _parked(system, "orders_projection", 1)
    assert after.seq == seq and after.parked_seq > before.parked_seq
    status, _, view = await get(system, f"/orders/{body['order_id']}", min_seq=headers["X-Stream-Sequence"])
    assert (status, view["total"]) == (200, 300)


async def test_the_projector_catches_up_after_postgresql_restarts(
    namespace: str, nats_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="projections.runner")
    postgres = EmbeddedPostgres(tmp_path, free_port(), durable=False)
    await asyncio.to_thread(postgres.start)
    settings = make_settings(namespace, nats_url, postgres.url, partitions=1)
    try:
        async with contextlib.AsyncExitStack() as stack:
            nc = await stack.enter_async_context(nats_connection(settings, "test-pg-restart"))
            await ensure_streams(nc, settings)
            await stack.enter_async_context(run_orders_actor(settings, nc))
            await ensure_schema(postgres.url, settings.db_schema, [m.DDL for m in (orders_model, tasks_model, inventory_model)])
            pool = await create_pool(postgres.url, settings.db_schema)
            stack.push_async_callback(pool.close)
            projector = Projector(nc, pool, orders_context(settings), OrdersProjection(), Checkpoints(pool))
            running = asyncio.get_running_loop().create_task(projector.run())

            async def place() -> int:
                reply = await nc.request(orders_context(settings).command("place"), msgspec.json.encode(PLACE), timeout=10)
                return int(msgspec.json.decode(reply.data)["seq"])

            first = await place()
            await until(lambda: projector.checkpoint >= first, failure="the projector never applied the first order")
            await asyncio.to_thread(postgres.stop)
            last = max([await place() for _ in range(3)])  # the write side does not need PostgreSQL
            await asyncio.to_thread(postgres.start)
            try:
                await until(lambda: projector.checkpoint >= last or running.done(), timeout=30,
                            failure="the projector never caught up after the restart")
                assert not running.done(), running
                assert await pool.fetchval("SELECT count(*) FROM orders") == 4
                # It holds its lock again (the old one died with its connection), so a standby
                # does not take over beside it.
                assert await pool.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted") == 1
            finally:
                projector.stop()
                await asyncio.wait_for(running, 10)
    finally:
        await asyncio.to_thread(postgres.stop)
    outages = [r for r in caplog.records if "retrying until it is back" in r.getMessage()]
    assert len(outages) == 1, [r.getMessage() for r in caplog.records]


async def test_a_retry_acts_on_the_event_its_stream_holds_not_on_the_parked_copy(system: System) -> None:
    _, headers, _ = await post(system, "/orders", PLACE)
    seq = int(headers["X-Stream-Sequence"])
    parked = parked_subjects(system.settings)
    # a parked entry whose subject is not what the stream holds at that sequence (forged, or stale)
    await parking.park(system.nc, parked, reader=FULFILMENT_READER, stream=system.orders.stream, seq=seq,
                       subject=system.orders.outbox("paid"), data=b'{"type": "order.paid", "order_id": "x"}',
                       headers={h.EV_COMMAND_ID: "forged"}, error="forged")
    target = (FULFILMENT_READER, system.orders.stream, seq)
    assert await parked_cli.command(system.settings, "retry", target=target) == 1
    assert await parking.get(system.nc, parked, *target) is not None  # kept, for an operator to skip
    assert (await get(system, "/tasks?type=order.fulfil"))[2]["items"] == []  # nothing was submitted


async def test_an_orders_history_shows_its_events_around_poison_on_its_subject(system: System) -> None:
    _, _, placed = await post(system, "/orders", PLACE)
    oid = placed["order_id"]
    await _publish(system, system.orders.events(oid), b"\xff{not json")
    await _publish(system, system.orders.events(oid), b'{"type": "order.confirmed", "order_id": "someone-else"}')
    status, _, history = await get(system, f"/orders/{oid}/events")
    assert status == 200, history
    assert [e["type"] for e in history["events"]] == ["order.placed"]


async def test_the_order_saga_parks_a_malformed_outbox_event_and_reserves_the_next_order(system: System) -> None:
    # Bytes that are not an order event, and JSON naming an order but of the wrong shape.
    first = await _publish(system, system.orders.outbox("confirmed"), b"\x00 not an event")
    second = await _publish(system, system.orders.outbox("confirmed"), b'{"type": "order.confirmed", "order_id": 7}')
    status, _, body = await post(system, "/orders", PLACE)
    assert status == 201
    status, _, body = await post(system, f"/orders/{body['order_id']}/confirm")
    assert (status, body["status"]) == (200, "reserved"), body
    found = _by_seq(await _parked(system, SAGA_READER, 2))
    assert set(found) == {first, second}
    assert all(e.error.startswith("MalformedError: undecodable order event") for e in found.values())
