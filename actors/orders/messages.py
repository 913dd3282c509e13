"""Order commands, events, replies and views. Stored event tags are pinned: history is forever."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from actors.upcasting import EventCodec

OrderId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$", description="order id")]
CustomerId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
Sku = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]
Quantity = Annotated[int, msgspec.Meta(ge=1, le=10_000)]
Money = Annotated[int, msgspec.Meta(ge=0, le=1_000_000_000_000, description="integer minor units")]
Currency = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$", description="ISO 4217 code")]
ShortText = Annotated[str, msgspec.Meta(max_length=200)]
# confirmed: its stock is being reserved (the order saga), then reserved or rejected.
OrderStatus = Literal["placed", "confirmed", "reserved", "rejected", "paid", "shipped", "cancelled"]


class Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """Base of every order message."""


class OrderLine(Message, frozen=True, kw_only=True):
    """One line of an order: a sku, how many, at what unit price."""

    sku: Sku
    quantity: Quantity
    unit_price: Money


# ---- commands (request bodies on orders.cmd.<name>) -----------------------------------------


class PlaceOrder(Message, frozen=True, kw_only=True, tag="order.place"):
    """orders.cmd.place: open a new order (at least one line); the id is generated unless given."""

    customer_id: CustomerId
    currency: Currency
    lines: Annotated[list[OrderLine], msgspec.Meta(min_length=1, max_length=200)]
    order_id: OrderId | None = None


class AddItem(Message, frozen=True, kw_only=True, tag="order.add_item"):
    """orders.cmd.add_item: add a line, or more of a sku already on the order."""

    order_id: OrderId
    sku: Sku
    quantity: Quantity
    unit_price: Money


class RemoveItem(Message, frozen=True, kw_only=True, tag="order.remove_item"):
    """orders.cmd.remove_item: take a sku off the order."""

    order_id: OrderId
    sku: Sku


class ConfirmOrder(Message, frozen=True, kw_only=True, tag="order.confirm"):
    """orders.cmd.confirm: freeze the lines and reserve their stock; the answer waits (bounded)
    for the reservation: `reserved` (awaiting payment) or `rejected` (the short SKUs named)."""

    order_id: OrderId


class PayOrder(Message, frozen=True, kw_only=True, tag="order.pay"):
    """orders.cmd.pay: record payment of exactly the total of a reserved order (while its
    reservation is still being made, pay waits for it, bounded)."""

    order_id: OrderId
    amount: Money
    payment_ref: ShortText | None = None


class ShipOrder(Message, frozen=True, kw_only=True, tag="order.ship"):
    """orders.cmd.ship: hand a paid order to the carrier, in one parcel or several (a tracking
    number each; `tracking`: one, as before `tracking_numbers`)."""

    order_id: OrderId
    carrier: ShortText | None = None
    tracking_numbers: Annotated[list[ShortText], msgspec.Meta(max_length=50)] = []
    tracking: ShortText | None = None


class CancelOrder(Message, frozen=True, kw_only=True, tag="order.cancel"):
    """orders.cmd.cancel: cancel an order that has not shipped."""

    order_id: OrderId
    reason: ShortText = ""


class RecordFulfilmentFailure(Message, frozen=True, kw_only=True, tag="order.fulfilment_failed"):
    """orders.cmd.fulfilment_failed (process manager): fulfilment of a paid order gave up."""

    order_id: OrderId
    reason: Annotated[str, msgspec.Meta(max_length=2000)] = ""


class RecordReserved(Message, frozen=True, kw_only=True, tag="order.record_reserved"):
    """orders.cmd.record_reserved (the order saga): every line's stock is reserved."""

    order_id: OrderId


class RecordRejected(Message, frozen=True, kw_only=True, tag="order.record_rejected"):
    """orders.cmd.record_rejected (the order saga): these SKUs were short; nothing is reserved."""

    order_id: OrderId
    short_skus: Annotated[list[Sku], msgspec.Meta(min_length=1, max_length=200)]


OrderCommand = (
    PlaceOrder | AddItem | RemoveItem | ConfirmOrder | PayOrder | ShipOrder | CancelOrder | RecordFulfilmentFailure
    | RecordReserved | RecordRejected
)

COMMANDS: dict[str, type[OrderCommand]] = {
    "place": PlaceOrder,
    "add_item": AddItem,
    "remove_item": RemoveItem,
    "confirm": ConfirmOrder,
    "pay": PayOrder,
    "ship": ShipOrder,
    "cancel": CancelOrder,
    "fulfilment_failed": RecordFulfilmentFailure,
    "record_reserved": RecordReserved,
    "record_rejected": RecordRejected,
}


# ---- events (stored on orders.events.<order_id>) ------------------------------------------------


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False):
    """Base of stored order events; `v` is the schema version of the event type."""

    v: int = 1
    order_id: OrderId


