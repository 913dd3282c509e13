"""Calling jetsource services over NATS request-reply, with coded errors on the way back."""

from __future__ import annotations

import time

import msgspec
from nats.aio.client import Client
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from bus import subjects as h
from bus.connection import request
from bus.errors import NoReplyError, NoResponderError, NotConnectedError, from_code
from bus.wire import ErrorReply

_error_decoder = msgspec.json.Decoder(ErrorReply)


def raise_for_error(data: bytes, headers: dict[str, str] | None) -> None:
    """Turn a coded error reply back into the matching JetsourceError."""
    if not headers or h.SERVICE_ERROR_CODE not in headers:
        return
    try:
        err = _error_decoder.decode(data).error
        raise from_code(err.code, err.message, err.field)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise from_code("internal", headers.get(h.SERVICE_ERROR, "service error")) from None


def with_deadline(headers: dict[str, str] | None, timeout: float) -> dict[str, str]:
    """The headers plus a `Deadline` (epoch ms) `timeout` from now, unless they carry one: a
    service never executes a command whose caller has stopped waiting for it."""
    out = dict(headers) if headers else {}
    out.setdefault(h.DEADLINE, str(int((time.time() + timeout) * 1000)))
    return out


async def call(
    nc: Client, subject: str, body: bytes, *, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> bytes:
    """Request-reply to a service with a deadline; returns the success body or raises a coded
    error: NoResponderError, NoReplyError (on the timeout) or NotConnectedError (at once while
    NATS is unreachable) for the transport's failures, the reply's own error otherwise."""
    try:
        msg = await request(nc, subject, body, timeout=timeout, headers=with_deadline(headers, timeout))
    except NoRespondersError:
        raise NoResponderError(f"no service answers {subject}") from None
    except NatsTimeoutError:
        raise NoReplyError(f"{subject} did not answer within {timeout:g}s") from None
    except ConnectionClosedError:
        raise NotConnectedError("NATS connection is closed") from None
    raise_for_error(msg.data, msg.headers)
    return msg.data

