"""Partitioned streams (K = 4) on real JetStream and PostgreSQL: each aggregate's events live in
the partition its id hashes to, every reader covers all partitions (replay merged by stored
time, status, rebuild, read-your-writes on lists), and a data directory keeps the partition
count its streams were created with.

The rest of the integration suite also runs at K = 4 (the `partitions` fixture): orders, tasks
with strict priority, the saga, fulfilment, contracts, traces, the user context."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest

from bus.eventstore import PartitionedStore
from bus.subjects import Context, partition_of
from bus.streams import ensure_stream, event_stream
from infra.bootstrap import PartitionsMismatch, ensure_streams, existing_partitions, prepare, run_actor
from infra.settings import Settings
from infra.status import rebuild, status
from tests.conftest import System, eventually, make_settings, running
from tests.integration.test_orders_http import PLACE, get, post

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def sharded(namespace: str, nats_url: str, database_url: str) -> AsyncIterator[System]:
    async with running(make_settings(namespace, nats_url, database_url, partitions=4)) as system:
        yield system


async def _orders(system: System, n: int, customer: str = "c-1") -> list[tuple[str, int]]:
    """n placed orders: (id, stream sequence of the write)."""
    out = []
    for _ in range(n):
        status, headers, body = await post(system, "/orders", {**PLACE, "customer_id": customer})
        assert status == 201, body
        out.append((body["order_id"], int(headers["X-Stream-Sequence"])))
    return out


async def test_each_aggregate_lives_in_the_partition_its_id_hashes_to(sharded: System) -> None:
    orders = sharded.orders
    assert orders.streams == [f"{sharded.settings.namespace.upper()}_ORDERS_P{p}" for p in range(4)]
    placed = await _orders(sharded, 24)
    js = sharded.nc.jetstream()
    for oid, _ in placed:
        part = orders.part_of(oid)
        assert part.stream.endswith(f"_P{partition_of(oid, 4)}")
        stored = await js.get_last_msg(part.stream, orders.events(oid), direct=True)
        assert stored.subject == f"{sharded.settings.namespace}.orders.events.{part.part}.{oid}"
    # Every partition takes writes (24 random ids over 4 partitions).
    counts = [(await js.stream_info(s)).state.messages for s in orders.streams]
    assert sum(counts) == 24 and all(counts), counts
    # Reads of one aggregate find it wherever it lives.
    oid, seq = placed[0]
    status, _, view = await get(sharded, f"/orders/{oid}", min_seq=seq)
    assert (status, view["status"]) == (200, "placed")
    status, _, history = await get(sharded, f"/orders/{oid}/events")
    assert status == 200 and [e["type"] for e in history["events"]] == ["order.placed"]


async def test_a_list_asked_for_min_seq_has_every_write_made_before_it(sharded: System) -> None:
    placed = await _orders(sharded, 12, customer="listed")
    # The sequence of the last write belongs to one partition; the list waits for all of them.
    status, _, page = await get(sharded, "/orders", customer_id="listed", min_seq=placed[-1][1], limit=50)
    assert status == 200
    assert {o["order_id"] for o in page["items"]} == {oid for oid, _ in placed}


async def test_a_replay_of_the_context_merges_the_partitions_by_stored_time(sharded: System) -> None:
    placed = await _orders(sharded, 16)
    store = PartitionedStore.open(sharded.nc, sharded.orders)
    events = [e async for e in store.read(sharded.orders.events_wildcard)]
    assert sorted(sharded.orders.aggregate_id(e.subject) for e in events) == sorted(oid for oid, _ in placed)
    times = [datetime.fromisoformat(e.time) for e in events]
    assert times == sorted(times)
    assert len({store.of(e.subject).stream for e in events}) > 1
    # The CLI prints the same merge, naming each event's stream.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JETSOURCE_NATS_URL": sharded.settings.resolved_nats_url(),
           "JETSOURCE_NAMESPACE": sharded.settings.namespace, "JETSOURCE_PARTITIONS": "4"}
    out = subprocess.run([sys.executable, "-m", "infra.cli", "replay", "orders"], env=env, capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(o["stream"], o["seq"]) for o in lines] == [(store.of(e.subject).stream, e.seq) for e in events]
    # One aggregate's replay reads its partition only.
    oid = placed[3][0]
    one = subprocess.run([sys.executable, "-m", "infra.cli", "replay", "orders", oid], env=env, capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert [json.loads(line)["stream"] for line in one.stdout.splitlines()] == [sharded.orders.part_of(oid).stream]


async def test_status_shows_every_partition_stream_and_projection_checkpoint(sharded: System) -> None:
    await _orders(sharded, 4)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        await status(sharded.settings, sharded.nc)
    text = printed.getvalue()
    for p in range(4):
        assert f"{sharded.settings.namespace.upper()}_ORDERS_P{p}" in text
        assert f"orders.p{p} " in text and f"tasks.p{p} " in text
        assert f"<- {sharded.settings.namespace.upper()}_ORDERS_P{p}" in text  # the process managers' lag


async def test_a_rebuild_refolds_every_partition_into_one_read_model(sharded: System) -> None:
    placed = await _orders(sharded, 12, customer="rebuilt")
    for oid, _ in placed[:4]:
        status, _, body = await post(sharded, f"/orders/{oid}/cancel")
        assert status == 200, body
    with contextlib.redirect_stdout(io.StringIO()):
        assert await rebuild(sharded.settings, "orders") == 0

    async def listed() -> dict[str, str]:
        _, _, page = await get(sharded, "/orders", customer_id="rebuilt", limit=50)
        return {o["order_id"]: o["status"] for o in page["items"]}

    expected = {oid: ("cancelled" if i < 4 else "placed") for i, (oid, _) in enumerate(placed)}
    await eventually(listed, lambda got: got == expected, timeout=20, failure="the rebuilt read model differs")


def _plain(namespace: str, nats_url: str, database_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """Settings arguments with the partition count left unset (as a user leaves it)."""
    monkeypatch.delenv("JETSOURCE_PARTITIONS", raising=False)
    return {"nats_url": nats_url, "database_url": database_url, "namespace": namespace, "db_schema": namespace,
            "_env_file": None}


async def test_streams_keep_the_partition_count_they_were_created_with(
    namespace: str, nats_url: str, database_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = _plain(namespace, nats_url, database_url, monkeypatch)
    old = Settings(**base, partitions=1)  # type: ignore[arg-type]
    async with running(make_settings(namespace, nats_url, database_url, partitions=1)) as system:
        await ensure_streams(system.nc, old)
        assert await existing_partitions(system.nc, old) == {n: (1, False) for n in ("orders", "tasks", "inventory")}
        # An actor told another count refuses to start (it would write where no reader looks).
        with pytest.raises(PartitionsMismatch, match="ORDERS_P0 does not exist"):
            async with run_actor(system.settings.model_copy(update={"partitions": 4}), system.nc, "orders"):
                pass
    # Left unset, the setting follows the streams; asked for explicitly, another count is refused.
    assert (await prepare(Settings(**base))).partitions == 1  # type: ignore[arg-type]
    with pytest.raises(PartitionsMismatch, match="created with 1 partition"):
        await prepare(Settings(**base, partitions=4))  # type: ignore[arg-type]


async def test_a_creation_cut_short_is_completed_by_the_count_it_was_started_with(
    namespace: str, nats_url: str, database_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = _plain(namespace, nats_url, database_url, monkeypatch)
    async with running(make_settings(namespace + "x", nats_url, database_url, partitions=1)) as system:
        js = system.nc.jetstream()
        # `prepare` with four partitions stopped after the orders streams and one of tasks'.
        for part in [*Context("orders", namespace, 4).parts, Context("tasks", namespace, 4).parts[0]]:
            await ensure_stream(js, event_stream(part))
        unsure = Settings(**base)  # type: ignore[arg-type]
        with pytest.raises(PartitionsMismatch, match="different partition counts"):
            await prepare(unsure)  # nothing says which count was meant
        done = await prepare(Settings(**base, partitions=4))  # type: ignore[arg-type]
        assert done.partitions == 4
        found = await existing_partitions(system.nc, done)
        assert found == {n: (4, True) for n in ("orders", "tasks", "inventory")}


def test_the_partition_hash_is_fnv1a_as_nats_subject_mapping_computes_it() -> None:
    # FNV-1a 32-bit test vectors; NATS `partition(K, n)` is this hash of the tokens, mod K.
    assert [partition_of(k, 2**31) for k in ("a", "foobar")] == [0xE40C292C % 2**31, 0xBF9CF968 % 2**31]
    assert partition_of("anything", 1) == 0
    ctx = Context("orders", "", 4)
    oid = "o-42"
    part = ctx.part_of(oid)
    assert ctx.partition_of_subject(ctx.events(oid)) == part.part == partition_of(oid, 4)
    assert ctx.partition_of_subject(part.outbox("paid")) == part.part
    assert (part.stream, part.outbox("paid"), part.queue("high")) == (
        f"ORDERS_P{part.part}", f"orders.outbox.{part.part}.paid", f"orders.queue.{part.part}.high")
    with pytest.raises(ValueError, match="4 partitions"):
        _ = ctx.stream
    assert Context("orders").stream == "ORDERS" and Context("orders").events("x") == "orders.events.x"


async def test_a_worker_takes_every_partition_high_queue_before_any_normal_one(sharded: System) -> None:
    from tests.task_types import STARTED

    STARTED.clear()
    # Queued before any worker runs: normal tasks land in every partition, then high ones.
    normal = [await post(sharded, "/tasks", {"type": "test.record", "priority": "normal",
                                             "payload": {"name": f"n{i}"}}) for i in range(8)]
    high = [await post(sharded, "/tasks", {"type": "test.record", "priority": "high",
                                           "payload": {"name": f"h{i}"}}) for i in range(8)]
    assert all(r[0] == 202 for r in normal + high)
    parts = {sharded.tasks.partition_of(r[2]["task_id"]) for r in high}
    assert len(parts) > 1
    await sharded.start_worker(worker_concurrency=1, fulfilment=False)
    await eventually(lambda: asyncio.sleep(0, len(STARTED)), lambda n: n >= 16, timeout=30)
    assert all(name.startswith("h") for name in STARTED[:8]), STARTED
