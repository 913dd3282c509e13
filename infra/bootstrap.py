"""The composition root: builds each role from settings with owned lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from nats.aio.client import Client

from actors.orders.service import order_actor
from bus.connection import connect
from bus.eventstore import EventStore
from bus.runtime import Actor
from bus.streams import ensure_stream, event_stream
from bus.subjects import Context
from http_edge.app import EdgeConfig, create_app
from infra.settings import Settings
from projections.orders import OrdersProjection
from projections.runner import Checkpoints, Projector
from projections.schema import create_pool, ensure_schema
from projections.service import QueryService

log = logging.getLogger(__name__)


def orders_context(settings: Settings) -> Context:
    return Context("orders", settings.namespace)


@contextlib.asynccontextmanager
async def nats_connection(settings: Settings, name: str) -> AsyncIterator[Client]:
    nc = await connect(settings.resolved_nats_url(), name)
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
    for ctx in (orders_context(settings),):
        await ensure_stream(js, event_stream(ctx, replicas=settings.stream_replicas,
                                             duplicate_window_s=settings.duplicate_window_s))


@contextlib.asynccontextmanager
async def run_orders_actor(settings: Settings, nc: Client) -> AsyncIterator[Actor]:
    ctx = orders_context(settings)
    store = EventStore(
        nc, ctx.stream, timeout=settings.request_timeout_s,
        max_batch=settings.append_batch_max, max_inflight_batches=settings.append_batches_inflight,
    )
    actor = order_actor(nc, store, ctx, concurrency=settings.actor_concurrency, max_retries=settings.actor_max_retries)
    await actor.start()
    try:
        yield actor
    finally:
        await actor.stop()


@contextlib.asynccontextmanager
async def run_projector(settings: Settings, nc: Client) -> AsyncIterator[Projector]:
    """The orders projection and the query endpoints that read it."""
    dsn = settings.resolved_database_url()
    await ensure_schema(dsn, settings.db_schema)
    pool = await create_pool(dsn, settings.db_schema, max_size=20)
    try:
        checkpoints = Checkpoints(pool)
        ctx = orders_context(settings)
        projector = Projector(nc, pool, ctx, OrdersProjection(), checkpoints, batch=settings.projection_batch)
        queries = QueryService(nc, pool, checkpoints, read_wait_timeout=settings.read_wait_timeout_s)
        await queries.add_orders(ctx)
        task = asyncio.get_running_loop().create_task(projector.run())
        try:
            yield projector
        finally:
            projector.stop()
            await queries.stop()
            await asyncio.wait_for(task, 10)
    finally:
        await pool.close()


def edge_app(settings: Settings, nc: Client) -> web.Application:
    config = EdgeConfig(
        request_timeout=settings.request_timeout_s,
        read_wait_timeout=settings.read_wait_timeout_s,
        max_body_bytes=settings.max_body_bytes,
        max_inflight=settings.max_inflight,
        rate_limit_per_s=settings.rate_limit_per_s,
        api_tokens=tuple(t.strip() for t in settings.api_tokens.split(",") if t.strip()),
    )
    return create_app(nc, orders_context(settings), config)


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
