"""`jetsource up` as a user runs it: a subprocess with embedded servers, driven over HTTP and
the CLI, stopped with SIGTERM, started again with its data intact."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from infra.embedded import free_port, free_run

PLACE = {"customer_id": "e2e", "currency": "USD", "lines": [{"sku": "book", "quantity": 1, "unit_price": 1999}]}


_free_run = free_run  # the embedded servers' own helper


def _metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        metric, _, rest = sample.partition("{")
        found = dict(pair.split("=", 1) for pair in rest.rstrip("}").split(",") if pair)
        if metric == name and {k: v.strip('"') for k, v in found.items()} == labels:
            return float(value)
    return 0.0


def _env(data_dir: Path, ports: dict[str, int]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETSOURCE_")}
    env.update({
        "JETSOURCE_DATA_DIR": str(data_dir),
        "JETSOURCE_NATS_PORT": str(ports["nats"]),
        "JETSOURCE_NATS_MONITOR_PORT": str(ports["monitor"]),
        "JETSOURCE_POSTGRES_PORT": str(ports["pg"]),
        "JETSOURCE_HTTP_PORT": str(ports["http"]),
        "JETSOURCE_METRICS_PORT": str(ports["metrics"]),
    })
    return env


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "infra.cli", "up"], env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


async def _wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                async with http.get(base + "/readyz") as resp:
                    if resp.status == 200:
                        # and the actor answers
                        async with http.get(base + "/orders?limit=1") as r2:
                            if r2.status == 200:
                                return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("jetsource up did not become ready:\n" + log.read_text())


async def _poll_status(http: aiohttp.ClientSession, url: str, status: str, log: Path, timeout: float = 30) -> dict:
    """GET url until its JSON has this status."""
    deadline = time.monotonic() + timeout
    while True:
        async with http.get(url) as resp:
            body = await resp.json()
        if body.get("status") == status:
            return body
        assert time.monotonic() < deadline, f"{url} never became {status}: {body}\n{log.read_text()}"
        await asyncio.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> list[int]:
    children = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    return children


async def _until_true(probe: Any, done: Any, what: str, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done(last := await probe()):
        assert time.monotonic() < deadline, f"{what}: never, within {timeout:g} s; last: {last}\n{log.read_text()[-5000:]}"
        await asyncio.sleep(0.2)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(300)
async def test_up_serves_orders_and_tasks_survives_a_crash_stops_cleanly_and_keeps_data(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("nats", "monitor", "pg", "http")}
    ports["metrics"] = _free_run(4)  # orders actor, tasks actor, worker, projector
    env = _env(tmp_path / "data", ports)
    log = tmp_path / "up.log"
    base = f"http://127.0.0.1:{ports['http']}"
    proc = _start(env, log)
    try:
        await _wait_ready(base, proc, log)
        async with aiohttp.ClientSession() as http:
            async with http.post(base + "/orders", json=PLACE) as resp:
                assert resp.status == 201, await resp.text()
                placed = await resp.json()
            oid = placed["order_id"]
            async with http.post(f"{base}/orders/{oid}/confirm") as resp:
                assert resp.status == 200
                seq = resp.headers["X-Stream-Sequence"]
            async with http.get(f"{base}/orders/{oid}", params={"min_seq": seq}) as resp:
                assert (await resp.json())["status"] == "reserved"  # the saga answered before confirm did

        # The CLI speaks to the same system.
        sent = _cli(env, "send", "orders.cmd.pay",
                    json.dumps({"order_id": oid, "amount": 1999}))
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert json.loads(sent.stdout)["status"] == "paid"
        bad = _cli(env, "send", "orders.cmd.pay", "{}")
        assert bad.returncode == 1 and json.loads(bad.stdout)["error"]["code"] == "validation"
        status = _cli(env, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "orders_actor" in status.stdout and "tasks_actor" in status.stdout and "ORDERS" in status.stdout
        # The embedded server admits no anonymous client: naming its URL (so no identity is
        # taken from the data directory) is refused, in one line.
        anonymous = _cli(env | {"JETSOURCE_NATS_URL": f"nats://127.0.0.1:{ports['nats']}"}, "status", "--timeout", "2")
        assert anonymous.returncode == 1 and "refused the admin identity" in anonymous.stderr, anonymous.stderr
        replayed = _cli(env, "replay", "orders", oid)
        assert [json.loads(line)["event"]["type"] for line in replayed.stdout.splitlines()][:4] == [
            "order.placed", "order.confirmed", "order.reserved", "order.paid"]

        # The fulfilment process manager ships the paid order through a task.
        async with aiohttp.ClientSession() as http:
            await _poll_status(http, f"{base}/orders/{oid}", "shipped", log)
            # Every role but the edge (which has /metrics) serves Prometheus metrics of its own.
            scraped = {}
            # (ports in `jetsource up`'s order: actors orders, tasks, inventory, worker, managers, projector)
            for role, offset in (("orders", 0), ("worker", 3), ("projector", 5)):
                async with http.get(f"http://127.0.0.1:{ports['metrics'] + offset}/metrics") as resp:
                    assert resp.status == 200
                    scraped[role] = await resp.text()
        assert _metric(scraped["orders"], "jetsource_appended_commands_total", stream="ORDERS") >= 4
        assert _metric(scraped["orders"], "jetsource_command_errors_total", subject="orders.cmd.pay",
                       code="validation") == 1
        assert _metric(scraped["worker"], "jetsource_tasks_finished_total", type="order.fulfil",
                       outcome="completed") == 1
        assert _metric(scraped["projector"], "jetsource_projection_checkpoint", projection="orders") >= 4
        assert 'jetsource_projection_pending{projection="orders"}' in scraped["projector"]
        assert "jetsource_tasks_running " in scraped["worker"]
        assert _metric(scraped["worker"], "jetsource_worker_request_seconds_count", command="claim_batch") >= 1
        assert f"127.0.0.1:{ports['metrics']}/metrics" in log.read_text()  # the banner says where

        # The live configuration reaches `up`'s edge, as its own NATS identity: a rate limit set
        # while it runs is applied, and removing it lifts it.
        assert _cli(env, "config", "set", "rate_limit_per_s", "1").returncode == 0
        async with aiohttp.ClientSession() as http:
            async def burst() -> list[int]:
                statuses = []
                for _ in range(4):
                    async with http.get(f"{base}/orders/{oid}") as resp:
                        statuses.append(resp.status)
                return statuses

            await _until_true(burst, lambda s: 429 in s, "the edge applying the live rate limit", log)
            assert _cli(env, "config", "unset", "rate_limit_per_s").returncode == 0
            await _until_true(burst, lambda s: s == [200] * 4, "the edge lifting the live rate limit", log)
        assert "live config: rate_limit_per_s = 1" in log.read_text()  # one line per change

        # A crashed role is restarted by the supervisor.
        actor = next(p for p in psutil.Process(proc.pid).children() if "actor tasks" in " ".join(p.cmdline()))
        actor.kill()
        await _wait_ready(base, proc, log)
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                async with http.post(f"{base}/tasks", json={"type": "echo", "payload": [1, 2]}) as resp:
                    if resp.status == 202:
                        task_id = (await resp.json())["task_id"]
                        break
                await asyncio.sleep(0.1)
            assert resp.status == 202
            task = await _poll_status(http, f"{base}/tasks/{task_id}", "completed", log)
            assert task["result"] == [1, 2]
            # A delayed task is stored, not held in memory: it survives the full stop below.
            run_at = time.time() + 6
            async with http.post(f"{base}/tasks", json={"type": "echo", "payload": "later", "run_at": run_at}) as resp:
                assert resp.status == 202
                delayed_id = (await resp.json())["task_id"]

        children = _stop(proc)
        assert children and not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                                    for pid in children)

        # Started again: the data is still there.
        proc = _start(env, log)
        await _wait_ready(base, proc, log)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/orders/{oid}") as resp:
                assert resp.status == 200
                assert (await resp.json())["status"] == "shipped"
            async with http.get(f"{base}/orders/{oid}/events") as resp:
                assert len((await resp.json())["events"]) == 5  # placed, confirmed, reserved, paid, shipped
            async with http.get(f"{base}/tasks/{task_id}") as resp:
                assert (await resp.json())["status"] == "completed"
            delayed = await _poll_status(http, f"{base}/tasks/{delayed_id}", "completed", log)
            assert delayed["result"] == "later"
            async with http.get(f"{base}/tasks/{delayed_id}/events") as resp:
                outcome = next(e for e in (await resp.json())["events"] if e["type"] == "task.completed")
            assert outcome["event"]["started_at"] >= run_at  # a quick task's start is in its outcome
    finally:
        if proc.poll() is None:
            _stop(proc)
