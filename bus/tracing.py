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


_HEX = frozenset("0123456789abcdef")


def w3c_trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`), or None
    when there is none or it is not valid (version ff, an all-zero id, wrong lengths): then the
    request starts a trace of its own, as the W3C recommendation says."""
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or (parts[0] == "00" and len(parts) != 4):
        return None
    version, trace_id, parent_id, flags = parts[:4]
    if (len(version), len(trace_id), len(parent_id), len(flags)) != (2, 32, 16, 2) or version == "ff":
        return None
    if not _HEX.issuperset(version + trace_id + parent_id + flags):
        return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return trace_id
