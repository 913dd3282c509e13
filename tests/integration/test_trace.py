"""One trace from an HTTP request through the process managers and the worker: what a paid
order causes (its fulfilment task, run by a worker, the worker's log lines, and the ship)
carries the pay's trace, given as a W3C `traceparent`."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

from bus import subjects as h
from infra.logs import JsonLines
from tests.conftest import System, eventually
from tests.integration.test_orders_http import PLACE, get, post

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


@contextlib.contextmanager
def json_lines(logger_name: str, role: str, level: int | None = None) -> Iterator[list[dict[str, Any]]]:
    """What the logger (and those below it) writes meanwhile, as the JSON lines a process of
    `role` would print; the list is filled as lines come (it is live inside the block)."""
    lines: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(self.format(record)))

    handler = Collect()
    handler.setFormatter(JsonLines(role))
    logger = logging.getLogger(logger_name)
    before = logger.level
    logger.addHandler(handler)
    if level is not None:
        logger.setLevel(level)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)


async def test_the_trace_of_a_pay_reaches_the_fulfilment_task_the_workers_lines_and_the_ship(system: System) -> None:
    await system.start_worker()
    _, _, body = await post(system, "/orders", PLACE)
    oid = body["order_id"]
    assert (await post(system, f"/orders/{oid}/confirm"))[0] == 200
    # The worker's and the task handlers' lines (the fulfilment handler's is a debug one).
    with json_lines("actors.tasks", "worker", logging.DEBUG) as lines:
        status, headers, _ = await post(system, f"/orders/{oid}/pay", {"amount": 300}, {"traceparent": TRACEPARENT})
        assert (status, headers["X-Trace-Id"]) == (200, TRACE)
        await eventually(lambda: get(system, f"/orders/{oid}"), lambda r: r[2].get("status") == "shipped",
                         timeout=30, every=0.1, failure=f"order {oid} was never shipped")
    fulfilling = [line for line in lines if f"fulfilling order {oid}" in line["message"]]
    assert fulfilling and all((line["trace_id"], line["correlation_id"]) == (TRACE, TRACE) for line in fulfilling), lines

    _, _, history = await get(system, f"/orders/{oid}/events")
    by_type: dict[str, dict[str, Any]] = {e["type"]: e for e in history["events"]}
    assert by_type["order.confirmed"]["trace_id"] != TRACE  # the trace is the pay's, not the order's
    assert (by_type["order.paid"]["trace_id"], by_type["order.paid"]["correlation_id"]) == (TRACE, TRACE)

    _, _, page = await eventually(lambda: get(system, "/tasks", type="order.fulfil"),
                                  lambda r: any(t["ref"] == f"order:{oid}" for t in r[2]["items"]),
                                  failure="the fulfilment task never showed up")
    [task] = [t for t in page["items"] if t["ref"] == f"order:{oid}"]
    status, _, task_history = await get(system, f"/tasks/{task['task_id']}/events")
    assert status == 200
    events = task_history["events"]
    assert [e["type"] for e in events][0] == "task.submitted" and events[-1]["type"] == "task.completed"
    assert [(e["type"], e["trace_id"], e["correlation_id"]) for e in events] == [
        (e["type"], TRACE, TRACE) for e in events]

    shipped = by_type["order.shipped"]  # shipped in the read model, so in the stream
    assert (shipped["type"], shipped["trace_id"], shipped["correlation_id"]) == ("order.shipped", TRACE, TRACE)


async def test_an_actors_log_lines_carry_the_trace_of_the_command_they_are_written_for(system: System) -> None:
    status, headers, body = await post(system, "/orders", PLACE)
    oid = body["order_id"]
    # A message no actor appended, stored on the order's subject: the next command's append
    # conflicts, the reload skips it — and logs that, inside the command.
    await system.nc.jetstream().publish(system.orders.part_of(oid).events(oid), b'{"type":"order.paid"}')
    with json_lines("actors.runtime", "orders_actor") as lines:
        async with system.http.post(f"{system.base}/orders/{oid}/items", headers={"X-Trace-Id": "trace-in-logs"},
                                    json={"sku": "pear", "quantity": 1, "unit_price": 5}) as resp:
            assert resp.status == 200
    skipped = [line for line in lines if "no actor appended" in line["message"]]
    assert skipped and all(line["trace_id"] == "trace-in-logs" for line in skipped), lines


async def test_a_process_managers_log_lines_carry_the_trace_of_the_event_it_handles(system: System) -> None:
    with json_lines("bus.parking", "order_saga") as lines:
        # An outbox event the saga cannot decode, stored with a trace: it is parked, and says so.
        await system.nc.jetstream().publish(
            system.orders.parts[0].outbox("confirmed"), b"\x00 not an event",
            headers={h.EV_COMMAND_ID: "poison-traced", h.EV_TRACE_ID: "trace-of-poison"})

        async def parked_lines() -> list[dict[str, Any]]:
            return [line for line in lines if "order_saga" in line["message"]]

        parked = await eventually(parked_lines, lambda found: bool(found), failure="the saga never parked it")
    assert all(line["trace_id"] == "trace-of-poison" for line in parked), parked
