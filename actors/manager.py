"""What every process manager shares: durable consumers on the outbox subjects it declares, one
event at a time with explicit acks, transient failures retried in place (the lease kept alive),
legitimate refusals skipped, and poison parked (`bus.parking`) so that one bad message never
stops it. A process manager only sends idempotent commands (keyed), so at-least-once delivery,
redelivery after a crash and a full replay change nothing.

A subclass says what it reads (`outboxes`: context -> outbox names) and implements `react`;
with `key` (the aggregate an event is about) the events of different aggregates are handled
concurrently, each aggregate's in stream order."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import logging
from collections.abc import Mapping
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError

from actors.upcasting import EventCodec
from bus import parking
from bus import subjects as h
from bus import tracing
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
from bus.outage import Outage
from bus.pull import Puller, position
from bus.subjects import Context, Parked

log = logging.getLogger(__name__)
# A legitimate refusal of a command (the aggregate moved on): nothing to repair, skip the event.
REFUSED = (RuleViolationError, NotFoundError)
# The event itself is bad (cannot be decoded, or its command is invalid or collides with another
# request under the same key): park it for an operator, never retry it forever.
POISON = (ValidationError, MalformedError, IdempotencyKeyReusedError)
# An internal error may be a passing fault; one that persists this many tries is parked.
INTERNAL_TRIES = 5
ACK_WAIT_S = 5  # an event not acked (nor kept, `in_progress`) this long is delivered again


class OutboxReader(abc.ABC):
    """The loop of a process manager over the outbox subjects of one or more contexts."""

    def __init__(
        self, nc: Client, reader: str, outboxes: Mapping[Context, tuple[str, ...]], *, timeout: float = 5.0,
        parked: Parked | None = None, concurrency: int = 64,
    ) -> None:
        self._nc = nc
        self.reader = reader
        # One consumer per partition stream of every context read.
        self._outboxes = {part: names for ctx, names in outboxes.items() for part in ctx.parts}
        first = next(iter(self._outboxes))
        self._parked = parked or Parked(first.namespace)
        self._timeout = timeout
        self._concurrency = concurrency
        self._stopping = asyncio.Event()
        # What it sends to being away (an actor down, NATS gone): per kind of event it reads
        # (each leads to one kind of command), one line when they start failing and one when
        # they go through again, however many are retried meanwhile.
        self._sending: dict[str, Outage] = {}

    @abc.abstractmethod
    async def react(self, ctx: Context, data: bytes, headers: Mapping[str, str]) -> None:
        """Handle one appended outbox event of `ctx` (the view of the partition it was stored
        in: compare contexts by `name`); raise what handling raises."""

    async def handle(self, stream: str, data: bytes, headers: Mapping[str, str]) -> None:
        """Handle one raw outbox event of a stream it reads (delivered, or a parked one retried):
        raises what handling raises; MalformedError for a message no actor appended."""
        if not appended(headers):
            raise MalformedError("not an appended outbox message: no command id (a reply NATS was made to store here)")
        tracing.follow(headers.get(h.EV_TRACE_ID), headers.get(h.EV_CORRELATION_ID))
        for ctx in self._outboxes:
            if ctx.stream == stream:
                return await self.react(ctx, data, headers)
        raise ValueError(f"{self.reader} reads {', '.join(c.stream for c in self._outboxes)}, not {stream}")

    @staticmethod
    def decode(decoder: msgspec.json.Decoder[Any] | EventCodec[Any], data: bytes, what: str) -> Any:
        try:
            return decoder.decode(data)
        except msgspec.DecodeError as exc:  # includes an unknown type or the wrong shape
            raise MalformedError(f"undecodable {what}: {exc}") from None

    async def run(self) -> None:
        await asyncio.gather(*(self._consume(ctx) for ctx in self._outboxes))

    @property
    def stopping(self) -> bool:
        """Whether stop() was called."""
        return self._stopping.is_set()

    def stop(self) -> None:
        self._stopping.set()

    async def send(self, subject: str, command: msgspec.Struct, key: str | None, cause: Mapping[str, str]) -> bytes:
        """An idempotent command caused by the event whose headers are `cause` (keyed, unless it
        is idempotent by itself): it carries that event's trace and correlation, and names the
        event's command as its cause."""
        headers = {h.IDEMPOTENCY_KEY: key} if key is not None else {}
        if trace := cause.get(h.EV_TRACE_ID):
            headers[h.TRACE_ID] = trace
        if correlation := cause.get(h.EV_CORRELATION_ID) or cause.get(h.EV_TRACE_ID):
            headers[h.CORRELATION_ID] = correlation
        if causation := cause.get(h.EV_COMMAND_ID):
            headers[h.CAUSATION_ID] = causation
        return await call(self._nc, subject, encode(command), headers=headers, timeout=self._timeout)

    async def _consume(self, ctx: Context) -> None:
        outage = Outage(log, f"{self.reader} on {ctx.stream}")
        while not self._stopping.is_set():
            try:
                await self._ensure_consumer(ctx)
                puller = Puller(self._nc, ctx.stream, self.reader)
                try:
                    await self._dispatch(ctx, puller, outage)
                finally:
                    await puller.close()
            except asyncio.CancelledError:
                raise
            except (JetsourceError, NatsError, OSError) as exc:  # NATS away (an outage): one line, no traceback
                outage.failed(exc)
                await self._pause(1.0)
            except Exception:
                log.exception("%s failed on %s; restarting", self.reader, ctx.stream)
                await self._pause(1.0)

    async def _pause(self, seconds: float) -> bool:
        """Sleep unless stopped; True when stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    def _config(self, ctx: Context) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.reader, filter_subjects=[ctx.outbox(n) for n in self._outboxes[ctx]],
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_S, max_deliver=-1,
            max_ack_pending=10_000,
        )

    async def _ensure_consumer(self, ctx: Context) -> None:
        """Create the outbox consumer, or replace a different definition (an older release's
        filter or cumulative acks, say) with one that resumes after what that one acknowledged.
        Events past its ack floor may come again: every command a manager sends is idempotent."""
        js = self._nc.jetstream()
        config = self._config(ctx)
        try:
            await js.add_consumer(ctx.stream, config)
            return
        except APIError:  # exists with another definition (the server answers 400 or 500)
            pass
        info = await js.consumer_info(ctx.stream, self.reader)
        floor = info.ack_floor.stream_seq if info.ack_floor and info.ack_floor.stream_seq else 0
        await js.delete_consumer(ctx.stream, self.reader)
        config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, floor + 1
        await js.add_consumer(ctx.stream, config)

    def key(self, ctx: Context, data: bytes) -> str | None:
        """The aggregate an outbox event is about: events with the same key are handled in
        stream order, different keys concurrently. None (the default): one at a time."""
        return None

    async def _dispatch(self, ctx: Context, puller: Puller, outage: Outage) -> None:
        """Pull and hand each event to the chain of its key: an event starts once the one
        before it with the same key is done, so each aggregate's events are handled in stream
        order while up to `concurrency` events of different aggregates are in flight, and
        pulling goes on meanwhile (a slow aggregate holds up only its own events)."""
        slots = asyncio.Semaphore(self._concurrency)
        tails: dict[str | None, asyncio.Task[None]] = {}
        queued: dict[int, Any] = {}  # given to this manager, not being handled yet (by id: Msg is unhashable)

        async def after(previous: asyncio.Task[None] | None, msg: Any) -> None:
            try:
                if previous is not None:
                    await asyncio.gather(previous, return_exceptions=True)
                queued.pop(id(msg), None)
                if not self._stopping.is_set():  # else left unacked, for the next manager
                    await self._handle_one(ctx, msg)
            except asyncio.CancelledError:
                raise
            except Exception:  # an ack or a park that failed: the event comes again after the ack wait
                log.exception("%s: handling an event of %s failed", self.reader, ctx.stream)
            finally:
                queued.pop(id(msg), None)
                slots.release()

        async def keep_leases() -> None:
            # Events waiting behind a slow one of their aggregate are still this manager's:
            # without this they would be redelivered (to be handled twice) after the ack wait.
            while True:
                await asyncio.sleep(ACK_WAIT_S / 3)
                for msg in list(queued.values()):
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

        def forget(key: str | None, task: asyncio.Task[None]) -> None:
            if tails.get(key) is task:
                del tails[key]

        leases = asyncio.get_running_loop().create_task(keep_leases())
        try:
            while not self._stopping.is_set():
                msgs = await puller.pull(self._concurrency, wait_s=0.5)
                outage.ok()
                queued.update((id(m), m) for m in msgs)
                for msg in msgs:
                    await slots.acquire()
                    key = self.key(ctx, msg.data)
                    task = asyncio.get_running_loop().create_task(after(tails.get(key), msg))
                    tails[key] = task
                    task.add_done_callback(functools.partial(forget, key))
        finally:
            await asyncio.gather(*tails.values(), return_exceptions=True)
            leases.cancel()

    async def _handle_one(self, ctx: Context, msg: Any) -> None:
        """Handle one event and ack it once it is handled, skipped (refused) or parked.

        Acks are per event (explicit), never cumulative: an event that a crashed manager had
        been given but not handled comes back after the ack wait whatever happened after it.
        A transient failure is retried in place, its lease kept alive, until the event is
        handled or the manager stops (then it stays unacked, for whichever manager runs next).
        """
        backoff, internal = 0.2, 0
        sending = self._sending.get(msg.subject)  # an outbox subject: one kind of event, one kind of command
        if sending is None:
            kind = f"{ctx.name} {msg.subject.rsplit('.', 1)[-1]}"  # e.g. "orders confirmed"
            sending = self._sending[msg.subject] = Outage(log, f"{self.reader}: handling {kind} events on {ctx.stream}")
        while True:
            try:
                await self.handle(ctx.stream, msg.data, msg.headers or {})
                sending.ok()
                break
            except REFUSED as exc:
                log.warning("%s: %s; skipping the event", self.reader, exc.message)
                break
            except POISON as exc:
                await self._park(ctx, msg, exc)
                break
            except JetsourceError as exc:
                internal += isinstance(exc, InternalError)
                if internal >= INTERNAL_TRIES:
                    await self._park(ctx, msg, exc)
                    break
                sending.failed(exc.message)
                await msg.in_progress()
                if await self._pause(backoff):
                    return
                backoff = min(backoff * 2, 2.0)  # well inside the ack wait
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug on this event: park it, never restart-loop
                await self._park(ctx, msg, exc)
                break
        await msg.ack()

    async def _park(self, ctx: Context, msg: Any, error: Exception) -> None:
        """Park the event; acknowledged by JetStream before the caller acks the event."""
        await parking.park(
            self._nc, self._parked, reader=self.reader, stream=ctx.stream, seq=position(msg).stream_seq,
            subject=msg.subject, data=msg.data, headers=msg.headers or {}, error=error, timeout=self._timeout,
        )
