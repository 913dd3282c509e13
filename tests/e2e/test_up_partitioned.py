"""`jetsource up --partitions 4` as a user runs it: every role, with its own NATS identity and
permissions, works over four streams per context; the data directory keeps its count."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from bus.subjects import partition_of
from infra.embedded import free_port
from tests.e2e.test_up import PLACE, _cli, _env, _free_run, _poll_status, _stop, _wait_ready


def _start(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "infra.cli", "up", *args], env=env, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT)


@pytest.mark.timeout(300)
async def test_up_with_four_partitions_runs_every_role_and_keeps_the_count(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("nats", "monitor", "pg", "http")}
    ports["metrics"] = _free_run(8)
    env = _env(tmp_path / "data", ports)
    log = tmp_path / "up.log"
    base = f"http://127.0.0.1:{ports['http']}"
    proc = _start(env, log, "--partitions", "4")
    try:
        await _wait_ready(base, proc, log)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base}/inventory/book/receive", json={"quantity": 10}) as resp:
                assert resp.status == 200, await resp.text()
            orders = []
            for _ in range(8):
                async with http.post(base + "/orders", json=PLACE) as resp:
                    assert resp.status == 201, await resp.text()
                    orders.append((await resp.json())["order_id"])
            assert len({partition_of(oid, 4) for oid in orders}) > 1
            # The saga (reading and writing across partitions), fulfilment and the workers.
            for oid in orders:
                async with http.post(f"{base}/orders/{oid}/confirm") as resp:
                    assert (await resp.json())["status"] == "reserved"
                async with http.post(f"{base}/orders/{oid}/pay", json={"amount": 1999}) as resp:
                    assert resp.status == 200, await resp.text()
            for oid in orders:
                await _poll_status(http, f"{base}/orders/{oid}", "shipped", log, timeout=60)
            # A list's read-your-writes reads every partition's last event, as the projector.
            async with http.post(f"{base}/orders/{orders[0]}/cancel") as resp:
                assert resp.status == 409  # shipped: refused, stores nothing
            async with http.get(f"{base}/orders", params={"customer_id": "e2e", "min_seq": "1"}) as resp:
                assert resp.status == 200, await resp.text()
                assert {o["order_id"] for o in (await resp.json())["items"]} == set(orders)
            async with http.get(f"{base}/inventory/book") as resp:
                assert (await resp.json())["on_hand"] == 2
        status = _cli(env, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        for p in range(4):
            assert f"ORDERS_P{p}" in status.stdout and f"orders.p{p}" in status.stdout
        replay = _cli(env, "replay", "orders", orders[0])
        assert replay.returncode == 0 and '"order.shipped"' in replay.stdout
    finally:
        _stop(proc)
    # Started again without the flag, the data directory keeps its four partitions ...
    proc = _start(env, log)
    try:
        await _wait_ready(base, proc, log)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/orders/{orders[0]}") as resp:
                assert (await resp.json())["status"] == "shipped"
    finally:
        _stop(proc)
    # ... and asking for another count is refused with the reason, before anything starts.
    refused = subprocess.run([sys.executable, "-m", "infra.cli", "up", "--partitions", "2"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "created with 4 partition(s)" in refused.stdout + refused.stderr
