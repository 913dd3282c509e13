"""The order actor: `orders.cmd.*` endpoints of a NATS micro service in a queue group."""

from __future__ import annotations

import msgspec
from nats.aio.client import Client

from actors.orders import domain
from actors.orders.messages import COMMANDS, OrderAccepted, OrderCommand, OrderEvent, OrderPaid, PlaceOrder
from bus.codec import encode
from bus.eventstore import EventStore
from bus.runtime import Actor, AggregateSpec
from bus.subjects import Context


def _aggregate_id(command: OrderCommand) -> str | None:
    return command.order_id


def _with_id(command: OrderCommand, order_id: str) -> OrderCommand:
    assert isinstance(command, PlaceOrder)
    return msgspec.structs.replace(command, order_id=order_id)


def _reply(order_id: str, state: domain.Order, version: int) -> OrderAccepted:
    return OrderAccepted(order_id=order_id, status=state.status, total=state.total, version=version, seq=version)


def order_spec(ctx: Context) -> AggregateSpec[domain.Order, OrderCommand, OrderEvent]:
    """The order aggregate as the actor runtime drives it."""

    def outbox(state: domain.Order, events: list[OrderEvent]) -> list[tuple[str, bytes]]:
        # A payment is news for other contexts (fulfilment): published with the event, atomically.
        return [(ctx.outbox("paid"), encode(e)) for e in events if isinstance(e, OrderPaid)]

    return AggregateSpec(
        ctx=ctx,
        initial=domain.INITIAL,
        evolve=domain.evolve,
        decide=domain.decide,
        event_type=OrderEvent,
        commands=COMMANDS,
        aggregate_id=_aggregate_id,
        with_id=_with_id,
        reply=_reply,
        outbox=outbox,
        event_id=lambda e: e.order_id,
    )


def order_actor(nc: Client, store: EventStore, ctx: Context, *, concurrency: int, max_retries: int) -> Actor:
    """Build (not start) the order actor."""
    return Actor(nc, store, order_spec(ctx), concurrency=concurrency, max_retries=max_retries)
