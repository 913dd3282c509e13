"""The order saga end to end over HTTP, NATS, JetStream and PostgreSQL: stock is reserved at
confirm (all lines or none), committed at ship, released at cancel; a paid order that is
cancelled while its fulfilment runs is never shipped; a replay of every stream changes nothing."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.js.api import DeliverPolicy

from actors.fulfilment import DURABLE as FULFILMENT
from actors.order_saga import READER as SAGA
from tests.conftest import System, eventually
from tests.integration.test_orders_http import get, post


def _order(*lines: tuple[str, int], price: int = 100) -> dict[str, Any]:
    return {"customer_id": "c-1", "currency": "EUR",
            "lines": [{"sku": sku, "quantity": q, "unit_price": price} for sku, q in lines]}


async def _receive(system: System, sku: str, quantity: int) -> None:
    status, _, body = await post(system, f"/inventory/{sku}/receive", {"quantity": quantity})
    assert status == 200, body


async def _stock(system: System, sku: str) -> dict[str, Any]:
    """The SKU's row in the read model; {} while the projection has not applied it yet."""
    status, _, body = await get(system, f"/inventory/{sku}")
    assert status in (200, 404), body
    return body if status == 200 else {}


async def _settled_stock(system: System, sku: str, expected: dict[str, int]) -> None:
    def matches(body: dict[str, Any]) -> bool:
        return all(body.get(k) == v for k, v in expected.items())

    await eventually(lambda: _stock(system, sku), matches, timeout=15, failure=f"stock of {sku} never settled")


async def _placed(system: System, *lines: tuple[str, int]) -> str:
    status, _, body = await post(system, "/orders", _order(*lines))
    assert status == 201, body
    return str(body["order_id"])


async def test_confirm_answers_rejected_naming_the_short_skus_and_keeps_none_of_the_stock(system: System) -> None:
    await _receive(system, "widget", 1)
    await _receive(system, "gadget", 5)
    oid = await _placed(system, ("gadget", 2), ("widget", 2), ("untracked-thing", 9))
    status, _, body = await post(system, f"/orders/{oid}/confirm")
    assert status == 200, body
    assert body["status"] == "rejected" and body["short_skus"] == ["widget"]
    # All lines or none: the gadgets reserved before the widget was found short are back.
    await _settled_stock(system, "gadget", {"on_hand": 5, "reserved": 0, "available": 5})
    await _settled_stock(system, "widget", {"on_hand": 1, "reserved": 0, "available": 1})
    status, _, body = await post(system, f"/orders/{oid}/pay", {"amount": 1300})
    assert status == 409 and body["error"]["code"] == "rule_violation"
    _, _, view = await eventually(lambda: get(system, f"/orders/{oid}"), lambda r: r[2].get("status") == "rejected")
    assert view["short_skus"] == ["widget"]


async def test_two_orders_racing_for_the_last_units_reserve_exactly_one(system: System) -> None:
    await _receive(system, "last", 3)
    first, second = await _placed(system, ("last", 2)), await _placed(system, ("last", 2))
    answers = await asyncio.gather(post(system, f"/orders/{first}/confirm"), post(system, f"/orders/{second}/confirm"))
    statuses = sorted(body["status"] for _, _, body in answers)
    assert statuses == ["rejected", "reserved"], answers
    await _settled_stock(system, "last", {"on_hand": 3, "reserved": 2, "available": 1})


async def test_an_untracked_sku_is_always_available_and_shipping_commits_tracked_stock(system: System) -> None:
    await system.start_worker()
    await _receive(system, "kept", 10)
    oid = await _placed(system, ("kept", 3), ("never-received", 50))
    status, _, body = await post(system, f"/orders/{oid}/confirm")
    assert (status, body["status"]) == (200, "reserved"), body
    await _settled_stock(system, "kept", {"on_hand": 10, "reserved": 3, "available": 7})
    status, _, body = await post(system, f"/orders/{oid}/pay", {"amount": 5300})
    assert (status, body["status"]) == (200, "paid"), body
    await eventually(lambda: get(system, f"/orders/{oid}"), lambda r: r[2].get("status") == "shipped", timeout=30)
    await _settled_stock(system, "kept", {"on_hand": 7, "reserved": 0, "available": 7})
    assert (await get(system, "/inventory/never-received"))[0] == 404


async def test_pay_right_after_confirm_needs_no_polling(system: System) -> None:
    # The saga's answer may arrive after confirm's bounded wait: pay then waits for it itself.
    for _ in range(5):
        oid = await _placed(system, ("fast", 1))
        confirm, pay = await asyncio.gather(post(system, f"/orders/{oid}/confirm"),
                                            post(system, f"/orders/{oid}/pay", {"amount": 100}))
        assert confirm[0] == 200 and confirm[2]["status"] in ("reserved", "paid"), confirm
        assert pay[0] in (200, 409), pay
        if pay[0] == 409:  # only when pay was decided before confirm: the order was still placed
            assert "placed" in pay[2]["error"]["message"]


