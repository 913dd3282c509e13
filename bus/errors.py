"""The domain error tree: stable machine codes shared by every transport.

Imports nothing from NATS so pure domain code may raise these.
"""

from __future__ import annotations


class JetsourceError(Exception):
    """Base of every error with a stable machine code."""

    code = "internal"
    status = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class MalformedError(JetsourceError):
    """The request body is not valid JSON (or not a JSON object)."""

    code = "malformed"
    status = 400


class ValidationError(JetsourceError):
    """A field is missing, of the wrong type or out of range."""

    code = "validation"
    status = 422


class NotFoundError(JetsourceError):
    """The addressed aggregate or read model row does not exist."""

    code = "not_found"
    status = 404


class RuleViolationError(JetsourceError):
    """The command is well-formed but forbidden in the aggregate's current state."""

    code = "rule_violation"
    status = 409


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


class InsufficientStockError(RuleViolationError):
    """Not enough available stock for a reservation (nothing was reserved)."""

    code = "insufficient_stock"
    status = 409


class PendingError(RuleViolationError):
    """The aggregate waits on another context's answer (a saga step, such as an order's stock
    reservation); the command can be decided once it has come. The runtime waits for it, bounded,
    before answering with this."""

    code = "pending"
    status = 409


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
