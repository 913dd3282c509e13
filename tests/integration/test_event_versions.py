"""Event sourcing in depth, end to end on real JetStream and PostgreSQL: an event stored at an
older schema version (raw bytes, as an older release wrote them) reads in its current shape
everywhere — the actor's fold, the projection, the process managers, history, replay and time
travel — and stays stored as it was; an aggregate's state at a version or a time; history pages."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec

from bus import subjects as h
from tests.conftest import System, eventually
from tests.integration.test_orders_http import PLACE, get, post

ROOT = Path(__file__).resolve().parents[2]


async def _paid_order(system: System) -> tuple[str, int]:
    """A paid order of 2 apples, a tracked SKU (its stock is reserved, and committed at ship)."""
    status, _, body = await post(system, "/inventory/apple/receive", {"quantity": 10})
    assert status == 200, body
    status, headers, body = await post(system, "/orders", PLACE)
    assert status == 201, body
    oid = body["order_id"]
    for step, extra in (("confirm", None), ("pay", {"amount": 300})):
        status, headers, body = await post(system, f"/orders/{oid}/{step}", extra)
        assert status == 200, body
    assert body["status"] == "paid"
    return oid, int(headers["X-Stream-Sequence"])


async def _store_raw(system: System, subject: str, data: bytes, expected: int | None = None) -> int:
    """Store bytes as an older release's actor did: with a command id, trace and time."""
    headers = {h.EV_COMMAND_ID: f"old-release-{subject}", h.EV_TRACE_ID: "old-trace",
               h.EV_TIME: "2026-06-01T12:00:00+00:00"}
    if expected is not None:
        headers[h.EXPECTED_LAST_SUBJECT_SEQ] = str(expected)
    return int((await system.nc.jetstream().publish(subject, data, headers=headers)).seq)


def _cli(system: System, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JETSOURCE_NATS_URL": system.settings.resolved_nats_url(),
           "JETSOURCE_NAMESPACE": system.settings.namespace, "JETSOURCE_PARTITIONS": str(system.settings.partitions)}
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


async def test_a_version_1_shipped_event_reads_as_version_2_everywhere_and_stays_stored_as_it_was(
    system: System,
) -> None:
    oid, paid_seq = await _paid_order(system)
    part = system.orders.part_of(oid)
    v1 = msgspec.json.encode({"type": "order.shipped", "v": 1, "order_id": oid, "carrier": "ups",
                              "tracking": "1Z999", "skus": ["apple"]})
    seq = await _store_raw(system, part.events(oid), v1, expected=paid_seq)
    await _store_raw(system, part.outbox("shipped"), v1)  # its outbox copy, as the actor stores it

    # The actor folds it (its cache is behind: the cancel conflicts, reloads, and is refused).
    status, _, body = await post(system, f"/orders/{oid}/cancel", {})
    assert (status, body["error"]["code"]) == (409, "rule_violation"), body
    assert "shipped" in body["error"]["message"]
    state, version = await system.actor.load(oid)
    assert (state.status, version) == ("shipped", seq)
    # The projection.
    status, _, view = await get(system, f"/orders/{oid}", min_seq=seq)
    assert status == 200
    assert (view["status"], view["carrier"], view["tracking_numbers"]) == ("shipped", "ups", ["1Z999"])
    # The order saga: it commits the shipped stock (a reservation becomes a commit).
    async def committed() -> bool:
        _, _, events = await get(system, "/inventory/apple/events")
        return any(e["type"] == "inventory.stock_committed" and e["event"]["order_id"] == oid
                   for e in events.get("events", ()))
    await eventually(committed)
    # History: current shape by default, the stored bytes with form=stored.
    _, _, history = await get(system, f"/orders/{oid}/events")
    shipped = history["events"][-1]
    assert (shipped["seq"], shipped["event"]["v"], shipped["event"]["tracking_numbers"]) == (seq, 2, ["1Z999"])
    assert "tracking" not in shipped["event"]
    _, _, stored = await get(system, f"/orders/{oid}/events", form="stored")
    assert stored["events"][-1]["event"] == json.loads(v1)
    # Time travel folds it too.
    _, _, now = await get(system, f"/orders/{oid}/state")
    assert (now["version"], now["state"]["status"]) == (seq, "shipped")
    # Replay: current by default, as stored with --stored.
    out = await asyncio.to_thread(_cli, system, "replay", "orders", oid)
    assert out.returncode == 0, out.stderr
    last = json.loads(out.stdout.splitlines()[-1])
    assert (last["seq"], last["event"]["v"], last["event"]["tracking_numbers"]) == (seq, 2, ["1Z999"])
    out = await asyncio.to_thread(_cli, system, "replay", "orders", oid, "--stored")
    assert json.loads(out.stdout.splitlines()[-1])["event"] == json.loads(v1)
    # Nothing was rewritten: the stream still holds the version-1 bytes.
    msg = await system.nc.jetstream().get_msg(part.stream, seq)
    assert msg.data == v1


