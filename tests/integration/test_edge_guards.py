"""Admission at the edge: bearer tokens for writes, per-client rate limits, bounded in-flight."""

from __future__ import annotations

import asyncio

from infra.bootstrap import run_edge
from infra.embedded import free_port
from tests.conftest import System
from tests.integration.test_orders_http import PLACE


async def test_writes_need_a_token_when_tokens_are_configured(system: System) -> None:
    settings = system.settings.model_copy(update={"http_port": free_port(), "api_tokens": "s3cret,other"})
    base = f"http://127.0.0.1:{settings.http_port}"
    async with run_edge(settings, system.nc):
        async with system.http.post(base + "/orders", json=PLACE) as resp:
            assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"
        async with system.http.post(base + "/orders", json=PLACE, headers={"Authorization": "Bearer nope"}) as resp:
            assert resp.status == 401
        async with system.http.post(base + "/orders", json=PLACE, headers={"Authorization": "Bearer other"}) as resp:
            assert resp.status == 201
        async with system.http.get(base + "/orders") as resp:
            assert resp.status == 200  # reads stay open


async def test_a_client_over_its_rate_gets_429_with_retry_after(system: System) -> None:
    settings = system.settings.model_copy(update={"http_port": free_port(), "rate_limit_per_s": 5.0})
    base = f"http://127.0.0.1:{settings.http_port}"
    async with run_edge(settings, system.nc):
        statuses = []
        for _ in range(12):
            async with system.http.get(base + "/orders") as resp:
                statuses.append(resp.status)
                if resp.status == 429:
                    assert resp.headers["Retry-After"] == "1"
                    assert (await resp.json())["error"]["code"] == "rate_limited"
        assert statuses.count(200) >= 5 and 429 in statuses
        async with system.http.get(base + "/healthz") as resp:
            assert resp.status == 200  # operations endpoints are never limited


async def test_past_the_in_flight_bound_requests_get_503_instead_of_queueing(system: System) -> None:
    settings = system.settings.model_copy(update={"http_port": free_port(), "max_inflight": 2})
    base = f"http://127.0.0.1:{settings.http_port}"
    async with run_edge(settings, system.nc):
        # Reads that wait for a far-future sequence hold their slot until the read-wait bound.
        async def slow() -> int:
            async with system.http.get(base + "/orders", params={"min_seq": 10**9}) as resp:
                return resp.status

        holders = [asyncio.create_task(slow()) for _ in range(2)]
        await asyncio.sleep(0.3)
        async with system.http.post(base + "/orders", json=PLACE) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["code"] == "unavailable"
        assert await asyncio.gather(*holders) == [504, 504]
