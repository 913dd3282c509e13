"""The orders read model: one row per order plus its lines, folded from order events."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import assert_never

import asyncpg
import msgspec

from actors.orders.messages import (
    FulfilmentFailed,
    GetOrder,
    ItemAdded,
    ItemRemoved,
    ListOrders,
    OrderCancelled,
    OrderConfirmed,
    ORDER_EVENTS,
    OrderEvent,
    OrderLine,
    OrderPage,
    OrderPaid,
    OrderPlaced,
    OrderRejected,
    OrderReserved,
    OrderShipped,
    OrderView,
)
from bus.errors import NotFoundError
from bus.eventstore import StoredEvent
from projections.runner import event_time
from projections.paging import keyset_page


@dataclass(slots=True)
class _Row:
    order_id: str
    customer_id: str
    status: str
    currency: str
    total: int
    version: int
    placed_at: datetime
    updated_at: datetime
    failure: str | None = None
    short_skus: list[str] | None = None
    refund_due: int | None = None
    carrier: str | None = None
    tracking_numbers: list[str] | None = None
    lines: dict[str, tuple[int, int]] = field(default_factory=dict)

    def retotal(self) -> None:
        self.total = sum(q * p for q, p in self.lines.values())


DDL = """
CREATE TABLE IF NOT EXISTS orders (
    order_id    text PRIMARY KEY,
    customer_id text NOT NULL,
    status      text NOT NULL,
    currency    text NOT NULL,
    total       bigint NOT NULL,
    version     bigint NOT NULL,
    placed_at   timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    failure     text
);
ALTER TABLE orders ADD COLUMN IF NOT EXISTS tracking text;
ALTER TABLE orders ADD COLUMN IF NOT EXISTS short_skus text[];
ALTER TABLE orders ADD COLUMN IF NOT EXISTS refund_due bigint;
ALTER TABLE orders ADD COLUMN IF NOT EXISTS carrier text;
ALTER TABLE orders ADD COLUMN IF NOT EXISTS tracking_numbers text[];
CREATE INDEX IF NOT EXISTS orders_by_time ON orders (placed_at DESC, order_id DESC);
CREATE INDEX IF NOT EXISTS orders_by_status ON orders (status, placed_at DESC, order_id DESC);
CREATE INDEX IF NOT EXISTS orders_by_customer ON orders (customer_id, placed_at DESC, order_id DESC);
CREATE TABLE IF NOT EXISTS order_lines (
    order_id    text NOT NULL REFERENCES orders (order_id) ON DELETE CASCADE,
    sku         text NOT NULL,
    quantity    integer NOT NULL,
    unit_price  bigint NOT NULL,
    PRIMARY KEY (order_id, sku)
);
"""
TABLES = ("orders", "order_lines")

_SELECT_ORDERS = "SELECT * FROM orders WHERE order_id = ANY($1::text[])"
_SELECT_LINES = "SELECT * FROM order_lines WHERE order_id = ANY($1::text[])"
_UPSERT_ORDERS = """
INSERT INTO orders (order_id, customer_id, status, currency, total, version, placed_at, updated_at, failure,
                    short_skus, refund_due, carrier, tracking_numbers)
SELECT o, c, st, cu, t, v, p, u, f, CASE WHEN sk = '' THEN NULL ELSE string_to_array(sk, ' ') END, r, ca,
       CASE WHEN tn IS NULL THEN NULL ELSE ARRAY(SELECT jsonb_array_elements_text(tn::jsonb)) END
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[],
            $7::timestamptz[], $8::timestamptz[], $9::text[], $10::text[], $11::bigint[], $12::text[], $13::text[])
  AS x(o, c, st, cu, t, v, p, u, f, sk, r, ca, tn)
ON CONFLICT (order_id) DO UPDATE SET status = EXCLUDED.status, total = EXCLUDED.total,
  version = EXCLUDED.version, updated_at = EXCLUDED.updated_at, failure = EXCLUDED.failure,
  short_skus = EXCLUDED.short_skus, refund_due = EXCLUDED.refund_due, carrier = EXCLUDED.carrier,
  tracking_numbers = EXCLUDED.tracking_numbers
