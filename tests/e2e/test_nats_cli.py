"""The standard NATS tools against `jetsource up`: the `nats` CLI lines of README.md (the block
after `<!-- nats-cli -->`), run exactly as written, with the admin identity in NATS_USER /
NATS_PASSWORD and NATS_URL naming the test's server. Skipped where `nats` is not on the PATH
(`go install github.com/nats-io/natscli/nats@v0.5.0`; `.ci/run` installs it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.test_up import _env, _free_run, _start, _stop, _wait_ready

ROOT = Path(__file__).resolve().parents[2]
NATS = shutil.which("nats")
pytestmark = pytest.mark.skipif(
    NATS is None, reason="the nats CLI is not on the PATH (go install github.com/nats-io/natscli/nats@v0.5.0)")
SERVICES = [f"{c}_{kind}" for c in ("orders", "tasks", "inventory") for kind in ("actor", "query")]


def readme_lines() -> list[str]:
    """The `nats ...` lines of README.md's marked block."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- nats-cli -->", 1)[1].split("```", 2)[1]
    return [line.strip() for line in block.splitlines() if line.strip().startswith("nats ")]


def _run(line: str, env: dict[str, str]) -> str:
    done = subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.mark.timeout(300)
async def test_the_readme_nats_lines_work_against_jetsource_up() -> None:
    lines = readme_lines()
    assert any(" bench service request orders.cmd.place " in line for line in lines), lines
    with tempfile.TemporaryDirectory(prefix="jetsource-natscli-") as tmp:
        first = _free_run(5)
        ports = {"nats": first, "monitor": first + 1, "pg": first + 2, "http": first + 3, "metrics": 0}
        env = _env(Path(tmp) / "data", ports)
        log = Path(tmp) / "up.log"
        proc = _start(env, log)
        try:
            await _wait_ready(f"http://127.0.0.1:{ports['http']}", proc, log)
            password = (Path(tmp) / "data" / "secrets" / "admin.password").read_text().strip()
            cli = {**env, "NATS_URL": f"nats://127.0.0.1:{ports['nats']}", "NATS_USER": "admin",
                   "NATS_PASSWORD": password, "HOME": tmp}
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{ports['http']}/orders", params={"limit": 1}) as resp:
                    assert resp.status == 200
            before = _orders_stored(cli)
            for line in lines:
                out = _run(line, cli)
                if " micro ls" in line or " micro list" in line:
                    assert all(name in out for name in SERVICES), out
                elif " micro info " in line:
                    assert "place" in out and "orders.cmd.place" in out, out
                elif " bench service request orders.cmd.place " in line:
                    msgs = int(line.split("--msgs", 1)[1].split()[0].lstrip("="))
                    # every request got a success: one new order each, no error counted
                    assert _orders_stored(cli) - before == msgs, out
                    stats = json.loads(_run("nats micro stats orders_actor --json", cli))
                    place = [e for s in _instances(stats) for e in s["endpoints"] if e["subject"] == "orders.cmd.place"]
                    assert sum(e["num_requests"] for e in place) >= msgs
                    assert sum(e["num_errors"] for e in place) == 0
                    assert sum(e["processing_time"] for e in place) > 0
                elif " stream info ORDERS" in line:
                    assert "Subjects: orders.events.>" in out or "orders.events.>" in out, out
                elif " stream get ORDERS" in line:
                    assert "order.placed" in out and "Jetsource-Command-Id" in out, out
            # the README's credentials are needed: without them the server refuses
            anonymous = {k: v for k, v in cli.items() if k not in ("NATS_USER", "NATS_PASSWORD")}
            refused = subprocess.run(["nats", "micro", "ls"], cwd=ROOT, env=anonymous, capture_output=True, text=True,
                                     timeout=60)
            assert refused.returncode != 0 and "uthorization" in refused.stdout + refused.stderr
        finally:
            _stop(proc)


def _instances(stats: object) -> list[dict]:
    return stats if isinstance(stats, list) else [stats]  # type: ignore[list-item]


def _orders_stored(env: dict[str, str]) -> int:
    info = json.loads(_run("nats stream info ORDERS --json", env))
    return int(info["state"]["messages"])

