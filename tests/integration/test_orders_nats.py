"""Order commands and queries over NATS against real nats-server and PostgreSQL."""

from __future__ import annotations

import json

from tests.conftest import System

PLACE = {"customer_id": "c-1", "currency": "EUR", "lines": [{"sku": "apple", "quantity": 2, "unit_price": 150}]}


async def test_place_order_over_nats_stores_an_event_and_replies_with_the_version(system: System) -> None:
    reply = await system.request(system.orders.command("place"), PLACE)
    body = json.loads(reply.data)
    assert reply.headers is None or "Nats-Service-Error-Code" not in reply.headers
    assert body["status"] == "placed" and body["total"] == 300 and body["version"] >= 1
    assert b"error" not in reply.data
    assert await system.messages(system.orders) == 1


async def test_the_state_cache_stays_bounded_and_evicted_orders_reload_from_the_stream(system: System) -> None:
    from actors.orders.service import order_spec
    from bus.eventstore import PartitionedStore
    from actors.runtime import Actor

    actor = Actor(system.nc, PartitionedStore.open(system.nc, system.orders), order_spec(system.orders), cache_size=3)
    from actors.orders.messages import AddItem, OrderAccepted, OrderLine, PlaceOrder

    ids = []
    for i in range(10):
        placed = await actor.execute(PlaceOrder(customer_id=f"c{i}", currency="EUR",
                                                lines=[OrderLine(sku="w", quantity=1, unit_price=1)]), None)
        assert isinstance(placed, OrderAccepted)
        ids.append(placed.order_id)
    assert len(actor._cache) == 3  # noqa: SLF001
    reply = await actor.execute(AddItem(order_id=ids[0], sku="x", quantity=2, unit_price=5), None)
    assert isinstance(reply, OrderAccepted) and reply.total == 1 + 10 and reply.status == "placed"
    await actor.stop()


async def test_a_keyed_retry_on_another_actor_process_gets_the_same_answer_and_stores_nothing(system: System) -> None:
    from actors.orders.messages import AddItem, OrderAccepted, OrderLine, PlaceOrder
    from actors.orders.service import order_spec
    from bus import subjects as h
    from bus.eventstore import PartitionedStore
    from actors.runtime import Actor

    other = Actor(system.nc, PartitionedStore.open(system.nc, system.orders), order_spec(system.orders))
    placed = await system.actor.execute(PlaceOrder(customer_id="c", currency="EUR",
                                                   lines=[OrderLine(sku="w", quantity=1, unit_price=1)]), None)
    assert isinstance(placed, OrderAccepted)
    oid = placed.order_id
    # The other process knows the order as it was before the keyed command.
    await other.execute(AddItem(order_id=oid, sku="x", quantity=1, unit_price=10), None)
    add = AddItem(order_id=oid, sku="y", quantity=1, unit_price=100)
    first = await system.actor.execute(add, {h.IDEMPOTENCY_KEY: "add-y"})
    retry = await other.execute(add, {h.IDEMPOTENCY_KEY: "add-y"})  # the retry lands elsewhere
    assert retry == first
    after = await other.execute(AddItem(order_id=oid, sku="z", quantity=1, unit_price=1), None)
    assert isinstance(after, OrderAccepted) and after.total == 1 + 10 + 100 + 1
    history = await PartitionedStore.open(system.nc, system.orders).load(system.orders.events(oid))
    assert len(history) == 4  # placed, x, y once, z
    await other.stop()


async def test_a_refusal_is_checked_against_the_stream_when_another_process_wrote_meanwhile(system: System) -> None:
    from actors.orders.messages import ConfirmOrder, OrderAccepted, OrderLine, PayOrder, PlaceOrder
    from actors.orders.service import order_spec
    from bus.eventstore import PartitionedStore
    from actors.runtime import Actor

    other = Actor(system.nc, PartitionedStore.open(system.nc, system.orders), order_spec(system.orders))
    placed = await other.execute(PlaceOrder(customer_id="c", currency="EUR",
                                            lines=[OrderLine(sku="w", quantity=1, unit_price=100)]), None)
    assert isinstance(placed, OrderAccepted)
    added = await system.request(system.orders.command("add_item"),
                                 {"order_id": placed.order_id, "sku": "a", "quantity": 1, "unit_price": 300})
    assert json.loads(added.data)["total"] == 400
    await system.actor.execute(ConfirmOrder(order_id=placed.order_id), None)
    # `other` cached the order as placed with one line; paying it there must see the confirm.
    paid = await other.execute(PayOrder(order_id=placed.order_id, amount=400), None)
    assert isinstance(paid, OrderAccepted) and paid.status == "paid"
    await other.stop()
