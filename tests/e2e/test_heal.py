"""`jetsource up` heals its embedded servers: a nats-server or PostgreSQL killed with SIGKILL is
reaped and started again on the same ports and data, and the roles reconnect on their own."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from infra.embedded import free_port
from tests.e2e.test_up import PLACE, _env, _start, _stop, _wait_ready


def _server(up: psutil.Process, is_it: Callable[[list[str]], bool]) -> psutil.Process:
    """The supervisor's one running child that `is_it` recognises by its command line."""
    [found] = [p for p in up.children() if p.status() != psutil.STATUS_ZOMBIE and is_it(p.cmdline())]
    return found


def _is_nats(cmdline: list[str]) -> bool:
    return bool(cmdline) and Path(cmdline[0]).name == "nats-server"


def _is_postmaster(cmdline: list[str]) -> bool:
    return bool(cmdline) and Path(cmdline[0]).name == "postgres"


async def _replaced(up: psutil.Process, is_it: Callable[[list[str]], bool], old: int, log: Path,
                    timeout: float = 30) -> psutil.Process:
    """Until a new such server runs and no child of the supervisor is a zombie."""
    deadline = time.monotonic() + timeout
    while True:
        children = up.children(recursive=True)
        zombies = [p.pid for p in children if _status(p) == psutil.STATUS_ZOMBIE]
        fresh = [p for p in up.children() if p.pid != old and _status(p) not in (None, psutil.STATUS_ZOMBIE)
                 and is_it(p.cmdline())]
        if fresh and not zombies:
            return fresh[0]
        assert time.monotonic() < deadline, f"not restarted (zombies: {zombies}):\n{log.read_text()}"
        await asyncio.sleep(0.1)


def _status(p: psutil.Process) -> str | None:
    try:
        return str(p.status())
    except psutil.NoSuchProcess:
        return None


async def _until_status(http: aiohttp.ClientSession, method: str, url: str, status: int, log: Path,
                        timeout: float, **kwargs: Any) -> aiohttp.ClientResponse:
    """Send the request until it answers `status` (the body is read)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with http.request(method, url, **kwargs) as resp:
                await resp.read()
                if resp.status == status:
                    return resp
                seen = f"{resp.status} {await resp.text()}"
        except aiohttp.ClientError as exc:
            seen = repr(exc)
        assert time.monotonic() < deadline, f"{method} {url} never answered {status}; last: {seen}\n{log.read_text()}"
        await asyncio.sleep(0.2)


@pytest.mark.timeout(240)
async def test_up_restarts_a_killed_nats_server_and_postgres_and_the_system_serves_again(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("nats", "monitor", "pg", "http")}
    ports["metrics"] = 0
    env = _env(tmp_path / "data", ports)
    log = tmp_path / "up.log"
    base = f"http://127.0.0.1:{ports['http']}"
    proc = _start(env, log)
    try:
        await _wait_ready(base, proc, log)
        up = psutil.Process(proc.pid)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            async with http.post(base + "/orders", json=PLACE) as resp:
                assert resp.status == 201, await resp.text()
                oid = (await resp.json())["order_id"]

            nats = _server(up, _is_nats)
            nats.kill()
            await _replaced(up, _is_nats, nats.pid, log)
            await _until_status(http, "POST", base + "/orders", 201, log, timeout=30, json=PLACE)
            assert "nats-server exited with code -9; restarting in 0.5s" in log.read_text()

            postmaster = _server(up, _is_postmaster)
            postmaster.kill()
            await _replaced(up, _is_postmaster, postmaster.pid, log)
            await _until_status(http, "GET", f"{base}/orders/{oid}", 200, log, timeout=30)
            assert "postgres exited with code -9; restarting in 0.5s" in log.read_text()
            # New writes reach the read model again (the projector reconnects to PostgreSQL).
            placed = await _until_status(http, "POST", base + "/orders", 201, log, timeout=30, json=PLACE)
            seq = placed.headers["X-Stream-Sequence"]
            async with http.post(base + "/orders", json=PLACE) as resp:
                assert resp.status == 201
                newest, seq = (await resp.json())["order_id"], resp.headers["X-Stream-Sequence"]
            await _until_status(http, "GET", f"{base}/orders/{newest}", 200, log, timeout=60, params={"min_seq": seq})
        children = _stop(proc)
        assert not any(psutil.pid_exists(pid) and _status(psutil.Process(pid)) not in (None, psutil.STATUS_ZOMBIE)
                       for pid in children)
    finally:
        if proc.poll() is None:
            _stop(proc)
