"""The projector: a durable JetStream consumer per projection. Each batch of events is applied
and its checkpoint (last stream sequence) stored in the same PostgreSQL transaction, then acked.
Events at or below the checkpoint are skipped, so redelivery never double-applies.

An event the projection cannot decode (or of a newer schema version) or cannot apply is parked
(`bus.parking`) and the projection moves past it: one poison event never stops a read model."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import zlib
from datetime import UTC, datetime
from typing import Any, Protocol

import asyncpg
import msgspec
from nats.errors import Error as NatsError
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError as JsNotFoundError

from bus import metrics, parking
from bus.errors import DeadlineError, UnavailableError
from bus.eventstore import EventStore, StoredEvent, appended
from bus.pull import Puller, position
from bus.subjects import EV_TIME, Context, Parked
from projections.schema import database_down

log = logging.getLogger(__name__)
# After a partial batch the projector waits a little for more events, so each transaction (and
# each fetch) carries more of them: 10 ms in a trickle, `busy_linger_s` (default 100 ms) under
# load (a batch of 100 or more), where the projector competes with the write path for the same
# cores: 10 -> 50 ms measured +12 % tasks/s end to end, 50 -> 100 ms +9 %, 100 -> 200 ms nothing
# beyond the noise. It bounds the extra read-your-writes delay.
LINGER_S = 0.01
BUSY_BATCH = 100


class Rewound(Exception):
    """The stored checkpoint went backwards (a rebuild): restart the consumer from it."""


class UnknownVersionError(Exception):
    """A stored event of a schema version newer than this code knows (a newer writer stored it)."""


class ForeignMessageError(Exception):
    """A message on an event subject that no actor appended there (a reply NATS was made to store)."""


class _LockLost(ConnectionError):
    """The connection holding the advisory lock died (PostgreSQL restarted): take it again."""


class _ApplyFailed(Exception):
    """Applying a batch failed deterministically: apply it again one event at a time."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def transient(exc: BaseException) -> bool:
    """Failures that say nothing about the events: a dependency is away, overloaded or unfit
    (see `database_down`). The batch is retried whole after a back-off; anything else that
    apply raises is the event's fault."""
    return database_down(exc) or isinstance(exc, UnavailableError | DeadlineError | NatsError)


# What decoding raises for bytes this code cannot read: not JSON, the wrong shape, an unknown
# `type` tag (msgspec.ValidationError is a DecodeError), or a newer schema version.
UNDECODABLE: tuple[type[Exception], ...] = (msgspec.DecodeError, UnknownVersionError, ForeignMessageError)

_known_versions: dict[type, int] = {}


def _known_version(cls: type) -> int:
    """The `v` default of an event Struct: the newest schema version this code writes."""
    known = _known_versions.get(cls)
    if known is None:
        defaults = {f.name: f.default for f in msgspec.structs.fields(cls)} if hasattr(cls, "__struct_fields__") else {}
        default = defaults.get("v")
        known = _known_versions[cls] = default if isinstance(default, int) else sys.maxsize
    return known


def decode_event(projection: Projection, stored: StoredEvent) -> Any:
    """Decode with the projection's decoder; raises one of UNDECODABLE for what it cannot read
    and for what no actor appended (see `bus.eventstore.appended`)."""
    if not appended(stored.headers):
        raise ForeignMessageError("not an appended event: no command id (a reply NATS was made to store here)")
    event = projection.decode(stored)
    v = getattr(event, "v", None)
    if v is not None and v > (_known_versions.get(type(event)) or _known_version(type(event))):
        raise UnknownVersionError(f"schema version {v} of {type(event).__name__} is newer than this code knows")
    named = projection.aggregate_id(event)
    if named is not None and not stored.subject.endswith("." + named):
        raise ForeignMessageError(f"an event of {named} copied to {stored.subject}")
    return event


def event_time(stored: StoredEvent) -> datetime:
    """When the event was stored, as its `Jetsource-Time` header says (else the stream's time;
    now, if neither parses): what read models record as `updated_at` and the like."""
    raw = stored.headers.get(EV_TIME) or stored.time
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return datetime.now(UTC)


