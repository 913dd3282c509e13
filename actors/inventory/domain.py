"""The stock decider: pure `decide(state, command) -> events` and `evolve(state, event) -> state`."""

from __future__ import annotations

from typing import assert_never

import msgspec
from msgspec.structs import replace

from actors.errors import InsufficientStockError, RuleViolationError, ValidationError
from actors.inventory.messages import (
    AdjustStock,
    CommitStock,
    InventoryCommand,
    InventoryEvent,
    ReceiveStock,
    ReleaseStock,
    ReserveStock,
    StockAdjusted,
    StockCommitted,
    StockReceived,
    StockReleased,
    StockReserved,
)


class Reservation(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Stock held for one order; an uncounted one (made while the SKU was untracked) holds nothing back."""

    quantity: int
    counted: bool


class Stock(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The stock of one SKU as folded from its events.

    Untracked by the cyclic GC (no cycles possible), as the order state is: actors cache many.
    A SKU is tracked once stock was received or adjusted; until then it is always available.
    """

    sku: str = ""
    tracked: bool = False
    on_hand: int = 0
    reservations: dict[str, Reservation] = {}

    @property
    def reserved(self) -> int:
        return sum(r.quantity for r in self.reservations.values() if r.counted)

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved


INITIAL = Stock()


def evolve(state: Stock, event: InventoryEvent) -> Stock:
    """Apply one event to the state."""
    match event:
        case StockReceived():
            return replace(state, sku=event.sku, tracked=True, on_hand=state.on_hand + event.quantity)
        case StockAdjusted():
            return replace(state, sku=event.sku, tracked=True, on_hand=state.on_hand + event.delta)
        case StockReserved():
            reservations = dict(state.reservations)
            reservations[event.order_id] = Reservation(quantity=event.quantity, counted=event.counted)
            return replace(state, sku=event.sku, reservations=reservations)
        case StockReleased():
            reservations = dict(state.reservations)
            reservations.pop(event.order_id, None)
            return replace(state, reservations=reservations)
        case StockCommitted():
            reservations = dict(state.reservations)
            reservations.pop(event.order_id, None)
            on_hand = state.on_hand - event.quantity if event.counted else state.on_hand
            return replace(state, on_hand=on_hand, reservations=reservations)
        case _:
            assert_never(event)


def decide(state: Stock, command: InventoryCommand) -> list[InventoryEvent]:
    """Decide which events a command causes, or raise a coded error (nothing is stored then)."""
    match command:
        case ReceiveStock():
            return [StockReceived(sku=command.sku, quantity=command.quantity)]
        case AdjustStock():
            if command.delta == 0:
                raise ValidationError("delta must not be 0", field="delta")
            after = state.on_hand + command.delta
            if after < 0:
                raise RuleViolationError(
                    f"adjusting sku {command.sku} by {command.delta} would leave {after} on hand "
                    f"(it has {state.on_hand})"
                )
            if after < state.reserved:
                raise RuleViolationError(
                    f"adjusting sku {command.sku} by {command.delta} would leave {after} on hand, "
                    f"below the {state.reserved} reserved"
                )
            return [StockAdjusted(sku=command.sku, delta=command.delta, reason=command.reason)]
        case ReserveStock():
            if command.order_id in state.reservations:
                return []  # the saga retries: the first reservation stands
            if state.tracked and state.available < command.quantity:
                raise InsufficientStockError(
                    f"sku {command.sku}: {command.quantity} requested, {state.available} available",
                    field="quantity",
                )
            return [StockReserved(sku=command.sku, order_id=command.order_id, quantity=command.quantity,
                                  counted=state.tracked)]
        case ReleaseStock():
            held = state.reservations.get(command.order_id)
            if held is None:
                return []
            return [StockReleased(sku=command.sku, order_id=command.order_id, quantity=held.quantity,
                                  counted=held.counted)]
        case CommitStock():
            held = state.reservations.get(command.order_id)
            if held is None:
                return []
            return [StockCommitted(sku=command.sku, order_id=command.order_id, quantity=held.quantity,
                                   counted=held.counted)]
        case _:
            assert_never(command)
