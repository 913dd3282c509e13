"""Answers a client had JetStream store on an event subject — a Direct Get's 404, a batch's
end-of-batch status (nats-server 2.15 stores them without their status line, with their
`Nats-Num-Pending` / `Nats-Last-Sequence` headers), a snapshot copied there — are not events:
loads, time travel, rebuilds and the live projector go on as if they were not there (and a
stored message is never taken for the server's own status: it carries its sequence). Also: a snapshot of a version the stream does not
end at is ignored, and a rebuild that died while holding a read model does not freeze it."""

from __future__ import annotations

import asyncio
import contextlib
import io

from actors.runtime import Actor
from bus.eventstore import PartitionedStore
from infra.contexts import declared
from infra.status import rebuild
from projections.schema import create_pool
from tests.conftest import System, eventually
from tests.integration.test_orders_http import PLACE, get, post


async def _forge(system: System, subject: str, api: str, body: bytes) -> None:
    """Ask JetStream something with `subject` as the reply: its answer is stored there."""
    js = system.nc.jetstream()
    before = sum([(await js.stream_info(s)).state.messages for s in system.orders.streams])
    await system.nc.publish(api, body, reply=subject)

    async def stored() -> int:
        return sum([(await js.stream_info(s)).state.messages for s in system.orders.streams])
    await eventually(stored, lambda n: n > before, failure="JetStream did not store the answer")


async def test_stored_status_answers_on_an_event_subject_change_nothing(system: System) -> None:
    status, headers, body = await post(system, "/orders", PLACE)
    oid = body["order_id"]
    orders = system.orders
    spec = declared(system.settings).context("orders").spec(system.settings)
    actor = Actor(system.nc, PartitionedStore.open(system.nc, orders), spec)
    await actor.snapshot_now(oid)  # a snapshot to copy
    subject = orders.part_of(oid).events(oid)
    snaps = orders.snapshot_stream
    # A 404, then a batch whose end-of-batch status says "more from sequence 1".
    await _forge(system, subject, f"$JS.API.DIRECT.GET.{snaps}", b'{"last_by_subj": "nothing.here"}')
    await _forge(system, subject, f"$JS.API.DIRECT.GET.{snaps}",
                 b'{"seq": 1, "next_by_subj": "%s", "batch": 1}' % orders.snapshots_wildcard.encode())
    status, headers, body = await post(system, f"/orders/{oid}/items", {"sku": "pear", "quantity": 1, "unit_price": 9})
    assert (status, body["total"]) == (200, 309), body
    state, version = await Actor(system.nc, PartitionedStore.open(system.nc, orders), spec).load(oid, use_snapshot=False)
    assert (state.total, version) == (309, body["version"])
    _, _, history = await get(system, f"/orders/{oid}/events")
    assert [e["type"] for e in history["events"]] == ["order.placed", "order.item_added"]
    _, _, now = await get(system, f"/orders/{oid}/state")
    assert now["state"]["lines"]["pear"]["quantity"] == 1
    # A rebuild reads past them (and ends), and the live projector follows on.
    with contextlib.redirect_stdout(io.StringIO()):
        assert await asyncio.wait_for(rebuild(system.settings, "orders"), 90) == 0
    status, headers, body = await post(system, "/orders", PLACE)
    assert (await get(system, f"/orders/{body['order_id']}", min_seq=headers["X-Stream-Sequence"]))[0] == 200
    _, _, view = await get(system, f"/orders/{oid}")
    assert view["total"] == 309


async def test_a_snapshot_of_a_version_the_stream_does_not_end_at_is_ignored(system: System) -> None:
    status, headers, body = await post(system, "/orders", PLACE)
    oid = body["order_id"]
    spec = declared(system.settings).context("orders").spec(system.settings)
    actor = Actor(system.nc, PartitionedStore.open(system.nc, system.orders), spec)
    snaps = actor.snapshots
    assert snaps is not None
    state, version = await actor.load(oid)
    # As if the stream had been restored to an older state: the snapshot says version + 100.
    data = snaps.body(oid, state, version + 100, "", {}, "", "")
    assert await snaps.save(oid, data, version + 100)
    fresh = Actor(system.nc, PartitionedStore.open(system.nc, system.orders), spec)
    assert await fresh.load(oid) == (state, version)
    assert fresh.snapshots is not None and fresh.snapshots.ignored == 1


async def test_a_hold_whose_rebuild_is_gone_is_let_go(system: System) -> None:
    status, headers, body = await post(system, "/orders", PLACE)
    await get(system, f"/orders/{body['order_id']}", min_seq=headers["X-Stream-Sequence"])
    pool = await create_pool(system.settings.resolved_database_url(), system.settings.db_schema)
    try:
        names = [part.checkpoint("orders") for part in system.orders.parts]
        # A rebuild held it at its current sequence, then died (its advisory lock went with it).
        await pool.execute("UPDATE projection_checkpoints SET hold_at = last_seq, hold_by = 424242 "
                           "WHERE name = ANY($1)", names)
        placed = [await post(system, "/orders", PLACE) for _ in range(3)]
        for status, headers, body in placed:
            status, _, view = await get(system, f"/orders/{body['order_id']}", min_seq=headers["X-Stream-Sequence"])
            assert status == 200, view
        # Let go where the projector met it (a partition without new events never did).
        touched = [system.orders.part_of(body["order_id"]).checkpoint("orders") for _, _, body in placed]
        assert await pool.fetchval("SELECT count(*) FROM projection_checkpoints WHERE name = ANY($1) "
                                   "AND hold_at IS NOT NULL", touched) == 0
    finally:
        await pool.close()
