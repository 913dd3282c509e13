"""The order decider: pure `decide(state, command) -> events` and `evolve(state, event) -> state`."""

from __future__ import annotations

import msgspec
from msgspec.structs import replace
from typing import assert_never

from actors.errors import NotFoundError, PendingError, RuleViolationError, ValidationError
from actors.orders.messages import (
    AddItem,
    CancelOrder,
    ConfirmOrder,
    FulfilmentFailed,
    ItemAdded,
    ItemRemoved,
    OrderCancelled,
    OrderCommand,
    OrderConfirmed,
    OrderEvent,
    OrderLine,
    OrderPaid,
    OrderPlaced,
    OrderRejected,
    OrderReserved,
    OrderShipped,
    OrderStatus,
    PayOrder,
    PlaceOrder,
    RecordFulfilmentFailure,
    RecordRejected,
    RecordReserved,
    RemoveItem,
    ShipOrder,
)

MAX_LINES = 200


class Order(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The state of one order as folded from its events.

    Not tracked by the cyclic GC (no cycles possible): actors cache up to 100k of these, and
    tracked caches made full collections pause the actor for 100+ ms.
    """

    order_id: str = ""
    exists: bool = False
    status: OrderStatus = "placed"
    customer_id: str = ""
    currency: str = ""
    lines: dict[str, OrderLine] = {}
    short_skus: tuple[str, ...] = ()
    refund_due: int = 0

    @property
    def total(self) -> int:
        return sum(line.quantity * line.unit_price for line in self.lines.values())


INITIAL = Order()


def evolve(state: Order, event: OrderEvent) -> Order:
    """Apply one event to the state."""
    match event:
        case OrderPlaced():
            return Order(
                order_id=event.order_id,
                exists=True,
                status="placed",
                customer_id=event.customer_id,
                currency=event.currency,
                lines={line.sku: line for line in event.lines},
            )
        case ItemAdded():
            lines = dict(state.lines)
            current = lines.get(event.sku)
            quantity = event.quantity + (current.quantity if current else 0)
            lines[event.sku] = OrderLine(sku=event.sku, quantity=quantity, unit_price=event.unit_price)
            return replace(state, lines=lines)
        case ItemRemoved():
            lines = dict(state.lines)
            lines.pop(event.sku, None)
            return replace(state, lines=lines)
        case OrderConfirmed():
            # Confirmed before the saga existed (no lines recorded): nothing will reserve its
            # stock, so it is as if reserved (its SKUs untracked), and it can be paid as before.
            return replace(state, status="confirmed" if event.lines else "reserved")
        case OrderReserved():
            return replace(state, status="reserved")
        case OrderRejected():
            return replace(state, status="rejected", short_skus=tuple(event.short_skus))
        case OrderPaid():
            return replace(state, status="paid")
        case OrderShipped():
            return replace(state, status="shipped")
        case OrderCancelled():
            return replace(state, status="cancelled", refund_due=event.refund_due)
        case FulfilmentFailed():
            return state
        case _:
            assert_never(event)


def decide(state: Order, command: OrderCommand) -> list[OrderEvent]:
    """Decide which events a command causes, or raise a coded error (nothing is stored then)."""
    match command:
        case PlaceOrder():
            if state.exists:
                raise RuleViolationError(f"order {command.order_id} already exists")
            # The wire type says so too; this holds for commands built in code as well.
            if not command.lines:
                raise ValidationError("an order needs at least one line", field="lines")
            seen: set[str] = set()
            for i, line in enumerate(command.lines):
                if line.sku in seen:
                    raise ValidationError(f"sku {line.sku} appears twice", field=f"lines[{i}].sku")
                seen.add(line.sku)
            assert command.order_id is not None
            return [
                OrderPlaced(
                    order_id=command.order_id,
                    customer_id=command.customer_id,
                    currency=command.currency,
                    lines=list(command.lines),
                )
            ]
        case AddItem():
            _require_editable(state, command.order_id)
            current = state.lines.get(command.sku)
            if current is not None and current.unit_price != command.unit_price:
                raise RuleViolationError(
                    f"sku {command.sku} is on the order at unit price {current.unit_price}, not {command.unit_price}"
                )
            if current is None and len(state.lines) >= MAX_LINES:
                raise RuleViolationError(f"an order holds at most {MAX_LINES} lines")
            if current is not None and current.quantity + command.quantity > 10_000:
                raise RuleViolationError(f"sku {command.sku} would exceed 10000 units")
            return [
                ItemAdded(
                    order_id=command.order_id,
                    sku=command.sku,
                    quantity=command.quantity,
                    unit_price=command.unit_price,
                )
            ]
        case RemoveItem():
            _require_editable(state, command.order_id)
            if command.sku not in state.lines:
                raise RuleViolationError(f"sku {command.sku} is not on order {command.order_id}")
            return [ItemRemoved(order_id=command.order_id, sku=command.sku)]
        case ConfirmOrder():
            _require(state, command.order_id, "placed", "confirm")
            if not state.lines:
                raise RuleViolationError("an order without lines cannot be confirmed")
            return [OrderConfirmed(order_id=command.order_id, total=state.total, lines=list(state.lines.values()))]
        case RecordReserved():
            _require(state, command.order_id, "confirmed", "record a reservation for")
            return [OrderReserved(order_id=command.order_id)]
        case RecordRejected():
            _require(state, command.order_id, "confirmed", "reject")
            return [OrderRejected(order_id=command.order_id, short_skus=list(command.short_skus))]
        case PayOrder():
            _require_settled(state, command.order_id)
            _require(state, command.order_id, "reserved", "pay")
            if command.amount != state.total:
                raise RuleViolationError(
                    f"payment of {command.amount} does not equal the order total {state.total}"
                )
            return [OrderPaid(order_id=command.order_id, amount=command.amount, payment_ref=command.payment_ref)]
        case ShipOrder():
            _require_settled(state, command.order_id)
            _require(state, command.order_id, "paid", "ship")
            numbers = list(command.tracking_numbers)
            if command.tracking and command.tracking not in numbers:
                numbers.insert(0, command.tracking)
            return [OrderShipped(order_id=command.order_id, carrier=command.carrier, tracking_numbers=numbers,
                                 skus=list(state.lines))]
        case CancelOrder():
            _require_exists(state, command.order_id)
            if state.status in ("shipped", "cancelled", "rejected"):
                raise RuleViolationError(f"a {state.status} order cannot be cancelled")
            # Stock is (or is being) reserved from confirm on; only a paid order is owed money.
            held = state.status in ("confirmed", "reserved", "paid")
            return [OrderCancelled(order_id=command.order_id, reason=command.reason,
                                   skus=list(state.lines) if held else [],
                                   refund_due=state.total if state.status == "paid" else 0)]
        case RecordFulfilmentFailure():
            _require(state, command.order_id, "paid", "record a fulfilment failure for")
            return [FulfilmentFailed(order_id=command.order_id, reason=command.reason)]
        case _:
            assert_never(command)


def pending(state: Order) -> bool:
    """Whether the order waits for the saga's answer on its stock (see `AggregateSpec.pending`)."""
    return state.status == "confirmed"


def _require_settled(state: Order, order_id: str) -> None:
    if pending(state):
        raise PendingError(f"order {order_id}'s stock is still being reserved; retry shortly")


def _require_exists(state: Order, order_id: str) -> None:
    if not state.exists:
        raise NotFoundError(f"order {order_id} does not exist")


def _require(state: Order, order_id: str, status: OrderStatus, action: str) -> None:
    _require_exists(state, order_id)
    if state.status != status:
        raise RuleViolationError(f"cannot {action} a {state.status} order (it must be {status})")


def _require_editable(state: Order, order_id: str) -> None:
    _require_exists(state, order_id)
    if state.status != "placed":
        raise RuleViolationError(f"items of a {state.status} order cannot change")
