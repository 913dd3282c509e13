"""Inventory commands, events, replies and views. Stored event tags are pinned: history is forever."""

from __future__ import annotations

from typing import Annotated

import msgspec

from actors.upcasting import EventCodec

# A SKU is the aggregate id and so a subject token: unlike an order line's SKU, no dots.
Sku = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$", description="stock keeping unit")]
OrderId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_\-]{1,64}$", description="order id")]
Received = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
Delta = Annotated[int, msgspec.Meta(ge=-1_000_000, le=1_000_000, description="nonzero change of the stock on hand")]
Quantity = Annotated[int, msgspec.Meta(ge=1, le=10_000)]
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """Base of every inventory message."""


# ---- commands (request bodies on inventory.cmd.<name>) ------------------------------------------


class ReceiveStock(Message, frozen=True, kw_only=True, tag="inventory.receive"):
    """inventory.cmd.receive: goods arrived; the SKU is tracked from now on."""

    sku: Sku
    quantity: Received


class AdjustStock(Message, frozen=True, kw_only=True, tag="inventory.adjust"):
    """inventory.cmd.adjust: correct the stock on hand (a count, breakage), never below what is reserved."""

    sku: Sku
    delta: Delta
    reason: Reason


class ReserveStock(Message, frozen=True, kw_only=True, tag="inventory.reserve"):
    """inventory.cmd.reserve (order saga): hold stock for an order; once per order, repeats change nothing."""

    sku: Sku
    order_id: OrderId
    quantity: Quantity


class ReleaseStock(Message, frozen=True, kw_only=True, tag="inventory.release"):
    """inventory.cmd.release (order saga): give an order's reservation back; none is no change."""

    sku: Sku
    order_id: OrderId


class CommitStock(Message, frozen=True, kw_only=True, tag="inventory.commit"):
    """inventory.cmd.commit (order saga, on ship): the reserved stock leaves; none is no change."""

    sku: Sku
    order_id: OrderId


InventoryCommand = ReceiveStock | AdjustStock | ReserveStock | ReleaseStock | CommitStock

COMMANDS: dict[str, type[InventoryCommand]] = {
    "receive": ReceiveStock,
    "adjust": AdjustStock,
    "reserve": ReserveStock,
    "release": ReleaseStock,
    "commit": CommitStock,
}


# ---- events (stored on inventory.events.<sku>) ----------------------------------------------------


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", gc=False):
    """Base of stored inventory events; `v` is the schema version of the event type."""

    v: int = 1
    sku: Sku


class StockReceived(Event, frozen=True, kw_only=True, tag="inventory.stock_received"):
    """Stock arrived and is on hand."""

    quantity: Received


class StockAdjusted(Event, frozen=True, kw_only=True, tag="inventory.stock_adjusted"):
    """The stock on hand was corrected, for the reason given."""

    delta: Delta
    reason: str


class StockReserved(Event, frozen=True, kw_only=True, tag="inventory.stock_reserved"):
    """Stock was held for an order; `counted` is False for an untracked SKU (it holds nothing back)."""

    order_id: OrderId
    quantity: Quantity
    counted: bool


class StockReleased(Event, frozen=True, kw_only=True, tag="inventory.stock_released"):
    """An order's reservation was given back."""

    order_id: OrderId
    quantity: Quantity
    counted: bool


class StockCommitted(Event, frozen=True, kw_only=True, tag="inventory.stock_committed"):
    """An order's reserved stock shipped; a counted commit leaves the stock on hand."""

    order_id: OrderId
    quantity: Quantity
    counted: bool


InventoryEvent = StockReceived | StockAdjusted | StockReserved | StockReleased | StockCommitted
# Every reader of inventory events decodes through this (see actors.upcasting: how an event evolves).
INVENTORY_EVENTS: EventCodec[InventoryEvent] = EventCodec(InventoryEvent)


# ---- replies and queries --------------------------------------------------------------------------


class InventoryAccepted(msgspec.Struct, frozen=True, kw_only=True, tag="inventory.accepted", tag_field="type"):
    """Reply to a successful inventory command: the SKU's stock and new version."""

    sku: str
    tracked: bool
    on_hand: int
    reserved: int
    available: int
    version: int
    seq: int


class GetStock(Message, frozen=True, kw_only=True, tag="inventory.get"):
    """inventory.query.get: one tracked SKU from the read model (optionally at least at min_seq)."""

    sku: Sku
    min_seq: Annotated[int, msgspec.Meta(ge=0)] | None = None


class ListStock(Message, frozen=True, kw_only=True, tag="inventory.list"):
    """inventory.query.list: tracked SKUs in SKU order, keyset-paginated by cursor."""

    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50
    cursor: Annotated[str, msgspec.Meta(max_length=200)] | None = None
    min_seq: Annotated[int, msgspec.Meta(ge=0)] | None = None


class StockView(msgspec.Struct, frozen=True, kw_only=True):
    """A tracked SKU's stock as the read model shows it."""

    sku: str
    on_hand: int
    reserved: int
    available: int
    version: int
    updated_at: str


class StockPage(msgspec.Struct, frozen=True, kw_only=True):
    """A page of SKUs and the cursor of the next page (null at the end)."""

    items: list[StockView]
    next_cursor: str | None = None