async def test_a_command_stores_version_2_and_a_single_tracking_number_still_works(system: System) -> None:
    oid, _ = await _paid_order(system)
    status, _, body = await post(system, f"/orders/{oid}/ship", {"carrier": "dhl", "tracking": "A1",
                                                                 "tracking_numbers": ["B2", "A1"]})
    assert status == 200, body
    _, _, history = await get(system, f"/orders/{oid}/events", form="stored")
    assert history["events"][-1]["event"]["v"] == 2
    assert history["events"][-1]["event"]["tracking_numbers"] == ["B2", "A1"]
    status, _, body = await post(system, f"/orders/{oid}/ship", {"tracking_numbers": ["x"] * 51})
    assert (status, body["error"]["code"], body["error"]["field"]) == (422, "validation", "tracking_numbers")


async def _history_of_four(system: System) -> tuple[str, list[dict[str, Any]]]:
    status, headers, body = await post(system, "/orders", PLACE)
    oid = body["order_id"]
    for sku in ("pear", "plum", "fig"):
        await asyncio.sleep(0.02)  # distinct stored times
        status, headers, body = await post(system, f"/orders/{oid}/items", {"sku": sku, "quantity": 1, "unit_price": 10})
        assert status == 200, body
    _, _, history = await get(system, f"/orders/{oid}/events")
    assert len(history["events"]) == 4
    return oid, history["events"]


async def test_the_state_at_a_version_or_a_time_is_folded_from_the_stream(system: System) -> None:
    oid, events = await _history_of_four(system)
    seqs = [e["seq"] for e in events]
    status, headers, now = await get(system, f"/orders/{oid}/state")
    assert status == 200
    assert (now["order_id"], now["version"], now["snapshot"], headers["ETag"]) == (oid, seqs[-1], None, f'"{seqs[-1]}"')
    assert sorted(now["state"]["lines"]) == ["apple", "fig", "pear", "plum"]
    _, _, second = await get(system, f"/orders/{oid}/state", at_version=seqs[1])
    assert (second["version"], sorted(second["state"]["lines"])) == (seqs[1], ["apple", "pear"])
    assert second["time"] == events[1]["time"]
    _, _, at = await get(system, f"/orders/{oid}/state", at_time=events[2]["time"])
    assert (at["version"], sorted(at["state"]["lines"])) == (seqs[2], ["apple", "pear", "plum"])
    # Beyond the last version, before the first event, an unknown id, bad values: coded errors.
    status, _, body = await get(system, f"/orders/{oid}/state", at_version=seqs[-1] + 1000)
    assert (status, body["error"]["code"], body["error"]["field"]) == (422, "validation", "at_version")
    status, _, body = await get(system, f"/orders/{oid}/state", at_time="2020-01-01T00:00:00Z")
    assert (status, body["error"]["code"]) == (404, "not_found") and "did not exist" in body["error"]["message"]
    status, _, body = await get(system, "/orders/no-such-order/state")
    assert (status, body["error"]["code"]) == (404, "not_found")
    for params, field in (({"at_version": "x"}, "at_version"), ({"at_version": "0"}, "at_version"),
                          ({"at_time": "yesterday"}, "at_time")):
        status, _, body = await get(system, f"/orders/{oid}/state", **params)
        assert (status, body["error"]["code"], body["error"]["field"]) == (422, "validation", field), body
    # The CLI shows the same.
    out = await asyncio.to_thread(_cli, system, "state", "orders", oid, "--at-version", str(seqs[1]))
    assert out.returncode == 0, out.stderr
    assert {k: v for k, v in json.loads(out.stdout).items() if k != "id"} == {
        k: v for k, v in second.items() if k != "order_id"}
    out = await asyncio.to_thread(_cli, system, "state", "orders", oid, "--at-time", "2020-01-01T00:00:00Z")
    assert out.returncode == 1 and "did not exist" in out.stderr and "Traceback" not in out.stderr


