"""The fulfilment process manager: links orders and tasks.

A paid order submits one `order.fulfil` task (idempotency key `fulfil:<order_id>`, so redelivered
or replayed events never submit a second); the task's completion ships the order; its dead
letter records a `order.fulfilment_failed` event on the order; a paid order that is cancelled
cancels its task (a running handler is signalled), and the ship its completion would send is
refused by the cancelled order. It reads the outbox subjects (`orders.outbox.paid`,
`orders.outbox.cancelled`, `tasks.outbox.ended`: copies of those events stored atomically with
them) through durable consumers, so the server filters out every other event (`OutboxReader`)."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
from nats.aio.client import Client

from actors.manager import OutboxReader
from actors.orders.messages import ORDER_EVENTS, OrderCancelled, OrderEvent, OrderPaid, RecordFulfilmentFailure, ShipOrder
from actors.runtime import keyed_id
from actors.tasks.messages import TASK_EVENTS, CancelTask, SubmitInternalTask, TaskCompleted, TaskDeadLettered, TaskEvent
from actors.tasks.registry import FULFIL_ORDER
from bus.subjects import Context, Parked
from infra.contexts import ProcessManager
from infra.settings import Settings

DURABLE = "fulfilment_manager"
ROLE = "fulfilment"


def fulfil_key(order_id: str) -> str:
    return f"fulfil:{order_id}"


def fulfil_task_id(order_id: str) -> str:
    """The id of an order's fulfilment task: the task actor derives it from the submit's key."""
    return keyed_id(fulfil_key(order_id))


class _Ref(msgspec.Struct):
    order_id: str | None = None
    ref: str | None = None


_ref = msgspec.json.Decoder(_Ref)


class FulfilmentManager(OutboxReader):
    """Reacts to OrderPaid, OrderCancelled, TaskCompleted and TaskDeadLettered."""

    def __init__(
        self, nc: Client, orders: Context, tasks: Context, *, timeout: float = 5.0, parked: Parked | None = None,
        step_s: float | None = None,
    ) -> None:
        super().__init__(nc, DURABLE, {orders: ("paid", "cancelled"), tasks: ("ended",)}, timeout=timeout,
                         parked=parked)
        self._orders = orders
        self._tasks = tasks
        self._step_s = step_s
        self._order_events = ORDER_EVENTS
        self._task_events = TASK_EVENTS

    def key(self, ctx: Context, data: bytes) -> str | None:
        """The order an event is about (a task's `ref` names it): one order's events in order."""
        try:
            ref = _ref.decode(data)
        except msgspec.DecodeError:
            return ""
        return ref.order_id or ref.ref or ""

    async def react(self, ctx: Context, data: bytes, headers: Mapping[str, str]) -> None:
        if ctx.name == self._orders.name:
            await self._on_order_event(self.decode(self._order_events, data, "order event"), headers)
        else:
            await self._on_task_event(self.decode(self._task_events, data, "task event"), headers)

    async def _on_order_event(self, event: OrderEvent, headers: Mapping[str, str]) -> None:
        if isinstance(event, OrderPaid):
            payload: dict[str, object] = {"order_id": event.order_id}
            if self._step_s is not None:
                payload["step_s"] = self._step_s
            await self.send(self._tasks.command("submit_internal"),
                            SubmitInternalTask(type=FULFIL_ORDER, payload=payload, ref=f"order:{event.order_id}"),
                            key=fulfil_key(event.order_id), cause=headers)
        elif isinstance(event, OrderCancelled) and event.refund_due:
            # Only a paid order has a fulfilment task; one that already ended refuses the cancel.
            await self.send(self._tasks.command("cancel"),
                            CancelTask(task_id=fulfil_task_id(event.order_id), reason="order cancelled"),
                            key=f"cancel-fulfil:{event.order_id}", cause=headers)

    async def _on_task_event(self, event: TaskEvent, headers: Mapping[str, str]) -> None:
        if not isinstance(event, TaskCompleted | TaskDeadLettered) or event.task_type != FULFIL_ORDER:
            return
        if not (event.ref or "").startswith("order:"):
            return
        order_id = event.ref.split(":", 1)[1]  # type: ignore[union-attr]
        if isinstance(event, TaskCompleted):
            result = event.result if isinstance(event.result, dict) else {}
            numbers = result.get("tracking_numbers")
            numbers = [t for n in numbers[:50] if (t := _text(n))] if isinstance(numbers, list) else []
            ship = ShipOrder(order_id=order_id, carrier=_text(result.get("carrier")), tracking=_text(result.get("tracking")),
                             tracking_numbers=numbers)
            await self.send(self._orders.command("ship"), ship, key=f"ship:{order_id}", cause=headers)
        else:
            failure = RecordFulfilmentFailure(order_id=order_id, reason=(event.error or "")[:2000])
            await self.send(self._orders.command("fulfilment_failed"), failure,
                            key=f"fulfilment-failed:{order_id}:{event.attempt}", cause=headers)


def _text(value: object) -> str | None:
    return str(value)[:200] if value is not None else None


def _build(nc: Client, contexts: Mapping[str, Context], settings: Settings) -> FulfilmentManager:
    return FulfilmentManager(nc, contexts["orders"], contexts["tasks"], timeout=settings.request_timeout_s,
                             step_s=settings.fulfil_step_s)


PROCESS_MANAGERS = (
    ProcessManager(
        name=ROLE, reader=DURABLE,
        consumes={"orders": ("paid", "cancelled"), "tasks": ("ended",)},
        sends={"tasks": ("submit_internal", "cancel"), "orders": ("ship", "fulfilment_failed")},
        build=_build,
    ),
)
