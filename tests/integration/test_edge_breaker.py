"""Circuit breaking at the edge on a real NATS: a subject whose service stops answering is refused
at once, unsent, for a cool-down; one probe then closes the breaker once the service is back."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import pytest
from nats.aio.msg import Msg

from http_edge.kit import BREAKERS
from infra.bootstrap import run_edge
from infra.embedded import free_port
from tests.conftest import System, eventually

pytestmark = pytest.mark.single_stream  # a breaker is per subject as sent; no partition is in one

TASK = {"type": "echo", "payload": {"n": 1}}


async def _post(system: System, base: str, body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
    async with system.http.post(base + "/tasks", json=body) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def _get_json(system: System, url: str) -> dict[str, Any]:
    async with system.http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


async def _metric(system: System, base: str, name: str, subject: str) -> float:
    async with system.http.get(base + "/metrics") as resp:
        text = await resp.text()
    found = re.search(rf'^{name}{{subject="{re.escape(subject)}"}} (\S+)$', text, re.MULTILINE)
    assert found, f"no {name} for {subject}"
    return float(found.group(1))


async def test_a_silent_subject_opens_its_breaker_and_one_probe_closes_it_once_the_service_is_back(
    system: System, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="http_edge.breaker")
    timeout = 1.0
    settings = system.settings.model_copy(update={
        "http_port": free_port(), "request_timeout_s": timeout, "breaker_failures": 3, "breaker_cooldown_s": 3.0})
    base = f"http://127.0.0.1:{settings.http_port}"
    subject = system.tasks.command("submit")
    await system.stop_tasks_actor()
    swallowed: list[Msg] = []

    async def swallow(msg: Msg) -> None:  # a service that takes requests and never answers
        swallowed.append(msg)

    silent = await system.nc.subscribe(subject, cb=swallow)
    await system.nc.flush()
    async with run_edge(settings, system.nc) as runner:
        breaker = runner.app[BREAKERS][subject]
        timed_out = await asyncio.gather(*(_post(system, base, TASK) for _ in range(3)))
        for status, _, body in timed_out:  # the breaker leaves a timeout's answer as it was
            assert status == 504 and "outcome is unknown" in body["error"]["message"], body
        assert len(swallowed) == 3

        refusals = 0
        status, headers, body = await _post(system, base, TASK)
        refusals += 1
        assert status == 503 and body["error"]["code"] == "circuit_open", body
        assert 1 <= int(headers["Retry-After"]) <= 3  # whole seconds left of the 3 s cool-down
        assert subject in body["error"]["message"] and "not sent" in body["error"]["message"]
        assert len(swallowed) == 3, "a refused request reached NATS"

        ready = await _get_json(system, base + "/readyz")
        assert ready["status"] == "ready" and set(ready["circuits"]) == {subject}
        assert ready["circuits"][subject]["state"] in ("open", "half_open")  # half-open once the 3 s are up
        assert await _metric(system, base, "jetsource_edge_circuit_state", subject) in (1, 2)  # half-open or open
        assert await _metric(system, base, "jetsource_edge_circuit_opened_total", subject) == 1

        await silent.unsubscribe()
        await system.start_tasks_actor()

        async def submit() -> int:
            nonlocal refusals
            status, _, body = await _post(system, base, TASK)
            refusals += body.get("error", {}).get("code") == "circuit_open"
            return status

        assert await eventually(submit, lambda s: s == 202, every=0.1, failure="the breaker never closed") == 202
        assert breaker.closed
        assert [await submit() for _ in range(5)] == [202] * 5
        ready = await _get_json(system, base + "/readyz")
        assert ready["circuits"] == {}
        assert await _metric(system, base, "jetsource_edge_circuit_state", subject) == 0
        assert await _metric(system, base, "jetsource_edge_circuit_refused_total", subject) == refusals
        opened = breaker.state().opened  # 1, or more if a probe came before the actor answered

    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "http_edge.breaker"]
    assert [level for level, _ in lines].count("WARNING") == 1, lines
    assert len(lines) == opened + 1 and "closed" in lines[-1][1], lines  # one per change, none per refusal


async def test_a_subject_nobody_serves_is_refused_by_its_breaker_and_other_subjects_are_not(system: System) -> None:
    settings = system.settings.model_copy(update={
        "http_port": free_port(), "breaker_failures": 2, "breaker_cooldown_s": 30.0})
    base = f"http://127.0.0.1:{settings.http_port}"
    await system.stop_tasks_actor()
    async with run_edge(settings, system.nc):
        first = [await _post(system, base, TASK) for _ in range(2)]
        assert [(s, b["error"]["code"]) for s, _, b in first] == [(503, "unavailable")] * 2
        status, headers, body = await _post(system, base, TASK)
        assert status == 503 and body["error"]["code"] == "circuit_open"
        assert 1 <= int(headers["Retry-After"]) <= 30
        async with system.http.get(base + "/orders") as resp:  # another subject's service is fine
            assert resp.status == 200
        ready = await _get_json(system, base + "/readyz")
        assert list(ready["circuits"]) == [system.tasks.command("submit")]
    assert await system.messages(system.tasks) == 0  # nothing was done for any of them


async def test_refusals_a_service_answers_never_open_the_breaker(system: System) -> None:
    settings = system.settings.model_copy(update={"http_port": free_port(), "breaker_failures": 2})
    base = f"http://127.0.0.1:{settings.http_port}"
    async with run_edge(settings, system.nc) as runner:
        for _ in range(4):
            status, _, body = await _post(system, base, {"type": "echo", "priority": "urgent"})
            assert status == 422 and body["error"]["code"] == "validation", body
            async with system.http.post(base + "/orders/nobody/confirm") as resp:
                assert resp.status == 404
        assert (await _post(system, base, TASK))[0] == 202
        breakers = runner.app[BREAKERS]
        assert {c.subject: (c.state, c.failures) for c in breakers.states()} == {
            system.tasks.command("submit"): ("closed", 0), system.orders.command("confirm"): ("closed", 0)}
        assert (await _get_json(system, base + "/readyz"))["circuits"] == {}
