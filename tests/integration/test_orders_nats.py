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
    info = await system.nc.jetstream().stream_info(system.orders.stream)
    assert info.state.messages == 1
