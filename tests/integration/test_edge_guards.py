"""Admission at the edge: bearer tokens (read-only, read-write), per-client rate limits, bounded in-flight."""

from __future__ import annotations

import asyncio

from infra.bootstrap import run_edge
from infra.embedded import free_port
from tests.conftest import System
from tests.integration.test_orders_http import PLACE


def _bearer(token: str, scheme: str = "Bearer") -> dict[str, str]:
    return {"Authorization": f"{scheme} {token}"}


async def test_with_tokens_configured_writes_and_reads_need_one(system: System) -> None:
    settings = system.settings.model_copy(update={"http_port": free_port(), "api_tokens": "s3cret,other"})
    base = f"http://127.0.0.1:{settings.http_port}"
    async with run_edge(settings, system.nc):
        async with system.http.post(base + "/orders", json=PLACE) as resp:
            assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"
            assert resp.headers["WWW-Authenticate"] == "Bearer"
        async with system.http.post(base + "/orders", json=PLACE, headers=_bearer("nope")) as resp:
            assert resp.status == 401
        async with system.http.post(base + "/orders", json=PLACE, headers=_bearer("other")) as resp:
            assert resp.status == 201
        for path in ("/orders", "/tasks/stats", "/openapi.json", "/asyncapi.json", "/metrics"):
            async with system.http.get(base + path) as resp:
                assert resp.status == 401, path
                assert (await resp.json())["error"]["code"] == "unauthorized"
                assert resp.headers["WWW-Authenticate"] == "Bearer"
            async with system.http.get(base + path, headers=_bearer("s3cret")) as resp:
                assert resp.status == 200, path
        for path in ("/healthz", "/readyz"):
            async with system.http.get(base + path) as resp:
                assert resp.status == 200, path  # probes answer without credentials


async def test_the_scheme_is_case_insensitive_and_other_schemes_are_refused(system: System) -> None:
    settings = system.settings.model_copy(update={"http_port": free_port(), "api_tokens": "s3cret"})
    base = f"http://127.0.0.1:{settings.http_port}"
    async with run_edge(settings, system.nc):
        for scheme in ("bearer", "BEARER", "BeArEr"):
            async with system.http.get(base + "/orders", headers=_bearer("s3cret", scheme)) as resp:
                assert resp.status == 200, scheme
        for header in ("Basic s3cret", "Bearers3cret", "s3cret", "Bearer s3cret2", "Bearer s3cre"):
            async with system.http.get(base + "/orders", headers={"Authorization": header}) as resp:
                assert resp.status == 401, header


async def test_a_read_only_token_reads_but_cannot_write(system: System) -> None:
    settings = system.settings.model_copy(update={
        "http_port": free_port(), "api_tokens": "writer", "api_read_tokens": "reader,auditor"})
    base = f"http://127.0.0.1:{settings.http_port}"
    async with run_edge(settings, system.nc):
        async with system.http.get(base + "/orders", headers=_bearer("auditor")) as resp:
            assert resp.status == 200
        async with system.http.head(base + "/orders", headers=_bearer("reader")) as resp:
            assert resp.status == 200
        async with system.http.post(base + "/orders", json=PLACE, headers=_bearer("reader")) as resp:
            assert resp.status == 403
            assert (await resp.json())["error"]["code"] == "forbidden"
        async with system.http.post(base + "/tasks", json={"type": "echo"}, headers=_bearer("reader")) as resp:
            assert resp.status == 403
        assert await system.messages(system.orders) == 0
        assert await system.messages(system.tasks) == 0
        async with system.http.post(base + "/orders", json=PLACE, headers=_bearer("writer")) as resp:
            assert resp.status == 201  # read-write tokens read and write
        async with system.http.get(base + "/orders", headers=_bearer("writer")) as resp:
            assert resp.status == 200


async def test_metrics_need_a_token_unless_opened_by_the_setting(system: System) -> None:
    closed = system.settings.model_copy(update={"http_port": free_port(), "api_tokens": "s3cret"})
    opened = system.settings.model_copy(update={"http_port": free_port(), "api_tokens": "s3cret", "metrics_open": True})
    async with run_edge(closed, system.nc), run_edge(opened, system.nc):
        async with system.http.get(f"http://127.0.0.1:{closed.http_port}/metrics") as resp:
            assert resp.status == 401
        async with system.http.get(f"http://127.0.0.1:{opened.http_port}/metrics") as resp:
            assert resp.status == 200 and "jetsource_http_requests" in await resp.text()
        async with system.http.get(f"http://127.0.0.1:{opened.http_port}/orders") as resp:
            assert resp.status == 401  # only /metrics is opened


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
            async with system.http.get(base + "/orders/held", params={"min_seq": 10**9}) as resp:
                return resp.status

        holders = [asyncio.create_task(slow()) for _ in range(2)]
        await asyncio.sleep(0.3)
        async with system.http.post(base + "/orders", json=PLACE) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["code"] == "unavailable"
        assert await asyncio.gather(*holders) == [504, 504]
