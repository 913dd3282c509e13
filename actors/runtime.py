"""The actor runtime: a NATS micro service per bounded context that turns command messages into
events through a pure decider, with bounded concurrency, per-aggregate ordering, an in-memory
state cache, optimistic concurrency with bounded retries, and coded error replies."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.service import EndpointConfig, Service
from nats.micro.request import Request

from actors.errors import JetsourceError, NotFoundError, PendingError, RuleViolationError, ValidationError
from actors.snapshots import Snapshots
from bus import subjects as h
from bus import tracing
from bus.codec import Decoder, encode
from bus.connection import on_reconnect
from bus.errors import ConflictError, DeadlineError, IdempotencyKeyReusedError, PreconditionFailedError
from bus.eventstore import NewEvent, PartitionedStore, StoredEvent, WrongExpectedSequence, appended
from bus.ids import IdSource
from bus.service import Concurrency, add_service, respond
from bus.subjects import Context
from actors.upcasting import EventCodec
from bus.wire import BatchItem, BatchReply, CommandBatch, ErrorBody

log = logging.getLogger(__name__)

S = TypeVar("S")
C = TypeVar("C")
E = TypeVar("E")

_ID_NAMESPACE = uuid.UUID("6f3a8e52-3c1e-4d55-9a57-2f0c6a1d9b10")


def keyed_id(key: str) -> str:
    """The id a keyed create command without an id gets: the same key always creates (or finds)
    the same aggregate, so a process manager knows the id of what it created."""
    return uuid.uuid5(_ID_NAMESPACE, key).hex


MAX_SNAPSHOTS_IN_FLIGHT = 256
ANY_VERSION = -1  # `Expected-Version: *` (HTTP `If-Match: *`): any current version, i.e. it exists


@dataclass(frozen=True, slots=True)
class CommandMeta:
    """What travels with a command besides its body."""

    command_id: str
    keyed: bool
    expected_version: int | None
    trace_id: str
    correlation_id: str
    causation_id: str | None
    deadline: float | None = None  # epoch seconds; None: the caller waits as long as it takes
    fingerprint: str | None = None  # digest of a keyed request, bound to its key

    @classmethod
    def from_headers(cls, headers: Mapping[str, str] | None, ids: IdSource) -> CommandMeta:
        if not headers:
            trace_id = ids.next()
            return cls(command_id=ids.next(), keyed=False, expected_version=None, trace_id=trace_id,
                       correlation_id=trace_id, causation_id=None)
        hdrs = headers
        key = hdrs.get(h.IDEMPOTENCY_KEY)
        if key is not None and not (0 < len(key) <= 200):
            raise ValidationError("Idempotency-Key must be 1..200 characters", field=h.IDEMPOTENCY_KEY)
        expected_raw = hdrs.get(h.EXPECTED_VERSION)
        expected: int | None = None
        if expected_raw is not None:
            expected_raw = expected_raw.strip().strip('"')
            try:
                expected = ANY_VERSION if expected_raw == "*" else int(expected_raw)
            except ValueError:
                raise ValidationError("Expected-Version must be an integer or *", field=h.EXPECTED_VERSION) from None
        deadline_raw = hdrs.get(h.DEADLINE)
        deadline: float | None = None
        if deadline_raw is not None:
            try:
                deadline = int(deadline_raw) / 1000
            except ValueError:
                raise ValidationError("Deadline must be epoch milliseconds", field=h.DEADLINE) from None
        trace_id = hdrs.get(h.TRACE_ID) or ids.next()
        return cls(
            command_id=key or ids.next(),
            keyed=key is not None,
            expected_version=expected,
            trace_id=trace_id,
            correlation_id=hdrs.get(h.CORRELATION_ID) or trace_id,
            causation_id=hdrs.get(h.CAUSATION_ID),
            deadline=deadline,
        )

    def check_deadline(self) -> None:
        """Refuse to go on once the caller has stopped waiting: it was told the outcome is
        unknown (or its request was buffered through an outage), so nothing may be stored now."""
        if self.deadline is not None and time.time() > self.deadline:
            raise DeadlineError("the command's deadline passed before it was executed; nothing was stored")


def fingerprint(command: Any) -> str:
    """A digest of a decoded command (its type tag and every field but the key itself, which may
    come in the body or in a header): what a key is bound to."""
    if getattr(command, "idempotency_key", None) is not None:
        command = msgspec.structs.replace(command, idempotency_key=None)
    return hashlib.blake2b(encode(command), digest_size=12).hexdigest()


@dataclass(frozen=True)
class AggregateSpec(Generic[S, C, E]):
    """How the runtime drives one kind of aggregate."""

    ctx: Context
    initial: S
    evolve: Callable[[S, E], S]
    decide: Callable[[S, C], list[E]]
    # The events' tagged union, or (with upcasters for older versions) its `actors.upcasting.EventCodec`.
    event_type: Any
    commands: Mapping[str, type]
    aggregate_id: Callable[[C], str | None]
    with_id: Callable[[C, str], C]
    reply: Callable[[str, S, int], msgspec.Struct]
    version: str = "1.0.0"
    # Stamp or check a decoded command before it is decided (e.g. the time, known types).
    prepare: Callable[[C], C] | None = None
    # Messages on other subjects of the aggregate's stream, stored in the same atomic batch:
    # given the partition view the aggregate lives in (spell outbox / queue subjects with it).
    outbox: Callable[[Context, S, list[E]], list[tuple[str, bytes]]] | None = None
    # Best-effort signals after the events are stored (core NATS, never the source of truth).
    after_commit: Callable[[Client, S, list[E]], Awaitable[None]] | None = None
    # Commands that also get a `<name>_batch` endpoint: {"items": [...]} -> {"results": [...]}.
    batchable: tuple[str, ...] = ()
    # A core NATS subject (last token: an aggregate id) on which other processes announce
    # changes; the cached aggregate is reloaded before its next command. For commands answered
    # from the cache without an append (nothing to conflict on), e.g. a task claim after a
    # cancel stored by another actor process.
    invalidations: str | None = None
    # Commands whose decision never stores anything (a claim): in batch requests they are
    # answered on the spot from a current cache entry, without a task or lock per item.
    read_only: tuple[type, ...] = ()
    # The aggregate an event names (its id field): a message on the subject that names another
    # is not this aggregate's event (see `bus.eventstore.appended`).
    event_id: Callable[[E], str] | None = None
    # True while the aggregate waits on another context's answer (a saga step: an order whose
    # stock is being reserved). A command that leaves it pending is answered once it is not, and
    # a command the decider refuses with PendingError is decided again then, both waiting at
    # most `settle_wait_s` (and never past the caller's deadline).
    pending: Callable[[S], bool] | None = None
    settle_wait_s: float = 2.0
    # Commands that continue the trace of the aggregate's last stored event instead of starting
    # their own: a worker's attempt bookkeeping, batched across many tasks (and so many traces),
    # stays in the trace of whatever queued the attempt (a submit, a retry), at no cost on the wire.
    inherits_trace: tuple[type, ...] = ()
    # Snapshots (`actors.snapshots`): one is stored every this many events of an aggregate (0:
    # never), and loads start from it. `state_version` names the state's schema: raise it when
    # the state Struct or `evolve` changes meaning, and older snapshots are ignored.
    snapshot_every: int = 100
    state_version: int = 1


def event_of(codec: EventCodec[E], event_id: Callable[[E], str] | None, stored: StoredEvent) -> E | None:
    """The event a stored message holds, in its current shape; None for a message that is not
    one of this aggregate's appended events (a reply NATS was made to store there, another
    aggregate's event copied to its subject), which changes nothing."""
    if not appended(stored.headers):
        log.warning("ignoring a message on %s at seq %d that no actor appended", stored.subject, stored.seq)
        return None
    event: E = codec.decode(stored.data)
    if event_id is not None and not stored.subject.endswith("." + event_id(event)):
        log.warning("ignoring another aggregate's event copied to %s at seq %d", stored.subject, stored.seq)
        return None
    return event


