"""Live configuration: `jetsource config set` changes what running roles do, without a restart;
bad values are refused and change nothing; `unset` goes back to the environment's value."""

from __future__ import annotations

import json
import logging
from typing import TypeVar

import pytest

from infra.liveconfig import LiveConfig
from tests.conftest import System, cli, eventually
from tests.integration.test_orders_http import get
from tests.integration.test_tasks import submit, wait_status
from tests.task_types import RUNNING

pytestmark = pytest.mark.single_stream  # one stream's worth: the bucket is the same whatever the partitions


def _lines(out: str) -> dict[str, dict[str, object]]:
    return {line["key"]: line for line in map(json.loads, out.splitlines())}


async def test_a_worker_follows_its_concurrency_from_the_config_bucket(system: System) -> None:
    worker = await system.start_worker(worker_concurrency=8)
    done = await cli(system, "config", "set", "worker_concurrency", "1")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["value"] == 1
    await eventually(lambda: _value(worker.concurrency), lambda n: n == 1, failure="the worker kept its concurrency")
    RUNNING.update(now=0, most=0)
    tasks = [await submit(system, {"type": "test.overlapping"}) for _ in range(6)]
    for task in tasks:
        await wait_status(system, task["task_id"], "completed")
    assert RUNNING["most"] == 1  # one at a time, though the worker started with 8

    listed = _lines((await cli(system, "config", "list")).stdout)
    assert listed["worker_concurrency"]["value"] == 1 and listed["worker_concurrency"]["source"] == "kv"
    assert listed["max_inflight"]["source"] in ("default", "environment")

    done = await cli(system, "config", "unset", "worker_concurrency")
    assert done.returncode == 0, done.stderr
    # Back to the value this process's settings give (its environment, or the default).
    await eventually(lambda: _value(worker.concurrency), lambda n: n == system.settings.worker_concurrency,
                     failure="the worker did not go back to its settings' concurrency")


async def test_the_edge_applies_a_rate_limit_set_while_it_runs(system: System) -> None:
    assert (await get(system, "/orders"))[0] == 200
    done = await cli(system, "config", "set", "rate_limit_per_s", "1")
    assert done.returncode == 0, done.stderr

    async def burst() -> list[int]:
        return [(await get(system, "/orders"))[0] for _ in range(5)]

    statuses = await eventually(burst, lambda s: 429 in s, failure="the edge never limited the rate")
    assert set(statuses) <= {200, 429}
    assert (await cli(system, "config", "set", "rate_limit_per_s", "0")).returncode == 0
    await eventually(burst, lambda s: s == [200] * 5, failure="the edge kept limiting")


async def test_the_log_level_changes_live(system: System) -> None:
    live = LiveConfig(system.nc, system.settings)
    from infra.liveconfig import apply_log_level

    live.on("log_level", apply_log_level)
    root = logging.getLogger()
    before = root.level
    try:
        async with live.running():
            assert (await cli(system, "config", "set", "log_level", "debug")).returncode == 0
            await eventually(lambda: _value(root.level), lambda level: level == logging.DEBUG,
                             failure="the log level did not change")
            got = json.loads((await cli(system, "config", "get", "log_level")).stdout)
            assert (got["value"], got["source"]) == ("DEBUG", "kv")  # stored as validated: upper case
    finally:
        root.setLevel(before)


async def test_the_projector_follows_its_linger(system: System) -> None:
    assert (await cli(system, "config", "set", "projection_busy_linger_s", "0.02")).returncode == 0
    await eventually(lambda: _value([p.busy_linger_s for p in system.projectors]),
                     lambda lingers: set(lingers) == {0.02}, failure="the projectors kept their linger")


@pytest.mark.parametrize(("key", "value", "complaint"), [
    ("worker_concurrency", "0", "greater than or equal to 1"),
    ("worker_concurrency", "many", "valid integer"),
    ("rate_limit_per_s", "-1", "greater than or equal to 0"),
    ("log_level", "LOUD", "a log level is one of DEBUG, INFO"),
    ("projection_busy_linger_s", "60", "less than or equal to 5"),
    ("breaker_cooldown_s", "Infinity", "finite number"),
    ("breaker_cooldown_s", "0", "greater than 0"),
    ("nats_url", "nats://elsewhere:4222", "is not a live setting"),
])
async def test_a_bad_value_is_refused_by_set_and_changes_nothing(
    system: System, key: str, value: str, complaint: str,
) -> None:
    from infra import liveconfig

    done = await cli(system, "config", "set", key, value)
    assert done.returncode == 2 and complaint in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "nothing was changed" in done.stderr or "is not a live setting" in done.stderr
    assert await liveconfig.read(system.nc, system.live.bucket, key, timeout=5) == (0, None)  # nothing stored


async def test_a_bad_value_written_around_set_is_not_applied(system: System) -> None:
    worker = await system.start_worker(worker_concurrency=4)
    bucket = system.live.bucket
    await system.nc.jetstream().publish(f"$KV.{bucket}.worker_concurrency", b"-5")
    await system.live.refresh({"worker_concurrency"})
    assert worker.concurrency == 4 and system.live.value("worker_concurrency") == system.settings.worker_concurrency
    await system.nc.jetstream().publish(f"$KV.{bucket}.worker_concurrency", b"3")
    await eventually(lambda: _value(worker.concurrency), lambda n: n == 3, failure="the good value never came")
    await system.nc.jetstream().publish(f"$KV.{bucket}.worker_concurrency", b'"lots"')
    got = json.loads((await cli(system, "config", "get", "worker_concurrency")).stdout)
    assert "not a valid value" in str(got["invalid"]) and got["source"] != "kv"
    await system.live.refresh({"worker_concurrency"})
    assert worker.concurrency == 3  # kept what it had


T = TypeVar("T")


async def _value(value: T) -> T:
    return value


async def test_the_edges_breakers_follow_their_policy_from_the_config_bucket(system: System) -> None:
    from tests.integration.test_orders_http import post

    assert (await cli(system, "config", "set", "breaker_failures", "1")).returncode == 0
    assert (await cli(system, "config", "set", "breaker_cooldown_s", "30")).returncode == 0
    await eventually(lambda: _value(system.live.value("breaker_cooldown_s")), lambda s: s == 30,
                     failure="the edge never saw the policy")
    await system.stop_tasks_actor()  # its commands now get no responder
    status, _, first = await post(system, "/tasks", {"type": "echo"})
    assert (status, first["error"]["code"]) == (503, "unavailable"), first
    status, headers, second = await post(system, "/tasks", {"type": "echo"})
    # One failure opened it (the default is 5), for the 30 s the bucket says (the default is 5).
    assert (status, second["error"]["code"]) == (503, "circuit_open"), second
    assert int(headers["Retry-After"]) > 5
