"""The wire types every service shares: coded error replies, batch requests and replies, and the
trace a command continues."""

from __future__ import annotations

from typing import Generic, TypeVar

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
R = TypeVar("R")


class CommandBatch(msgspec.Struct, Generic[T], frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`{"items": [...]}`: the body of a `<command>_batch` request, commands executed as if sent
    alone."""

    items: list[T]


class BatchItem(msgspec.Struct, Generic[R], frozen=True, kw_only=True, omit_defaults=True):
    """One outcome in a batch reply: the command's reply, or why it was refused. The runtime
    sends replies it has encoded already (`BatchItem[msgspec.Raw]`); `BatchItem[OrderAccepted]`
    is the same bytes, typed (what API descriptions show)."""

    accepted: R | None = None
    refused: ErrorBody | None = None


class BatchReply(msgspec.Struct, Generic[R], frozen=True, kw_only=True):
    """Reply to a `<command>_batch` request, in request order."""

    results: list[BatchItem[R]]


def error_reply(exc: JetsourceError) -> tuple[bytes, dict[str, str]]:
    """Encode a coded error as a NATS micro error reply."""
    body = encode(ErrorReply(error=ErrorBody(code=exc.code, message=exc.message, field=exc.field)))
    return body, {h.SERVICE_ERROR_CODE: str(exc.status), h.SERVICE_ERROR: exc.message[:500]}
