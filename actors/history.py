"""Time travel: an aggregate's state at a version or at a time, folded from its event stream (not
from a read model), and the page of its history a reader asked for. The edge's
`GET /{context}/{id}/state` and `/events` and the CLI's `jetsource state` and `replay` use these."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from actors.errors import NotFoundError, ValidationError
from actors.runtime import AggregateSpec, event_of
from actors.snapshots import Snapshot, Snapshots
from actors.upcasting import EventCodec
from bus import subjects as h
from bus.errors import InternalError
from bus.eventstore import PartitionedStore, StoredEvent, appended


@dataclass(frozen=True, slots=True)
class StateAt:
    """An aggregate's state after its events up to `version`, the last of them stored at `time`."""

    state: Any
    version: int  # the stream sequence of the last event folded: what the aggregate's ETag was then
    time: str
    snapshot: int | None = None  # the version of the snapshot the fold started from, if one


def stored_time(stored: StoredEvent) -> datetime:
    """When the event was stored: its `Jetsource-Time` header, else the stream's time stamp."""
    raw = stored.headers.get(h.EV_TIME) or stored.time
    at = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def parse_time(text: str, field: str) -> datetime:
    """An ISO 8601 time from a query or the command line (no zone: UTC)."""
    try:
        at = datetime.fromisoformat(text.strip().replace(" ", "+").replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(f"{field} must be an ISO 8601 time, e.g. 2026-01-01T12:00:00+00:00", field=field) from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def fold(spec: AggregateSpec[Any, Any, Any], events: Sequence[StoredEvent], noun: str, aggregate_id: str, *,
         at_version: int | None = None, at_time: datetime | None = None, start: Snapshot | None = None) -> StateAt:
    """Fold stored events (in stream order, after `start`'s version when given) up to a version
    or a time. NotFoundError when the aggregate had no event by then; ValidationError for a
    version beyond its last."""
    codec: EventCodec[Any] = EventCodec.of(spec.event_type)
    state, version, when = spec.initial, 0, ""
    if start is not None:
        state, version, when = start.state, start.body.version, start.body.time
    last = version
    folding = True
    for stored in events:
        if folding and (at_version is not None and stored.seq > at_version
                        or at_time is not None and stored_time(stored) > at_time):
            folding = False
        if not folding:  # past the point asked for: only how far the aggregate goes (nothing decoded)
            if appended(stored.headers):
                last = stored.seq
            continue
        try:
            event = event_of(codec, spec.event_id, stored)
        except msgspec.DecodeError as exc:  # an appended event this code cannot read (projections park it)
            raise InternalError(f"{noun} {aggregate_id}: the event at sequence {stored.seq} cannot be read by this "
                                f"code ({exc}); its state cannot be folded") from None
        if event is None:
            continue
        last = stored.seq
        state, version, when = spec.evolve(state, event), stored.seq, stored_time(stored).isoformat()
    if last == 0:
        raise NotFoundError(f"{noun} {aggregate_id} has no events")
    if at_version is not None and at_version > last:
        raise ValidationError(f"at_version {at_version} is beyond the last version of {noun} {aggregate_id} ({last})",
                              field="at_version")
    if version == 0:
        asked = f"version {at_version}" if at_version is not None and at_time is None else \
            f"{at_time.isoformat() if at_time else ''}"
        raise NotFoundError(f"{noun} {aggregate_id} did not exist at {asked}: its first event came later")
    return StateAt(state, version, when, start.body.version if start is not None else None)


async def state_at(store: PartitionedStore, spec: AggregateSpec[Any, Any, Any], aggregate_id: str, noun: str, *,
                   at_version: int | None = None, at_time: datetime | None = None,
                   snapshots: Snapshots | None = None) -> StateAt:
    """The aggregate's state at a version or a time (both: whichever comes first), from its
    stream: from its snapshot and the events after it when the snapshot is not past the point
    asked for, else from its first event."""
    start = await snapshots.load(aggregate_id) if snapshots is not None else None
    if start is not None and ((at_version is not None and start.body.version > at_version)
                              or (at_time is not None and (not start.body.time
                                                           or parse_time(start.body.time, "time") > at_time))):
        start = None
    events = await store.load(spec.ctx.events(aggregate_id), after_seq=start.body.version if start else 0)
    return fold(spec, events, noun, aggregate_id, at_version=at_version, at_time=at_time, start=start)
