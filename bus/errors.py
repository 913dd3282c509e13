"""The error tree with stable machine codes shared by every transport: the transport's own
errors here, on the base and beside the errors a decider raises (`actors.errors`, re-exported),
and the table that rebuilds any of them from its code.
"""

from __future__ import annotations

# The bus's one import from outside itself: the errors a domain raises, so the tree is one.
from actors.errors import (
    InsufficientStockError,
    JetsourceError,
    NotFoundError,
    PendingError,
    RuleViolationError,
    ValidationError,
)

__all__ = [
    "BY_CODE",
    "ConflictError",
    "DeadlineError",
    "IdempotencyKeyReusedError",
    "InsufficientStockError",
    "InternalError",
    "JetsourceError",
    "MalformedError",
    "NoReplyError",
    "NoResponderError",
    "NotConnectedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PendingError",
    "PreconditionFailedError",
    "RateLimitedError",
    "RuleViolationError",
    "UnavailableError",
    "ValidationError",
    "from_code",
]


class MalformedError(JetsourceError):
    """The request body is not valid JSON (or not a JSON object)."""

    code = "malformed"
    status = 400


class ConflictError(JetsourceError):
    """Concurrent writers kept changing the aggregate; retries were exhausted."""

    code = "conflict"
    status = 409


class PreconditionFailedError(JetsourceError):
    """The caller's expected version (If-Match) is not the aggregate's version."""

    code = "precondition_failed"
    status = 412


class IdempotencyKeyReusedError(JetsourceError):
    """The Idempotency-Key was used before for a different request (command or body)."""

    code = "idempotency_key_reused"
    status = 422


class RateLimitedError(JetsourceError):
    """The caller sent more than its share; retry later."""

    code = "rate_limited"
    status = 429


class PayloadTooLargeError(JetsourceError):
    """The request body exceeds the configured limit."""

    code = "payload_too_large"
    status = 413


class UnavailableError(JetsourceError):
    """A dependency (NATS, JetStream, PostgreSQL) is down or overloaded."""

    code = "unavailable"
    status = 503


class DeadlineError(JetsourceError):
    """The operation did not finish in time; its outcome may be unknown."""

    code = "timeout"
    status = 504


# What a request's transport tells apart (raised by `bus.client.call`, never sent over the wire, so
# not in BY_CODE: a coded reply of the same code rebuilds as the parent). The edge's circuit
# breakers count the first two against the subject, never the third (`http_edge.breaker`).


class NoResponderError(UnavailableError):
    """No service is subscribed to the subject a request was sent to (NATS "no responders")."""


class NoReplyError(DeadlineError):
    """A request got no reply within its timeout: its service is slow, stuck or gone."""


class NotConnectedError(UnavailableError):
    """This process's own NATS connection is down (reconnecting or closed): nothing was sent."""


class InternalError(JetsourceError):
    """An unexpected failure; details are logged, never sent."""

    code = "internal"
    status = 500


BY_CODE: dict[str, type[JetsourceError]] = {
    cls.code: cls
    for cls in (
        MalformedError,
        ValidationError,
        NotFoundError,
        RuleViolationError,
        InsufficientStockError,
        PendingError,
        ConflictError,
        PreconditionFailedError,
        IdempotencyKeyReusedError,
        RateLimitedError,
        PayloadTooLargeError,
        UnavailableError,
        DeadlineError,
        InternalError,
    )
}


def from_code(code: str, message: str, field: str | None = None) -> JetsourceError:
    """Rebuild an error received over the wire from its code."""
    return BY_CODE.get(code, InternalError)(message, field=field)