class Projection(Protocol):
    """A read model: decodes stored events and applies a batch inside a transaction."""

    name: str

    def decode(self, stored: StoredEvent) -> Any: ...

    def aggregate_id(self, event: Any) -> str | None:
        """The aggregate a decoded event names (None: the read model does not say)."""
        ...

    async def apply(self, conn: asyncpg.Connection, batch: list[tuple[StoredEvent, Any]]) -> None: ...


class Checkpoints:
    """Projection checkpoints, with in-process notification for read-your-writes waits."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._known: dict[str, int] = {}
        self._changed = asyncio.Condition()

    async def get(self, name: str) -> int:
        value = await self._pool.fetchval("SELECT last_seq FROM projection_checkpoints WHERE name = $1", name)
        seq = int(value or 0)
        self._known[name] = seq
        return seq

    async def advanced(self, name: str, seq: int) -> None:
        self._known[name] = seq
        async with self._changed:
            self._changed.notify_all()

    async def wait(self, name: str, seq: int, timeout: float) -> bool:
        """Wait until the projection has applied `seq`; False if it did not within timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._known.get(name, 0) >= seq or await self.get(name) >= seq:
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                async with self._changed:
                    await asyncio.wait_for(self._changed.wait(), min(remaining, 0.02))
            except TimeoutError:
                pass


