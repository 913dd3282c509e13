"""`jetsource status` and `jetsource projections rebuild`."""

from __future__ import annotations

import asyncio
import json

import msgspec
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NotFoundError

from bus.connection import connect
from bus.subjects import Context
from infra.bootstrap import orders_context
from infra.settings import Settings
from projections.orders import OrdersProjection
from projections.runner import Checkpoints, Projector
from projections.schema import create_pool, ensure_schema

READ_MODELS = {"orders": ("orders", "order_lines")}


async def _discover(nc: object, timeout: float = 0.5) -> list[dict[str, object]]:
    """Every NATS micro service instance answering $SRV.INFO."""
    inbox = nc.new_inbox()  # type: ignore[attr-defined]
    sub = await nc.subscribe(inbox)  # type: ignore[attr-defined]
    await nc.publish("$SRV.INFO", b"", reply=inbox)  # type: ignore[attr-defined]
    found = []
    try:
        while True:
            msg = await sub.next_msg(timeout)
            found.append(msgspec.json.decode(msg.data))
    except NatsTimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return found


async def last_event_seq(nc: object, ctx: Context) -> int:
    """The sequence of the newest event (the stream also holds outbox and queue messages)."""
    try:
        return int((await nc.jetstream().get_last_msg(ctx.stream, ctx.events_wildcard)).seq)  # type: ignore[attr-defined]
    except NotFoundError:
        return 0


async def status(settings: Settings) -> int:
    nc = await connect(settings.resolved_nats_url(), "jetsource-status")
    try:
        js = nc.jetstream()
        services = await _discover(nc)
        print("services:")
        for svc in sorted(services, key=lambda s: (s["name"], s["id"])):  # type: ignore[index]
            endpoints = ", ".join(e["subject"] for e in svc.get("endpoints", []))  # type: ignore[union-attr]
            print(f"  {svc['name']:<22} {svc['id']}  {endpoints}")
        if not services:
            print("  (none answering)")
        print("streams:")
        ctx = orders_context(settings)
        try:
            info = await js.stream_info(ctx.stream)
            print(f"  {ctx.stream:<22} messages={info.state.messages} last_seq={info.state.last_seq} "
                  f"replicas={info.config.num_replicas}")
        except NotFoundError:
            print(f"  {ctx.stream:<22} missing (run `jetsource up` once)")
            return 1
        print("projections:")
        try:
            consumer = await js.consumer_info(ctx.stream, ctx.consumer("orders"))
            lag = (consumer.num_pending or 0) + (consumer.num_ack_pending or 0)
            floor = consumer.ack_floor.stream_seq if consumer.ack_floor else 0
            print(f"  orders                 applied_through={floor} lag={lag}")
        except NotFoundError:
            print("  orders                 no consumer yet (projector never ran)")
        return 0
    finally:
        await nc.close()


async def rebuild(settings: Settings) -> int:
    """Empty the read models and re-fold them from the streams, printing progress."""
    dsn = settings.resolved_database_url()
    await ensure_schema(dsn, settings.db_schema)
    pool = await create_pool(dsn, settings.db_schema)
    nc = await connect(settings.resolved_nats_url(), "jetsource-rebuild")
    try:
        ctx = orders_context(settings)
        target = await last_event_seq(nc, ctx)
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT last_seq FROM projection_checkpoints WHERE name = 'orders' FOR UPDATE")
            await conn.execute("TRUNCATE " + ", ".join(READ_MODELS["orders"]))
            await conn.execute(
                "INSERT INTO projection_checkpoints (name, last_seq) VALUES ('orders', 0) "
                "ON CONFLICT (name) DO UPDATE SET last_seq = 0, updated_at = now()"
            )
        print(json.dumps({"projection": "orders", "rebuilding_to_seq": target}), flush=True)
        # If a projector is running it rewinds and does the work; otherwise this one does.
        checkpoints = Checkpoints(pool)
        projector = Projector(nc, pool, ctx, OrdersProjection(), checkpoints, batch=settings.projection_batch)
        task = asyncio.get_running_loop().create_task(projector.run())
        try:
            while True:
                done = await checkpoints.get("orders")
                print(json.dumps({"projection": "orders", "applied_through": done, "target": target,
                                  "percent": round(100 * done / target, 1) if target else 100.0}), flush=True)
                if done >= target:
                    break
                await asyncio.sleep(0.5)
        finally:
            projector.stop()
            await task
        return 0
    finally:
        await nc.close()
        await pool.close()
