"""The composition root: builds each role from settings with owned lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Protocol

from aiohttp import web
from nats.aio.client import Client

from actors.fulfilment import FulfilmentManager
from actors.orders.service import order_actor
from actors.tasks.messages import PRIORITIES
from actors.tasks.registry import TaskRegistry, build_registry
from actors.tasks.service import task_actor
from actors.tasks.worker import Worker
from bus.connection import connect
from bus.eventstore import EventStore
from bus.runtime import Actor
from bus.streams import ensure_stream, ensure_work_consumers, event_stream, parked_stream
from bus.subjects import Context, Parked
from http_edge.app import EdgeConfig, create_app
from infra import auth
from infra.settings import Settings
from projections.orders import OrdersProjection
from projections.tasks import TasksProjection
from projections.runner import Checkpoints, Projector
from projections.schema import create_pool, ensure_schema
from projections.service import QueryService

log = logging.getLogger(__name__)


def orders_context(settings: Settings) -> Context:
    return Context("orders", settings.namespace)


def tasks_context(settings: Settings) -> Context:
    return Context("tasks", settings.namespace)


def parked_subjects(settings: Settings) -> Parked:
    return Parked(settings.namespace)


def _store(settings: Settings, nc: Client, ctx: Context) -> EventStore:
    return EventStore(
        nc, ctx.stream, timeout=settings.request_timeout_s,
        max_batch=settings.append_batch_max, max_inflight_batches=settings.append_batches_inflight,
    )


@contextlib.asynccontextmanager
async def nats_connection(settings: Settings, name: str, role: str = auth.ADMIN) -> AsyncIterator[Client]:
    """A connection with the identity of `role` (see infra.auth), drained on exit."""
    nc = await connect(settings.resolved_nats_url(), name, credentials=auth.credentials(settings, role))
    try:
        yield nc
    finally:
        if nc.is_connected:
            await nc.drain()
        else:
            await nc.close()


async def ensure_streams(nc: Client, settings: Settings) -> None:
    """Create or update every event stream (idempotent)."""
    js = nc.jetstream()
    for ctx, with_queue in ((orders_context(settings), False), (tasks_context(settings), True)):
        await ensure_stream(js, event_stream(ctx, replicas=settings.stream_replicas,
                                             duplicate_window_s=settings.duplicate_window_s, with_queue=with_queue))
    await ensure_stream(js, parked_stream(parked_subjects(settings), replicas=settings.stream_replicas))
    await ensure_work_consumers(js, tasks_context(settings), PRIORITIES, settings.task_lease_s)


class Loop(Protocol):
    """A role's long-running loop: `run` until `stop()`; `stopping` once it was called."""

    @property
    def stopping(self) -> bool: ...

    async def run(self) -> None: ...


async def keep_running(name: str, loop: Loop) -> None:
    """Run a role's loop again if it ever ends on an error its own loop does not handle: a dead
    loop inside a live process answers nothing and the supervisor, seeing the process alive,
    would never restart it (seen once after a PostgreSQL kill, before that error was known)."""
    backoff = 1.0
    while True:
        try:
            await loop.run()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            if loop.stopping:
                return
            log.exception("%s stopped on an unexpected error; running it again in %.0fs", name, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)


@contextlib.asynccontextmanager
async def _running(actor: Actor) -> AsyncIterator[Actor]:
    await actor.start()
    try:
        yield actor
    finally:
        await actor.stop()


def run_orders_actor(settings: Settings, nc: Client) -> contextlib.AbstractAsyncContextManager[Actor]:
    ctx = orders_context(settings)
    return _running(order_actor(nc, _store(settings, nc, ctx), ctx, concurrency=settings.actor_concurrency,
                                max_retries=settings.actor_max_retries))


def run_tasks_actor(settings: Settings, nc: Client) -> contextlib.AbstractAsyncContextManager[Actor]:
    ctx = tasks_context(settings)
    types = build_registry(settings.task_modules).types()
    return _running(task_actor(nc, _store(settings, nc, ctx), ctx, types, concurrency=settings.actor_concurrency,
                               max_retries=settings.actor_max_retries))


@contextlib.asynccontextmanager
async def run_worker(
    settings: Settings, nc: Client, registry: TaskRegistry | None = None, name: str | None = None,
    manager_nc: Client | None = None,
) -> AsyncIterator[Worker]:
    """Task workers plus the fulfilment process manager (on `manager_nc`, its own identity's
    connection, when given)."""
    worker = Worker(
        nc, tasks_context(settings), registry or build_registry(settings.task_modules),
        concurrency=settings.worker_concurrency, lease_s=settings.task_lease_s,
        name=name or f"{socket.gethostname()}:{os.getpid()}", request_timeout=settings.request_timeout_s,
    )
    manager = FulfilmentManager(manager_nc or nc, orders_context(settings), tasks_context(settings),
                                timeout=settings.request_timeout_s)
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(keep_running("worker", worker)),
             loop.create_task(keep_running("fulfilment manager", manager))]
    try:
        yield worker
    finally:
        manager.stop()
        await worker.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def run_projector(settings: Settings, nc: Client) -> AsyncIterator[Projector]:
    """The orders projection and the query endpoints that read it."""
    dsn = settings.resolved_database_url()
    await ensure_schema(dsn, settings.db_schema)
    pool = await create_pool(dsn, settings.db_schema, max_size=20)
    try:
        checkpoints = Checkpoints(pool)
        projectors = [
            Projector(nc, pool, orders_context(settings), OrdersProjection(), checkpoints, batch=settings.projection_batch,
                      busy_linger_s=settings.projection_busy_linger_s),
            Projector(nc, pool, tasks_context(settings), TasksProjection(), checkpoints, batch=settings.projection_batch,
                      busy_linger_s=settings.projection_busy_linger_s),
        ]
        queries = QueryService(nc, pool, checkpoints, read_wait_timeout=settings.read_wait_timeout_s)
        await queries.add_orders(orders_context(settings))
        await queries.add_tasks(tasks_context(settings))
        running = [asyncio.get_running_loop().create_task(keep_running(f"projection {p.durable}", p))
                   for p in projectors]
        try:
            yield projectors[0]
        finally:
            for projector in projectors:
                projector.stop()
            await queries.stop()
            await asyncio.wait_for(asyncio.gather(*running), 10)
    finally:
        await pool.close()


def _tokens(setting: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in setting.split(",") if t.strip())


def edge_app(settings: Settings, nc: Client) -> web.Application:
    config = EdgeConfig(
        request_timeout=settings.request_timeout_s,
        read_wait_timeout=settings.read_wait_timeout_s,
        max_body_bytes=settings.max_body_bytes,
        max_inflight=settings.max_inflight,
        rate_limit_per_s=settings.rate_limit_per_s,
        api_tokens=_tokens(settings.api_tokens),
        api_read_tokens=_tokens(settings.api_read_tokens),
        metrics_open=settings.metrics_open,
    )
    return create_app(nc, orders_context(settings), tasks_context(settings), config)


@contextlib.asynccontextmanager
async def run_edge(settings: Settings, nc: Client) -> AsyncIterator[web.AppRunner]:
    runner = web.AppRunner(edge_app(settings, nc), access_log=None, shutdown_timeout=10)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port, backlog=1024)
    await site.start()
    try:
        yield runner
    finally:
        await runner.cleanup()
