"""A context from outside jetsource (examples/loyalty.py), loaded by the setting alone: its
actor, stream, read model, routes and NATS permissions come from its one declaration."""

from __future__ import annotations

from tests.conftest import eventually, make_settings, running
from tests.integration.test_orders_http import get, post


async def test_a_context_loaded_by_setting_runs_end_to_end_over_nats_and_http(
    partitions: int, namespace: str, nats_url: str, database_url: str,
) -> None:
    settings = make_settings(namespace, nats_url, database_url, context_modules="examples.loyalty",
                             partitions=partitions)
    async with running(settings) as system:
        ctx = system.ctx("loyalty")
        status, headers, body = await post(system, "/loyalty/c-7/earn", {"points": 120, "reason": "welcome"})
        assert (status, body["balance"]) == (200, 120), body
        # Over NATS, as any client would send it.
        reply = await system.request(ctx.command("redeem"), {"customer_id": "c-7", "points": 20})
        assert reply.data and b'"balance":100' in reply.data
        status, _, body = await post(system, "/loyalty/c-7/redeem", {"points": 1000})
        assert (status, body["error"]["code"]) == (409, "rule_violation")
        _, _, view = await eventually(lambda: get(system, "/loyalty/c-7", min_seq=int(headers["X-Stream-Sequence"]) + 1),
                                      lambda r: r[0] == 200 and r[2]["balance"] == 100)
        assert view["customer_id"] == "c-7"
        _, _, history = await get(system, "/loyalty/c-7/events")
        assert [e["type"] for e in history["events"]] == ["loyalty.points_earned", "loyalty.points_redeemed"]
        assert await system.messages(ctx) == 2
