"""No ghost writes, clear errors in outages, and idempotency keys bound to their request.

Outages are real: a TCP proxy between one client and the real nats-server (or PostgreSQL) is
cut or stalled, so only that client sees the server go away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from actors.runtime import _ID_NAMESPACE
from bus import subjects as h
from bus.client import call
from bus.errors import UnavailableError
from infra.bootstrap import nats_connection, run_edge
from infra.embedded import free_port
from projections.runner import Checkpoints
from projections.schema import create_pool
from infra.contexts import declared
from projections.service import QueryService
from tests.conftest import System, eventually, until
from tests.integration.test_orders_http import PLACE, get, post, stored_count
from tests.proxy import Proxy


def _order_id(key: str) -> str:
    """The id a keyed place derives from its key (as the actor does)."""
    return uuid.uuid5(_ID_NAMESPACE, key).hex


async def _events_of(system: System, order_id: str) -> list[str]:
    status, _, body = await get(system, f"/orders/{order_id}/events")
    return [] if status == 404 else [e["type"] for e in body["events"]]


@contextlib.asynccontextmanager
async def _proxy_to(url: str) -> AsyncIterator[Proxy]:
    proxy = Proxy(int(url.rsplit(":", 1)[1].split("/")[0]))
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def test_a_command_past_its_deadline_is_refused_and_stores_nothing(system: System) -> None:
    key = "late-1"
    late = str(int((time.time() - 1) * 1000))
    msg = await system.request(system.orders.command("place"), PLACE, {h.IDEMPOTENCY_KEY: key, h.DEADLINE: late})
    assert msg.headers is not None and msg.headers[h.SERVICE_ERROR_CODE] == "504"
    assert json.loads(msg.data)["error"]["code"] == "timeout"
    # the same command with time left is executed: the deadline, not the key, refused it
    soon = str(int((time.time() + 5) * 1000))
    msg = await system.request(system.orders.command("place"), PLACE, {h.IDEMPOTENCY_KEY: key, h.DEADLINE: soon})
    assert msg.headers is None or h.SERVICE_ERROR_CODE not in msg.headers
    assert await _events_of(system, _order_id(key)) == ["order.placed"]


async def test_while_disconnected_a_caller_fails_fast_and_nothing_is_sent_later(system: System) -> None:
    async with _proxy_to(system.settings.resolved_nats_url()) as proxy:
        settings = system.settings.model_copy(update={"nats_url": f"nats://127.0.0.1:{proxy.port}"})
        async with nats_connection(settings, "test-cut") as nc:
            await proxy.cut()
            await until(lambda: not nc.is_connected, failure="client never noticed")
            body = json.dumps(PLACE).encode()
            # Buffered, this request would wait out its 30 s timeout (DeadlineError) and be
            # delivered after the reconnect; it must be refused at once instead.
            with pytest.raises(UnavailableError):
                await call(nc, system.orders.command("place"), body, headers={h.IDEMPOTENCY_KEY: "cut-1"}, timeout=30)
            await proxy.restore()
            await until(lambda: nc.is_connected, failure="client never reconnected")
            await nc.flush()
    await asyncio.sleep(0.2)
    assert await _events_of(system, _order_id("cut-1")) == []


async def test_with_nats_down_the_edge_answers_503_with_retry_after_and_readyz_is_not_ready(system: System) -> None:
    async with _proxy_to(system.settings.resolved_nats_url()) as proxy:
        settings = system.settings.model_copy(update={"nats_url": f"nats://127.0.0.1:{proxy.port}", "http_port": free_port()})
        base = f"http://127.0.0.1:{settings.http_port}"
        async with nats_connection(settings, "edge-cut") as nc, run_edge(settings, nc):
            async with system.http.get(base + "/readyz") as resp:
                assert resp.status == 200
            proxy.stall()  # the server stops answering (as under SIGSTOP); the socket stays up
            async with system.http.get(base + "/readyz") as resp:
                assert resp.status == 503 and (await resp.json())["error"]["code"] == "unavailable"
            await proxy.cut()
            await until(lambda: not nc.is_connected, failure="edge never noticed")
            async with system.http.post(base + "/orders", json=PLACE, headers={"Idempotency-Key": "down-1"}) as resp:
                assert resp.status == 503, await resp.text()
                assert resp.headers["Retry-After"] == "1"
                assert (await resp.json())["error"]["code"] == "unavailable"
            async with system.http.get(base + "/readyz") as resp:
                assert resp.status == 503
            await proxy.restore()
            await until(lambda: nc.is_connected, failure="edge never reconnected")
            async with system.http.post(base + "/orders", json=PLACE, headers={"Idempotency-Key": "down-2"}) as resp:
                assert resp.status == 201
    assert await _events_of(system, _order_id("down-1")) == []


async def test_a_504_says_the_outcome_is_unknown_and_to_retry_with_the_same_key(system: System) -> None:
    async with _proxy_to(system.settings.resolved_nats_url()) as proxy:
        settings = system.settings.model_copy(update={
            "nats_url": f"nats://127.0.0.1:{proxy.port}", "http_port": free_port(), "request_timeout_s": 0.5})
        base = f"http://127.0.0.1:{settings.http_port}"
        async with nats_connection(settings, "edge-stall") as nc, run_edge(settings, nc):
            proxy.stall()
            async with system.http.post(base + "/orders", json=PLACE, headers={"Idempotency-Key": "slow-1"}) as resp:
                assert resp.status == 504
                error = (await resp.json())["error"]
            assert error["code"] == "timeout"
            assert "outcome is unknown" in error["message"] and "same Idempotency-Key" in error["message"]
            await proxy.cut()
    # the stalled bytes were dropped with the connection; had they arrived late, the deadline
    # would have refused them
    await asyncio.sleep(0.5)
    assert await _events_of(system, _order_id("slow-1")) == []


async def test_with_postgres_down_reads_get_503_and_one_log_line_per_outage(
    system: System, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, headers, placed = await post(system, "/orders", PLACE)
    oid = placed["order_id"]
    assert (await get(system, f"/orders/{oid}", min_seq=headers["X-Stream-Sequence"]))[0] == 200
    pg_port = int(database_url.rsplit(":", 1)[1].split("/")[0])
    proxy = Proxy(pg_port)
    await proxy.start()
    # A second query service (as in a second projector process), reading through the proxy; it
    # shares the queue group with the system's own, so queries reach both.
    pool = await create_pool(database_url.replace(f":{pg_port}/", f":{proxy.port}/"), system.settings.db_schema)
    queries = QueryService(system.nc, pool, Checkpoints(pool), read_wait_timeout=1.0)
    try:
        orders = declared(system.settings).context("orders").read_model
        assert orders is not None
        await queries.add(system.orders, orders.queries, "orders")
        await proxy.cut()
        caplog.set_level(logging.WARNING, logger="projections.service")
        statuses = set()
        for _ in range(30):
            status, resp_headers, body = await get(system, f"/orders/{oid}")
            statuses.add(status)
            if status == 503:
                assert body["error"]["code"] == "unavailable" and resp_headers["Retry-After"] == "1"
        assert 503 in statuses and statuses <= {200, 503}
        outage = [r for r in caplog.records if r.name == "projections.service" and r.levelno >= logging.WARNING]
        assert len(outage) == 1 and outage[0].exc_info is None, [r.getMessage() for r in outage]
        await proxy.restore()
        await eventually(lambda: _statuses(system, f"/orders/{oid}", 10), lambda s: s == {200})
    finally:
        await queries.stop()
        await pool.close()
        await proxy.close()


async def _statuses(system: System, path: str, n: int) -> set[int]:
    return {(await get(system, path))[0] for _ in range(n)}


# ---- idempotency keys ---------------------------------------------------------------------------


async def test_a_key_reused_for_another_command_is_refused_and_stores_nothing(system: System) -> None:
    _, _, body = await post(system, "/orders", PLACE)
    oid = body["order_id"]
    assert (await post(system, f"/orders/{oid}/confirm"))[0] == 200
    paid = await post(system, f"/orders/{oid}/pay", {"amount": 300}, {"Idempotency-Key": "p1"})
    assert paid[0] == 200
    before = await stored_count(system)
    status, _, body = await post(system, f"/orders/{oid}/cancel", None, {"Idempotency-Key": "p1"})
    assert status == 422 and body["error"]["code"] == "idempotency_key_reused", body
    assert body["error"]["field"] == "Idempotency-Key"
    status, _, body = await post(system, f"/orders/{oid}/pay", {"amount": 301}, {"Idempotency-Key": "p1"})
    assert status == 422 and body["error"]["code"] == "idempotency_key_reused"
    assert await stored_count(system) == before
    assert "order.cancelled" not in await _events_of(system, oid)


async def test_a_key_reused_for_another_body_on_place_is_refused(system: System) -> None:
    first = await post(system, "/orders", PLACE, {"Idempotency-Key": "place-x"})
    assert first[0] == 201
    other = {**PLACE, "customer_id": "someone-else"}
    status, _, body = await post(system, "/orders", other, {"Idempotency-Key": "place-x"})
    assert status == 422 and body["error"]["code"] == "idempotency_key_reused"
    assert await stored_count(system) == 1


async def test_a_repeated_request_gets_the_original_answer_even_after_the_aggregate_moved_on(system: System) -> None:
    _, _, body = await post(system, "/orders", PLACE)
    oid = body["order_id"]
    first = await post(system, f"/orders/{oid}/confirm", None, {"Idempotency-Key": "c1"})
    assert (await post(system, f"/orders/{oid}/pay", {"amount": 300}))[0] == 200
    again = await post(system, f"/orders/{oid}/confirm", None, {"Idempotency-Key": "c1"})
    assert again[0] == first[0] == 200
    assert again[2] == first[2] and again[2]["status"] == "reserved"


async def test_if_match_star_means_any_current_version(system: System) -> None:
    _, _, body = await post(system, "/orders", PLACE)
    oid = body["order_id"]
    status, _, body = await post(system, f"/orders/{oid}/confirm", None, {"If-Match": "*"})
    assert status == 200, body
    before = await stored_count(system)
    status, _, body = await post(system, "/orders/no-such-order/confirm", None, {"If-Match": "*"})
    assert status == 412 and body["error"]["code"] == "precondition_failed"
    assert await stored_count(system) == before