class _Entry(msgspec.Struct, gc=False):
    """A cached aggregate. Untracked by the cyclic GC: the cache is large and cycle-free."""

    state: Any
    version: int
    # command id -> (stream sequence of its last event, fingerprint of the keyed request or "")
    commands: dict[str, tuple[int, str]] = {}
    loaded: bool = False
    # The trace and correlation of its last stored event: what `inherits_trace` commands continue.
    trace: str = ""
    correlation: str = ""
    since_snapshot: int = 0  # events folded since its last snapshot (or since it was loaded)


class Actor(Generic[S, C, E]):
    """Runs one bounded context's command endpoints."""

    def __init__(
        self,
        nc: Client,
        store: PartitionedStore,
        spec: AggregateSpec[S, C, E],
        *,
        concurrency: int = 512,
        max_retries: int = 5,
        cache_size: int = 100_000,
    ) -> None:
        self._nc = nc
        self._store = store
        self._spec = spec
        self._concurrency = Concurrency(concurrency)
        self._max_retries = max_retries
        self._cache: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        # Per-aggregate locks exist only while an aggregate has commands in flight.
        self._locks: dict[str, asyncio.Lock] = {}
        self._cache_size = cache_size
        self._event_decoder: EventCodec[E] = EventCodec.of(spec.event_type)
        self._ids = IdSource()
        self._service: Service | None = None
        self._invalidations: Subscription | None = None
        self._forget_reconnects: Callable[[], None] | None = None
        # Commands waiting for a pending aggregate to settle, woken by the next change to it.
        self._changed: dict[str, asyncio.Event] = {}
        # A context of one stream is its own (only) partition: no lookup per command.
        self._one_part = None if spec.ctx.partitioned else spec.ctx
        self.snapshots = Snapshots.of(nc, spec)
        self._snapshotting: set[asyncio.Task[bool]] = set()

    def _stats(self, endpoint: Any) -> Any:
        """`$SRV.STATS` data: the event store's writes (on the first endpoint only: one copy)."""
        if endpoint.name == next(iter(self._spec.commands)):
            return {"store": self._store.stats()}
        return None

    async def start(self) -> Service:
        ctx = self._spec.ctx
        if self._spec.invalidations is not None:
            self._invalidations = await self._nc.subscribe(self._spec.invalidations, cb=self._on_invalidation)
            # Signals sent while this connection was away are lost: distrust the whole cache.
            self._forget_reconnects = on_reconnect(self._nc, self.invalidate_all)
        service = await add_service(
            self._nc,
            name=f"{ctx.service_name}_actor",
            version=self._spec.version,
            description=f"jetsource {ctx.name} actor",
            queue_group=ctx.queue_group,
            stats_handler=self._stats,
        )
        for name, command_type in self._spec.commands.items():
            await service.add_endpoint(
                EndpointConfig(
                    name=name,
                    subject=ctx.command(name),
                    queue_group=ctx.queue_group,
                    handler=self._endpoint(Decoder(command_type)),
                    metadata={"kind": "command"},
                )
            )
        for name in self._spec.batchable:
            await service.add_endpoint(
                EndpointConfig(
                    name=f"{name}_batch",
                    subject=ctx.command(f"{name}_batch"),
                    queue_group=ctx.queue_group,
                    handler=self._batch_endpoint(self._spec.commands[name]),
                    metadata={"kind": "command batch"},
                )
            )
        self._service = service
        return service

    async def _on_invalidation(self, msg: Msg) -> None:
        self.invalidate(msg.subject.rsplit(".", 1)[1])

    def invalidate(self, aggregate_id: str) -> None:
        """Reload this aggregate's events before its next command (another process wrote)."""
        entry = self._cache.get(aggregate_id)
        if entry is not None:
            entry.loaded = False

    def invalidate_all(self) -> None:
        """Reload every cached aggregate before its next command."""
        for entry in self._cache.values():
            entry.loaded = False

    def cached(self, aggregate_id: str) -> bool:
        """Whether commands on this aggregate are decided from the cache without reading first."""
        entry = self._cache.get(aggregate_id)
        return entry is not None and entry.loaded

    async def stop(self) -> None:
        """Stop taking requests, then finish the ones in flight."""
        if self._invalidations is not None:
            await self._invalidations.unsubscribe()
            self._invalidations = None
        if self._forget_reconnects is not None:
            self._forget_reconnects()
            self._forget_reconnects = None
        if self._service is not None:
            await self._service.stop()
        await self._concurrency.drain()
        if self._snapshotting:
            await asyncio.gather(*self._snapshotting, return_exceptions=True)
        await self._store.close()

    def _endpoint(self, decoder: Decoder[Any]) -> Callable[[Request], Awaitable[None]]:
        async def serve(request: Request) -> None:
            await respond(request, lambda: self.execute(decoder.decode(request.data), request.headers))

        return self._concurrency.wrap(serve)

    def _batch_endpoint(self, command_type: type) -> Callable[[Request], Awaitable[None]]:
        """Many commands in one request (workers starting what one pull gave them). Each item
        is executed as if sent alone; per-item outcomes come back in order."""
        decoder: Decoder[CommandBatch[Any]] = Decoder(CommandBatch[command_type])  # type: ignore[valid-type]

        async def run(request: Request) -> BatchReply[msgspec.Raw]:
            batch = decoder.decode(request.data)
            # Keys and expected versions address one aggregate: never shared by a batch. One
            # request is one trace.
            headers = {k: v for k, v in (request.headers or {}).items()
                       if k in (h.TRACE_ID, h.CORRELATION_ID, h.CAUSATION_ID, h.DEADLINE)}
            headers.setdefault(h.TRACE_ID, self._ids.next())
            outcomes: list[Any] = [self._answer_from_cache(c) for c in batch.items]
            rest = [i for i, outcome in enumerate(outcomes) if outcome is None]
            if rest:
                done = await asyncio.gather(*(self.execute(batch.items[i], headers) for i in rest),
                                            return_exceptions=True)
                for i, outcome in zip(rest, done, strict=True):
                    outcomes[i] = outcome
            results: list[BatchItem[msgspec.Raw]] = []
            for outcome in outcomes:
                if isinstance(outcome, JetsourceError):
                    results.append(BatchItem(refused=ErrorBody(code=outcome.code, message=outcome.message,
                                                                field=outcome.field)))
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    results.append(BatchItem(accepted=msgspec.Raw(encode(outcome))))
            return BatchReply(results=results)

        async def serve(request: Request) -> None:
            await respond(request, lambda: run(request))

        return self._concurrency.wrap(serve)

    # ---- the command path ----------------------------------------------------------------

    def _answer_from_cache(self, command: C) -> msgspec.Struct | None:
        """The reply to a read-only command decided from a current cache entry with nothing in
        flight on its aggregate; None when it needs the full path (not cached, reloading,
        locked, or refused: a refusal from the cache is checked against the stream first)."""
        if not isinstance(command, self._spec.read_only):
            return None
        aggregate_id = self._spec.aggregate_id(command)
        if aggregate_id is None or aggregate_id in self._locks:
            return None
        entry = self._cache.get(aggregate_id)
        if entry is None or not entry.loaded:
            return None
        try:
            if self._spec.prepare is not None:
                command = self._spec.prepare(command)
            events = self._spec.decide(entry.state, command)
        except JetsourceError:
            return None  # answered per item on the full path
        if events:
            raise AssertionError(f"{type(command).__name__} is declared read-only but decided {events!r}")
        self._cache.move_to_end(aggregate_id)
        return self._spec.reply(aggregate_id, entry.state, entry.version)

    async def execute(self, command: C, headers: Mapping[str, str] | None) -> msgspec.Struct:
        """Decide and store one command; returns the reply Struct or raises a coded error."""
        meta = CommandMeta.from_headers(headers, self._ids)
        tracing.follow(meta.trace_id, meta.correlation_id)
        meta.check_deadline()
        body_key = getattr(command, "idempotency_key", None)
        if body_key and not meta.keyed:
            meta = dataclasses.replace(meta, command_id=body_key, keyed=True)
        if meta.keyed:
            meta = dataclasses.replace(meta, fingerprint=fingerprint(command))
        if self._spec.prepare is not None:
            command = self._spec.prepare(command)
        aggregate_id = self._spec.aggregate_id(command)
        fresh = False
        if aggregate_id is None:
            if meta.keyed:
                aggregate_id = keyed_id(meta.command_id)
            else:
                aggregate_id, fresh = self._new_id(), True
            command = self._spec.with_id(command, aggregate_id)
        subject = self._spec.ctx.events(aggregate_id)
        # The hot path is one `_execute`; only an aggregate that may be pending (a saga step)
        # waits, bounded by `settle_wait_s` in all and never past the caller's deadline.
        pending = self._spec.pending
        settle_by = 0.0
        try:
            reply = await self._execute(aggregate_id, subject, command, meta, fresh)
        except PendingError as refused:
            if pending is None:
                raise
            settle_by = self._settle_by(meta)
            reply = await self._decided_when_settled(aggregate_id, subject, command, meta, refused, settle_by)
        if pending is not None and (entry := self._cache.get(aggregate_id)) is not None and pending(entry.state):
            return await self._answered_when_settled(aggregate_id, subject, reply, settle_by or self._settle_by(meta))
        return reply

    async def _decided_when_settled(
        self, aggregate_id: str, subject: str, command: C, meta: CommandMeta, refused: PendingError,
        settle_by: float,
    ) -> msgspec.Struct:
        """A command the decider refused with PendingError (the aggregate waits on another
        context, e.g. a pay while the saga reserves): decided again once it is not pending."""
        while True:
            if not await self._settled(aggregate_id, subject, settle_by):
                raise refused
            try:
                return await self._execute(aggregate_id, subject, command, meta, False)
            except PendingError as again:
                refused = again

    async def _answered_when_settled(
        self, aggregate_id: str, subject: str, reply: msgspec.Struct, settle_by: float,
    ) -> msgspec.Struct:
        """A stored command that left its aggregate pending (a confirm, until the saga answers)
        is answered once it is not. A failure while waiting does not change what was stored:
        the reply says what it is now."""
        pending = self._spec.pending
        assert pending is not None
        try:
            await self._settled(aggregate_id, subject, settle_by)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the command is stored; answer with what is known
            return reply
        entry = self._cache.get(aggregate_id)
        if entry is not None and not pending(entry.state):
            return self._spec.reply(aggregate_id, entry.state, entry.version)
        return reply

    def _settle_by(self, meta: CommandMeta) -> float:
        """When a wait for a pending aggregate gives up (monotonic): the setting's bound, and
        early enough before the caller's deadline for the answer to reach it."""
        settle_by = time.monotonic() + self._spec.settle_wait_s
        if meta.deadline is not None:
            settle_by = min(settle_by, time.monotonic() + (meta.deadline - time.time()) - 0.2)
        return settle_by

    async def _settled(self, aggregate_id: str, subject: str, until: float) -> bool:
        """Wait until the aggregate is no longer pending, or `until` (monotonic) passes: woken
        by a command on it in this process, else reading its stream every 50 ms (the answer may
        come through another actor process)."""
        self._concurrency.give_back()  # waiting is not work: it must not hold back the answer it waits for
        while (remaining := until - time.monotonic()) > 0:
            changed = self._changed.setdefault(aggregate_id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, 0.05))
            if self._changed.get(aggregate_id) is changed and not changed._waiters:  # noqa: SLF001
                self._changed.pop(aggregate_id, None)
            entry = self._entry(aggregate_id, False)
            if not changed.is_set():  # not changed here: maybe through another process
                lock = self._locks.setdefault(aggregate_id, asyncio.Lock())
                try:
                    async with lock:
                        await self._catch_up(entry, subject)
                finally:
                    if not lock.locked() and not lock._waiters:  # noqa: SLF001 - drop idle locks
                        self._locks.pop(aggregate_id, None)
            if entry.loaded and not self._spec.pending(entry.state):  # type: ignore[misc]
                return True
        return False

    async def _execute(
        self, aggregate_id: str, subject: str, command: C, meta: CommandMeta, fresh: bool,
    ) -> msgspec.Struct:
        for attempt in range(self._max_retries + 1):
            entry = self._entry(aggregate_id, fresh)
            # Even a just-created aggregate is locked while its first events are stored: a
            # follow-up command (a worker starting a just-submitted task) must see them.
            lock = self._locks.get(aggregate_id)
            if lock is None:
                lock = self._locks[aggregate_id] = asyncio.Lock()
            try:
                async with lock:
                    reply = await self._attempt(aggregate_id, subject, entry, command, meta, attempt)
            finally:
                if not lock.locked() and not lock._waiters:  # noqa: SLF001 - drop idle locks
                    self._locks.pop(aggregate_id, None)
            if reply is not None:
                return reply
            fresh = False
            if attempt:
                # Lost twice or more to writers in other processes: a random pause before
                # reloading breaks the lockstep in which one side could lose every round.
                await asyncio.sleep(random.uniform(0, 0.002 * 2 ** attempt))
        raise ConflictError(f"aggregate {aggregate_id} kept changing; gave up after {self._max_retries} retries")

    async def _attempt(
        self, aggregate_id: str, subject: str, entry: _Entry, command: C, meta: CommandMeta, attempt: int,
        *, verified: bool = False,
    ) -> msgspec.Struct | None:
        """One try: None when a concurrent writer got there first (reload and retry)."""
        if not entry.loaded:
            await self._catch_up(entry, subject)
            verified = True
        seen = entry.commands.get(meta.command_id)
        if seen is not None:
            return await self._repeat(aggregate_id, subject, seen, meta)
        if meta.expected_version is not None and not self._version_matches(meta.expected_version, entry):
            if attempt == 0:
                await self._catch_up(entry, subject)
            if not self._version_matches(meta.expected_version, entry):
                expected = "any version" if meta.expected_version == ANY_VERSION else f"version {meta.expected_version}"
                raise PreconditionFailedError(
                    f"expected {expected}, but the aggregate is at {entry.version}"
                    + (" (it does not exist)" if entry.version == 0 else "")
                )
        try:
            events = self._spec.decide(entry.state, command)
        except (RuleViolationError, NotFoundError):
            if verified:
                raise
            # A refusal stores nothing, so nothing would conflict if the cache missed a write by
            # another actor process (a confirm elsewhere, then a pay here): check the stream first.
            version = entry.version
            await self._catch_up(entry, subject)
            if entry.version == version:
                raise
            return await self._attempt(aggregate_id, subject, entry, command, meta, attempt, verified=True)
        if not events:
            return self._spec.reply(aggregate_id, entry.state, entry.version)
        trace = correlation = None
        if self._spec.inherits_trace and entry.trace and isinstance(command, self._spec.inherits_trace):
            trace, correlation = entry.trace, entry.correlation or entry.trace
        new = self._new_events(aggregate_id, events, meta, trace, correlation)
        extra = (self._spec.outbox(self._one_part or self._spec.ctx.part_of(aggregate_id), entry.state, events)
                 if self._spec.outbox else ())
        meta.check_deadline()
        try:
            result = await self._store.append(subject, new, entry.version, extra, deadline=meta.deadline)
        except WrongExpectedSequence:
            entry.loaded = False
            return None
        state = entry.state
        for event in events:
            state = self._spec.evolve(state, event)
        entry.state = state
        entry.version = result.last_seq
        entry.commands[meta.command_id] = (result.last_seq, meta.fingerprint or "")
        entry.trace, entry.correlation = trace or meta.trace_id, correlation or meta.correlation_id
        if self.snapshots is not None:
            entry.since_snapshot += len(events)
            if entry.since_snapshot >= self._spec.snapshot_every:
                self._snapshot(aggregate_id, entry, new[-1].headers[h.EV_TIME])
        if self._changed and (changed := self._changed.pop(aggregate_id, None)) is not None:
            changed.set()
        if self._spec.after_commit is not None:
            await self._spec.after_commit(self._nc, state, events)
        return self._spec.reply(aggregate_id, state, result.last_seq)

    @staticmethod
    def _version_matches(expected: int, entry: _Entry) -> bool:
        return entry.version > 0 if expected == ANY_VERSION else entry.version == expected

    async def _repeat(self, aggregate_id: str, subject: str, seen: tuple[int, str], meta: CommandMeta) -> msgspec.Struct:
        """A command id seen before: the same request gets the answer it got first (the state
        right after its events, folded again from the stream); another request under the same
        key is refused. Events stored before requests were fingerprinted bind nothing."""
        seq, stored_fingerprint = seen
        if meta.keyed and stored_fingerprint and stored_fingerprint != meta.fingerprint:
            raise IdempotencyKeyReusedError(
                f"Idempotency-Key {meta.command_id!r} was used for a different request on this aggregate; "
                "use a new key for a new request", field=h.IDEMPOTENCY_KEY)
        state = self._spec.initial
        pending = self._spec.pending
        for stored in await self._store.load(subject):
            # A command answered once its aggregate settled (a confirm, once the saga answered)
            # is answered again with the state after the events that settled it.
            if stored.seq > seq and not (pending is not None and pending(state)):
                break
            if (event := self._event_of(stored)) is not None:
                state = self._spec.evolve(state, event)
                seq = max(seq, stored.seq)
        return self._spec.reply(aggregate_id, state, seq)

    def _new_id(self) -> str:
        return self._ids.next()

    def _new_events(
        self, aggregate_id: str, events: list[E], meta: CommandMeta, trace: str | None = None,
        correlation: str | None = None,
    ) -> list[NewEvent]:
        """The events with their headers; `trace`/`correlation` (inherited) replace the command's."""
        now = datetime.now(UTC).isoformat()
        base = {
            h.EV_COMMAND_ID: meta.command_id,
            h.EV_CORRELATION_ID: correlation or meta.correlation_id,
            h.EV_TRACE_ID: trace or meta.trace_id,
            h.EV_TIME: now,
        }
        if meta.causation_id:
            base[h.EV_CAUSATION_ID] = meta.causation_id
        if meta.fingerprint:
            base[h.EV_REQUEST_HASH] = meta.fingerprint
        if len(events) == 1 and not meta.keyed:
            return [NewEvent(encode(events[0]), base)]
        out = []
        for i, event in enumerate(events):
            headers = dict(base)
            if meta.keyed:
                headers[h.MSG_ID] = f"{aggregate_id}:{meta.command_id}:{i}"
            out.append(NewEvent(encode(event), headers))
        return out

    def _entry(self, aggregate_id: str, fresh: bool) -> _Entry:
        entry = self._cache.get(aggregate_id)
        if entry is not None:
            self._cache.move_to_end(aggregate_id)
            return entry
        entry = _Entry(state=self._spec.initial, version=0, commands={}, loaded=fresh)
        self._cache[aggregate_id] = entry
        if len(self._cache) > self._cache_size:
            self._evict()
        return entry

    def _evict(self) -> None:
        # Oldest first; an entry in use (its lock held) goes back to the end instead.
        for _ in range(len(self._cache)):
            if len(self._cache) <= self._cache_size:
                return
            key, entry = self._cache.popitem(last=False)
            if key in self._locks:
                self._cache[key] = entry

    async def _catch_up(self, entry: _Entry, subject: str, *, use_snapshot: bool = True) -> None:
        """Fold the events stored after the cached version into the cached state; an aggregate
        not loaded before starts from its snapshot, when it has a usable one."""
        aggregate_id = subject.rsplit(".", 1)[1]
        snapshot = None
        if entry.version == 0 and use_snapshot and self.snapshots is not None:
            snapshot = await self.snapshots.load(aggregate_id)
            if snapshot is not None:
                body = snapshot.body
                entry.state, entry.version, entry.since_snapshot = snapshot.state, body.version, 0
                entry.commands.update(body.commands)
                entry.trace, entry.correlation = body.trace, body.correlation
        state = entry.state
        folded = 0
        stored = None
        events = await self._store.load(subject, after_seq=entry.version)
        if snapshot is not None and not events and await self._store.last_seq(subject) != entry.version:
            # A snapshot of a version the stream does not end at (a stream restored or made
            # anew without dropping the snapshots): not this stream's; fold from the start.
            assert self.snapshots is not None
            self.snapshots.ignored += 1
            log.warning("ignoring the snapshot of %s at %d: the stream's last event is elsewhere", subject, entry.version)
            entry.state, entry.version, entry.commands = self._spec.initial, 0, {}
            await self._catch_up(entry, subject, use_snapshot=False)
            return
        for stored in events:
            event = self._event_of(stored)
            if event is not None:
                state = self._spec.evolve(state, event)
                command_id = stored.headers[h.EV_COMMAND_ID]
                entry.commands[command_id] = (stored.seq, stored.headers.get(h.EV_REQUEST_HASH, ""))
                entry.trace = stored.headers.get(h.EV_TRACE_ID, "")
                entry.correlation = stored.headers.get(h.EV_CORRELATION_ID, "")
                folded += 1
            entry.version = stored.seq  # the subject's last sequence, which the next append expects
        entry.state = state
        entry.loaded = True
        if folded and self.snapshots is not None and use_snapshot:
            entry.since_snapshot += folded
            if entry.since_snapshot >= self._spec.snapshot_every and stored is not None:
                self._snapshot(aggregate_id, entry, stored.headers.get(h.EV_TIME, stored.time))

    def _snapshot(self, aggregate_id: str, entry: _Entry, time: str) -> None:
        """Store the entry's state as the aggregate's snapshot, in the background: a snapshot is
        a cache, and a command never waits for one (nor fails with it)."""
        snapshots = self.snapshots
        assert snapshots is not None
        entry.since_snapshot = 0
        if len(self._snapshotting) >= MAX_SNAPSHOTS_IN_FLIGHT:
            return  # the server is slow to take them: this aggregate's next ones will do
        try:
            data = snapshots.body(aggregate_id, entry.state, entry.version, time, entry.commands, entry.trace,
                                  entry.correlation)
        except (TypeError, msgspec.EncodeError) as exc:
            log.error("%s: the state cannot be encoded, so no snapshots are taken: %s", self._spec.ctx.name, exc)
            self.snapshots = None
            return
        task = asyncio.get_running_loop().create_task(snapshots.save(aggregate_id, data, entry.version))
        self._snapshotting.add(task)
        task.add_done_callback(self._snapshotting.discard)

    async def snapshot_now(self, aggregate_id: str) -> int:
        """Fold the aggregate from its stream (from its snapshot, if any) and store its snapshot
        now; returns the version it folds up to (0: no events). For `jetsource snapshots take`."""
        if self.snapshots is None:
            raise ValueError(f"{self._spec.ctx.name} takes no snapshots (snapshot_every is 0)")
        entry = _Entry(state=self._spec.initial, version=0, commands={})
        subject = self._spec.ctx.events(aggregate_id)
        await self._catch_up(entry, subject)
        if entry.version == 0:
            return 0
        stored = await self._store.load(subject, after_seq=entry.version - 1)
        time = stored[-1].headers.get(h.EV_TIME, stored[-1].time) if stored else ""
        data = self.snapshots.body(aggregate_id, entry.state, entry.version, time, entry.commands, entry.trace,
                                   entry.correlation)
        if not await self.snapshots.save(aggregate_id, data, entry.version):
            raise RuntimeError(f"the snapshot of {self._spec.ctx.name} {aggregate_id} was not stored (see the log)")
        return entry.version

    def _event_of(self, stored: StoredEvent) -> E | None:
        return event_of(self._event_decoder, self._spec.event_id, stored)

    async def load(self, aggregate_id: str, *, use_snapshot: bool = True) -> tuple[S, int]:
        """The current state and version of an aggregate, straight from the stream (from its
        snapshot and the events after it, unless told not to use one)."""
        entry = _Entry(state=self._spec.initial, version=0, commands={})
        await self._catch_up(entry, self._spec.ctx.events(aggregate_id), use_snapshot=use_snapshot)
        return entry.state, entry.version


