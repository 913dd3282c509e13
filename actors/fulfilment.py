"""The fulfilment process manager: links orders and tasks.

A paid order submits one `order.fulfil` task (idempotency key `fulfil:<order_id>`, so redelivered
or replayed events never submit a second); the task's completion ships the order; its dead
letter records a `order.fulfilment_failed` event on the order. It consumes the outbox subjects
(`orders.outbox.paid`, `tasks.outbox.ended`: copies of those events stored atomically with them)
through durable consumers, so the server filters out every other event, and it only issues
idempotent commands, so at-least-once is enough. An event it cannot decode or handle is parked
(`bus.parking`, reader `fulfilment_manager`) and acked: one bad message never stops it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError

from actors.orders.messages import OrderEvent, OrderPaid
from actors.tasks.messages import TaskCompleted, TaskDeadLettered, TaskEvent
from actors.tasks.registry import FULFIL_ORDER
from bus import parking
from bus import subjects as h
from bus.client import call
from bus.codec import encode
from bus.errors import (
    IdempotencyKeyReusedError,
    InternalError,
    JetsourceError,
    MalformedError,
    NotFoundError,
    RuleViolationError,
    ValidationError,
)
from bus.eventstore import appended
from bus.pull import Puller, position
from bus.subjects import Context, Parked

log = logging.getLogger(__name__)
DURABLE = "fulfilment_manager"
# A legitimate refusal of a command (the order moved on): nothing to repair, skip the event.
_REFUSED = (RuleViolationError, NotFoundError)
# The event itself is bad (cannot be decoded, or its command is invalid or collides with another
# request under the same key): park it for an operator, never retry it forever.
_POISON = (ValidationError, MalformedError, IdempotencyKeyReusedError)
# An internal error may be a passing fault; one that persists this many tries is parked.
_INTERNAL_TRIES = 5


class FulfilmentManager:
    """Reacts to OrderPaid, TaskCompleted and TaskDeadLettered."""

    def __init__(
        self, nc: Client, orders: Context, tasks: Context, *, timeout: float = 5.0, parked: Parked | None = None
    ) -> None:
        self._nc = nc
        self._orders = orders
        self._tasks = tasks
        self._parked = parked or Parked(orders.namespace)
        self._timeout = timeout
        self._stopping = asyncio.Event()
        self._order_events = msgspec.json.Decoder(OrderEvent)
        self._task_events = msgspec.json.Decoder(TaskEvent)

    async def run(self) -> None:
        await asyncio.gather(
            self._consume(self._orders),
            self._consume(self._tasks),
        )

    async def handle(self, stream: str, data: bytes, headers: dict[str, str]) -> None:
        """Handle one raw outbox event of either stream (delivered, or a parked one retried):
        raises what handling raises; MalformedError for a message no actor appended."""
        if not appended(headers):
            raise MalformedError("not an appended outbox message: no command id (a reply NATS was made to store here)")
        if stream == self._orders.stream:
            await self._on_order_event(data, headers)
        elif stream == self._tasks.stream:
            await self._on_task_event(data, headers)
        else:
            raise ValueError(f"the fulfilment manager reads {self._orders.stream} and {self._tasks.stream}, not {stream}")

    @property
    def stopping(self) -> bool:
        """Whether stop() was called."""
        return self._stopping.is_set()

    def stop(self) -> None:
        self._stopping.set()

    async def _consume(self, ctx: Context) -> None:
        while not self._stopping.is_set():
            try:
                await self._ensure_consumer(ctx)
                puller = Puller(self._nc, ctx.stream, DURABLE)
                try:
                    while not self._stopping.is_set():
                        msgs = await puller.pull(500, wait_s=0.5)
                        if msgs:
                            await self._handle_batch(ctx, msgs)
                finally:
                    await puller.close()
            except asyncio.CancelledError:
                raise
            except (JetsourceError, NatsError, OSError) as exc:  # NATS away (an outage): one line, no traceback
                log.warning("fulfilment manager on %s: %s; restarting in 1s", ctx.stream, exc)
                await self._pause(1.0)
            except Exception:
                log.exception("fulfilment manager failed on %s; restarting", ctx.stream)
                await self._pause(1.0)

    async def _pause(self, seconds: float) -> bool:
        """Sleep unless stopped; True when stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    async def _ensure_consumer(self, ctx: Context) -> None:
        """Create the outbox consumer, or replace a different definition (an older release's
        cumulative acks, say) with one that resumes after what that one acknowledged. Events
        past its ack floor may come again: every command this manager sends is idempotent."""
        js = self._nc.jetstream()
        config = ConsumerConfig(
            durable_name=DURABLE, filter_subject=ctx.outbox_wildcard, deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT, ack_wait=5, max_deliver=-1, max_ack_pending=10_000,
        )
        try:
            await js.add_consumer(ctx.stream, config)
            return
        except APIError:  # exists with another definition (the server answers 400 or 500)
            pass
        info = await js.consumer_info(ctx.stream, DURABLE)
        floor = info.ack_floor.stream_seq if info.ack_floor and info.ack_floor.stream_seq else 0
        await js.delete_consumer(ctx.stream, DURABLE)
        config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, floor + 1
        await js.add_consumer(ctx.stream, config)

    async def _handle_batch(self, ctx: Context, msgs: list[Any]) -> None:
        """Handle in order, acking each event once it is handled, skipped (refused) or parked.

        Acks are per event (explicit), never cumulative: an event that a crashed manager had
        been given but not handled comes back after the ack wait whatever happened after it.
        A transient failure is retried in place, its lease kept alive, until the event is
        handled or the manager stops (then it stays unacked, for whichever manager runs next).
        """
        for msg in msgs:
            backoff, internal = 0.2, 0
            while True:
                try:
                    await self.handle(ctx.stream, msg.data, msg.headers or {})
                    break
                except _REFUSED as exc:
                    log.warning("fulfilment: %s; skipping the event", exc.message)
                    break
                except _POISON as exc:
                    await self._park(ctx, msg, exc)
                    break
                except JetsourceError as exc:
                    internal += isinstance(exc, InternalError)
                    if internal >= _INTERNAL_TRIES:
                        await self._park(ctx, msg, exc)
                        break
                    log.warning("fulfilment: %s; retrying in %.1fs", exc.message, backoff)
                    await msg.in_progress()
                    if await self._pause(backoff):
                        return
                    backoff = min(backoff * 2, 2.0)  # well inside the 5 s ack wait
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a bug on this event: park it, never restart-loop
                    await self._park(ctx, msg, exc)
                    break
            await msg.ack()

    async def _park(self, ctx: Context, msg: Any, error: Exception) -> None:
        """Park the event; acknowledged by JetStream before the caller acks the event."""
        await parking.park(
            self._nc, self._parked, reader=DURABLE, stream=ctx.stream, seq=position(msg).stream_seq,
            subject=msg.subject, data=msg.data, headers=msg.headers or {}, error=error, timeout=self._timeout,
        )

    async def _command(self, subject: str, body: dict[str, Any], key: str, causation: str | None) -> None:
        headers = {h.IDEMPOTENCY_KEY: key}
        if causation:
            headers[h.CAUSATION_ID] = causation
        await call(self._nc, subject, encode(body), headers=headers, timeout=self._timeout)

    async def _on_order_event(self, data: bytes, headers: dict[str, str]) -> None:
        try:
            event = self._order_events.decode(data)
        except msgspec.DecodeError as exc:  # includes an unknown type or the wrong shape
            raise MalformedError(f"undecodable order event: {exc}") from None
        if isinstance(event, OrderPaid):
            await self._command(
                self._tasks.command("submit_internal"),
                {"type": FULFIL_ORDER, "payload": {"order_id": event.order_id}, "ref": f"order:{event.order_id}"},
                key=f"fulfil:{event.order_id}", causation=headers.get(h.EV_COMMAND_ID),
            )

    async def _on_task_event(self, data: bytes, headers: dict[str, str]) -> None:
        try:
            event = self._task_events.decode(data)
        except msgspec.DecodeError as exc:
            raise MalformedError(f"undecodable task event: {exc}") from None
        if not isinstance(event, TaskCompleted | TaskDeadLettered) or event.task_type != FULFIL_ORDER:
            return
        if not (event.ref or "").startswith("order:"):
            return
        order_id = event.ref.split(":", 1)[1]  # type: ignore[union-attr]
        if isinstance(event, TaskCompleted):
            result = event.result if isinstance(event.result, dict) else {}
            body = {"order_id": order_id, "carrier": result.get("carrier"), "tracking": result.get("tracking")}
            await self._command(self._orders.command("ship"), body, key=f"ship:{order_id}",
                                causation=headers.get(h.EV_COMMAND_ID))
        else:
            await self._command(self._orders.command("fulfilment_failed"), {"order_id": order_id, "reason": event.error},
                                key=f"fulfilment-failed:{order_id}:{event.attempt}", causation=headers.get(h.EV_COMMAND_ID))
