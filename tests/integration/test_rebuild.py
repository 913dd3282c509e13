"""Blue/green rebuilds on real JetStream and PostgreSQL: the new copy is built aside while the
live read model keeps serving and following, both are compared at the same stream sequence, and
one transaction swaps them. Readers never see a 404 or an older state than before it began."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from infra.status import rebuild
from projections.orders import OrdersProjection
from projections.rebuild import recorded_versions
from projections.schema import create_pool
from tests.conftest import System, eventually
from tests.integration.test_orders_http import PLACE, get, post

ROOT = Path(__file__).resolve().parents[2]


async def _orders(system: System, count: int, customer: str = "c-1") -> list[tuple[str, int]]:
    out = []
    for i in range(count):
        status, headers, body = await post(system, "/orders", {**PLACE, "customer_id": customer})
        assert status == 201, body
        oid = body["order_id"]
        if i % 3 == 0:
            status, headers, body = await post(system, f"/orders/{oid}/items", {"sku": "pear", "quantity": 1,
                                                                              "unit_price": 7})
        out.append((oid, int(headers["X-Stream-Sequence"])))
    return out


async def _schemas(system: System) -> set[str]:
    conn = await asyncpg.connect(system.settings.resolved_database_url())
    try:
        return {r[0] for r in await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE $1",
                                               system.settings.db_schema + "__%")}
    finally:
        await conn.close()


async def test_reads_during_a_rebuild_never_see_a_404_or_an_older_state(system: System) -> None:
    placed = await _orders(system, 40)
    watched = [oid for oid, _ in placed[::5]]
    _, _, before = await get(system, "/orders", limit=500, min_seq=placed[-1][1])
    versions = {o["order_id"]: o["version"] for o in before["items"]}
    seen: list[tuple[str, int, int]] = []  # (order, status, version)
    done = asyncio.Event()

    async def read() -> None:
        while not done.is_set():
            for oid in watched:
                status, _, view = await get(system, f"/orders/{oid}")
                seen.append((oid, status, view.get("version", -1)))
            await asyncio.sleep(0)

    async def write() -> list[tuple[str, int]]:  # the live read model keeps following
        out = []
        while not done.is_set():
            out += await _orders(system, 1, customer="during")
            await asyncio.sleep(0.01)
        return out

    reader, writer = asyncio.create_task(read()), asyncio.create_task(write())
    report: list[dict[str, Any]] = []
    try:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert await rebuild(system.settings, "orders") == 0
        report = [json.loads(line) for line in out.getvalue().splitlines()]
        await asyncio.sleep(0.2)  # reads after the swap, too
    finally:
        done.set()
        await reader
        during = await writer
    assert len(seen) > 20 and all(status == 200 for _, status, _ in seen), [s for s in seen if s[1] != 200][:5]
    assert all(version >= versions[oid] for oid, _, version in seen)
    phases = [line.get("phase") for line in report]
    assert "copying" in phases and phases[-1] == "swapped", phases
    compared = next(line for line in report if line.get("phase") == "compared")
    assert compared["parity"] is True and {t["table"] for t in compared["tables"]} == {"orders", "order_lines"}, compared
    copying = next(line for line in report if line.get("phase") == "copying")
    assert {"events_per_s", "lag", "eta_s", "applied_through", "target"} <= set(copying)
    # Everything placed before and during the rebuild is there, and the live model still follows.
    last = max(seq for _, seq in placed + during)
    _, _, after = await get(system, "/orders", limit=500, min_seq=last)
    assert {o["order_id"] for o in after["items"]} >= {oid for oid, _ in placed + during}
    [(oid, seq)] = await _orders(system, 1, customer="after")
    assert (await get(system, f"/orders/{oid}", min_seq=seq))[0] == 200
    assert await _schemas(system) == set()  # the copy's schema and the old tables are gone


async def test_a_drifted_read_model_is_reported_and_kept_when_parity_is_required(system: System) -> None:
    placed = await _orders(system, 6)
    oid, seq = placed[2]
    await get(system, f"/orders/{oid}", min_seq=seq)
    pool = await create_pool(system.settings.resolved_database_url(), system.settings.db_schema)
    try:
        await pool.execute("UPDATE orders SET total = 1 WHERE order_id = $1", oid)  # a drift nobody folded
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert await rebuild(system.settings, "orders", require_parity=True) == 1
        compared = next(json.loads(line) for line in out.getvalue().splitlines() if '"compared"' in line)
        orders = next(t for t in compared["tables"] if t["table"] == "orders")
        assert compared["parity"] is False and orders["equal"] is False
        assert orders["live_rows"] == orders["copy_rows"] == 6
        assert [oid in row for row in orders["only_live"]] == [True] and [oid in row for row in orders["only_copy"]] == [True]
        assert await pool.fetchval("SELECT total FROM orders WHERE order_id = $1", oid) == 1  # not swapped
        # The hold was released: the live read model follows again.
        [(late, late_seq)] = await _orders(system, 1)
        assert (await get(system, f"/orders/{late}", min_seq=late_seq))[0] == 200
        # Without --require-parity the copy (the fold of the streams) replaces the drifted model.
        with contextlib.redirect_stdout(io.StringIO()):
            assert await rebuild(system.settings, "orders", keep=True) == 0
        assert await pool.fetchval("SELECT total FROM orders WHERE order_id = $1", oid) == 300
        kept = f"{system.settings.db_schema}__orders_old"
        assert await _schemas(system) == {kept}
        assert await pool.fetchval(f'SELECT total FROM "{kept}".orders WHERE order_id = $1', oid) == 1
    finally:
        await pool.close()


async def test_a_projection_version_bump_rebuilds_its_read_model_when_the_projector_starts(
    system: System, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from infra.bootstrap import run_projector

    placed = await _orders(system, 5)
    pool = await create_pool(system.settings.resolved_database_url(), system.settings.db_schema)
    try:
        current = (await recorded_versions(pool)).get("orders")
        assert current == OrdersProjection.version
        await pool.execute("UPDATE orders SET status = 'drifted'")  # what the new version folds anew
        monkeypatch.setattr(OrdersProjection, "version", current + 1)
        async with run_projector(system.settings, system.nc):
            await eventually(lambda: recorded_versions(pool), lambda v: v.get("orders") == current + 1, timeout=60,
                             failure="the outdated read model was not rebuilt")
        assert set(await pool.fetchval("SELECT array_agg(DISTINCT status) FROM orders")) == {"placed"}
        assert await pool.fetchval("SELECT count(*) FROM orders") == len(placed)
    finally:
        await pool.close()


async def test_the_cli_rebuilds_one_read_model_and_prints_progress(system: System) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JETSOURCE_NATS_URL": system.settings.resolved_nats_url(),
           "JETSOURCE_NAMESPACE": system.settings.namespace, "JETSOURCE_DB_SCHEMA": system.settings.db_schema,
           "JETSOURCE_DATABASE_URL": system.settings.resolved_database_url(),
           "JETSOURCE_PARTITIONS": str(system.settings.partitions)}
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "infra.cli", "projections", "rebuild", "tasks"],
                                   env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert {line["projection"] for line in lines} == {"tasks"}
    assert lines[-1]["phase"] == "swapped"
    bad = subprocess.run([sys.executable, "-m", "infra.cli", "projections", "rebuild", "nope"], env=env,
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


async def test_a_read_model_built_before_versions_were_recorded_counts_as_version_1(system: System) -> None:
    """A data directory from before `projection_versions`: its orders read model (built by the
    projection before carriers and tracking numbers) is due for a rebuild; an empty one is not."""
    from infra.contexts import declared
    from projections.rebuild import Model, outdated

    [(oid, seq)] = await _orders(system, 1)
    await get(system, f"/orders/{oid}", min_seq=seq)
    found = declared(system.settings)
    models = [Model.of(bc, bc.context(system.settings)) for bc in found.contexts if bc.read_model is not None]
    pool = await create_pool(system.settings.resolved_database_url(), system.settings.db_schema)
    try:
        await pool.execute("DELETE FROM projection_versions")
        due = await outdated(pool, models)
        assert [m.name for m in due] == ["orders"]  # tasks and inventory are at version 1
        recorded = await recorded_versions(pool)
        assert recorded["orders"] == 1 and recorded["tasks"] == recorded["inventory"] == 1
        await pool.execute("DELETE FROM projection_versions")
        await pool.execute("UPDATE projection_checkpoints SET last_seq = 0")  # as if nothing was built
        assert await outdated(pool, models) == []
        assert (await recorded_versions(pool))["orders"] == OrdersProjection.version
    finally:
        await pool.close()