"""
_INSERT_LINES = """
INSERT INTO order_lines (order_id, sku, quantity, unit_price)
SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[])
"""


class OrdersProjection:
    """Folds a batch of order events into the `orders` and `order_lines` tables."""

    name = "orders"
    # 2: carriers and tracking numbers (`order.shipped` v2); a read model built by 1 is rebuilt.
    version = 2

    def __init__(self) -> None:
        self._decoder = ORDER_EVENTS

    @staticmethod
    def aggregate_id(event: OrderEvent) -> str:
        return event.order_id

    def decode(self, stored: StoredEvent) -> OrderEvent:
        return self._decoder.decode(stored.data)

    async def apply(self, conn: asyncpg.Connection, batch: list[tuple[StoredEvent, OrderEvent]]) -> None:
        # Orders placed in this batch need no read; only pre-existing ones are fetched.
        placed_here = {e.order_id for _, e in batch if isinstance(e, OrderPlaced)}
        existing = list({e.order_id for _, e in batch} - placed_here)
        rows: dict[str, _Row] = {}
        if existing:
            for r in await conn.fetch(_SELECT_ORDERS, existing):
                rows[r["order_id"]] = _Row(
                    r["order_id"], r["customer_id"], r["status"], r["currency"], r["total"], r["version"],
                    r["placed_at"], r["updated_at"], r["failure"], r["short_skus"], r["refund_due"], r["carrier"],
                    r["tracking_numbers"],
                )
            for r in await conn.fetch(_SELECT_LINES, existing):
                rows[r["order_id"]].lines[r["sku"]] = (r["quantity"], r["unit_price"])
        touched: set[str] = set()
        for stored, event in batch:
            at = event_time(stored)
            row = rows.get(event.order_id)
            if isinstance(event, OrderPlaced):
                row = rows[event.order_id] = _Row(
                    event.order_id, event.customer_id, "placed", event.currency, 0, stored.seq, at, at,
                    lines={line.sku: (line.quantity, line.unit_price) for line in event.lines},
                )
                row.retotal()
            elif row is None:
                continue  # an event before its order was placed cannot happen; ignore defensively
            else:
                self._fold(row, event)
            row.version = stored.seq
            row.updated_at = at
            touched.add(event.order_id)
        changed = [rows[i] for i in touched]
        if not changed:
            return
        await conn.execute(_UPSERT_ORDERS, *map(list, zip(*(
            (r.order_id, r.customer_id, r.status, r.currency, r.total, r.version, r.placed_at, r.updated_at, r.failure,
             " ".join(r.short_skus or ()), r.refund_due, r.carrier,
             None if r.tracking_numbers is None else msgspec.json.encode(r.tracking_numbers).decode())
            for r in changed
        ), strict=True)))
        stale = [i for i in touched if i not in placed_here]
        if stale:
            await conn.execute("DELETE FROM order_lines WHERE order_id = ANY($1::text[])", stale)
        lines = [(r.order_id, sku, q, p) for r in changed for sku, (q, p) in r.lines.items()]
        if lines:
            await conn.execute(_INSERT_LINES, *map(list, zip(*lines, strict=True)))

    @staticmethod
    def _fold(row: _Row, event: OrderEvent) -> None:
        match event:
            case OrderPlaced():
                pass
            case ItemAdded():
                quantity = event.quantity + row.lines.get(event.sku, (0, 0))[0]
                row.lines[event.sku] = (quantity, event.unit_price)
                row.retotal()
            case ItemRemoved():
                row.lines.pop(event.sku, None)
                row.retotal()
            case OrderConfirmed():
                row.status = "confirmed" if event.lines else "reserved"  # lines: none before the saga
            case OrderReserved():
                row.status = "reserved"
            case OrderRejected():
                row.status, row.short_skus = "rejected", list(event.short_skus)
            case OrderPaid():
                row.status = "paid"
            case OrderShipped():
                row.status, row.carrier, row.tracking_numbers = "shipped", event.carrier, list(event.tracking_numbers)
            case OrderCancelled():
                row.status, row.refund_due = "cancelled", event.refund_due or None
            case FulfilmentFailed():
                row.failure = event.reason or "fulfilment failed"
            case _:
                assert_never(event)


# ---- queries --------------------------------------------------------------------------------------


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


async def _lines(conn: asyncpg.Connection, ids: list[str]) -> dict[str, list[OrderLine]]:
    out: dict[str, list[OrderLine]] = {i: [] for i in ids}
    for r in await conn.fetch(
        "SELECT order_id, sku, quantity, unit_price FROM order_lines WHERE order_id = ANY($1::text[]) ORDER BY sku", ids
    ):
        out[r["order_id"]].append(OrderLine(sku=r["sku"], quantity=r["quantity"], unit_price=r["unit_price"]))
    return out


def _view(r: asyncpg.Record, lines: list[OrderLine]) -> OrderView:
    return OrderView(
        order_id=r["order_id"], customer_id=r["customer_id"], status=r["status"], currency=r["currency"],
        total=r["total"], lines=lines, version=r["version"], placed_at=_iso(r["placed_at"]),
        updated_at=_iso(r["updated_at"]), failure=r["failure"], short_skus=list(r["short_skus"] or ()),
        refund_due=r["refund_due"] or 0, carrier=r["carrier"], tracking_numbers=list(r["tracking_numbers"] or ()),
    )


async def get_order(pool: asyncpg.Pool, query: GetOrder) -> OrderView:
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM orders WHERE order_id = $1", query.order_id)
        if row is None:
            raise NotFoundError(f"order {query.order_id} not found")
        return _view(row, (await _lines(conn, [query.order_id]))[query.order_id])


async def list_orders(pool: asyncpg.Pool, query: ListOrders) -> OrderPage:
    async with pool.acquire() as conn:
        rows, cursor = await keyset_page(
            conn, "SELECT * FROM orders", (("status", query.status), ("customer_id", query.customer_id)),
            time_column="placed_at", id_column="order_id", cursor=query.cursor, limit=query.limit,
        )
        lines = await _lines(conn, [r["order_id"] for r in rows])
    return OrderPage(items=[_view(r, lines[r["order_id"]]) for r in rows], next_cursor=cursor)
