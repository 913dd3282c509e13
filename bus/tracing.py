"""The trace a piece of work belongs to, for the log lines written while it runs.

Set where work for a trace begins in a process — the edge's request, an actor's command, a
process manager's event — in the task that does it (asyncio gives every task its own copy of
the context, so nothing leaks from one request to the next); the log formatter reads it."""

from __future__ import annotations

from contextvars import ContextVar

# (trace id, correlation id); None outside any traced work.
CURRENT: ContextVar[tuple[str, str] | None] = ContextVar("jetsource_trace", default=None)


def follow(trace_id: str | None, correlation_id: str | None = None) -> None:
    """Log lines from here on in this task carry this trace (and correlation, by default the trace)."""
    if trace_id:
        CURRENT.set((trace_id, correlation_id or trace_id))
