"""The process manager: a paid order is fulfilled by one task and shipped; a dead-lettered
fulfilment is recorded on the order."""

from __future__ import annotations

import pytest

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from actors.fulfilment import DURABLE, FulfilmentManager
from bus.eventstore import EventStore
from bus.pull import Puller
from bus.subjects import Context
from infra.bootstrap import ensure_streams, run_tasks_actor, tasks_context
from tests.conftest import System, eventually
from tests.integration.test_orders_http import PLACE, get, post
from tests.task_types import UNFULFILLABLE

# One stream's mechanics: consumer definitions, sequences, parked positions.
pytestmark = pytest.mark.single_stream


async def _paid_order(system: System) -> str:
    _, _, body = await post(system, "/orders", PLACE)
    oid = body["order_id"]
    assert (await post(system, f"/orders/{oid}/confirm"))[0] == 200
    assert (await post(system, f"/orders/{oid}/pay", {"amount": 300}))[0] == 200
    return oid


async def _wait_order(system: System, oid: str, check: Any, timeout: float = 30) -> dict[str, Any]:
    _, _, view = await eventually(lambda: get(system, f"/orders/{oid}"), lambda r: check(r[2]), timeout=timeout,
                                  every=0.1, failure=f"order {oid} never got there")
    return view


async def _fulfilment_tasks(system: System) -> list[dict[str, Any]]:
    _, _, page = await get(system, "/tasks", type="order.fulfil")
    return page["items"]


async def test_a_paid_order_is_fulfilled_once_and_shipped_even_when_events_are_replayed(system: System) -> None:
    await system.start_worker()
    oid = await _paid_order(system)
    view = await _wait_order(system, oid, lambda v: v.get("status") == "shipped")
    assert view["status"] == "shipped"
    _, _, history = await get(system, f"/orders/{oid}/events")
    shipped = history["events"][-1]
    assert shipped["type"] == "order.shipped" and shipped["event"]["tracking_numbers"][0].startswith("JS")
    # Replay both streams to the process manager from the beginning: nothing new happens.
    js = system.nc.jetstream()
    for ctx in (system.orders, system.tasks):
        await js.delete_consumer(ctx.stream, DURABLE)
        await js.add_consumer(ctx.stream, ConsumerConfig(
            durable_name=DURABLE, filter_subject=ctx.outbox_wildcard, deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT))
    await asyncio.sleep(2)
    for ctx in (system.orders, system.tasks):
        info = await js.consumer_info(ctx.stream, DURABLE)
        assert info.num_pending == 0
    tasks = [t for t in await _fulfilment_tasks(system) if t["ref"] == f"order:{oid}"]
    assert len(tasks) == 1 and tasks[0]["status"] == "completed"
    _, _, again = await get(system, f"/orders/{oid}/events")
    assert len(again["events"]) == len(history["events"])


async def test_a_dead_lettered_fulfilment_is_recorded_on_the_order(system: System) -> None:
    await system.start_worker()
    _, _, body = await post(system, "/orders", PLACE)
    oid = body["order_id"]
    UNFULFILLABLE.add(oid)
    await post(system, f"/orders/{oid}/confirm")
    await post(system, f"/orders/{oid}/pay", {"amount": 300})
    view = await _wait_order(system, oid, lambda v: v.get("failure") is not None, timeout=40)
    assert view["status"] == "paid" and "no stock" in view["failure"]
    _, _, history = await get(system, f"/orders/{oid}/events")
    assert history["events"][-1]["type"] == "order.fulfilment_failed"


@contextlib.asynccontextmanager
async def _manager(system: System, tasks: Context) -> AsyncIterator[FulfilmentManager]:
    manager = FulfilmentManager(system.nc, system.orders, tasks, timeout=2.0)
    running = asyncio.get_running_loop().create_task(manager.run())
    try:
        yield manager
    finally:
        manager.stop()
        await asyncio.wait_for(running, 10)


async def _until_submitted_for(orders: list[str], refs_now: Callable[[], Awaitable[set[str]]]) -> None:
    """Until a fulfilment task was submitted for each order, or fail naming the ones that were."""
    await eventually(refs_now, lambda refs: {f"order:{oid}" for oid in orders} <= refs, timeout=30, every=0.2,
                     failure="a fulfilment task was not submitted for every order")


async def test_an_outage_of_the_task_service_loses_no_paid_order(system: System) -> None:
    # A manager whose task service is not running yet: every submit fails, transiently.
    later = system.settings.model_copy(update={"namespace": f"{system.settings.namespace}b"})
    await ensure_streams(system.nc, later)
    tasks = tasks_context(later)
    store = EventStore(system.nc, tasks.stream)

    async def submitted() -> set[str]:
        return {json.loads(e.data).get("ref") async for e in store.read(tasks.events_wildcard)}

    async with _manager(system, tasks):
        first = await _paid_order(system)
        await asyncio.sleep(0.5)  # the manager has failed on it by now
        await system.stack.enter_async_context(run_tasks_actor(later, system.nc))
        second = await _paid_order(system)  # handled while the first still waits for its retry
        await _until_submitted_for([first, second], submitted)


async def test_an_event_a_crashed_manager_was_given_is_still_handled(system: System) -> None:
    async with _manager(system, system.tasks):
        await asyncio.sleep(0.5)  # its consumers exist
    first = await _paid_order(system)
    crashed = Puller(system.nc, system.orders.stream, DURABLE)  # takes the event, dies before acking
    assert len(await crashed.pull(1, wait_s=5.0)) == 1
    await crashed.close()

    async def submitted() -> set[str]:
        return {t["ref"] for t in await _fulfilment_tasks(system)}

    async with _manager(system, system.tasks):
        second = await _paid_order(system)  # handled long before the first comes back
        await _until_submitted_for([first, second], submitted)


async def test_an_older_consumer_definition_is_replaced_without_replaying_what_it_acked(system: System) -> None:
    js = system.nc.jetstream()
    await js.add_consumer(system.orders.stream, ConsumerConfig(  # as an older release defined it
        durable_name=DURABLE, filter_subject=system.orders.outbox_wildcard, deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.ALL))
    for _ in range(2):
        await _paid_order(system)
    old = Puller(system.nc, system.orders.stream, DURABLE)
    handled = await old.pull(10, wait_s=5.0)
    assert len(handled) == 4  # two orders' outbox copies: confirmed and paid
    await handled[-1].ack()
    await old.close()
    floor = handled[-1].metadata.sequence.stream
    await eventually(lambda: js.consumer_info(system.orders.stream, DURABLE),
                     lambda info: info.ack_floor and info.ack_floor.stream_seq == floor, failure="the ack never landed")

    async with _manager(system, system.tasks):
        await asyncio.sleep(0.5)
    info = await js.consumer_info(system.orders.stream, DURABLE)
    assert info.config.ack_policy == AckPolicy.EXPLICIT
    assert info.config.opt_start_seq == floor + 1
