"""Snapshots: an aggregate's folded state at a version, kept in JetStream so that loading a long
history costs the snapshot plus the events after it.

One stream per context (`ORDERS_SNAPSHOTS`, subjects `orders.snapshots.<id>`, one message per
subject: the current snapshot). Not a source of truth: a snapshot that is missing, unreadable,
of another aggregate, or of another state schema (`AggregateSpec.state_version`) is ignored and
the aggregate is folded from its events — never misread. Only the context's actor writes them
(its permissions; `jetsource snapshots take` as the admin). A snapshot carries, besides the
state, the keyed command ids of the aggregate (the most recent `KEPT_COMMANDS`), so a retried
keyed command is still recognised after a load from a snapshot.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.errors import Error as NatsError

from bus import subjects as h
from bus.codec import encode
from bus.connection import request
from bus.errors import DeadlineError, UnavailableError
from bus.eventstore import direct_last
from bus.subjects import Context

log = logging.getLogger(__name__)

KEPT_COMMANDS = 1000  # keyed command ids a snapshot keeps (the latest), for idempotent retries


class SnapshotBody(msgspec.Struct, frozen=True, kw_only=True):
    """What a snapshot message holds."""

    id: str  # the aggregate's id: a snapshot copied to another's subject is not its snapshot
    version: int  # the stream sequence of the last event folded into `state`
    state_version: int  # the state schema it was written with
    time: str = ""  # when that last event was stored
    state: msgspec.Raw
    commands: dict[str, tuple[int, str]] = {}  # keyed command id -> (sequence, request fingerprint)
    trace: str = ""
    correlation: str = ""


_body = msgspec.json.Decoder(SnapshotBody)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A decoded, usable snapshot."""

    body: SnapshotBody
    state: Any


class Snapshots:
    """Reads and writes one context's snapshots."""

    def __init__(self, nc: Client, ctx: Context, state_type: type, state_version: int, *, timeout: float = 5.0) -> None:
        self._nc = nc
        self._ctx = ctx
        self._state: msgspec.json.Decoder[Any] = msgspec.json.Decoder(state_type)
        self.state_version = state_version
        self._timeout = timeout
        self.written = 0
        self.ignored = 0

    @classmethod
    def of(cls, nc: Client, spec: Any, *, timeout: float = 5.0) -> Snapshots | None:
        """The snapshots of an aggregate (an `AggregateSpec`); None when it takes none."""
        if spec.snapshot_every <= 0:
            return None
        return cls(nc, spec.ctx, type(spec.initial), spec.state_version, timeout=timeout)

    async def load(self, aggregate_id: str) -> Snapshot | None:
        """The aggregate's current snapshot when it is usable; None otherwise (fold the events)."""
        try:
            msg = await direct_last(self._nc, self._ctx.snapshot_stream, self._ctx.snapshot(aggregate_id),
                                    timeout=self._timeout)
        except (NatsError, UnavailableError, DeadlineError) as exc:  # no snapshot stream yet, a timeout: fold
            log.warning("snapshot of %s %s not read (%s); folding its events", self._ctx.name, aggregate_id, exc)
            return None
        if msg is None:
            return None
        return self.decode(aggregate_id, msg.data, msg.headers or {})

    def decode(self, aggregate_id: str, data: bytes, headers: dict[str, str]) -> Snapshot | None:
        if h.SNAPSHOT_VERSION not in headers:  # not written by an actor (see bus.eventstore.appended)
            self.ignored += 1
            return None
        try:
            body = _body.decode(data)
            if body.id != aggregate_id or body.state_version != self.state_version:
                self.ignored += 1
                return None
            return Snapshot(body, self._state.decode(body.state))
        except msgspec.DecodeError as exc:
            log.warning("ignoring an unreadable snapshot of %s %s: %s", self._ctx.name, aggregate_id, exc)
            self.ignored += 1
            return None

    def body(self, aggregate_id: str, state: Any, version: int, time: str,
             commands: dict[str, tuple[int, str]], trace: str, correlation: str) -> bytes:
        """A snapshot's bytes: only keyed commands (those with a fingerprint) are worth keeping."""
        keyed = [(cid, seen) for cid, seen in commands.items() if seen[1]]
        if len(keyed) > KEPT_COMMANDS:
            keyed = sorted(keyed, key=lambda item: item[1][0])[-KEPT_COMMANDS:]
        return encode(SnapshotBody(id=aggregate_id, version=version, state_version=self.state_version, time=time,
                                   state=msgspec.Raw(encode(state)), commands=dict(keyed), trace=trace,
                                   correlation=correlation))

    async def save(self, aggregate_id: str, data: bytes, version: int) -> bool:
        """Store a snapshot (replacing the aggregate's previous one); False when it was not stored."""
        try:
            reply = await request(self._nc, self._ctx.snapshot(aggregate_id), data, timeout=self._timeout,
                                  headers={h.SNAPSHOT_VERSION: str(version)})
        except (NatsError, UnavailableError, TimeoutError) as exc:
            log.warning("snapshot of %s %s at %d not stored: %s", self._ctx.name, aggregate_id, version, exc)
            return False
        if b'"error"' in reply.data:
            log.warning("snapshot of %s %s at %d refused: %s", self._ctx.name, aggregate_id, version,
                        reply.data[:200].decode("utf-8", "replace"))
            return False
        self.written += 1
        return True
