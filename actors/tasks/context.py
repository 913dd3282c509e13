"""The tasks context, declared once: the task aggregate and its work queue, the workers' role,
its read model and routes."""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client
from nats.js.client import JetStreamContext

from actors.tasks.messages import (
    PRIORITIES, Dispatch, GetTask, ListTasks, TaskPage, TaskProgressed, TaskStats, TaskStatsView, TaskView,
)
from actors.tasks.registry import build_registry
from actors.tasks.service import task_spec
from bus.streams import ensure_work_consumers
from bus.subjects import Context, Parked
from http_edge import tasks as routes
from infra.contexts import BoundedContext, Contract, Parameter, Published, Query, ReadModel, Role
from infra.settings import Settings
from projections import tasks as read_model

# Commands only workers send: attempt bookkeeping.
WORKER_COMMANDS = ("claim", "start", "progress", "complete", "fail", "claim_batch", "start_batch", "complete_batch")
PUBLIC_COMMANDS = ("submit", "cancel", "retry")


async def _prepare(js: JetStreamContext, ctx: Context, settings: Settings) -> None:
    await ensure_work_consumers(js, ctx, PRIORITIES, settings.task_lease_s)


def _worker_permissions(ctx: Context, settings: Settings) -> dict[str, Any]:
    from actors.tasks.worker import PARKED_READER
    from infra.auth import consumer_api, stores

    parked = Parked(settings.namespace)
    return {
        "publish": {
            "allow": [*(ctx.command(n) for n in WORKER_COMMANDS),
                      *(api for part in ctx.parts for p in PRIORITIES
                        for api in consumer_api(part.stream, part.work_consumer(p), manage=False)),
                      parked.reader_wildcard(PARKED_READER)],
            "deny": [*stores(settings), ctx.live(">"),
                     *(ctx.command(n) for n in (*PUBLIC_COMMANDS, "submit_batch", "submit_internal"))],
        },
        "subscribe": {"allow": [ctx.live("ready"), ctx.live("cancel", "*")], "deny": []},
    }


# What the work queue and the live signals carry (the AsyncAPI document).
_TASK_ID = {"task_id": Parameter("the task's id")}
_PUBLISHES = (
    Published("queue", lambda ctx: ctx.queue_address("priority"), Dispatch,
              "A work item, stored in the task's stream in the same atomic batch as the event that causes it; "
              "workers pull it through the durable consumer workers_<priority>",
              {"priority": Parameter("the task's priority: workers drain high before normal, normal before low",
                                     PRIORITIES)}),
    Published("live.progress", lambda ctx: ctx.live("progress", "{task_id}"), TaskProgressed,
              "A running task's progress (core NATS, best effort): the task.progressed event as stored", _TASK_ID),
    Published("live.cancel", lambda ctx: ctx.live("cancel", "{task_id}"), None,
              "The task was cancelled (core NATS, empty body): a worker running it cancels its handler, and every "
              "task actor process reloads it", _TASK_ID),
    Published("live.ready", lambda ctx: ctx.live("ready"), None,
              "Work is waiting (core NATS, empty body, at most one per group commit): wakes idle workers, which "
              "also poll"),
)


async def _status(nc: Client, ctx: Context) -> list[str]:
    from infra.status import consumer_line

    return ["work queues:", *[await consumer_line(nc, part.stream, part.work_consumer(p),
                                                  f"tasks {p}" + (f" p{part.part}" if ctx.partitioned else ""))
                              for p in PRIORITIES for part in ctx.parts]]


CONTEXT = BoundedContext(
    name="tasks",
    aggregate=lambda ctx, settings: task_spec(ctx, build_registry(settings.task_modules).types()),
    public_commands=PUBLIC_COMMANDS,
    read_model=ReadModel(
        projection=read_model.TasksProjection, tables=read_model.TABLES, ddl=read_model.DDL,
        queries={"get": Query(GetTask, read_model.get_task, aggregate="task_id", reply=TaskView),
                 "list": Query(ListTasks, read_model.list_tasks, reply=TaskPage),
                 "stats": Query(TaskStats, read_model.task_stats, reply=TaskStatsView)},
    ),
    routes=routes.routes,
    openapi=routes.openapi,
    work_queue=True,
    actor_publishes=lambda ctx: [ctx.live(">")],
    publishes=_PUBLISHES,
    actor_subscribes=lambda ctx: [ctx.live("cancel", "*")],
    prepare=_prepare,
    roles=(Role("worker", ("worker",), _worker_permissions),),
    status=_status,
    contract=Contract(
        id_field="task_id",
        # Far in the future: no worker runs it while the suite looks at it.
        create=lambda tid: ("submit", {"task_id": tid, "type": "echo", "payload": {"n": 1}, "delay_s": 86_400}),
        change=lambda tid: ("cancel", {"task_id": tid, "reason": "contract"}),
        refused=lambda tid: ("retry", {"task_id": tid}, "rule_violation"),
        invalid=("submit", {"type": "echo", "priority": "urgent"}, "priority"),
        repeatable=False,
    ),
)
