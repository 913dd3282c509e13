"""The errors a decider raises to refuse a command, with stable machine codes (public contract).

Standard library only, so a domain raises them without importing the bus. `bus.errors` adds the
transport's errors to the same tree (one base) and maps every code back to its class.
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


class InsufficientStockError(RuleViolationError):
    """Not enough available stock for a reservation (nothing was reserved)."""

    code = "insufficient_stock"
    status = 409


class PendingError(JetsourceError):
    """The aggregate waits on another context's answer (a saga step, such as an order's stock
    reservation); the command can be decided once it has come. The runtime waits for it, bounded,
    before answering with this. Not a refusal: retry it (a process manager does, in place)."""

    code = "pending"
    status = 409
