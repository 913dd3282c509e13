"""The stock actor: `inventory.cmd.*` endpoints, one aggregate per SKU."""

from __future__ import annotations

from actors.inventory import domain
from actors.inventory.messages import COMMANDS, INVENTORY_EVENTS, InventoryAccepted, InventoryCommand, InventoryEvent
from actors.runtime import AggregateSpec
from bus.subjects import Context


def _reply(sku: str, state: domain.Stock, version: int) -> InventoryAccepted:
    return InventoryAccepted(
        sku=sku, tracked=state.tracked, on_hand=state.on_hand, reserved=state.reserved,
        available=state.available, version=version, seq=version,
    )


def inventory_spec(ctx: Context) -> AggregateSpec[domain.Stock, InventoryCommand, InventoryEvent]:
    """The stock aggregate as the actor runtime drives it."""
    return AggregateSpec(
        ctx=ctx,
        initial=domain.INITIAL,
        evolve=domain.evolve,
        decide=domain.decide,
        event_type=INVENTORY_EVENTS,
        commands=COMMANDS,
        aggregate_id=lambda c: c.sku,
        with_id=lambda c, sku: c,  # every command names its SKU: no id is ever generated
        reply=_reply,
        event_id=lambda e: e.sku,
    )
