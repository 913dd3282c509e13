"""The event store on JetStream: atomic, optimistic, deduplicated appends with group commit,
aggregate loads through batched Direct Get, and stream reads from a sequence or a time.

Group commit: with `sync_interval: always` every JetStream publish costs an fsync, which caps
single appends near 4–5k/s on this class of disk. Concurrent commands' appends are therefore
coalesced into one atomic batch (stream `allow_atomic`), which the server validates message by
message (each aggregate's first event carries `Nats-Expected-Last-Subject-Sequence`) and
stores with a single sync, all or none. If the batch is rejected (one stale writer, one
duplicate id) every command in it is retried alone so only the guilty one fails.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.nuid import NUID

from bus import metrics
from bus import subjects as h
from bus.connection import RawHeaders, parse_headers, request, subscribe_raw, unsubscribe_raw
from bus.errors import DeadlineError, UnavailableError

log = logging.getLogger(__name__)

ERR_WRONG_LAST_SEQUENCE = 10071
ERR_BATCH_WRONG_LAST_SEQUENCE = 10164
ERR_BATCH_DUPLICATE_MSG_ID = 10201
_CONFLICT_CODES = {ERR_WRONG_LAST_SEQUENCE, ERR_BATCH_WRONG_LAST_SEQUENCE, ERR_BATCH_DUPLICATE_MSG_ID}
MAX_ATOMIC_BATCH = 1000  # server limit on messages per atomic batch


class WrongExpectedSequence(Exception):
    """The aggregate moved on since it was loaded (or the batch repeated a message id)."""


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    count: int = 0
    error: _ApiError | None = None


_ack_decoder = msgspec.json.Decoder(_PubAck)


def appended(headers: Mapping[str, str]) -> bool:
    """Whether a message on an event subject may be an event an actor appended, not something
    NATS was made to put there. Any client that may send a request chooses its reply subject,
    and JetStream answers there whatever the client's permissions: a Direct Get answer, a stream
    info or a pull's status aimed at `orders.events.<id>` is stored like an event. Those carry no
    command id; appended events always do. (A copy of another stream's event keeps its headers:
    readers also check that the event names the subject's aggregate. The server refuses to store
    a stream's answers into that same stream, measured on nats-server 2.15.)"""
    return h.EV_COMMAND_ID in headers


@dataclass(slots=True)
class NewEvent:
    """An encoded event about to be appended, with its headers."""

    data: bytes
    headers: dict[str, str]


@dataclass(slots=True, frozen=True)
class StoredEvent:
    """An event as stored in JetStream."""

    subject: str
    seq: int
    time: str
    data: bytes
    headers: Mapping[str, str]


@dataclass(slots=True, frozen=True)
class AppendResult:
    """Where a command's events landed: stream sequences first..last."""

    first_seq: int
    last_seq: int
    duplicate: bool = False


@dataclass(slots=True)
class _Load:
    """One load in flight: the events so far; `batch` resolves at the end of each Direct Get
    batch with the next sequence to ask for (None: that was all)."""

    subject: str
    batch: asyncio.Future[int | None]
    events: list[StoredEvent] = field(default_factory=list)


@dataclass(slots=True)
class _Pending:
    subject: str
    events: list[NewEvent]
    expected_seq: int | None
    extra: list[tuple[str, bytes]]
    future: asyncio.Future[AppendResult] = field(repr=False)
    deadline: float | None = None  # epoch seconds: past it, the command is dropped unstored

    def messages(self, bare: str | None = None) -> list[tuple[str, NewEvent, int | None]]:
        out = [(self.subject, event, self.expected_seq if i == 0 else None) for i, event in enumerate(self.events)]
        if self.extra:
            # An outbox copy carries its command's id (readers tell by it that an actor appended
            # it), trace id, and its correlation (when not the trace id, its default) and
            # causation ids, so what a process manager does about it continues the same trace.
            # Messages under `bare` (work items) carry only the trace (and a correlation that is
            # not the trace): what a worker's log lines and handler need of it, and no more bytes
            # of storage and parsing per task.
            first = self.events[0].headers
            headers = {name: first[name] for name in _COPIED if name in first}
            if h.EV_CORRELATION_ID in headers and headers[h.EV_CORRELATION_ID] == headers.get(h.EV_TRACE_ID):
                del headers[h.EV_CORRELATION_ID]
            traced = {name: headers[name] for name in _TRACED if name in headers} if bare else headers
            out += [(subject, NewEvent(data, traced if bare and subject.startswith(bare) else headers), None)
                    for subject, data in self.extra]
        return out


_COPIED = (h.EV_COMMAND_ID, h.EV_TRACE_ID, h.EV_CORRELATION_ID, h.EV_CAUSATION_ID)
_TRACED = (h.EV_TRACE_ID, h.EV_CORRELATION_ID)


def _hpub(subject: str, headers: dict[str, str], data: bytes) -> bytes:
    """One NATS HPUB frame (no reply subject)."""
    hdr = "NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    head = hdr.encode()
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (subject.encode(), len(head), len(head) + len(data), head, data)


class EventStore:
    """Appends to and reads from one event stream."""

    def __init__(
        self,
        nc: Client,
        stream: str,
        *,
        timeout: float = 5.0,
        max_batch: int = 256,
        max_inflight_batches: int = 8,
        bare: str | None = None,
    ) -> None:
        """`bare`: a subject prefix (a work queue's) whose extra messages are stored with only
        their trace headers."""
        self._nc = nc
        self.stream = stream
        self._bare = bare
        self._timeout = timeout
        self._max_batch = min(max_batch, MAX_ATOMIC_BATCH)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._slots = asyncio.Semaphore(max_inflight_batches)
        self._wake = asyncio.Event()
        self._nuid = NUID()
        self._committer: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self.batches_committed = 0
        self.batches_split = 0
        # Writes to the stream (an atomic batch or a single publish) and the commands they stored:
        # their ratio is the group commit's batch size (the dashboard's, from the actor's $SRV stats).
        self.writes = 0
        self.commands_committed = 0
        self._gets: dict[str, _Load] = {}  # loads in flight, by reply token
        self._gets_sub: Subscription | None = None
        self._gets_prefix = ""
        self._m_commands = metrics.APPENDED_COMMANDS.labels(stream)
        self._m_batches = metrics.APPEND_BATCHES.labels(stream)
        self._m_batch_messages = metrics.APPEND_BATCH_MESSAGES.labels(stream)
        self._m_splits = metrics.APPEND_SPLITS.labels(stream)
        self._m_batch_seconds = metrics.APPEND_BATCH_SECONDS.labels(stream)

    # ---- appends -------------------------------------------------------------------------

    async def append(
        self,
        subject: str,
        events: Sequence[NewEvent],
        expected_seq: int | None,
        extra: Sequence[tuple[str, bytes]] = (),
        *,
        deadline: float | None = None,
    ) -> AppendResult:
        """Append one command's events atomically (with `extra` messages on other subjects of
        the stream, e.g. work items); raises WrongExpectedSequence on conflict, and
        DeadlineError (nothing stored) if the batch would go out after `deadline`."""
        if not events:
            raise ValueError("nothing to append")
        if self._committer is None or self._committer.done():
            self._committer = asyncio.get_running_loop().create_task(self._commit_loop())
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(subject, list(events), expected_seq, list(extra), future, deadline))
        self._wake.set()
        return await future

    async def close(self) -> None:
        """Finish in-flight batches, then stop the committer (and the loads' subscription)."""
        if self._gets_sub is not None and self._nc.is_connected:
            with contextlib.suppress(Exception):
                await unsubscribe_raw(self._nc, self._gets_sub)
            self._gets_sub = None
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._committer is not None:
            self._committer.cancel()
            try:
                await self._committer
            except asyncio.CancelledError:
                pass

    async def _commit_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._slots.acquire()
                batch = self._take()
                task = asyncio.get_running_loop().create_task(self._commit(batch))
                self._inflight.add(task)
                task.add_done_callback(self._commit_done)

    def _commit_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._slots.release()

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        count = 0
        seen: set[str] = set()
        now = time.time()
        while self._queue:
            item = self._queue[0]
            if item.deadline is not None and now > item.deadline:
                # Its caller has stopped waiting (the queue backed up): never store it late.
                self._queue.popleft()
                if not item.future.done():
                    item.future.set_exception(
                        DeadlineError("the command's deadline passed before it was stored; nothing was stored"))
                continue
            n = len(item.events) + len(item.extra)
            # One command per aggregate per batch: the server checks the expected
            # sequence against the stream as it was before the batch.
            if batch and (count + n > self._max_batch or item.subject in seen):
                break
            self._queue.popleft()
            batch.append(item)
            seen.add(item.subject)
            count += n
        return batch

    async def _commit(self, batch: list[_Pending]) -> None:
        try:
            if not batch:
                return
            if len(batch) == 1:
                await self._append_alone(batch[0])
                return
            messages = [m for item in batch for m in item.messages(self._bare)]
            sent = time.perf_counter()
            try:
                ack = await self._publish_atomic(messages)
            except WrongExpectedSequence:
                self.batches_split += 1
                self._m_splits.inc()
                await asyncio.gather(*(self._append_alone(item) for item in batch))
                return
            except Exception as exc:  # noqa: BLE001 - handed to every waiting command
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                return
            self.batches_committed += 1
            self.writes += 1
            self.commands_committed += len(batch)
            self._m_batch_seconds.observe(time.perf_counter() - sent)
            self._m_batches.inc()
            self._m_batch_messages.observe(len(messages))
            self._m_commands.inc(len(batch))
            seq = ack.seq - len(messages) + 1
            for item in batch:
                if not item.future.done():
                    item.future.set_result(AppendResult(seq, seq + len(item.events) - 1))
                seq += len(item.events) + len(item.extra)
        except asyncio.CancelledError:
            for item in batch:
                if not item.future.done():
                    item.future.cancel()
            raise

    async def _append_alone(self, item: _Pending) -> None:
        if item.deadline is not None and time.time() > item.deadline:  # a split batch's retry, late
            if not item.future.done():
                item.future.set_exception(
                    DeadlineError("the command's deadline passed before it was stored; nothing was stored"))
            return
        try:
            if len(item.events) == 1 and not item.extra:
                ack = await self._publish_one(item.subject, item.events[0], item.expected_seq)
                result = AppendResult(ack.seq, ack.seq, ack.duplicate)
            else:
                messages = item.messages(self._bare)
                ack = await self._publish_atomic(messages)
                first = ack.seq - len(messages) + 1
                result = AppendResult(first, first + len(item.events) - 1)
        except Exception as exc:  # noqa: BLE001 - delivered to the waiting command
            if not item.future.done():
                item.future.set_exception(exc)
            return
        self._m_commands.inc()
        self.writes += 1
        self.commands_committed += 1
        if not item.future.done():
            item.future.set_result(result)

    async def _publish_one(self, subject: str, event: NewEvent, expected: int | None) -> _PubAck:
        headers = event.headers
        if expected is not None:
            headers = {**headers, h.EXPECTED_LAST_SUBJECT_SEQ: str(expected)}
        return await self._request(subject, event.data, headers)

    async def _publish_atomic(self, messages: list[tuple[str, NewEvent, int | None]]) -> _PubAck:
        batch_id = self._nuid.next().decode()
        last = len(messages)
        frames = bytearray()
        for n, (subject, event, expected) in enumerate(messages, 1):
            headers = {**event.headers, h.BATCH_ID: batch_id, h.BATCH_SEQ: str(n)}
            if expected is not None:
                headers[h.EXPECTED_LAST_SUBJECT_SEQ] = str(expected)
            if n == last:
                if frames:
                    await self._write_frames(bytes(frames))
                headers[h.BATCH_COMMIT] = "1"
                return await self._request(subject, event.data, headers)
            frames += _hpub(subject, headers, event.data)
        raise AssertionError("unreachable: empty batch")

    async def _write_frames(self, frames: bytes) -> None:
        # Profiling showed nats-py spending most of a batch in per-message publish and
        # writelines; the batch's leading messages go out as one pre-encoded write. Header
        # values are ours or validated at the edge of the runtime (no CR/LF).
        nc = self._nc
        if not nc.is_connected:
            raise UnavailableError("not connected to NATS")
        await nc._send_command(frames)  # noqa: SLF001 - one write per batch, see above
        await nc._flush_pending()  # noqa: SLF001

    async def _request(self, subject: str, data: bytes, headers: dict[str, str]) -> _PubAck:
        try:
            msg = await request(self._nc, subject, data, timeout=self._timeout, headers=headers)
        except NatsTimeoutError:
            raise DeadlineError("the event store did not acknowledge in time; outcome unknown") from None
        except NoRespondersError:
            raise UnavailableError(f"no stream stores {subject!r} (is JetStream up?)") from None
        ack = _ack_decoder.decode(msg.data)
        if ack.error is not None:
            if ack.error.err_code in _CONFLICT_CODES:
                raise WrongExpectedSequence(ack.error.description)
            raise UnavailableError(f"event store rejected the append: {ack.error.description}")
        return ack

    # ---- reads ---------------------------------------------------------------------------

    async def load(self, subject: str, after_seq: int = 0) -> list[StoredEvent]:
        """All events of one subject after a sequence, via batched Direct Get."""
        out: list[StoredEvent] = []
        async for batch in self._batches(subject, after_seq + 1):
            out += batch
        return out

    async def _batches(self, subject: str, seq: int = 1, since: datetime | None = None,
                       size: int = 1000) -> AsyncGenerator[list[StoredEvent], None]:
        """The messages of `subject` (a wildcard too) from a sequence or a time, in stream
        order, a Direct Get batch at a time.

        The answers come to one subscription per store (an inbox wildcard, made on first use),
        routed to each reader by the last token of its reply subject, and are collected by a
        raw handler (`bus.connection.subscribe_raw`): a subscription and a `next_msg` per load
        cost ~5 event-loop turns per event (1,000 events took 22 ms, most of it in the loop)."""
        loop = asyncio.get_running_loop()
        if self._gets_sub is None or self._gets_sub._closed:  # noqa: SLF001 - made again after a close
            self._gets_prefix = self._nc.new_inbox() + "."
            self._gets_sub = await subscribe_raw(self._nc, self._gets_prefix + "*", self._on_raw_get)
            if self._gets_sub is None:  # a connection of nats-py's own: its message objects
                self._gets_sub = await self._nc.subscribe(self._gets_prefix + "*", cb=self._on_get)
        if not self._nc.is_connected:
            raise UnavailableError("not connected to NATS")
        token = self._nuid.next().decode()
        load = _Load(subject, loop.create_future())
        self._gets[token] = load
        reply = self._gets_prefix + token
        api = f"$JS.API.DIRECT.GET.{self.stream}"
        ask: dict[str, Any] = {"next_by_subj": subject, "batch": size}
        if since is not None:
            ask["start_time"] = since.astimezone(UTC).isoformat().replace("+00:00", "Z")
        else:
            ask["seq"] = seq
        try:
            while True:
                await self._nc.publish(api, msgspec.json.encode(ask), reply=reply)
                try:
                    more = await asyncio.wait_for(load.batch, self._timeout)
                except TimeoutError:
                    raise DeadlineError("loading events timed out") from None
                if load.events:
                    yield load.events
                if more is None:
                    return
                ask = {"next_by_subj": subject, "batch": size, "seq": more}
                load.batch, load.events = loop.create_future(), []
        finally:
            del self._gets[token]

    async def batch(self, subject: str, seq: int, size: int = 1000) -> list[StoredEvent]:
        """Up to `size` messages of `subject` (a wildcard too) from a sequence on: one Direct
        Get batch (a read without a consumer: what a rebuild's copy folds from)."""
        batches = self._batches(subject, seq, size=size)
        try:
            return await anext(batches, [])
        finally:
            await batches.aclose()

    async def last_seq(self, subject: str) -> int:
        """The sequence of the last message on `subject` (a wildcard too), 0 when there is none."""
        msg = await direct_last(self._nc, self.stream, subject, timeout=self._timeout)
        return 0 if msg is None else int((msg.headers or {})["Nats-Sequence"])

    def _on_raw_get(self, subject: bytes, reply: bytes, headers: bytes, data: bytes) -> None:
        """A Direct Get answer as the connection read it (see `bus.connection.subscribe_raw`)."""
        load = self._gets.get(subject[len(self._gets_prefix):].decode())
        if load is None:
            return
        status = headers[8:9] == b" "  # `NATS/1.0 204 EOB\r\n...`: an inline status line first
        if status and b"\r\nNats-Sequence:" not in headers:  # the server's own end of batch, or 404
            end = headers.find(b"\r\n")
            self._got(load, headers[9:12].decode(), parse_headers(headers[end + 2:]), data)
        else:
            # A stored message, even one whose own headers start with a status line (an answer
            # a client had JetStream store there): every one carries its sequence.
            self._got(load, None, RawHeaders(headers[headers.find(b"\r\n") + 2 if status else 10:]), data)

    async def _on_get(self, msg: Msg) -> None:
        load = self._gets.get(msg.subject[len(self._gets_prefix):])
        if load is None:
            return  # a late answer to a load that gave up
        hdrs = msg.headers or {}
        self._got(load, None if "Nats-Sequence" in hdrs else hdrs.get(h.STATUS), hdrs, msg.data)

    @staticmethod
    def _got(load: _Load, status: str | None, hdrs: Mapping[str, str], data: bytes) -> None:
        if status is None:
            load.events.append(StoredEvent(subject=hdrs["Nats-Subject"], seq=int(hdrs["Nats-Sequence"]),
                                           time=hdrs["Nats-Time-Stamp"], data=data, headers=hdrs))
            return
        if load.batch.done():
            return
        if status == "204":  # end of this batch: more to come unless nothing is pending
            pending = int(hdrs.get("Nats-Num-Pending", "0") or 0)
            after = int(hdrs.get("Nats-Last-Sequence", "0") or 0) + 1
            # Never back (nor to where no message of this batch led): the next batch follows it.
            last = load.events[-1].seq if load.events else None
            load.batch.set_result(after if pending and last is not None and after > last else None)
        elif status == "404":
            load.batch.set_result(None)
        else:
            load.batch.set_exception(UnavailableError(f"direct get failed with status {status}"))

    async def read(
        self,
        subject: str,
        *,
        from_seq: int | None = None,
        since: datetime | None = None,
        follow: bool = False,
        idle_timeout: float = 1.0,
    ) -> AsyncIterator[StoredEvent]:
        """Replay events of `subject` (may be a wildcard) in stream order; optionally follow.

        The history (what the stream holds when the read starts) comes by batched Direct Get;
        following, an ordered consumer takes over after the last event of it."""
        js = self._nc.jetstream()
        last = (await js.stream_info(self.stream)).state.last_seq
        seen = 0
        if last and (from_seq or 0) <= last:
            async for batch in self._batches(subject, max(from_seq or 1, 1), None if from_seq else since):
                for event in batch:
                    if event.seq > last:
                        break
                    seen = event.seq
                    yield event
                if seen >= last or (batch and batch[-1].seq > last):
                    break
        if not follow:
            return
        if seen:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=seen + 1)
        elif from_seq is not None or last:
            start = max(from_seq or 1, last + 1)
            config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
        else:
            config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        sub = await js.subscribe(subject, stream=self.stream, ordered_consumer=True, config=config)
        try:
            while True:
                try:
                    msg = await sub.next_msg(idle_timeout)
                except NatsTimeoutError:
                    continue
                meta = msg.metadata
                yield StoredEvent(
                    subject=msg.subject,
                    seq=meta.sequence.stream,
                    time=meta.timestamp.isoformat() if meta.timestamp else "",
                    data=msg.data,
                    headers=msg.headers or {},
                )
        finally:
            await sub.unsubscribe()


