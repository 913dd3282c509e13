"""The order routes of the HTTP edge, end to end through real NATS, JetStream and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import System

PLACE = {"customer_id": "c-1", "currency": "EUR", "lines": [{"sku": "apple", "quantity": 2, "unit_price": 150}]}


async def post(system: System, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    async with system.http.post(system.base + path, json=body, headers=headers) as resp:
        return resp.status, resp.headers.copy(), await resp.json()


async def get(system: System, path: str, **params: Any) -> tuple[int, Any, Any]:
    async with system.http.get(system.base + path, params=params) as resp:
        return resp.status, resp.headers.copy(), await resp.json()


async def stored_count(system: System) -> int:
    return await system.messages(system.orders)


async def test_an_order_goes_from_placed_to_shipped_and_the_read_model_follows(system: System) -> None:
    status, headers, body = await post(system, "/orders", PLACE)
    assert status == 201
    oid = body["order_id"]
    assert headers["Location"] == f"/orders/{oid}"
    assert headers["ETag"] == f'"{body["version"]}"'
    status, _, body = await post(system, f"/orders/{oid}/items", {"sku": "pear", "quantity": 1, "unit_price": 99})
    assert (status, body["total"]) == (200, 399)
    async with system.http.delete(f"{system.base}/orders/{oid}/items/pear") as resp:
        assert resp.status == 200
    for step, extra in (("confirm", None), ("pay", {"amount": 300}), ("ship", {"carrier": "ups"})):
        status, headers, body = await post(system, f"/orders/{oid}/{step}", extra)
        assert status == 200, body
    assert body["status"] == "shipped"
    status, headers, view = await get(system, f"/orders/{oid}", min_seq=headers["X-Stream-Sequence"])
    assert status == 200
    assert (view["status"], view["total"], view["lines"]) == ("shipped", 300, [{"sku": "apple", "quantity": 2, "unit_price": 150}])
    assert view["version"] == body["version"]
    status, _, history = await get(system, f"/orders/{oid}/events")
    assert [e["type"] for e in history["events"]] == [
        "order.placed", "order.item_added", "order.item_removed", "order.confirmed", "order.reserved", "order.paid",
        "order.shipped",
    ]
    assert all(e["trace_id"] and e["command_id"] for e in history["events"])


async def test_a_retried_post_with_the_same_idempotency_key_stores_once_and_answers_the_same(system: System) -> None:
    key = {"Idempotency-Key": "req-42"}
    first = await post(system, "/orders", PLACE, key)
    second = await post(system, "/orders", PLACE, key)
    assert first[0] == second[0] == 201
    assert first[2] == second[2]
    assert await stored_count(system) == 1
    oid = first[2]["order_id"]
    confirm1 = await post(system, f"/orders/{oid}/confirm", None, {"Idempotency-Key": "confirm-1"})
    confirm2 = await post(system, f"/orders/{oid}/confirm", None, {"Idempotency-Key": "confirm-1"})
    assert confirm1[2] == confirm2[2] and confirm1[0] == 200
    assert await stored_count(system) == 4  # placed, confirmed (+ its outbox copy), reserved (the saga)


async def test_if_match_with_a_stale_version_is_412_and_stores_nothing(system: System) -> None:
    _, headers, body = await post(system, "/orders", PLACE)
    oid, etag = body["order_id"], headers["ETag"]
    status, headers, _ = await post(system, f"/orders/{oid}/items", {"sku": "kiwi", "quantity": 1, "unit_price": 5}, {"If-Match": etag})
    assert status == 200
    before = await stored_count(system)
    status, _, body = await post(system, f"/orders/{oid}/confirm", None, {"If-Match": etag})
    assert status == 412 and body["error"]["code"] == "precondition_failed"
    assert await stored_count(system) == before


async def test_bad_input_gets_a_specific_4xx_and_changes_nothing(system: System) -> None:
    _, _, body = await post(system, "/orders", PLACE)
    oid = body["order_id"]
    before = await stored_count(system)
    async with system.http.post(system.base + "/orders", data=b"{oops", headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "malformed"
    status, _, body = await post(system, "/orders", {**PLACE, "lines": [{"sku": "a", "quantity": "two", "unit_price": 1}]})
    assert status == 422 and body["error"]["field"] == "lines[0].quantity"
    status, _, body = await post(system, "/orders", {"currency": "EUR"})
    assert status == 422 and body["error"]["field"] == "customer_id"
    status, _, body = await post(system, "/orders/nope/confirm")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, _, body = await post(system, f"/orders/{oid}/pay", {"amount": 1})
    assert status == 409 and body["error"]["code"] == "rule_violation"
    async with system.http.post(system.base + "/orders", data=b"x" * (system.settings.max_body_bytes + 1)) as resp:
        assert resp.status == 413 and (await resp.json())["error"]["code"] == "payload_too_large"
    status, _, body = await get(system, "/orders/does-not-exist")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, _, body = await get(system, "/orders", limit="many")
    assert status == 422 and body["error"]["field"] == "limit"
    status, _, body = await get(system, "/orders/bad id!/events")
    assert status == 422
    assert await stored_count(system) == before


async def test_list_filters_by_status_and_customer_and_pages_by_cursor(system: System) -> None:
    ids = []
    for i in range(5):
        _, _, body = await post(system, "/orders", {**PLACE, "customer_id": "alice" if i % 2 == 0 else "bob"})
        ids.append(body["order_id"])
    _, headers, _ = await post(system, f"/orders/{ids[0]}/cancel", {"reason": "changed mind"})
    seq = headers["X-Stream-Sequence"]
    _, _, page = await get(system, "/orders", customer_id="alice", limit=2, min_seq=seq)
    assert len(page["items"]) == 2 and page["next_cursor"]
    _, _, page2 = await get(system, "/orders", customer_id="alice", limit=2, cursor=page["next_cursor"])
    seen = [o["order_id"] for o in page["items"] + page2["items"]]
    assert sorted(seen) == sorted([ids[0], ids[2], ids[4]]) and page2["next_cursor"] is None
    _, _, cancelled = await get(system, "/orders", status="cancelled")
    assert [o["order_id"] for o in cancelled["items"]] == [ids[0]]


async def test_concurrent_writers_on_one_order_lose_no_update(system: System, nats_url: str) -> None:
    # A second actor (its own cache) in the same queue group makes writers really race.
    from infra.bootstrap import run_orders_actor

    async with run_orders_actor(system.settings, system.nc):
        _, _, body = await post(system, "/orders", PLACE)
        oid = body["order_id"]
        results = await asyncio.gather(
            *(post(system, f"/orders/{oid}/items", {"sku": "nut", "quantity": 1, "unit_price": 7}) for _ in range(120))
        )
    ok = [r for r in results if r[0] == 200]
    assert ok, results[:3]
    assert all(r[0] == 409 and r[2]["error"]["code"] == "conflict" for r in results if r[0] != 200)
    state, version = await system.actor.load(oid)
    assert state.lines["nut"].quantity == len(ok)
    _, _, view = await get(system, f"/orders/{oid}", min_seq=version)
    assert view["lines"][1:] == [{"sku": "nut", "quantity": len(ok), "unit_price": 7}]  # after PLACE's apple


async def test_operations_endpoints(system: System) -> None:
    assert (await get(system, "/healthz"))[0] == 200
    assert (await get(system, "/readyz"))[0] == 200
    status, _, doc = await get(system, "/openapi.json")
    assert status == 200 and "/orders/{order_id}/pay" in doc["paths"] and "PlaceOrder" in doc["components"]["schemas"]
    # The time the actor stamps on task commands is documented as not the caller's to set.
    assert doc["components"]["schemas"]["SubmitTask"]["properties"]["at"]["readOnly"] is True
    async with system.http.get(system.base + "/metrics") as resp:
        assert resp.status == 200 and "jetsource_http_requests" in await resp.text()
    status, _, body = await get(system, "/nowhere")
    assert status == 404 and body["error"]["code"] == "not_found"
