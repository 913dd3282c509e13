"""Parked events: what a reader (a projection, a process manager) could not decode or apply.

The reader copies the event to the dead-letter stream (`<root>.parked.<reader>.<stream>.<seq>`,
the raw bytes, why it failed, the event's own `Jetsource-*` headers) and moves on: one bad event
never stops it. The event streams stay untouched (they deny delete and purge); an operator lists
the parked events, retries them after a fix, or skips them (`jetsource projections parked`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError as JsNotFoundError

from bus import metrics
from bus import subjects as h
from bus.errors import DeadlineError, UnavailableError
from bus.subjects import Parked

log = logging.getLogger(__name__)
MAX_ERROR_CHARS = 500


@dataclass(frozen=True, slots=True)
class ParkedEvent:
    """An event a reader parked: where it is stored, why it failed, its bytes and headers."""

    reader: str
    stream: str
    seq: int
    subject: str
    error: str
    time: str
    data: bytes
    headers: dict[str, str]  # the event's own Jetsource-* headers (trace id, command id, ...)
    parked_seq: int  # its sequence in the dead-letter stream


def describe(error: BaseException | str) -> str:
    """One line, at most MAX_ERROR_CHARS: it travels in a header (no CR/LF allowed there)."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    text = text.replace("\r", " ").replace("\n", " ").strip()
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


async def park(
    nc: Client,
    parked: Parked,
    *,
    reader: str,
    stream: str,
    seq: int,
    subject: str,
    data: bytes,
    headers: Mapping[str, str],
    error: BaseException | str,
    timeout: float = 5.0,
) -> None:
    """Park one event; returns once JetStream has stored it (so the reader may move past it).

    Parking the same event again replaces the earlier copy, with the new error.
    """
    reason = describe(error)
    hdrs = {k: v for k, v in headers.items()
            if k.startswith(h.EV_HEADER_PREFIX) and not k.startswith(h.PARKED_HEADER_PREFIX)}
    hdrs.update({
        h.PARKED_READER: reader, h.PARKED_STREAM: stream, h.PARKED_SEQ: str(seq), h.PARKED_SUBJECT: subject,
        h.PARKED_ERROR: reason, h.PARKED_TIME: datetime.now(UTC).isoformat(),
    })
    try:
        await nc.jetstream().publish(parked.subject(reader, stream, seq), data, timeout=timeout, headers=hdrs)
    except NatsTimeoutError:
        raise DeadlineError(f"parking {stream} seq {seq} was not acknowledged in time") from None
    except NatsError as exc:
        raise UnavailableError(f"parking {stream} seq {seq} failed: {exc}") from None
    metrics.PARKED_EVENTS.labels(reader).inc()
    log.error("%s parked %s seq %d (%s): %s", reader, stream, seq, subject, reason)


def _event(parked: Parked, raw: RawStreamMsg) -> ParkedEvent:
    hdrs: dict[str, str] = dict(raw.headers or {})
    reader, stream, seq = parked.parse(raw.subject or "")
    return ParkedEvent(
        reader=reader, stream=stream, seq=seq, subject=hdrs.get(h.PARKED_SUBJECT, ""),
        error=hdrs.get(h.PARKED_ERROR, ""), time=hdrs.get(h.PARKED_TIME, ""), data=raw.data or b"",
        headers={k: v for k, v in hdrs.items()
                 if k.startswith(h.EV_HEADER_PREFIX) and not k.startswith(h.PARKED_HEADER_PREFIX)},
        parked_seq=int(raw.seq or 0),
    )


async def counts(nc: Client, parked: Parked) -> dict[str, int]:
    """How many events each reader has parked and not yet resolved."""
    out: dict[str, int] = {}
    for reader, _, _ in await listed(nc, parked):
        out[reader] = out.get(reader, 0) + 1
    return out


async def listed(nc: Client, parked: Parked) -> list[tuple[str, str, int]]:
    """(reader, stream, seq) of every parked event, in that order (one stream info: as many as
    the server lists in one answer)."""
    out = []
    for subject in await _subjects(nc, parked, parked.wildcard):
        try:
            out.append(parked.parse(subject))
        except ValueError:  # not one a reader parked (a stored reply aimed there): not an entry
            continue
    return sorted(out)


async def unresolved(nc: Client, parked: Parked, reader: str | None = None) -> list[ParkedEvent]:
    """The parked events (of one reader, or all), by reader, stream and sequence.

    One direct get each: parked events are meant to be few (the stream info that lists their
    subjects is not paged beyond what the server returns in one answer).
    """
    subjects = await _subjects(nc, parked, parked.reader_wildcard(reader) if reader else parked.wildcard)
    js = nc.jetstream()
    out = []
    for subject in sorted(subjects, key=parked.parse):
        try:
            out.append(_event(parked, await js.get_last_msg(parked.stream, subject, direct=True)))
        except JsNotFoundError:
            continue  # resolved meanwhile
    return out


async def get(nc: Client, parked: Parked, reader: str, stream: str, seq: int) -> ParkedEvent | None:
    """One parked event, or None when it is not (or no longer) parked."""
    try:
        raw = await nc.jetstream().get_last_msg(parked.stream, parked.subject(reader, stream, seq), direct=True)
    except JsNotFoundError:
        return None
    return _event(parked, raw)


async def delete(nc: Client, parked: Parked, event: ParkedEvent) -> bool:
    """Resolve a parked event (retried successfully, or skipped); False if it was gone already."""
    try:
        return bool(await nc.jetstream().delete_msg(parked.stream, event.parked_seq))
    except JsNotFoundError:
        return False


async def clear(nc: Client, parked: Parked, reader: str) -> None:
    """Forget everything one reader parked (a rebuild parks again whatever still fails)."""
    try:
        await nc.jetstream().purge_stream(parked.stream, subject=parked.reader_wildcard(reader))
    except JsNotFoundError:
        pass


async def _subjects(nc: Client, parked: Parked, wildcard: str) -> dict[str, int]:
    try:
        info = await nc.jetstream().stream_info(parked.stream, subjects_filter=wildcard)
    except JsNotFoundError:
        return {}
    return dict(info.state.subjects or {})