async def test_every_context_has_time_travel(system: System) -> None:
    status, _, body = await post(system, "/tasks", {"type": "test.record", "payload": {"n": 1}})
    assert status in (200, 201, 202), body
    status, _, state = await get(system, f"/tasks/{body['task_id']}/state")
    assert (status, state["state"]["status"]) == (200, "pending"), state
    status, _, body = await post(system, "/inventory/kiwi/receive", {"quantity": 5})
    assert status == 200, body
    status, _, state = await get(system, "/inventory/kiwi/state")
    assert (status, state["sku"], state["state"]["on_hand"]) == (200, "kiwi", 5), state


async def test_history_pages_by_sequence_time_and_limit(system: System) -> None:
    oid, events = await _history_of_four(system)
    seqs = [e["seq"] for e in events]
    _, _, page = await get(system, f"/orders/{oid}/events", limit=2)
    assert ([e["seq"] for e in page["events"]], page["next_from_seq"]) == (seqs[:2], seqs[2])
    _, _, page = await get(system, f"/orders/{oid}/events", from_seq=page["next_from_seq"], limit=2)
    assert ([e["seq"] for e in page["events"]], page["next_from_seq"]) == (seqs[2:], None)
    _, _, page = await get(system, f"/orders/{oid}/events", since=events[3]["time"])
    assert [e["seq"] for e in page["events"]] == seqs[3:]
    _, _, page = await get(system, f"/orders/{oid}/events", from_seq=seqs[-1] + 1)
    assert page["events"] == []
    for params, field in (({"limit": "0"}, "limit"), ({"limit": "10001"}, "limit"), ({"from_seq": "a"}, "from_seq"),
                          ({"since": "soon"}, "since"), ({"form": "raw"}, "form")):
        status, _, body = await get(system, f"/orders/{oid}/events", **params)
        assert (status, body["error"]["code"], body["error"]["field"]) == (422, "validation", field), body


async def test_the_state_of_an_aggregate_holding_an_event_no_code_reads_is_a_coded_error(system: System) -> None:
    status, headers, body = await post(system, "/orders", PLACE)
    oid = body["order_id"]
    part = system.orders.part_of(oid)
    bad = await _store_raw(system, part.events(oid), b'{"type":"order.shipped","v":9,"order_id":"%s"}' % oid.encode())
    status, _, body = await get(system, f"/orders/{oid}/state")
    assert (status, body["error"]["code"]) == (500, "internal"), body
    assert f"the event at sequence {bad} cannot be read" in body["error"]["message"]
    _, _, at = await get(system, f"/orders/{oid}/state", at_version=bad - 1)  # before it: folds
    assert at["state"]["status"] == "placed"
    out = await asyncio.to_thread(_cli, system, "state", "orders", oid)
    assert out.returncode == 1 and "cannot be read" in out.stderr and "Traceback" not in out.stderr