class Projector:
    """Runs one projection from one stream (a context's, or one partition's: `ctx` is that
    partition's view) into PostgreSQL; its checkpoint is `ctx.checkpoint(projection.name)`."""

    def __init__(
        self,
        nc: Client,
        pool: asyncpg.Pool,
        ctx: Context,
        projection: Projection,
        checkpoints: Checkpoints,
        *,
        batch: int = 500,
        busy_linger_s: float = 0.1,
        parked: Parked | None = None,
        durable_suffix: str = "",
        direct: bool = False,
    ) -> None:
        """`durable_suffix`: a second projector of the same projection and stream (a blue/green
        rebuild's copy, writing to its own schema) has its own consumer and lock; it parks
        under the projection's reader name all the same. `direct`: read the stream by batched
        Direct Get instead of a durable consumer (a rebuild's copy: no consumer to keep, and
        each batch asked for while the one before is applied)."""
        self._nc = nc
        self._pool = pool
        self._ctx = ctx
        self._projection = projection
        self._checkpoints = checkpoints
        self._batch = batch
        self.busy_linger_s = busy_linger_s
        self._parked = parked or Parked(ctx.namespace)
        self._stopping = asyncio.Event()
        self._lock_conn: asyncpg.Connection | None = None
        self._outage: str | None = None
        self._backoff = 0.1
        self.checkpoint = 0
        self.pending = 0  # events the consumer held after the last batch: the lag
        self.name = ctx.checkpoint(projection.name)  # its checkpoint's name
        self.stream = ctx.stream
        self._suffix = durable_suffix
        self._direct = direct
        self.parked_seqs: set[tuple[str, int]] = set()  # (stream, seq) of what it parked
        label = self.name + durable_suffix
        self._m_events = metrics.PROJECTED_EVENTS.labels(label)
        self._m_checkpoint = metrics.PROJECTION_CHECKPOINT.labels(label)
        self._m_pending = metrics.PROJECTION_PENDING.labels(label)

    @property
    def reader(self) -> str:
        """The name it parks under: the projection's."""
        return self._ctx.consumer(self._projection.name)

    @property
    def durable(self) -> str:
        return self._ctx.consumer(self._projection.name) + self._suffix

    async def _bind(self) -> Puller:
        """(Re)create the durable consumer at the stored checkpoint and pull from it.

        The database is the authority on progress. Starting the consumer afresh on every bind
        also takes back what an earlier attempt (a failed batch here, or a crashed projector)
        had been delivered but not applied: left in place, those events would come back only
        after the ack wait, behind newer ones that move the checkpoint past them, and would
        then be skipped as applied.
        """
        js = self._nc.jetstream()
        await self._start_checkpoint()
        with contextlib.suppress(JsNotFoundError):
            await js.delete_consumer(self._ctx.stream, self.durable)
        await js.add_consumer(
            self._ctx.stream,
            ConsumerConfig(
                durable_name=self.durable,
                description=f"jetsource projection {self._projection.name}",
                filter_subject=self._ctx.events_wildcard,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self.checkpoint + 1,
                ack_policy=AckPolicy.ALL,
                ack_wait=60,
                max_ack_pending=20_000,
                max_deliver=-1,
            ),
        )
        return Puller(self._nc, self._ctx.stream, self.durable, raw=True, prefetch=True)

    async def _start_checkpoint(self) -> None:
        await self._pool.execute(
            "INSERT INTO projection_checkpoints (name, last_seq) VALUES ($1, 0) ON CONFLICT (name) DO NOTHING",
            self.name,
        )
        self.checkpoint = await self._checkpoints.get(self.name)

    async def run(self) -> None:
        """Consume until stop() is called; failures back off and retry (nothing is skipped
        silently: what cannot be decoded or applied is parked).

        One projector per projection is active at a time (a PostgreSQL advisory lock); any
        others wait as hot standbys and take over when the active one goes away. An outage of
        PostgreSQL (or NATS) is waited out, logged once: the lock is taken again and the
        projection resumes from its stored checkpoint.
        """
        key = zlib.crc32(f"jetsource:{self._ctx.stream}:{self._projection.name}{self._suffix}".encode())
        while not self._stopping.is_set():
            try:
                async with self._pool.acquire() as lock_conn:
                    while not await lock_conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
                        if await self._sleep(1.0):
                            return
                    self._lock_conn = lock_conn
                    try:
                        await self._run_active()
                    finally:
                        self._lock_conn = None
                        try:
                            await lock_conn.execute("SELECT pg_advisory_unlock($1)", key)
                        except Exception as exc:  # noqa: BLE001 - a dead connection took the lock with it
                            if not transient(exc):
                                raise
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not transient(exc):
                    raise
                if self._outage is None:
                    self._outage = parking.describe(exc)
                    log.warning("projection %s: %s; retrying until it is back", self.name, self._outage)
                if await self._sleep(self._backoff):
                    return
                self._backoff = min(self._backoff * 2, 5.0)

    def _recovered(self) -> None:
        self._backoff = 0.1
        if self._outage is not None:
            log.info("projection %s: resuming from checkpoint %d after: %s", self.name, self.checkpoint,
                     self._outage)
            self._outage = None

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped; True when stopping."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass
        return self._stopping.is_set()

    async def _run_active(self) -> None:
        while not self._stopping.is_set():
            try:
                if self._direct:
                    await self._start_checkpoint()
                    self._recovered()
                    await self._consume_direct()
                    continue
                sub = await self._bind()
                self._recovered()
                try:
                    await self._consume(sub)
                finally:
                    await sub.close()
            except asyncio.CancelledError:
                raise
            except Rewound as exc:
                log.warning("projection %s: %s; restarting from there", self.name, exc)
            except Exception as exc:
                if transient(exc):
                    raise  # run() waits the outage out, then takes the lock again
                log.exception("projection %s failed; retrying in %.1fs", self.name, self._backoff)
                await self._sleep(self._backoff)
                self._backoff = min(self._backoff * 2, 5.0)

    async def _consume(self, sub: Puller) -> None:
        while not self._stopping.is_set():
            if self._lock_conn is not None and self._lock_conn.is_closed():
                raise _LockLost("the connection holding the projection's lock was lost")
            msgs = await sub.pull(self._batch, wait_s=0.5)
            if not msgs:
                self.pending = 0
                self._m_pending.set(0)
                # Idle: notice a rebuild (checkpoint reset) without waiting for new events.
                if await self._checkpoints.get(self.name) < self.checkpoint:
                    raise Rewound("checkpoint was reset")
                continue
            batch: list[tuple[StoredEvent, Any]] = []
            poison: list[tuple[StoredEvent, BaseException]] = []
            last_seq = self.checkpoint
            for msg in msgs:
                at = position(msg)
                seq = at.stream_seq
                if seq <= self.checkpoint:
                    continue  # applied already (redelivery)
                headers = msg.headers or {}
                # The stream's time only where the event has none of its own (`event_time`).
                stored = StoredEvent(subject=msg.subject, seq=seq, time=headers.get(EV_TIME) or at.time, data=msg.data,
                                     headers=headers)
                try:
                    batch.append((stored, decode_event(self._projection, stored)))
                except UNDECODABLE as exc:
                    poison.append((stored, exc))
                last_seq = max(last_seq, seq)
            self.pending = at.pending
            self._m_pending.set(at.pending)  # what the consumer holds after this batch's last event
            if not await self._store(batch, poison, last_seq):
                return
            if msgs:
                await msgs[-1].ack()
            if len(msgs) < self._batch:
                await asyncio.sleep(self.busy_linger_s if len(msgs) >= BUSY_BATCH else LINGER_S)

    async def _consume_direct(self) -> None:
        """Fold the stream read by Direct Get batches of every subject (the events' filter,
        applied by the server from an old position over many subjects, cost it ~30 µs an
        event; here outbox and queue messages are skipped instead), each batch asked for
        while the one before it is applied; idle, look again every `LINGER_S`."""
        store = EventStore(self._nc, self._ctx.stream)
        wildcard = ">"
        events_prefix = self._ctx.events_wildcard[:-1]
        ahead: asyncio.Future[list[StoredEvent]] | None = None
        read_from = self.checkpoint + 1  # the checkpoint is the last *event* applied; this, the next message
        try:
            while not self._stopping.is_set():
                if self._lock_conn is not None and self._lock_conn.is_closed():
                    raise _LockLost("the connection holding the projection's lock was lost")
                if ahead is None:
                    ahead = asyncio.ensure_future(store.batch(wildcard, read_from, self._batch))
                messages, ahead = await ahead, None
                if not messages:
                    await asyncio.sleep(LINGER_S)
                    continue
                read_from = messages[-1].seq + 1
                ahead = asyncio.ensure_future(store.batch(wildcard, read_from, self._batch))
                batch: list[tuple[StoredEvent, Any]] = []
                poison: list[tuple[StoredEvent, BaseException]] = []
                last_seq = self.checkpoint
                for stored in messages:
                    if stored.seq <= self.checkpoint or not stored.subject.startswith(events_prefix):
                        continue
                    last_seq = stored.seq
                    try:
                        batch.append((stored, decode_event(self._projection, stored)))
                    except UNDECODABLE as exc:
                        poison.append((stored, exc))
                if not await self._store(batch, poison, last_seq):
                    return
        finally:
            if ahead is not None:
                ahead.cancel()
                with contextlib.suppress(BaseException):
                    await ahead
            await store.close()

    async def _store(self, batch: list[tuple[StoredEvent, Any]], poison: list[tuple[StoredEvent, BaseException]],
                     last_seq: int) -> bool:
        """Commit a batch (up to a hold, waiting for its release for the rest); False when
        stopping meanwhile."""
        while last_seq > self.checkpoint:
            try:
                applied, held_at = await self._commit(batch, poison, last_seq, one_by_one=False)
            except _ApplyFailed as failed:
                log.warning("projection %s: a batch of %d events failed (%s); applying them one at a time",
                            self.name, len(batch), parking.describe(failed.cause))
                applied, held_at = await self._commit(batch, poison, last_seq, one_by_one=True)
            reached = last_seq if held_at is None else min(last_seq, max(held_at, self.checkpoint))
            self.checkpoint = reached
            await self._checkpoints.advanced(self.name, reached)
            self._m_events.inc(applied)
            self._m_checkpoint.set(reached)
            if reached < last_seq:  # held (a blue/green rebuild): the rest waits until it is released
                batch = [(e, ev) for e, ev in batch if e.seq > reached]
                poison = [(e, why) for e, why in poison if e.seq > reached]
                if not await self._until_released(reached):
                    return False
        return True

    async def _until_released(self, at: int) -> bool:
        """Wait while this read model is held at `at` (a blue/green rebuild compares and swaps
        it meanwhile); False when stopping. Afterwards, its connections are renewed: the tables
        it writes may be new ones."""
        while True:
            row = await self._pool.fetchrow("SELECT hold_at, hold_by FROM projection_checkpoints WHERE name = $1",
                                            self.name)
            if row is None or row["hold_at"] is None or row["hold_at"] > at:
                break
            if row["hold_by"] is not None and await self._holder_gone(row["hold_by"]):
                await self._pool.execute("UPDATE projection_checkpoints SET hold_at = NULL, hold_by = NULL "
                                         "WHERE name = $1 AND hold_by = $2", self.name, row["hold_by"])
                log.warning("projection %s: the rebuild holding it at %d is gone; going on", self.name, at)
                break
            if await self._sleep(0.05):
                return False
        await self._pool.expire_connections()
        return True

    async def _holder_gone(self, key: int) -> bool:
        """Whether the rebuild that set a hold has let go of its advisory lock (it ended, or its
        process or connection died)."""
        async with self._pool.acquire() as conn:
            free = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))
            if free:
                await conn.execute("SELECT pg_advisory_unlock($1)", key)
            return free

    async def _commit(
        self, batch: list[tuple[StoredEvent, Any]], poison: list[tuple[StoredEvent, BaseException]], last_seq: int,
        *, one_by_one: bool,
    ) -> tuple[int, int | None]:
        """Apply the batch, park the poison and store the checkpoint in one transaction; returns
        how many events were applied, and the sequence the read model is held at, if it is (a
        blue/green rebuild): then only the events up to it were.

        Whole, a deterministic failure of apply raises _ApplyFailed (rolling everything back).
        One by one, each event is applied in a savepoint and those that fail are parked too.
        Every park is acknowledged by JetStream before the checkpoint moves past the event.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            # The stored checkpoint, locked, is the authority: a concurrent projector may have
            # moved it on (skip what it applied) or a rebuild reset it.
            row = await conn.fetchrow(
                "SELECT last_seq, hold_at FROM projection_checkpoints WHERE name = $1 FOR UPDATE", self.name)
            applied, held_at = (int(row["last_seq"]), row["hold_at"]) if row is not None else (0, None)
            if applied < self.checkpoint:
                raise Rewound(f"checkpoint went back from {self.checkpoint} to {applied}")
            if held_at is not None:
                if held_at <= applied:
                    return 0, held_at
                last_seq = min(last_seq, held_at)
            batch = [(e, ev) for e, ev in batch if applied < e.seq <= last_seq]
            failed = [(e, why) for e, why in poison if applied < e.seq <= last_seq]
            done = len(batch)
            if batch and not one_by_one:
                try:
                    await self._projection.apply(conn, batch)
                except Exception as exc:  # the projector's catch-all: an outage, or this batch holds poison
                    if transient(exc):
                        raise
                    raise _ApplyFailed(exc) from exc
            elif batch:
                for item in batch:
                    try:
                        async with conn.transaction():  # a savepoint: a failure undoes this event only
                            await self._projection.apply(conn, [item])
                    except Exception as exc:  # the event's fault (park it, apply the others), or an outage
                        if transient(exc):
                            raise
                        failed.append((item[0], exc))
                        done -= 1
            for stored, why in sorted(failed, key=lambda f: f[0].seq):
                await parking.park(
                    self._nc, self._parked, reader=self.reader, stream=self._ctx.stream, seq=stored.seq,
                    subject=stored.subject, data=stored.data, headers=stored.headers, error=why,
                )
                self.parked_seqs.add((self._ctx.stream, stored.seq))
            await conn.execute(
                """INSERT INTO projection_checkpoints (name, last_seq, updated_at) VALUES ($1, $2, now())
                   ON CONFLICT (name) DO UPDATE SET last_seq = GREATEST(projection_checkpoints.last_seq, EXCLUDED.last_seq),
                   updated_at = now()""",
                self.name, last_seq,
            )
        return done, held_at

    @property
    def stopping(self) -> bool:
        """Whether stop() was called."""
        return self._stopping.is_set()

    def stop(self) -> None:
        self._stopping.set()
