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

# jetsource headers on parked events (the dead-letter stream), beside the event's own headers
PARKED_READER = "Jetsource-Parked-Reader"
PARKED_STREAM = "Jetsource-Parked-Stream"
PARKED_SEQ = "Jetsource-Parked-Seq"
PARKED_SUBJECT = "Jetsource-Parked-Subject"
PARKED_ERROR = "Jetsource-Parked-Error"
PARKED_TIME = "Jetsource-Parked-Time"
PARKED_HEADER_PREFIX = "Jetsource-Parked-"

_TOKEN = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")


def valid_token(value: str) -> bool:
    """True when value is safe as a single subject token (ids, names)."""
    return bool(_TOKEN.match(value))


@dataclass(frozen=True, slots=True)
class Context:
    """Subjects and stream names of one bounded context ("orders", "tasks") in a namespace.

    The namespace is empty in production; tests give each run its own so that streams,
    subjects and consumers never collide.
    """

    name: str
    namespace: str = ""

    @property
    def _root(self) -> str:
        return f"{self.namespace}.{self.name}" if self.namespace else self.name

    @property
    def stream(self) -> str:
        base = self.name.upper()
        return f"{self.namespace.upper()}_{base}" if self.namespace else base

    @property
    def events_wildcard(self) -> str:
        return f"{self._root}.events.>"

    def events(self, aggregate_id: str) -> str:
        return f"{self._root}.events.{aggregate_id}"

    def aggregate_id(self, subject: str) -> str:
        return subject.rsplit(".", 1)[1]

    def queue(self, name: str) -> str:
        return f"{self._root}.queue.{name}"

    @property
    def queue_wildcard(self) -> str:
        return f"{self._root}.queue.>"

    def outbox(self, name: str) -> str:
        return f"{self._root}.outbox.{name}"

    @property
    def outbox_wildcard(self) -> str:
        return f"{self._root}.outbox.>"

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