async def test_cancel_while_fulfilment_runs_cancels_the_task_never_ships_and_gives_the_stock_back(
    system: System,
) -> None:
    await system.start_worker(fulfil_step_s=1.5)  # picking, packing, handing over take 4.5 s
    await _receive(system, "slow", 5)
    oid = await _placed(system, ("slow", 2))
    assert (await post(system, f"/orders/{oid}/confirm"))[2]["status"] == "reserved"
    status, _, paid = await post(system, f"/orders/{oid}/pay", {"amount": 200})
    assert status == 200, paid

    async def fulfilment() -> dict[str, Any] | None:
        _, _, page = await get(system, "/tasks", type="order.fulfil")
        return next((t for t in page["items"] if t["ref"] == f"order:{oid}"), None)

    await eventually(fulfilment, lambda t: t is not None and t["status"] == "running", timeout=15,
                     failure="the fulfilment task never ran")
    status, _, body = await post(system, f"/orders/{oid}/cancel", {"reason": "changed my mind"})
    assert (status, body["status"], body["refund_due"]) == (200, "cancelled", 200), body
    await eventually(fulfilment, lambda t: t is not None and t["status"] == "cancelled", timeout=15,
                     failure="the fulfilment task was not cancelled")
    await _settled_stock(system, "slow", {"on_hand": 5, "reserved": 0, "available": 5})
    await asyncio.sleep(5)  # longer than the handler would have taken
    _, _, history = await get(system, f"/orders/{oid}/events")
    types = [e["type"] for e in history["events"]]
    assert "order.shipped" not in types and types[-1] == "order.cancelled", types
    _, _, view = await get(system, f"/orders/{oid}")
    assert (view["status"], view["refund_due"]) == ("cancelled", 200)


async def test_a_replay_of_every_stream_to_the_process_managers_changes_nothing(system: System) -> None:
    await system.start_worker()
    await _receive(system, "replayed", 4)
    shipped, cancelled = await _placed(system, ("replayed", 1)), await _placed(system, ("replayed", 1))
    rejected = await _placed(system, ("replayed", 9))
    for oid in (shipped, cancelled, rejected):
        await post(system, f"/orders/{oid}/confirm")
    await post(system, f"/orders/{shipped}/pay", {"amount": 100})
    await post(system, f"/orders/{cancelled}/cancel")
    await eventually(lambda: get(system, f"/orders/{shipped}"), lambda r: r[2].get("status") == "shipped", timeout=30)
    js = system.nc.jetstream()
    streams = [*system.orders.streams, *system.tasks.streams, *system.inventory.streams]
    readers = [(reader, part) for reader, ctx in ((SAGA, system.orders), (FULFILMENT, system.orders),
                                                  (FULFILMENT, system.tasks)) for part in ctx.parts]

    async def quiet() -> list[int]:
        # Stored messages per stream, once both managers have handled everything.
        for reader, ctx in readers:
            info = await js.consumer_info(ctx.stream, reader)
            if info.num_pending or info.num_ack_pending:
                return []
        return [(await js.stream_info(s)).state.last_seq for s in streams]

    before = await eventually(quiet, timeout=20, failure="the process managers never caught up")
    await asyncio.sleep(1)
    before = await eventually(quiet, timeout=20)
    # Rewind every manager's consumer to the first message: they see all of history again.
    for reader, ctx in readers:
        info = await js.consumer_info(ctx.stream, reader)
        await js.delete_consumer(ctx.stream, reader)
        config = info.config
        config.deliver_policy, config.opt_start_seq = DeliverPolicy.ALL, None
        await js.add_consumer(ctx.stream, config)
    await asyncio.sleep(2)
    after = await eventually(quiet, timeout=30, failure="the replay never finished")
    assert after == before
    await _settled_stock(system, "replayed", {"on_hand": 3, "reserved": 0, "available": 3})
    statuses = [(await get(system, f"/orders/{oid}"))[2]["status"] for oid in (shipped, cancelled, rejected)]
    assert statuses == ["shipped", "cancelled", "rejected"]


async def test_bad_stock_requests_get_a_clear_error_and_store_nothing(system: System) -> None:
    await _receive(system, "checked", 3)
    before = await system.messages(system.inventory)
    cases = [
        ("/inventory/has.dot/receive", {"quantity": 1}, 422, "validation"),  # not a subject token
        ("/inventory/checked/receive", {"quantity": 0}, 422, "validation"),
        ("/inventory/checked/receive", {"quantity": "many"}, 422, "validation"),
        ("/inventory/checked/receive", [1], 422, "validation"),  # not a JSON object
        ("/inventory/checked/adjust", {"delta": 0, "reason": "count"}, 422, "validation"),
        ("/inventory/checked/adjust", {"delta": -1}, 422, "validation"),  # a reason is required
        ("/inventory/checked/adjust", {"delta": -5, "reason": "count"}, 409, "rule_violation"),  # below zero
        ("/inventory/checked/reserve", {"order_id": "o", "quantity": 1}, 404, "not_found"),  # internal: no route
    ]
    for path, body, status, code in cases:
        got, _, answer = await post(system, path, body)
        assert (got, answer["error"]["code"]) == (status, code), (path, body, answer)
    async with system.http.post(system.base + "/inventory/checked/receive", data=b"{not json") as resp:
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "malformed"
    assert await system.messages(system.inventory) == before
