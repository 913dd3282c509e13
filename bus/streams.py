"""Stream declarations, applied idempotently at start-up."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import BadRequestError

from bus.subjects import Context


def event_stream(ctx: Context, *, replicas: int = 1, duplicate_window_s: float = 300.0) -> StreamConfig:
    """The event stream of a bounded context: the source of truth, never deleted or purged."""
    return StreamConfig(
        name=ctx.stream,
        description=f"jetsource {ctx.name} events (source of truth)",
        subjects=[ctx.events_wildcard],
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=duplicate_window_s,
        deny_delete=True,
        deny_purge=True,
        allow_direct=True,
        allow_atomic=True,
    )


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or bring an existing one to this configuration."""
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != 10058:  # stream name already in use with a different configuration
            raise
        await js.update_stream(config)
