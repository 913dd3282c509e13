"""The wire types every service shares: coded error replies, batch requests and replies, and the
trace a command continues."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Generic, TypeVar

import msgspec

from bus import subjects as h
from bus.codec import encode
from bus.errors import JetsourceError


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    """The body of every coded error reply and HTTP error response."""

    code: str
    message: str
    field: str | None = None


class ErrorReply(msgspec.Struct, frozen=True, kw_only=True):
    """`{"error": {...}}`: what a caller gets instead of a result."""

    error: ErrorBody


T = TypeVar("T")
# Copied into the headers of stored events, which are written as raw frames: one line.
HeaderValue = Annotated[str, msgspec.Meta(pattern=r"\A[^\r\n]+\Z")]


class Trace(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The trace a command continues: what its `Trace-Id`, `Correlation-Id` and `Causation-Id`
    headers say, or, for an item of a batch, its entry in the batch's `traces`."""

    trace_id: HeaderValue
    correlation_id: HeaderValue | None = None  # None: the trace id
    causation_id: HeaderValue | None = None

    @classmethod
    def of(cls, cause: Mapping[str, str]) -> Trace | None:
        """The trace of a command caused by a stored message (an event, an outbox copy, a work
        item): the message's trace and correlation go on, and its command is the cause."""
        trace_id = cause.get(h.EV_TRACE_ID)
        if not trace_id:
            return None
        correlation_id = cause.get(h.EV_CORRELATION_ID)
        return cls(trace_id=trace_id, correlation_id=correlation_id if correlation_id != trace_id else None,
                   causation_id=cause.get(h.EV_COMMAND_ID) or None)

    def headers(self) -> dict[str, str]:
        """The trace as the headers of a command sent alone."""
        headers = {h.TRACE_ID: self.trace_id, h.CORRELATION_ID: self.correlation_id or self.trace_id}
        if self.causation_id:
            headers[h.CAUSATION_ID] = self.causation_id
        return headers


class CommandBatch(msgspec.Struct, Generic[T], frozen=True, kw_only=True, omit_defaults=True):
    """`{"items": [...], "traces"?: [...]}`: the body of a `<command>_batch` request, commands
    executed as if sent alone. The request's trace headers hold for every item, but for an item
    whose entry in `traces` (one per item, or none) is set: a worker batches the work of many
    traces."""

    items: list[T]
    traces: list[Trace | None] | None = None


class BatchItem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One outcome in a batch reply: the command's reply, or why it was refused."""

    accepted: msgspec.Raw | None = None
    refused: ErrorBody | None = None


class BatchReply(msgspec.Struct, frozen=True, kw_only=True):
    """Reply to a `<command>_batch` request, in request order."""

    results: list[BatchItem]


def error_reply(exc: JetsourceError) -> tuple[bytes, dict[str, str]]:
    """Encode a coded error as a NATS micro error reply."""
    body = encode(ErrorReply(error=ErrorBody(code=exc.code, message=exc.message, field=exc.field)))
    return body, {h.SERVICE_ERROR_CODE: str(exc.status), h.SERVICE_ERROR: exc.message[:500]}
