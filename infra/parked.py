"""`jetsource projections parked`: list the events readers parked, retry them after a fix, or
skip them.

Retrying a projection's event applies it through the current projection code on top of the
current read model (later events of the same aggregate were applied without it), in a
transaction that first locks the projection's checkpoint row, as the projector does, so the
two never interleave. Retrying a fulfilment event runs the process manager's handler on it.
Either way a success deletes the parked copy; a failure keeps it, with the new error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
from nats.aio.client import Client
from nats.js.errors import NotFoundError as JsNotFoundError

from actors.tasks.worker import PARKED_READER as WORKERS_READER
from bus import parking
from bus import subjects as h
from bus.connection import connect
from bus.errors import JetsourceError, MalformedError, NotFoundError, RuleViolationError, ValidationError
from bus.eventstore import StoredEvent
from bus.parking import ParkedEvent
from infra.auth import ADMIN, credentials
from infra.bootstrap import parked_subjects
from infra.contexts import declared
from infra.settings import Settings
from infra.status import ReadModel, read_models
from projections.runner import decode_event, transient
from projections.schema import create_pool


@dataclass(frozen=True, slots=True)
class RetryOutcome:
    """What retrying one parked event did: resolved (applied, deleted) or still parked, and why."""

    event: ParkedEvent
    resolved: bool
    error: str | None = None


def describe(event: ParkedEvent) -> dict[str, Any]:
    """A parked event as one JSON object (its body as text when it is UTF-8)."""
    try:
        body: str | None = event.data.decode()
    except UnicodeDecodeError:
        body = None
    return {"reader": event.reader, "stream": event.stream, "seq": event.seq, "subject": event.subject,
            "error": event.error, "time": event.time, "size": len(event.data), "body": body}


async def select(
    nc: Client, settings: Settings, *, everything: bool = False, reader: str | None = None,
    target: tuple[str, str, int] | None = None,
) -> list[ParkedEvent]:
    """The parked events a command is about: all of them (of one reader), or one."""
    parked = parked_subjects(settings)
    if target is not None:
        one = await parking.get(nc, parked, *target)
        return [one] if one is not None else []
    if not everything:
        raise ValueError("name one parked event (READER STREAM SEQ) or pass --all")
    return await parking.unresolved(nc, parked, reader)


async def skip(nc: Client, settings: Settings, events: list[ParkedEvent]) -> list[ParkedEvent]:
    """Delete parked events unapplied; returns those that were still parked."""
    parked = parked_subjects(settings)
    return [e for e in events if await parking.delete(nc, parked, e)]


async def retry(nc: Client, pool: asyncpg.Pool, settings: Settings, events: list[ParkedEvent]) -> list[RetryOutcome]:
    """Retry parked events in order (see the module docstring)."""
    models = {m.ctx.consumer(m.projection.name): m for m in read_models(settings)}
    found = declared(settings)
    subjects = found.subjects(settings)
    managers = {pm.reader: pm.build(nc, subjects, settings) for pm in found.managers}
    out = []
    for parked in events:
        # The parked copy says which event failed; what is retried is that event as its stream
        # holds it. (Any reader may park; a copy that does not match its stream is not trusted.)
        event = await _as_stored(nc, parked)
        if event is None:
            out.append(RetryOutcome(parked, False, f"{parked.stream} seq {parked.seq} is not the parked event "
                                                   f"(no message there on {parked.subject}); skip it"))
            continue
        if event.reader in models:
            outcome = await _retry(nc, settings, event, lambda e: _apply(pool, models[e.reader], e))
        elif event.reader in managers:
            outcome = await _retry(nc, settings, event, lambda e: _handle(managers[e.reader], e))
        elif event.reader == WORKERS_READER:
            outcome = await _retry(nc, settings, event, lambda e: _requeue(nc, e))
        else:
            outcome = RetryOutcome(event, False, f"no reader named {event.reader!r} here")
        out.append(outcome)
    return out


async def _as_stored(nc: Client, parked: ParkedEvent) -> ParkedEvent | None:
    """The parked event with the bytes and headers its stream holds at its sequence, or None when
    the stream holds no such message on that subject."""
    try:
        raw = await nc.jetstream().get_msg(parked.stream, parked.seq, direct=True)
    except JsNotFoundError:
        return None
    if raw.subject != parked.subject:
        return None
    headers = {k: v for k, v in (raw.headers or {}).items() if k.startswith(h.EV_HEADER_PREFIX)}
    return replace(parked, data=raw.data or b"", headers=headers)


async def _retry(nc: Client, settings: Settings, event: ParkedEvent, attempt: Callable[[ParkedEvent], Any]) -> RetryOutcome:
    parked = parked_subjects(settings)
    try:
        await attempt(event)
    except Exception as exc:
        if not transient(exc):
            return await _failed(nc, settings, event, exc)
        return RetryOutcome(event, False, parking.describe(exc))  # says nothing about the event: keep it
    await parking.delete(nc, parked, event)
    return RetryOutcome(event, True)


async def _failed(nc: Client, settings: Settings, event: ParkedEvent, exc: Exception) -> RetryOutcome:
    """A retry that failed: an invalid event or a bug is re-parked with the new error; another
    coded refusal (unavailable, timed out, refused for now) keeps it as it was."""
    if isinstance(exc, JetsourceError) and not isinstance(exc, ValidationError | MalformedError):
        return RetryOutcome(event, False, parking.describe(exc))
    await _repark(nc, settings, event, exc)
    return RetryOutcome(event, False, parking.describe(exc))


async def _repark(nc: Client, settings: Settings, event: ParkedEvent, error: Exception) -> None:
    await parking.park(nc, parked_subjects(settings), reader=event.reader, stream=event.stream, seq=event.seq,
                       subject=event.subject, data=event.data, headers=event.headers, error=error)


async def _apply(pool: asyncpg.Pool, model: ReadModel, event: ParkedEvent) -> None:
    projection = model.projection
    stored = StoredEvent(subject=event.subject, seq=event.seq, time=event.time, data=event.data, headers=event.headers)
    async with pool.acquire() as conn, conn.transaction():
        # Serialise with a running projector, which holds this row while it applies a batch.
        checkpoint = next((part.checkpoint(projection.name) for part in model.ctx.parts if part.stream == event.stream),
                          None)
        if checkpoint is None:  # no stream of this read model: nothing to lock, so nothing to apply
            raise MalformedError(f"{event.stream} is not a stream of the {projection.name} read model")
        await conn.execute("SELECT last_seq FROM projection_checkpoints WHERE name = $1 FOR UPDATE", checkpoint)
        await projection.apply(conn, [(stored, decode_event(projection, stored))])


async def _requeue(nc: Client, event: ParkedEvent) -> None:
    """A work item goes back on its queue as it was; a worker parks it again if still unreadable."""
    await nc.jetstream().publish(event.subject, event.data)


async def _handle(manager: Any, event: ParkedEvent) -> None:
    try:
        await manager.handle(event.stream, event.data, event.headers)
    except (RuleViolationError, NotFoundError):
        pass  # refused as the running manager would refuse it: nothing left to do


async def command(
    settings: Settings, action: str, *, everything: bool = False, reader: str | None = None,
    target: tuple[str, str, int] | None = None,
) -> int:
    """The CLI: print JSON lines; exit code 1 when an event is still parked or not found."""
    nc = await connect(settings.resolved_nats_url(), "jetsource-parked", credentials=credentials(settings, ADMIN))
    try:
        if action == "list":
            for event in await parking.unresolved(nc, parked_subjects(settings), reader):
                print(json.dumps(describe(event)), flush=True)
            return 0
        events = await select(nc, settings, everything=everything, reader=reader, target=target)
        if not events:
            print(json.dumps({"error": "no such parked event" if target else "nothing parked"}))
            return 1 if target else 0
        if action == "skip":
            for event in await skip(nc, settings, events):
                print(json.dumps({"skipped": describe(event)}), flush=True)
            return 0
        pool = await create_pool(settings.resolved_database_url(), settings.db_schema, max_size=2)
        try:
            outcomes = await retry(nc, pool, settings, events)
        finally:
            await pool.close()
        for o in outcomes:
            print(json.dumps({"retried": {"reader": o.event.reader, "stream": o.event.stream, "seq": o.event.seq},
                              "resolved": o.resolved, "error": o.error}), flush=True)
        return 0 if all(o.resolved for o in outcomes) else 1
    finally:
        await nc.close()
