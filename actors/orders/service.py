"""The order actor: `orders.cmd.*` endpoints of a NATS micro service in a queue group."""

from __future__ import annotations

import msgspec
from nats.aio.client import Client

from actors.orders import domain
from actors.orders.messages import (
    COMMANDS,
    OrderAccepted,
    OrderCancelled,
    OrderCommand,
    OrderConfirmed,
    ORDER_EVENTS,
    OrderEvent,
    OrderPaid,
    OrderShipped,
    PlaceOrder,
)
from actors.runtime import Actor, AggregateSpec
from bus.codec import encode
from bus.eventstore import PartitionedStore
from bus.subjects import Context


def _aggregate_id(command: OrderCommand) -> str | None:
    return command.order_id


def _with_id(command: OrderCommand, order_id: str) -> OrderCommand:
    assert isinstance(command, PlaceOrder)
    return msgspec.structs.replace(command, order_id=order_id)


def _reply(order_id: str, state: domain.Order, version: int) -> OrderAccepted:
    return OrderAccepted(order_id=order_id, status=state.status, total=state.total, version=version, seq=version,
                         short_skus=list(state.short_skus), refund_due=state.refund_due)


# Order events that are news for other contexts (the order saga, fulfilment), copied to
# `orders.outbox.<name>` in the same atomic batch as the event itself.
_OUTBOX = {OrderConfirmed: "confirmed", OrderPaid: "paid", OrderCancelled: "cancelled", OrderShipped: "shipped"}


def order_spec(ctx: Context, *, settle_wait_s: float = 2.0) -> AggregateSpec[domain.Order, OrderCommand, OrderEvent]:
    """The order aggregate as the actor runtime drives it; a confirm is answered once the saga
    has reserved its stock or rejected it (waiting at most `settle_wait_s`)."""
    subjects = [{t: part.outbox(name) for t, name in _OUTBOX.items()} for part in ctx.parts]

    def outbox(part: Context, state: domain.Order, events: list[OrderEvent]) -> list[tuple[str, bytes]]:
        names = subjects[part.part or 0]
        return [(names[type(e)], encode(e)) for e in events if type(e) in names]

    return AggregateSpec(
        ctx=ctx,
        initial=domain.INITIAL,
        evolve=domain.evolve,
        decide=domain.decide,
        event_type=ORDER_EVENTS,
        commands=COMMANDS,
        aggregate_id=_aggregate_id,
        with_id=_with_id,
        reply=_reply,
        outbox=outbox,
        event_id=lambda e: e.order_id,
        pending=domain.pending,
        settle_wait_s=settle_wait_s,
    )


def order_actor(nc: Client, store: PartitionedStore, ctx: Context, *, concurrency: int, max_retries: int) -> Actor:
    """Build (not start) the order actor."""
    return Actor(nc, store, order_spec(ctx), concurrency=concurrency, max_retries=max_retries)
