"""The inventory read model: one row per SKU (on hand, reserved), folded from stock events.

Released and committed events carry the reservation's quantity and whether it counted, so the
reserved total is kept without a table of reservations."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import assert_never

import asyncpg
import msgspec

from actors.inventory.messages import (
    INVENTORY_EVENTS,
    GetStock,
    InventoryEvent,
    ListStock,
    StockAdjusted,
    StockCommitted,
    StockPage,
    StockReceived,
    StockReleased,
    StockReserved,
    StockView,
)
from bus.errors import NotFoundError, ValidationError
from bus.eventstore import StoredEvent
from projections.runner import event_time
from bus.subjects import valid_token


@dataclass(slots=True)
class _Row:
    sku: str
    tracked: bool
    on_hand: int
    reserved: int
    version: int
    updated_at: datetime


DDL = """
CREATE TABLE IF NOT EXISTS inventory (
    sku         text PRIMARY KEY,
    tracked     boolean NOT NULL,
    on_hand     bigint NOT NULL,
    reserved    bigint NOT NULL,
    version     bigint NOT NULL,
    updated_at  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS inventory_tracked ON inventory (sku) WHERE tracked;
"""
TABLES = ("inventory",)

_SELECT = "SELECT * FROM inventory WHERE sku = ANY($1::text[])"
_UPSERT = """
INSERT INTO inventory (sku, tracked, on_hand, reserved, version, updated_at)
SELECT * FROM unnest($1::text[], $2::boolean[], $3::bigint[], $4::bigint[], $5::bigint[], $6::timestamptz[])
ON CONFLICT (sku) DO UPDATE SET tracked = EXCLUDED.tracked, on_hand = EXCLUDED.on_hand,
  reserved = EXCLUDED.reserved, version = EXCLUDED.version, updated_at = EXCLUDED.updated_at
"""


class InventoryProjection:
    """Folds a batch of stock events into the `inventory` table."""

    name = "inventory"

    def __init__(self) -> None:
        self._decoder = INVENTORY_EVENTS

    @staticmethod
    def aggregate_id(event: InventoryEvent) -> str:
        return event.sku

    def decode(self, stored: StoredEvent) -> InventoryEvent:
        return self._decoder.decode(stored.data)

    async def apply(self, conn: asyncpg.Connection, batch: list[tuple[StoredEvent, InventoryEvent]]) -> None:
        if not batch:
            return
        rows = {
            r["sku"]: _Row(r["sku"], r["tracked"], r["on_hand"], r["reserved"], r["version"], r["updated_at"])
            for r in await conn.fetch(_SELECT, list({e.sku for _, e in batch}))
        }
        for stored, event in batch:
            at = event_time(stored)
            row = rows.get(event.sku)
            if row is None:
                row = rows[event.sku] = _Row(event.sku, False, 0, 0, 0, at)
            self._fold(row, event)
            row.version = stored.seq
            row.updated_at = at
        await conn.execute(_UPSERT, *map(list, zip(*(
            (r.sku, r.tracked, r.on_hand, r.reserved, r.version, r.updated_at) for r in rows.values()
        ), strict=True)))

    @staticmethod
    def _fold(row: _Row, event: InventoryEvent) -> None:
        match event:
            case StockReceived():
                row.tracked = True
                row.on_hand += event.quantity
            case StockAdjusted():
                row.tracked = True
                row.on_hand += event.delta
            case StockReserved():
                if event.counted:
                    row.reserved += event.quantity
            case StockReleased():
                if event.counted:
                    row.reserved -= event.quantity
            case StockCommitted():
                if event.counted:
                    row.reserved -= event.quantity
                    row.on_hand -= event.quantity
            case _:
                assert_never(event)


# ---- queries --------------------------------------------------------------------------------------


def _view(r: asyncpg.Record) -> StockView:
    return StockView(
        sku=r["sku"], on_hand=r["on_hand"], reserved=r["reserved"], available=r["on_hand"] - r["reserved"],
        version=r["version"], updated_at=r["updated_at"].astimezone(UTC).isoformat(),
    )


def _cursor(sku: str) -> str:
    return base64.urlsafe_b64encode(sku.encode()).decode()


def _after(cursor: str) -> str:
    try:
        sku = base64.urlsafe_b64decode(cursor.encode()).decode()
    except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        sku = ""
    if not valid_token(sku):
        raise ValidationError("cursor is not one this service issued", field="cursor")
    return sku


async def get_stock(pool: asyncpg.Pool, query: GetStock) -> StockView:
    row = await pool.fetchrow("SELECT * FROM inventory WHERE sku = $1 AND tracked", query.sku)
    if row is None:
        raise NotFoundError(
            f"sku {query.sku} is untracked (no stock was ever received or adjusted): it is always available"
        )
    return _view(row)


async def list_stock(pool: asyncpg.Pool, query: ListStock) -> StockPage:
    """Tracked SKUs in SKU order (the partial index `inventory_tracked`), after the cursor's SKU."""
    if query.cursor is None:
        rows = await pool.fetch("SELECT * FROM inventory WHERE tracked ORDER BY sku LIMIT $1", query.limit + 1)
    else:
        rows = await pool.fetch("SELECT * FROM inventory WHERE tracked AND sku > $1 ORDER BY sku LIMIT $2",
                                _after(query.cursor), query.limit + 1)
    more = len(rows) > query.limit
    rows = rows[:query.limit]
    return StockPage(items=[_view(r) for r in rows], next_cursor=_cursor(rows[-1]["sku"]) if more else None)
