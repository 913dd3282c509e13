"""Snapshots on real JetStream: an actor stores one every N events of an aggregate, a load starts
from it (plus the events after it), what is not a usable snapshot is ignored rather than misread,
keyed retries are still recognised after a load from a snapshot, and the CLI shows, takes and
drops them."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from actors.orders import domain
from actors.runtime import Actor
from bus import subjects as h
from bus.eventstore import PartitionedStore, direct_last
from infra.contexts import declared
from tests.conftest import System, eventually, make_settings, running
from tests.integration.test_orders_http import PLACE, get, post

ROOT = Path(__file__).resolve().parents[2]
EVERY = 5


@pytest.fixture
async def snapshotting(partitions: int, namespace: str, nats_url: str, database_url: str) -> AsyncIterator[System]:
    async with running(make_settings(namespace, nats_url, database_url, partitions=partitions,
                                     snapshot_every=EVERY)) as system:
        yield system


async def _order_with_items(system: System, items: int, headers: dict[str, str] | None = None) -> tuple[str, int]:
    status, out, body = await post(system, "/orders", PLACE)
    assert status == 201, body
    oid = body["order_id"]
    for i in range(items):
        status, out, body = await post(system, f"/orders/{oid}/items", {"sku": f"sku-{i % 7}", "quantity": 1,
                                                                        "unit_price": 10}, headers)
        assert status == 200, body
    return oid, int(out["X-Stream-Sequence"])


async def _snapshot(system: System, oid: str) -> dict | None:
    msg = await direct_last(system.nc, system.orders.snapshot_stream, system.orders.snapshot(oid), timeout=5)
    return None if msg is None else json.loads(msg.data)


def _fresh_actor(system: System) -> Actor:
    """An actor with an empty cache, on the same streams (as after a restart)."""
    spec = declared(system.settings).context("orders").spec(system.settings)
    return Actor(system.nc, PartitionedStore.open(system.nc, system.orders), spec)


async def test_an_aggregate_is_snapshotted_every_n_events_and_loads_from_it(snapshotting: System) -> None:
    oid, last = await _order_with_items(snapshotting, 11)  # 12 events: snapshots after the 5th and the 10th
    snap = await eventually(lambda: _snapshot(snapshotting, oid), lambda s: s is not None and s["state_version"] == 1
                            and s["version"] < last and s["id"] == oid)
    assert snap is not None
    _, _, history = await get(snapshotting, f"/orders/{oid}/events")
    seqs = [e["seq"] for e in history["events"]]
    assert snap["version"] == seqs[9]
    fresh = _fresh_actor(snapshotting)
    assert await fresh.load(oid) == await fresh.load(oid, use_snapshot=False)
    state, version = await fresh.load(oid)
    assert (version, state.total) == (last, 300 + 110)
    # Time travel starts from it when it is not past the point asked for.
    _, _, now = await get(snapshotting, f"/orders/{oid}/state")
    assert (now["version"], now["snapshot"], now["state"]["lines"]["sku-0"]["quantity"]) == (last, seqs[9], 2)
    _, _, then = await get(snapshotting, f"/orders/{oid}/state", at_version=seqs[3])
    assert (then["version"], then["snapshot"]) == (seqs[3], None)
    # A command after a load from the snapshot is decided on the right state and version.
    status, _, body = await post(snapshotting, f"/orders/{oid}/items", {"sku": "late", "quantity": 1, "unit_price": 5})
    assert (status, body["total"]) == (200, 415), body


async def test_a_keyed_retry_is_recognised_after_a_load_from_a_snapshot(snapshotting: System) -> None:
    status, out, body = await post(snapshotting, "/orders", PLACE)
    oid = body["order_id"]
    key = {"Idempotency-Key": f"add-{oid}"}
    first = await post(snapshotting, f"/orders/{oid}/items", {"sku": "pear", "quantity": 1, "unit_price": 99}, key)
    assert first[0] == 200
    for i in range(EVERY):  # a snapshot after the keyed command
        assert (await post(snapshotting, f"/orders/{oid}/items", {"sku": "fig", "quantity": 1, "unit_price": 1}))[0] == 200
    await eventually(lambda: _snapshot(snapshotting, oid), lambda s: s is not None and f"add-{oid}" in s["commands"])
    stored = await snapshotting.messages(snapshotting.orders)
    snapshotting.actor.invalidate_all()
    snapshotting.actor._cache.clear()  # noqa: SLF001 - as after a restart: the next load is from the snapshot
    again = await post(snapshotting, f"/orders/{oid}/items", {"sku": "pear", "quantity": 1, "unit_price": 99}, key)
    assert (again[0], again[2]) == (first[0], first[2])
    assert await snapshotting.messages(snapshotting.orders) == stored
    other = await post(snapshotting, f"/orders/{oid}/items", {"sku": "pear", "quantity": 2, "unit_price": 99}, key)
    assert (other[0], other[2]["error"]["code"]) == (422, "idempotency_key_reused"), other


@pytest.mark.parametrize("forgery", ["no header", "another aggregate", "an older state schema", "not a snapshot"])
async def test_what_is_not_a_usable_snapshot_is_ignored_not_misread(snapshotting: System, forgery: str) -> None:
    oid, last = await _order_with_items(snapshotting, 2)  # no snapshot of its own yet
    bogus = domain.Order(order_id=oid, exists=True, status="shipped", customer_id="evil", currency="EUR")
    body = {"id": oid, "version": last, "state_version": 1, "state": msgspec.to_builtins(bogus)}
    headers = {h.SNAPSHOT_VERSION: str(last)}
    if forgery == "no header":
        headers = {}
    elif forgery == "another aggregate":
        body["id"] = "someone-else"
    elif forgery == "an older state schema":
        body["state_version"] = 0
    data = b"\x00 not json" if forgery == "not a snapshot" else json.dumps(body).encode()
    await snapshotting.nc.jetstream().publish(snapshotting.orders.snapshot(oid), data, headers=headers)
    fresh = _fresh_actor(snapshotting)
    state, version = await fresh.load(oid)
    assert (state.status, state.customer_id, version) == ("placed", "c-1", last)
    assert fresh.snapshots is not None and fresh.snapshots.ignored == 1
    _, _, now = await get(snapshotting, f"/orders/{oid}/state")
    assert (now["snapshot"], now["state"]["status"]) == (None, "placed")


def _cli(system: System, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JETSOURCE_NATS_URL": system.settings.resolved_nats_url(),
           "JETSOURCE_NAMESPACE": system.settings.namespace, "JETSOURCE_PARTITIONS": str(system.settings.partitions),
           "JETSOURCE_SNAPSHOT_EVERY": str(EVERY)}
    return subprocess.run([sys.executable, "-m", "infra.cli", "snapshots", *args], env=env, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


async def test_the_cli_shows_takes_and_drops_snapshots(snapshotting: System) -> None:
    oid, last = await _order_with_items(snapshotting, 2)
    out = await asyncio.to_thread(_cli, snapshotting, "show", "orders", oid)
    assert out.returncode == 1 and f"orders {oid} has no snapshot" in out.stderr
    out = await asyncio.to_thread(_cli, snapshotting, "take", "orders", oid)
    assert (out.returncode, json.loads(out.stdout)) == (0, {"id": oid, "version": last}), out.stderr
    out = await asyncio.to_thread(_cli, snapshotting, "show", "orders", oid)
    shown = json.loads(out.stdout)
    assert (shown["version"], shown["usable"], shown["state"]["status"]) == (last, True, "placed")
    out = await asyncio.to_thread(_cli, snapshotting, "show", "orders")
    summary = json.loads(out.stdout)
    assert (summary["snapshots"], summary["every"], summary["state_version"]) == (1, EVERY, 1)
    out = await asyncio.to_thread(_cli, snapshotting, "take", "orders", "no-such-order")
    assert out.returncode == 1 and "has no events" in out.stderr
    out = await asyncio.to_thread(_cli, snapshotting, "drop", "orders")
    assert out.returncode == 0, out.stderr
    assert await _snapshot(snapshotting, oid) is None
    state, version = await _fresh_actor(snapshotting).load(oid)
    assert (state.status, version) == ("placed", last)
