"""The read model equals the fold of the stream, exactly once in effect."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from infra.status import rebuild
from tests.conftest import System
from tests.integration.test_orders_http import PLACE, get, post


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


async def test_redelivered_events_are_not_applied_twice(system: System) -> None:
    seq = await _make_history(system)
    before = await _orders(system, seq)
    # Simulate redelivery of the whole stream: restart the durable consumer from sequence 1
    # while the checkpoint in PostgreSQL stays where it is.
    js = system.nc.jetstream()
    projector = system.projector
    durable = projector.durable
    await js.delete_consumer(system.orders.stream, durable)
    await js.add_consumer(system.orders.stream, ConsumerConfig(
        durable_name=durable, filter_subject=system.orders.events_wildcard, deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.ALL,
    ))
    for _ in range(100):
        info = await js.consumer_info(system.orders.stream, durable)
        if info.ack_floor and info.ack_floor.stream_seq >= seq:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the projector did not consume the redelivered events")
    assert await _orders(system, seq) == before
    assert before and all(total == 300 + 30 for _, total, _, _ in before.values())


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