async def direct_last(nc: Client, stream: str, subject: str, *, timeout: float) -> Msg | None:
    """The last message on `subject` (a wildcard too) of a stream, None when there is none: one
    Direct Get with the subject in the body, which the roles' permissions allow (nats-py's
    `get_last_msg(direct=True)` puts it in the API subject instead)."""
    try:
        msg = await request(nc, f"$JS.API.DIRECT.GET.{stream}", msgspec.json.encode({"last_by_subj": subject}),
                            timeout=timeout)
    except NoRespondersError:
        raise UnavailableError(f"JetStream is not answering Direct Get on {stream}") from None
    except NatsTimeoutError:
        raise DeadlineError("Direct Get timed out") from None
    headers = msg.headers or {}
    if "Nats-Sequence" in headers:  # a stored message (even one whose own headers carry a status)
        return msg
    status = headers.get(h.STATUS)
    if status == "404":
        return None
    raise UnavailableError(f"direct get on {stream} failed with status {status}")


class PartitionedStore:
    """The event stores of every partition of a context, one `EventStore` (and so one
    group-commit pipeline) per partition stream: an aggregate's subject picks its partition's.

    Reads of one aggregate go to its partition. A read of the whole context merges the
    partitions by the time each event was stored (ties: partition order, then sequence) — the
    documented replay order; order within an aggregate is its stream order, always. Following
    (`follow=True`), events print as they arrive once the history has been merged.
    """

    def __init__(self, ctx: h.Context, make: Callable[[h.Context], EventStore]) -> None:
        self._ctx = ctx
        self.parts = [make(part) for part in ctx.parts]
        if len(self.parts) == 1:
            # One stream: the actor's hot path calls its store directly, without a frame here.
            self.append = self.parts[0].append  # type: ignore[method-assign]
            self.load = self.parts[0].load  # type: ignore[method-assign]

    @classmethod
    def open(cls, nc: Client, ctx: h.Context, *, work_queue: bool = False, **options: Any) -> PartitionedStore:
        """A store per partition with the same `EventStore` options; `work_queue`: each
        partition's work items (`<ctx>.queue[.<p>].*`) carry only their trace headers."""
        return cls(ctx, lambda part: EventStore(nc, part.stream, bare=part.queue_wildcard[:-1] if work_queue else None,
                                                **options))

    @property
    def streams(self) -> list[str]:
        return [store.stream for store in self.parts]

    def stats(self) -> list[dict[str, object]]:
        """Each partition's writes and the commands they stored, since this process started."""
        return [{"stream": s.stream, "writes": s.writes, "commands": s.commands_committed} for s in self.parts]

    def of(self, subject: str) -> EventStore:
        """The store of the partition a subject of this context belongs to."""
        return self.parts[self._ctx.partition_of_subject(subject)]

    async def append(
        self,
        subject: str,
        events: Sequence[NewEvent],
        expected_seq: int | None,
        extra: Sequence[tuple[str, bytes]] = (),
        *,
        deadline: float | None = None,
    ) -> AppendResult:
        return await self.of(subject).append(subject, events, expected_seq, extra, deadline=deadline)

    async def load(self, subject: str, after_seq: int = 0) -> list[StoredEvent]:
        return await self.of(subject).load(subject, after_seq)

    async def last_seq(self, subject: str) -> int:
        return await self.of(subject).last_seq(subject)

    async def close(self) -> None:
        await asyncio.gather(*(store.close() for store in self.parts))

    async def read(
        self,
        subject: str,
        *,
        from_seq: int | None = None,
        since: datetime | None = None,
        follow: bool = False,
        idle_timeout: float = 1.0,
    ) -> AsyncIterator[StoredEvent]:
        """`EventStore.read` over the partitions `subject` spans (one aggregate's: its own;
        a wildcard: all). `from_seq` is a sequence of each partition's stream."""
        if len(self.parts) == 1 or not subject.endswith(">"):
            async for event in self.of(subject).read(subject, from_seq=from_seq, since=since, follow=follow,
                                                     idle_timeout=idle_timeout):
                yield event
            return
        parts = list(zip(self._ctx.parts, self.parts, strict=True))
        readers = [store.read(part.events_wildcard if subject.startswith(self._ctx.events_wildcard[:-1])
                              else subject, from_seq=from_seq, since=since, follow=False, idle_timeout=idle_timeout)
                   for part, store in parts]
        last = [0] * len(parts)
        async for index, event in _merged(readers):
            last[index] = event.seq
            yield event
        if not follow:
            return
        queue: asyncio.Queue[StoredEvent] = asyncio.Queue(maxsize=1000)

        async def tail(part: h.Context, store: EventStore, after: int) -> None:
            wildcard = part.events_wildcard if subject.startswith(self._ctx.events_wildcard[:-1]) else subject
            async for event in store.read(wildcard, from_seq=after + 1 if after else from_seq, since=None if after
                                          else since, follow=True, idle_timeout=idle_timeout):
                await queue.put(event)

        tasks: set[asyncio.Future[Any]] = {asyncio.create_task(tail(part, store, last[i]))
                                            for i, (part, store) in enumerate(parts)}
        getter: asyncio.Future[Any] | None = None
        try:
            while True:
                if getter is None:
                    getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, *tasks}, return_when=asyncio.FIRST_COMPLETED)
                for task in done - {getter}:  # a partition's tail ended: its failure is the reader's
                    tasks.discard(task)
                    if (exc := task.exception()) is not None:
                        raise exc
                if getter in done:
                    event, getter = getter.result(), None
                    yield event
        finally:
            if getter is not None:
                getter.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def _merged(readers: list[AsyncIterator[StoredEvent]]) -> AsyncIterator[tuple[int, StoredEvent]]:
    """K-way merge of per-partition reads by stored time, then partition, then sequence."""
    heads: dict[int, tuple[datetime, int, int, StoredEvent]] = {}

    async def advance(index: int) -> None:
        try:
            event = await anext(readers[index])
        except StopAsyncIteration:
            heads.pop(index, None)
            return
        heads[index] = (datetime.fromisoformat(event.time), index, event.seq, event)

    for index in range(len(readers)):
        await advance(index)
    while heads:
        index = min(heads, key=lambda i: heads[i][:3])
        event = heads[index][3]
        await advance(index)
        yield index, event
