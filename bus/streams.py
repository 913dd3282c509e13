"""Stream declarations, applied idempotently at start-up."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from bus.subjects import Context, Parked


def event_stream(
    ctx: Context, *, replicas: int = 1, duplicate_window_s: float = 300.0, with_queue: bool = False
) -> StreamConfig:
    """The event stream of a bounded context: the source of truth, never deleted or purged.

    Besides `<ctx>.events.>` it holds `<ctx>.outbox.>` (notifications for other contexts) and,
    `with_queue`, `<ctx>.queue.>` (work items): both are stored in the same atomic batch as the
    events that cause them, so consumers can filter on them server-side.
    """
    return StreamConfig(
        name=ctx.stream,
        description=f"jetsource {ctx.name} events (source of truth)",
        subjects=[ctx.events_wildcard, ctx.outbox_wildcard, *([ctx.queue_wildcard] if with_queue else [])],
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=duplicate_window_s,
        deny_delete=True,
        deny_purge=True,
        allow_direct=True,
        allow_atomic=True,
    )


def parked_stream(parked: Parked, *, replicas: int = 1) -> StreamConfig:
    """The dead-letter stream of events readers parked. Not a source of truth: deletes and
    purges are allowed (a resolved event is deleted), and one message per subject makes
    parking the same event twice (a redelivery, a rebuild) replace it."""
    return StreamConfig(
        name=parked.stream,
        description="jetsource parked events (could not be decoded or applied)",
        subjects=[parked.wildcard],
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_msgs_per_subject=1,
        deny_delete=False,
        deny_purge=False,
        allow_direct=True,
    )


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or bring an existing one to this configuration."""
    try:
        await js.add_stream(config)
    except BadRequestError as exc:
        if exc.err_code != 10058:  # stream name already in use with a different configuration
            raise
        await js.update_stream(config)


async def ensure_work_consumers(js: JetStreamContext, ctx: Context, names: tuple[str, ...], lease_s: float) -> None:
    """One durable pull consumer per work queue (e.g. per priority); ack wait is the lease."""
    for name in names:
        config = ConsumerConfig(
            durable_name=ctx.work_consumer(name),
            description=f"jetsource {ctx.name} workers, {name} queue",
            filter_subject=ctx.queue(name),
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=lease_s,
            max_deliver=-1,
            max_ack_pending=100_000,
        )
        await js.add_consumer(ctx.stream, config)
