"""The subject grammar and header names. Nobody else spells a subject or a JetStream header."""

from __future__ import annotations

import re
from dataclasses import dataclass

# JetStream / NATS headers
MSG_ID = "Nats-Msg-Id"
EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
BATCH_ID = "Nats-Batch-Id"
BATCH_SEQ = "Nats-Batch-Sequence"
BATCH_COMMIT = "Nats-Batch-Commit"
SERVICE_ERROR = "Nats-Service-Error"
SERVICE_ERROR_CODE = "Nats-Service-Error-Code"
STATUS = "Status"  # inline status of a server message (404, 408, 503, ...)
STATUS_DESCRIPTION = "Description"

# jetsource headers on commands (requests)
IDEMPOTENCY_KEY = "Idempotency-Key"
EXPECTED_VERSION = "Expected-Version"
TRACE_ID = "Trace-Id"
CORRELATION_ID = "Correlation-Id"
CAUSATION_ID = "Causation-Id"
MIN_SEQ = "Min-Seq"
# When the caller stops waiting (epoch milliseconds): an actor never executes a command past it.
DEADLINE = "Deadline"

# jetsource headers on stored events
EV_COMMAND_ID = "Jetsource-Command-Id"
EV_CORRELATION_ID = "Jetsource-Correlation-Id"
EV_CAUSATION_ID = "Jetsource-Causation-Id"
EV_TRACE_ID = "Jetsource-Trace-Id"
EV_TIME = "Jetsource-Time"
EV_REPLY = "Jetsource-Reply"
# A digest of the keyed request that stored these events: the same key with another request is refused.
EV_REQUEST_HASH = "Jetsource-Request-Hash"
EV_HEADER_PREFIX = "Jetsource-"
# On a snapshot: the version (stream sequence) it folds up to. Readers ignore a message without it.
SNAPSHOT_VERSION = "Jetsource-Snapshot-Version"

# jetsource headers on parked events (the dead-letter stream), beside the event's own headers
PARKED_READER = "Jetsource-Parked-Reader"
PARKED_STREAM = "Jetsource-Parked-Stream"
PARKED_SEQ = "Jetsource-Parked-Seq"
PARKED_SUBJECT = "Jetsource-Parked-Subject"
PARKED_ERROR = "Jetsource-Parked-Error"
PARKED_TIME = "Jetsource-Parked-Time"
PARKED_HEADER_PREFIX = "Jetsource-Parked-"

# The channel parameter naming an aggregate's partition in API descriptions (`Context.events_address`).
PARTITION_PARAMETER = "partition"

_TOKEN = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")


def valid_token(value: str) -> bool:
    """True when value is safe as a single subject token (ids, names)."""
    return bool(_TOKEN.match(value))


def partition_of(key: str, partitions: int) -> int:
    """The partition of an aggregate id: FNV-1a (32 bit) of its UTF-8 bytes, modulo the count.
    The same hash as NATS subject mapping's `partition(K, n)`, so a server-side mapping of the
    id token would agree with it."""
    if partitions <= 1:
        return 0
    value = 0x811C9DC5
    for byte in key.encode():
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value % partitions


