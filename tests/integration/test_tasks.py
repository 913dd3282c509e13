"""Task scheduling on real JetStream and PostgreSQL: priorities, delays, retries, dead letters,
cancellation, leases, idempotency, progress."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import pytest

from actors.tasks.messages import CancelTask, ClaimTask, SubmitTask, TaskAccepted
from bus.errors import RuleViolationError
from bus.connection import connect
from infra.bootstrap import run_tasks_actor
from infra.embedded import free_port
from tests.conftest import System, eventually, until
from tests.task_types import GATES, RUNNING, RUNS, STARTED, STOPPED
from tests.integration.test_orders_http import get, post


async def submit(system: System, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    status, _, reply = await post(system, "/tasks", body, headers)
    assert status == 202, reply
    return reply


async def wait_status(
    system: System, task_id: str, status: str, timeout: float = 20.0, attempt: int | None = None
) -> dict[str, Any]:
    _, _, view = await eventually(
        lambda: get(system, f"/tasks/{task_id}"),
        lambda r: r[0] == 200 and r[2]["status"] == status and attempt in (None, r[2]["attempt"]),
        timeout=timeout, failure=f"task {task_id} never became {status} (attempt {attempt})")
    return view


async def wait_completed(system: System, count: int, min_seq: int, timeout: float = 30.0) -> None:
    """Until the read model counts `count` completed tasks (having applied `min_seq` first)."""
    await eventually(lambda: get(system, "/tasks/stats", min_seq=min_seq),
                     lambda r: r[2]["by_status"].get("completed") == count, timeout=timeout, every=0.2,
                     failure=f"{count} tasks never completed")


async def events_of(system: System, task_id: str) -> list[dict[str, Any]]:
    _, _, body = await get(system, f"/tasks/{task_id}/events")
    return body["events"]


def attempt_starts(history: list[dict[str, Any]]) -> list[float]:
    """When each attempt began: its `task.started`, or for one that ended before its start was
    stored, the `started_at` of its outcome."""
    return [e["event"]["at"] if e["type"] == "task.started" else e["event"]["started_at"] for e in history
            if e["type"] == "task.started" or e["event"].get("started_at") is not None]


async def test_a_submitted_echo_task_runs_and_completes_with_its_result(system: System) -> None:
    await system.start_worker()
    reply = await submit(system, {"type": "echo", "payload": {"hello": "world"}})
    view = await wait_status(system, reply["task_id"], "completed")
    assert view["result"] == {"hello": "world"} and view["attempt"] == 1 and view["progress"] == 100.0


async def test_unknown_types_and_bad_fields_are_rejected_naming_the_field(system: System) -> None:
    status, _, body = await post(system, "/tasks", {"type": "no.such.type"})
    assert status == 422 and body["error"]["field"] == "type"
    status, _, body = await post(system, "/tasks", {"type": "echo", "priority": "urgent"})
    assert status == 422 and body["error"]["field"] == "priority"
    status, _, body = await post(system, "/tasks", {"type": "echo", "retry": {"max_attempts": 0}})
    assert status == 422 and body["error"]["field"] == "retry.max_attempts"
    assert await system.messages(system.tasks) == 0


async def _stored(system: System) -> int:
    return await system.messages(system.tasks)


@pytest.mark.parametrize(("body", "field"), [
    ({"type": "echo", "run_at": -1e300}, "run_at"),
    ({"type": "echo", "run_at": 1e300}, "run_at"),
    ({"type": "echo", "run_at": time.time() + 31 * 86400}, "run_at"),
    ({"type": "echo", "delay_s": 31 * 86400}, "delay_s"),
    ({"type": "echo", "timeout_s": 0}, "timeout_s"),
    ({"type": "echo", "retry": {"backoff_s": -1}}, "retry.backoff_s"),
    ({"type": "echo", "retry": {"backoff_max_s": 86401}}, "retry.backoff_max_s"),
    ({"type": "sleep", "payload": {"seconds": 3601}}, "payload.seconds"),
    ({"type": "flaky", "payload": {"fail_times": "twice"}}, "payload.fail_times"),
    ({"type": "fail", "payload": {"error": 7}}, "payload.error"),
    ({"type": "http.request", "payload": {"url": "file:///etc/passwd"}}, "payload.url"),
    ({"type": "http.request", "payload": {"url": "http://x", "method": "TRACE"}}, "payload.method"),
    ({"type": "http.request", "payload": {"method": "GET"}}, "payload.url"),
    ({"type": "order.fulfil", "payload": {"order_id": "o1"}}, "type"),
])
async def test_out_of_range_times_and_bad_payloads_are_422_naming_the_field_and_store_nothing(
    system: System, body: dict[str, Any], field: str
) -> None:
    status, _, reply = await post(system, "/tasks", body)
    assert (status, reply["error"]["code"], reply["error"]["field"]) == (422, "validation", field), reply
    assert await _stored(system) == 0


async def test_a_deeply_nested_body_is_400_malformed(system: System) -> None:
    deep = "[" * 2000 + "]" * 2000  # msgspec alone raised RecursionError: a 500
    for path in ("/tasks", "/orders/o1/pay"):  # the actor's decoder, the edge's own
        async with system.http.post(system.base + path, data='{"type":"echo","payload":' + deep + "}",
                                    headers={"Content-Type": "application/json"}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == "malformed"
    assert await _stored(system) == 0


async def test_internal_types_are_refused_on_submit_and_accepted_on_submit_internal(system: System) -> None:
    body = {"type": "order.fulfil", "payload": {"order_id": "o1"}}
    refused = await system.request(system.tasks.command("submit"), body)
    assert refused.headers and refused.headers["Nats-Service-Error-Code"] == "422"
    assert json.loads(refused.data)["error"]["field"] == "type"
    batch = await system.request(system.tasks.command("submit_batch"), {"items": [body]})
    assert json.loads(batch.data)["results"][0]["refused"]["field"] == "type"
    assert await _stored(system) == 0
    accepted = await system.request(system.tasks.command("submit_internal"), body)
    assert json.loads(accepted.data)["task_type"] == "order.fulfil", accepted.data
    bad = await system.request(system.tasks.command("submit_internal"), {"type": "order.fulfil", "payload": {}})
    assert json.loads(bad.data)["error"]["field"] == "payload.order_id"
    # The public types are accepted there too (same body as submit).
    assert json.loads((await system.request(system.tasks.command("submit_internal"), {"type": "echo"})).data)["status"]


async def test_the_edge_exposes_no_worker_command_nor_internal_submit(system: System) -> None:
    for name in ("submit_internal", "claim", "start", "progress", "complete", "fail", "claim_batch",
                 "start_batch", "complete_batch"):
        for path in (f"/tasks/{name}", f"/tasks/t1/{name}"):
            status, _, body = await post(system, path, {"type": "order.fulfil", "payload": {"order_id": "o1"}})
            assert status in (404, 405), (path, status, body)
    assert await _stored(system) == 0


async def test_a_caller_cannot_set_the_time_the_actor_stamps(system: System) -> None:
    t0 = time.time()
    reply = await submit(system, {"type": "echo", "at": 1.0, "delay_s": 3600})
    submitted = (await events_of(system, reply["task_id"]))[0]["event"]
    assert submitted["at"] >= t0 and submitted["run_at"] >= t0 + 3600  # not 1.0 + 3600


async def test_the_same_idempotency_key_is_one_task(system: System) -> None:
    a = await submit(system, {"type": "echo", "idempotency_key": "job-7"})
    b = await submit(system, {"type": "echo", "idempotency_key": "job-7"})
    c = await submit(system, {"type": "echo"}, {"Idempotency-Key": "job-7"})
    assert a["task_id"] == b["task_id"] == c["task_id"] and a["version"] == b["version"]
    # one event and one work item
    assert await system.messages(system.tasks) == 2


async def test_a_high_task_behind_many_low_ones_starts_next(system: System) -> None:
    STARTED.clear()
    await asyncio.gather(*(submit(system, {"type": "echo", "priority": "low", "payload": {"name": f"low{i}"}})
                           for i in range(300)))
    low = await submit(system, {"type": "test.record", "priority": "low", "payload": {"name": "low-last"}})
    await submit(system, {"type": "test.record", "priority": "high", "payload": {"name": "high"}})
    await submit(system, {"type": "test.record", "priority": "normal", "payload": {"name": "normal"}})
    await system.start_worker(worker_concurrency=1)
    await wait_status(system, low["task_id"], "completed", timeout=60)
    assert STARTED == ["high", "normal", "low-last"]


async def test_a_delayed_task_does_not_start_before_its_time(system: System) -> None:
    await system.start_worker()
    t0 = time.time()
    reply = await submit(system, {"type": "echo", "delay_s": 1.5})
    assert reply["status"] == "scheduled"
    view = await wait_status(system, reply["task_id"], "completed")
    [started_at] = attempt_starts(await events_of(system, reply["task_id"]))
    assert started_at >= t0 + 1.5
    assert view["status"] == "completed"


async def test_failures_retry_with_backoff_then_succeed(system: System) -> None:
    await system.start_worker()
    reply = await submit(system, {"type": "flaky", "payload": {"fail_times": 2},
                                  "retry": {"max_attempts": 3, "backoff_s": 0.3, "jitter": 0}})
    view = await wait_status(system, reply["task_id"], "completed")
    assert view["attempt"] == 3 and view["result"] == {"succeeded_on_attempt": 3}
    history = await events_of(system, reply["task_id"])
    failed = [e["event"] for e in history if e["type"] == "task.failed"]
    assert [round(f["retry_at"] - f["at"], 3) for f in failed] == [0.3, 0.6]
    starts = attempt_starts(history)
    assert len(starts) == 3 and starts[1] >= failed[0]["retry_at"] and starts[2] >= failed[1]["retry_at"]


async def test_the_last_failure_dead_letters_and_retry_brings_it_back(system: System) -> None:
    await system.start_worker()
    reply = await submit(system, {"type": "fail", "payload": {"error": "boom"}, "retry": {"max_attempts": 2, "backoff_s": 0.1}})
    view = await wait_status(system, reply["task_id"], "dead")
    assert view["error"] == "boom" and view["attempt"] == 2
    _, _, dead = await get(system, "/tasks", status="dead")
    assert [t["task_id"] for t in dead["items"]] == [reply["task_id"]]
    status, _, again = await post(system, f"/tasks/{reply['task_id']}/retry")
    assert status == 200 and again["status"] == "pending"
    view = await wait_status(system, reply["task_id"], "dead", attempt=4)
    assert view["error"] == "boom"
    status, _, body = await post(system, f"/tasks/{reply['task_id']}/cancel")
    assert status == 409


async def test_a_timeout_counts_as_a_failed_attempt(system: System) -> None:
    await system.start_worker()
    reply = await submit(system, {"type": "sleep", "payload": {"seconds": 5}, "timeout_s": 0.3, "retry": {"max_attempts": 1}})
    view = await wait_status(system, reply["task_id"], "dead")
    assert "timed out" in view["error"]
    # A handler that swallows its cancellation and returns has still timed out.
    reply = await submit(system, {"type": "test.stubborn", "timeout_s": 0.3, "retry": {"max_attempts": 1}})
    view = await wait_status(system, reply["task_id"], "dead")
    assert "timed out" in view["error"] and view["result"] is None


async def test_a_cancelled_pending_task_never_runs(system: System) -> None:
    reply = await submit(system, {"type": "echo", "delay_s": 0.5})
    status, _, body = await post(system, f"/tasks/{reply['task_id']}/cancel", {"reason": "not needed"})
    assert status == 200 and body["status"] == "cancelled"
    await system.start_worker()
    await asyncio.sleep(1.5)
    assert [e["type"] for e in await events_of(system, reply["task_id"])] == ["task.submitted", "task.cancelled"]
    await wait_status(system, reply["task_id"], "cancelled")


async def test_cancelling_a_running_task_stops_its_handler(system: System) -> None:
    await system.start_worker()
    reply = await submit(system, {"type": "test.gated", "payload": {"gate": "cancel-me"}})
    await wait_status(system, reply["task_id"], "running")
    status, _, body = await post(system, f"/tasks/{reply['task_id']}/cancel")
    assert status == 200
    await asyncio.wait_for(STOPPED["cancel-me"].wait(), 5)
    view = await wait_status(system, reply["task_id"], "cancelled")
    assert view["finished_at"]


async def test_a_cancel_signalled_after_the_claim_was_checked_never_lets_the_handler_run(
    system: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = await system.start_worker()
    run = worker._run  # noqa: SLF001

    async def cancelled_first(item: Any, task: Any, slot: Any) -> None:
        # The cancel is stored, and its signal seen, after `_start` went through the claim's
        # answer and before the attempt's own task runs.
        status, _, _ = await post(system, f"/tasks/{task.task_id}/cancel")
        assert status == 200
        await until(lambda: task.task_id in worker._recently_cancelled, timeout=5, every=0.01,  # noqa: SLF001
                         failure="the cancel signal never arrived")
        await run(item, task, slot)

    monkeypatch.setattr(worker, "_run", cancelled_first)
    reply = await submit(system, {"type": "test.quiet", "payload": {"gate": "late-cancel"}})
    await wait_status(system, reply["task_id"], "cancelled")
    await asyncio.sleep(0.3)  # were it started, the handler would have noted it by now
    assert "late-cancel" not in STARTED


async def test_progress_is_visible_in_the_read_model_and_live(system: System) -> None:
    live: list[dict[str, Any]] = []

    async def collect(msg: Any) -> None:
        live.append(json.loads(msg.data))

    sub = await system.nc.subscribe(system.tasks.live("progress", "*"), cb=collect)
    await system.start_worker()
    reply = await submit(system, {"type": "test.gated", "payload": {"gate": "progress"}})
    _, _, view = await eventually(lambda: get(system, f"/tasks/{reply['task_id']}"),
                                  lambda r: r[2].get("progress") == 40, failure="progress 40 never showed")
    assert view["progress_message"] == "almost half" and view["status"] == "running"
    assert any(p["percent"] == 40 and p["task_id"] == reply["task_id"] for p in live)
    GATES["progress"].set()
    await wait_status(system, reply["task_id"], "completed")
    await sub.unsubscribe()


async def test_a_worker_killed_mid_task_loses_its_lease_and_another_completes_it_once(system: System) -> None:
    from infra.bootstrap import nats_connection, run_worker

    # The first worker's connection dies mid-task: no lease renewals, no outcome.
    async with contextlib.AsyncExitStack() as doomed:
        doomed_nc = await doomed.enter_async_context(nats_connection(system.settings, "doomed"))
        await doomed.enter_async_context(run_worker(system.settings, doomed_nc, name="doomed"))
        reply = await submit(system, {"type": "test.gated", "payload": {"gate": "kill"}})
        view = await wait_status(system, reply["task_id"], "running")
        assert view["worker"] == "doomed"
        await doomed_nc.close()  # as far as NATS is concerned, the process is gone
        GATES["kill"].set()
        await system.start_worker(name="rescuer")
        view = await wait_status(system, reply["task_id"], "completed", timeout=30)
        assert view["worker"] == "rescuer"
        completions = [e for e in await events_of(system, reply["task_id"]) if e["type"] == "task.completed"]
        assert len(completions) == 1


async def test_stats_count_by_status_and_priority(system: System) -> None:
    await submit(system, {"type": "echo", "priority": "high", "delay_s": 60})
    await submit(system, {"type": "echo", "priority": "low"})
    reply = await submit(system, {"type": "echo", "priority": "low"})
    _, _, stats = await get(system, "/tasks/stats", min_seq=reply["seq"])
    assert stats["by_status"] == {"scheduled": 1, "pending": 2}
    assert stats["by_priority"]["low"] == {"pending": 2} and stats["queue_depth"] == 3
    assert stats["oldest_waiting_s"] is not None


async def test_the_http_request_type_calls_out_and_fails_on_server_errors(system: System) -> None:
    from aiohttp import web

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"got": await request.json()})

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=503)

    app = web.Application()
    app.router.add_post("/ok", ok)
    app.router.add_get("/broken", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await system.start_worker()
        good = await submit(system, {"type": "http.request", "payload": {
            "method": "POST", "url": f"http://127.0.0.1:{port}/ok", "json": {"n": 1}}})
        bad = await submit(system, {"type": "http.request", "payload": {"url": f"http://127.0.0.1:{port}/broken"},
                                    "retry": {"max_attempts": 1}})
        view = await wait_status(system, good["task_id"], "completed")
        assert view["result"]["status"] == 200 and json.loads(view["result"]["body"]) == {"got": {"n": 1}}
        view = await wait_status(system, bad["task_id"], "dead")
        assert view["error"] == "server answered 503"
    finally:
        await runner.cleanup()


async def test_no_task_is_lost_when_workers_start_them_as_fast_as_they_are_submitted(system: System) -> None:
    # Regression: a start racing the submit's own cache update once acked the work item away.
    await system.start_worker()
    replies = await asyncio.gather(*(submit(system, {"type": "echo", "payload": i}) for i in range(400)))
    await wait_completed(system, 400, max(r["seq"] for r in replies), timeout=60)


async def test_a_start_batch_answers_each_item_in_order(system: System) -> None:
    task = await submit(system, {"type": "echo"})
    body = {"items": [{"task_id": task["task_id"], "attempt": 1, "worker": "w"},
                      {"task_id": "no-such-task", "attempt": 1, "worker": "w"},
                      {"task_id": task["task_id"], "attempt": 7, "worker": "w"}]}
    reply = await system.request(system.tasks.command("start_batch"), body, headers={"Idempotency-Key": "ignored"})
    results = json.loads(reply.data)["results"]
    assert results[0]["accepted"]["status"] == "running"
    assert results[1]["refused"]["code"] == "not_found"
    assert results[2]["refused"]["code"] == "rule_violation"
    bad = await system.request(system.tasks.command("start_batch"), {"items": [{"task_id": 5}]})
    assert bad.headers and bad.headers["Nats-Service-Error-Code"] == "422"


async def test_a_claim_stores_nothing_and_refuses_a_cancelled_task(system: System) -> None:
    # Delayed far ahead, so no worker takes it meanwhile.
    task = await submit(system, {"type": "echo", "delay_s": 3600})
    claim = {"items": [{"task_id": task["task_id"], "attempt": 1}]}
    [granted] = json.loads((await system.request(system.tasks.command("claim_batch"), claim)).data)["results"]
    assert granted["accepted"]["status"] == "scheduled" and granted["accepted"]["version"] == task["version"]
    assert [e["type"] for e in await events_of(system, task["task_id"])] == ["task.submitted"]
    status, _, _ = await post(system, f"/tasks/{task['task_id']}/cancel", {})
    assert status == 200
    [refused] = json.loads((await system.request(system.tasks.command("claim_batch"), claim)).data)["results"]
    assert refused["refused"]["code"] == "rule_violation"


async def test_a_claim_on_another_actor_process_sees_a_cancel_it_did_not_store(system: System) -> None:
    # Two more task-actor processes' worth of actors: one caches the task, the other cancels it.
    async with run_tasks_actor(system.settings, system.nc) as first, run_tasks_actor(system.settings, system.nc) as other:
        task = await first.execute(SubmitTask(type="echo", delay_s=3600), None)
        assert isinstance(task, TaskAccepted)
        task_id = task.task_id
        await other.execute(CancelTask(task_id=task_id), None)

        async def refusal() -> RuleViolationError | None:
            try:
                await first.execute(ClaimTask(task_id=task_id, attempt=1), None)
            except RuleViolationError as exc:
                return exc
            return None

        # The cancel's signal reaches `first` asynchronously.
        refused = await eventually(refusal, timeout=5, failure="a stale cache granted a claim for a cancelled task")
        assert refused is not None and "cancelled" in refused.message


async def test_a_stray_cancel_signal_delays_a_task_but_never_loses_it(system: System) -> None:
    await system.start_worker()
    task = await submit(system, {"type": "echo", "payload": "kept", "delay_s": 0.5})
    # The signal a stored cancel sends, without the cancel: the worker stores the start first
    # and lets the store decide.
    await system.nc.publish(system.tasks.live("cancel", task["task_id"]), b"")
    view = await wait_status(system, task["task_id"], "completed")
    assert view["result"] == "kept"


async def test_a_quick_task_records_its_start_in_its_outcome_and_a_long_one_on_its_own(system: System) -> None:
    await system.start_worker()
    quick = await submit(system, {"type": "echo", "payload": 1})
    view = await wait_status(system, quick["task_id"], "completed")
    history = await events_of(system, quick["task_id"])
    assert [e["type"] for e in history] == ["task.submitted", "task.completed"]
    completed = history[1]["event"]
    assert completed["worker"] == view["worker"] and completed["started_at"] <= completed["at"] and view["started_at"]
    slow = await submit(system, {"type": "sleep", "payload": {"seconds": 2.0}})
    running = await wait_status(system, slow["task_id"], "running")  # shown while it runs
    assert running["started_at"] and running["worker"]
    await wait_status(system, slow["task_id"], "completed")
    history = [e for e in await events_of(system, slow["task_id"]) if e["type"] != "task.progressed"]
    assert [e["type"] for e in history] == ["task.submitted", "task.started", "task.completed"]
    assert history[2]["event"]["started_at"] is None


async def test_a_submit_batch_queues_each_task_and_keeps_per_item_idempotency(system: System) -> None:
    await system.start_worker()
    items = [{"type": "echo", "payload": i, "idempotency_key": f"bulk-{i}"} for i in range(50)]
    items.append({"type": "no.such.type"})
    reply = await system.request(system.tasks.command("submit_batch"), {"items": items})
    results = json.loads(reply.data)["results"]
    assert [r.get("accepted", {}).get("status") for r in results[:50]] == ["pending"] * 50
    assert results[50]["refused"]["field"] == "type"
    again = json.loads((await system.request(system.tasks.command("submit_batch"), {"items": items[:50]})).data)
    assert [r["accepted"]["task_id"] for r in again["results"]] == [r["accepted"]["task_id"] for r in results[:50]]
    await wait_completed(system, 50, max(r["accepted"]["seq"] for r in results[:50]))


async def test_an_actor_distrusts_its_cache_after_a_reconnect(system: System) -> None:
    # Cancel signals are core NATS: those sent while a task-actor process was disconnected are
    # lost, so after a reconnect every cached aggregate is read again before its next command.
    nc = await connect(system.settings.resolved_nats_url(), "test-reconnect")
    try:
        async with run_tasks_actor(system.settings, nc) as first, \
                run_tasks_actor(system.settings, system.nc) as other:
            task = await first.execute(SubmitTask(type="echo", delay_s=3600), None)
            assert isinstance(task, TaskAccepted)
            assert first.cached(task.task_id)
            reconnects = nc.stats["reconnects"]
            transport = nc._transport  # noqa: SLF001 - the connection drops as in an outage
            assert transport is not None
            transport.close()
            await other.execute(CancelTask(task_id=task.task_id), None)
            await until(lambda: nc.stats["reconnects"] > reconnects and nc.is_connected, every=0.02,
                             failure="never reconnected")
            assert not first.cached(task.task_id)
            with pytest.raises(RuleViolationError, match="cancelled"):
                await first.execute(ClaimTask(task_id=task.task_id, attempt=1), None)
    finally:
        await nc.close()


async def test_a_worker_runs_at_most_its_concurrency_of_handlers_at_once(system: System) -> None:
    # A slot is freed when its handler ends (the outcome is stored meanwhile), never twice.
    RUNNING.update(now=0, most=0)
    await system.start_worker(worker_concurrency=3)
    tasks = [await submit(system, {"type": "test.overlapping"}) for _ in range(12)]
    for task in tasks:
        await wait_status(system, task["task_id"], "completed")
    assert RUNNING["most"] == 3


async def test_outcomes_are_kept_through_a_task_actor_outage_and_no_handler_runs_again(system: System) -> None:
    # The handlers end while no task actor answers (as during a JetStream leader failover): each
    # outcome is tried again, its lease held, until the actor is back.
    await system.start_worker()
    tasks = [await submit(system, {"type": "test.counted", "payload": {"gate": "outage", "fail": i % 4 == 0},
                                   "retry": {"max_attempts": 1}}) for i in range(24)]
    ids = [t["task_id"] for t in tasks]
    await until(lambda: all(RUNS[i] for i in ids), failure="not every handler started")
    await system.stop_tasks_actor()
    GATES["outage"].set()
    await asyncio.sleep(system.settings.task_lease_s * 1.5)  # longer than a lease
    await system.start_tasks_actor()
    for i, task_id in enumerate(ids):
        await wait_status(system, task_id, "dead" if i % 4 == 0 else "completed")
    await asyncio.sleep(1.5)  # a work item redelivered by mistake would have run by now
    assert {task_id: RUNS[task_id] for task_id in ids} == {task_id: 1 for task_id in ids}


async def test_an_outcome_that_cannot_be_stored_fails_the_task_instead_of_holding_the_worker(system: System) -> None:
    await system.start_worker()
    once = {"retry": {"max_attempts": 1}}
    tasks = {name: await submit(system, {"type": name, **once})
             for name in ("test.oversized", "test.unencodable", "test.wordy")}
    views = {name: await wait_status(system, t["task_id"], "dead") for name, t in tasks.items()}
    assert "more than the 262144 a task result may be" in views["test.oversized"]["error"]
    assert "cannot be stored as JSON" in views["test.unencodable"]["error"]
    assert views["test.wordy"]["error"].startswith("why why") and len(views["test.wordy"]["error"]) == 2000
    # and the worker still works
    echo = await submit(system, {"type": "echo", "payload": {"still": "working"}})
    assert (await wait_status(system, echo["task_id"], "completed"))["result"] == {"still": "working"}
