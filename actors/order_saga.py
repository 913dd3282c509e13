"""The order saga: an order's stock, reserved in the inventory context and given back when the
order does not go ahead.

- `order.confirmed` → reserve every line (`inventory.cmd.reserve`, all at once: each SKU is its
  own aggregate). All lines reserved → `orders.cmd.record_reserved`. Any short →
  `orders.cmd.record_rejected` naming every short SKU, then release what it did reserve (the
  compensation).
- `order.cancelled` → release the reservation of each SKU the order held.
- `order.shipped` → commit it (the stock leaves on hand).

Reserves and answers are keyed by the order (and SKU), so a redelivered or replayed event repeats
answers instead of acting twice; releases need no key (releasing what is not held stores
nothing); a SKU that is not a valid inventory id (orders allow dots, NATS
subject tokens do not) can never be tracked and is treated as untracked: always available.
It reads `orders.outbox.{confirmed,cancelled,shipped}` through one durable consumer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

import msgspec
from nats.aio.client import Client

from actors.errors import InsufficientStockError, NotFoundError, RuleViolationError
from actors.inventory.messages import CommitStock, ReleaseStock, ReserveStock
from actors.manager import OutboxReader
from actors.orders import domain
from actors.orders.messages import ORDER_EVENTS, OrderCancelled, OrderConfirmed, OrderShipped, RecordRejected, RecordReserved
from bus.eventstore import PartitionedStore, appended
from bus.subjects import Context, valid_token
from infra.contexts import ProcessManager
from infra.settings import Settings

READER = "order_saga"
ROLE = "order_saga"


class _OrderRef(msgspec.Struct):
    order_id: str = ""


_order_ref = msgspec.json.Decoder(_OrderRef)


class OrderSaga(OutboxReader):
    """Reacts to OrderConfirmed, OrderCancelled and OrderShipped."""

    def __init__(self, nc: Client, orders: Context, inventory: Context, *, timeout: float = 5.0) -> None:
        super().__init__(nc, READER, {orders: ("confirmed", "cancelled", "shipped")}, timeout=timeout)
        self._orders = orders
        self._inventory = inventory
        self._events = ORDER_EVENTS
        self._store = PartitionedStore.open(nc, orders, timeout=timeout)

    def key(self, ctx: Context, data: bytes) -> str | None:
        try:
            return _order_ref.decode(data).order_id
        except msgspec.DecodeError:
            return ""  # handled (and parked) with the other undecodable ones

    async def react(self, ctx: Context, data: bytes, headers: Mapping[str, str]) -> None:
        event = self.decode(self._events, data, "order event")
        if isinstance(event, OrderConfirmed):
            await self._reserve(event, headers)
        elif isinstance(event, OrderCancelled):
            await self._release(event.order_id, event.skus, headers)
        elif isinstance(event, OrderShipped):
            for sku in filter(valid_token, event.skus):
                await self.send(self._inventory.command("commit"), CommitStock(sku=sku, order_id=event.order_id),
                                key=f"commit:{event.order_id}:{sku}", cause=headers)

    async def _status(self, order_id: str) -> str:
        """The order's status as its stream has it now (not as the event being handled did)."""
        state = domain.INITIAL
        for stored in await self._store.load(self._orders.events(order_id)):
            if appended(stored.headers):
                with contextlib.suppress(msgspec.DecodeError):
                    state = domain.evolve(state, self._events.decode(stored.data))
        return state.status

    async def _release(self, order_id: str, skus: list[str], headers: Mapping[str, str]) -> None:
        """Give back whatever the order holds of these SKUs. Not keyed: a release is idempotent
        by itself (nothing held, nothing stored), and a key would make a later release a repeat
        of an earlier one that found nothing yet (a cancel handled before a racing reserve)."""
        await asyncio.gather(*(self.send(self._inventory.command("release"), ReleaseStock(sku=sku, order_id=order_id),
                                         key=None, cause=headers) for sku in skus if valid_token(sku)))

    async def _answer(self, command: str, body: msgspec.Struct, key: str, order_id: str, skus: list[str],
                      headers: Mapping[str, str]) -> None:
        """Tell the order; if it has moved on meanwhile (cancelled, or answered by another
        saga instance), a cancelled or rejected order holds nothing: give its stock back."""
        try:
            await self.send(self._orders.command(command), body, key=key, cause=headers)
        except (RuleViolationError, NotFoundError):
            if await self._status(order_id) in ("cancelled", "rejected"):
                await self._release(order_id, skus, headers)
            raise

    async def _reserve(self, event: OrderConfirmed, headers: Mapping[str, str]) -> None:
        order_id = event.order_id
        skus = [line.sku for line in event.lines]
        # Redelivered or replayed after the order moved on: never reserve again (stock that
        # arrived since for a SKU that was short then is not taken), and give back anything an
        # interrupted earlier try left held by an order that ended.
        status = await self._status(order_id)
        if status in ("cancelled", "rejected"):
            await self._release(order_id, skus, headers)
        if status != "confirmed":
            return
        lines = [line for line in event.lines if valid_token(line.sku)]

        async def reserve(sku: str, quantity: int) -> bool:
            try:
                await self.send(self._inventory.command("reserve"),
                                ReserveStock(sku=sku, order_id=order_id, quantity=quantity),
                                key=f"reserve:{order_id}:{sku}", cause=headers)
                return True
            except InsufficientStockError:
                return False

        # All lines at once (each SKU is its own aggregate). Any other error fails the event as
        # a whole, to be retried once every reserve has answered: each is keyed, so a retry
        # repeats what was done and tries again what was not.
        outcomes = await asyncio.gather(*(reserve(line.sku, line.quantity) for line in lines), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        short = [line.sku for line, ok in zip(lines, outcomes, strict=True) if not ok]
        if not short:
            await self._answer("record_reserved", RecordReserved(order_id=order_id), f"reserved:{order_id}",
                               order_id, skus, headers)
            return
        # All lines or none: the order is rejected first, then its stock given back, so that a
        # crash in between leaves an order whose redelivered confirm releases it (above).
        await self._answer("record_rejected", RecordRejected(order_id=order_id, short_skus=short),
                           f"rejected:{order_id}", order_id, skus, headers)
        await self._release(order_id, skus, headers)


def _build(nc: Client, contexts: Mapping[str, Context], settings: Settings) -> OrderSaga:
    return OrderSaga(nc, contexts["orders"], contexts["inventory"], timeout=settings.request_timeout_s)


PROCESS_MANAGERS = (
    ProcessManager(
        name=ROLE, reader=READER,
        consumes={"orders": ("confirmed", "cancelled", "shipped")}, reads=("orders",),
        sends={"inventory": ("reserve", "release", "commit"), "orders": ("record_reserved", "record_rejected")},
        build=_build,
    ),
)