@dataclass(frozen=True, slots=True)
class Context:
    """Subjects and stream names of one bounded context ("orders", "tasks") in a namespace.

    The namespace is empty in production; tests give each run its own so that streams,
    subjects and consumers never collide.

    A context's events may spread over `partitions` streams, an aggregate's partition fixed by
    `partition_of` its id. With one (the default, and every data directory from before
    partitions) the stream is `ORDERS` and the subjects `orders.events.<id>`,
    `orders.outbox.<name>`, `orders.queue.<name>`. With K > 1, partition p is the stream
    `ORDERS_P<p>` holding `orders.events.<p>.<id>`, `orders.outbox.<p>.<name>` and
    `orders.queue.<p>.<name>`: `orders.events.>` still covers every event, and an event's
    aggregate id is still its subject's last token. `parts` gives one view per partition (each
    with its own `stream`); `part_of(id)` the view an aggregate lives in. Asking the whole
    context of K > 1 for a single stream's name or subjects is a programming error and raises.
    """

    name: str
    namespace: str = ""
    partitions: int = 1
    part: int | None = None  # this view's partition (None: the whole context)

    @property
    def _root(self) -> str:
        return f"{self.namespace}.{self.name}" if self.namespace else self.name

    @property
    def partitioned(self) -> bool:
        return self.partitions > 1

    @property
    def parts(self) -> tuple[Context, ...]:
        """One view per partition, in partition order (the context itself when it has one)."""
        if not self.partitioned:
            return (self,)
        if self.part is not None:
            return (self,)
        return tuple(Context(self.name, self.namespace, self.partitions, p) for p in range(self.partitions))

    def partition_of(self, aggregate_id: str) -> int:
        return partition_of(aggregate_id, self.partitions)

    def part_of(self, aggregate_id: str) -> Context:
        """The view of the partition the aggregate's events live in."""
        if not self.partitioned:
            return self
        return Context(self.name, self.namespace, self.partitions, partition_of(aggregate_id, self.partitions))

    def partition_of_subject(self, subject: str) -> int:
        """The partition a subject of this context belongs to (its events', outbox's or queue's)."""
        if not self.partitioned:
            return 0
        return int(subject[len(self._root) + 1:].split(".", 2)[1])

    def _token(self) -> str:
        """`.<p>` of a partition's view, "" for a single-stream context."""
        if not self.partitioned:
            return ""
        if self.part is None:
            raise ValueError(f"context {self.name} has {self.partitions} partitions: use one of its parts")
        return f".{self.part}"

    @property
    def stream(self) -> str:
        base = self.name.upper() + (f"_P{self._token()[1:]}" if self.partitioned else "")
        return f"{self.namespace.upper()}_{base}" if self.namespace else base

    @property
    def streams(self) -> list[str]:
        """Every stream of the context, in partition order."""
        return [part.stream for part in self.parts]

    @property
    def events_wildcard(self) -> str:
        """Every event of this view: the whole context's, or one partition's."""
        if self.partitioned and self.part is not None:
            return f"{self._root}.events.{self.part}.*"
        return f"{self._root}.events.>"

    def events(self, aggregate_id: str) -> str:
        if not self.partitioned:
            return f"{self._root}.events.{aggregate_id}"
        if aggregate_id in ("*", ">"):
            raise ValueError("a wildcard has no partition: use events_wildcard (or a part's)")
        return f"{self._root}.events.{partition_of(aggregate_id, self.partitions)}.{aggregate_id}"

    def aggregate_id(self, subject: str) -> str:
        return subject.rsplit(".", 1)[1]

    def queue(self, name: str) -> str:
        return f"{self._root}.queue{self._token()}.{name}"

    @property
    def queue_wildcard(self) -> str:
        if self.partitioned and self.part is None:
            return f"{self._root}.queue.>"
        return f"{self._root}.queue{self._token()}.>"

    def outbox(self, name: str) -> str:
        return f"{self._root}.outbox{self._token()}.{name}"

    @property
    def outbox_wildcard(self) -> str:
        if self.partitioned and self.part is None:
            return f"{self._root}.outbox.>"
        return f"{self._root}.outbox{self._token()}.>"

    # Channel addresses, as API descriptions (AsyncAPI) spell them: `{name}` is a parameter, and
    # a partitioned context's subjects carry the parameter `{partition}` (`partition_of` the id).
    def events_address(self, id_parameter: str) -> str:
        return f"{self._root}.events{self._partition_parameter}.{{{id_parameter}}}"

    def outbox_address(self, parameter: str) -> str:
        return f"{self._root}.outbox{self._partition_parameter}.{{{parameter}}}"

    def queue_address(self, parameter: str) -> str:
        return f"{self._root}.queue{self._partition_parameter}.{{{parameter}}}"

    @property
    def _partition_parameter(self) -> str:
        return f".{{{PARTITION_PARAMETER}}}" if self.partitioned else ""

    # Snapshots: one stream per context (not per partition), one message per aggregate.
    @property
    def snapshot_stream(self) -> str:
        base = f"{self.name.upper()}_SNAPSHOTS"
        return f"{self.namespace.upper()}_{base}" if self.namespace else base

    def snapshot(self, aggregate_id: str) -> str:
        return f"{self._root}.snapshots.{aggregate_id}"

    @property
    def snapshots_wildcard(self) -> str:
        return f"{self._root}.snapshots.>"

    def command(self, name: str) -> str:
        return f"{self._root}.cmd.{name}"

    def query(self, name: str) -> str:
        return f"{self._root}.query.{name}"

    def live(self, *parts: str) -> str:
        return ".".join((self._root, "live", *parts))

    @property
    def service_name(self) -> str:
        return f"{self.namespace}_{self.name}" if self.namespace else self.name

    @property
    def queue_group(self) -> str:
        return f"{self._root}.actors"

    def consumer(self, projection: str) -> str:
        return f"{projection}_projection"

    def work_consumer(self, queue: str) -> str:
        """The durable pull consumer the workers share for one work queue (e.g. a priority)."""
        return f"workers_{queue}"

    def checkpoint(self, name: str) -> str:
        """The name a reader's position in this view's stream is stored under: the reader's own
        for a single-stream context, `<name>.p<p>` per partition."""
        if not self.partitioned:
            return name
        return f"{name}.p{self._token()[1:]}"


@dataclass(frozen=True, slots=True)
class Parked:
    """Subjects of the dead-letter stream: events a reader could not decode or apply.

    One subject per parked event, `<root>.parked.<reader>.<stream>.<seq>`, so parking the same
    event again replaces it (the stream keeps one message per subject).
    """

    namespace: str = ""

    @property
    def _root(self) -> str:
        return f"{self.namespace}.parked" if self.namespace else "parked"

    @property
    def stream(self) -> str:
        return f"{self.namespace.upper()}_PARKED" if self.namespace else "PARKED"

    @property
    def wildcard(self) -> str:
        return f"{self._root}.>"

    def reader_wildcard(self, reader: str) -> str:
        return f"{self._root}.{reader}.>"

    def subject(self, reader: str, stream: str, seq: int) -> str:
        return f"{self._root}.{reader}.{stream}.{seq}"

    def parse(self, subject: str) -> tuple[str, str, int]:
        """(reader, stream, seq) of a parked event's subject."""
        reader, stream, seq = subject.rsplit(".", 3)[1:]
        return reader, stream, int(seq)