class OrderPlaced(Event, frozen=True, kw_only=True, tag="order.placed"):
    """An order was opened for a customer."""

    customer_id: CustomerId
    currency: Currency
    lines: list[OrderLine]


class ItemAdded(Event, frozen=True, kw_only=True, tag="order.item_added"):
    """A quantity of a sku was added to the order."""

    sku: Sku
    quantity: Quantity
    unit_price: Money


class ItemRemoved(Event, frozen=True, kw_only=True, tag="order.item_removed"):
    """A sku was taken off the order."""

    sku: Sku


class OrderConfirmed(Event, frozen=True, kw_only=True, tag="order.confirmed"):
    """The lines were frozen at this total; their stock is to be reserved (`lines`: empty in
    events stored before the order saga)."""

    total: Money
    lines: list[OrderLine] = []


class OrderReserved(Event, frozen=True, kw_only=True, tag="order.reserved"):
    """Every line's stock is reserved: the order awaits payment."""


class OrderRejected(Event, frozen=True, kw_only=True, tag="order.rejected"):
    """Stock was short for these SKUs; nothing stays reserved and the order ends here."""

    short_skus: list[str]


class OrderPaid(Event, frozen=True, kw_only=True, tag="order.paid"):
    """Payment of the total was recorded."""

    amount: Money
    payment_ref: str | None = None


class OrderShipped(Event, frozen=True, kw_only=True, tag="order.shipped"):
    """The order left the warehouse in one or more parcels, a tracking number each; the stock
    reserved for `skus` leaves on hand.

    Version 2. Version 1 had one `tracking` number, and an order that went out in two parcels
    had nowhere to put the second: its events are upcast (`_shipped_v1`)."""

    v: int = 2
    carrier: str | None = None
    tracking_numbers: list[str] = []
    skus: list[str] = []


class OrderCancelled(Event, frozen=True, kw_only=True, tag="order.cancelled"):
    """The order was cancelled before shipping: the stock reserved for `skus` is released, and a
    paid order is owed a refund of `refund_due` (its fulfilment task is cancelled)."""

    reason: str = ""
    skus: list[str] = []
    refund_due: Money = 0


class FulfilmentFailed(Event, frozen=True, kw_only=True, tag="order.fulfilment_failed"):
    """Fulfilment of the paid order was dead-lettered; it stays paid and needs attention."""

    reason: str = ""


OrderEvent = (
    OrderPlaced | ItemAdded | ItemRemoved | OrderConfirmed | OrderReserved | OrderRejected | OrderPaid | OrderShipped
    | OrderCancelled | FulfilmentFailed
)


def _shipped_v1(event: dict[str, Any]) -> dict[str, Any]:
    """order.shipped 1 -> 2: the one `tracking` number becomes the list of them."""
    tracking = event.pop("tracking", None)
    event["tracking_numbers"] = [tracking] if tracking else []
    return event


# Every reader of order events decodes through this: stored events in their current shape.
ORDER_EVENTS: EventCodec[OrderEvent] = EventCodec(OrderEvent, {("order.shipped", 1): _shipped_v1})


# ---- replies and queries ------------------------------------------------------------------------


class OrderAccepted(msgspec.Struct, frozen=True, kw_only=True, tag="order.accepted", tag_field="type",
                    omit_defaults=True):
    """Reply to a successful order command: the order's id, status and new version (and the
    short SKUs of a rejected order, the refund due to a cancelled paid one)."""

    order_id: str
    status: OrderStatus
    total: int
    version: int
    seq: int
    short_skus: list[str] = []
    refund_due: int = 0


class GetOrder(Message, frozen=True, kw_only=True, tag="order.get"):
    """orders.query.get: one order from the read model (optionally at least at min_seq)."""

    order_id: OrderId
    min_seq: Annotated[int, msgspec.Meta(ge=0)] | None = None


class ListOrders(Message, frozen=True, kw_only=True, tag="order.list"):
    """orders.query.list: orders newest first, filtered, keyset-paginated by cursor."""

    status: OrderStatus | None = None
    customer_id: CustomerId | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50
    cursor: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    min_seq: Annotated[int, msgspec.Meta(ge=0)] | None = None


class OrderView(msgspec.Struct, frozen=True, kw_only=True):
    """An order as the read model shows it."""

    order_id: str
    customer_id: str
    status: str
    currency: str
    total: int
    lines: list[OrderLine]
    version: int
    placed_at: str
    updated_at: str
    failure: str | None = None
    short_skus: list[str] = []
    refund_due: int = 0
    carrier: str | None = None
    tracking_numbers: list[str] = []


class OrderPage(msgspec.Struct, frozen=True, kw_only=True):
    """A page of orders and the cursor of the next page (null at the end)."""

    items: list[OrderView]
    next_cursor: str | None = None
