"""Stream declarations, applied idempotently at start-up."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from bus.subjects import Context, Parked

log = logging.getLogger(__name__)


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


def snapshot_stream(ctx: Context, *, replicas: int = 1) -> StreamConfig:
    """A context's snapshots: one current snapshot per aggregate (one message per subject).
    Not a source of truth — a cache of folds its event streams can always redo — so deletes and
    purges are allowed (`jetsource snapshots drop`)."""
    return _latest_per_subject(ctx.snapshot_stream, ctx.snapshots_wildcard, replicas,
                               f"jetsource {ctx.name} snapshots (a cache of folded state; the events are the truth)")


def parked_stream(parked: Parked, *, replicas: int = 1) -> StreamConfig:
    """The dead-letter stream of events readers parked. Not a source of truth: deletes and
    purges are allowed (a resolved event is deleted), and one message per subject makes
    parking the same event twice (a redelivery, a rebuild) replace it."""
    return _latest_per_subject(parked.stream, parked.wildcard, replicas,
                               "jetsource parked events (could not be decoded or applied)")


def _latest_per_subject(name: str, subject: str, replicas: int, description: str) -> StreamConfig:
    """A stream that is no source of truth: one message per subject (a new one replaces it),
    deletes and purges allowed, Direct Get for readers."""
    return StreamConfig(
        name=name,
        description=description,
        subjects=[subject],
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
        assert config.name is not None
        current = (await js.stream_info(config.name)).config
        if (current.num_replicas or 1) > (config.num_replicas or 1):
            # Never scale a stream down by accident (a `prepare` run without the cluster
            # settings would ask for R1): fewer copies of the source of truth is an operator's
            # explicit decision, made with the nats CLI.
            log.warning("stream %s keeps its %d replicas (asked for %d)", config.name, current.num_replicas,
                        config.num_replicas or 1)
            config = dataclasses.replace(config, num_replicas=current.num_replicas)
        await js.update_stream(config)


async def ensure_work_consumers(js: JetStreamContext, ctx: Context, names: tuple[str, ...], lease_s: float) -> None:
    """One durable pull consumer per work queue (e.g. per priority); ack wait is the lease."""
    for part in ctx.parts:
        for name in names:
            await js.add_consumer(part.stream, _work_consumer(part, name, lease_s))


def _work_consumer(ctx: Context, name: str, lease_s: float) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=ctx.work_consumer(name),
        description=f"jetsource {ctx.name} workers, {name} queue",
        filter_subject=ctx.queue(name),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=lease_s,
        max_deliver=-1,
        max_ack_pending=100_000,
    )


async def wait_for_jetstream(js: JetStreamContext, timeout: float = 30.0) -> None:
    """Until JetStream answers: on a cluster, until its nodes have elected a meta leader."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await js.account_info()
            return
        except NatsError:
            if asyncio.get_running_loop().time() >= deadline:
                raise
            await asyncio.sleep(0.25)


async def stream_leader(js: JetStreamContext, stream: str) -> tuple[str | None, list[str]]:
    """The stream's leader (None during an election) and every peer's name, sorted."""
    cluster = (await js.stream_info(stream)).cluster
    if cluster is None:
        return None, []
    peers = {p.name for p in cluster.replicas or [] if p.name}
    if cluster.leader:
        peers.add(cluster.leader)
    return cluster.leader or None, sorted(peers)


async def spread_leaders(nc: Client, streams: list[str], timeout: float = 10.0) -> dict[str, str | None]:
    """Move stream leaders so each node leads its share: every stream's leader is, of its peers,
    the one leading the fewest of the streams before it. Returns each stream's leader after.

    A leader moves with `STREAM.LEADER.STEPDOWN` naming the preferred peer (nats-server 2.11+);
    where that is refused, plain step-downs until another leads. Best effort: a stream still led
    elsewhere is only a less even spread."""
    js = nc.jetstream()
    leads: dict[str, int] = {}
    out: dict[str, str | None] = {}
    for stream in streams:
        leader, peers = await _elected(js, stream, timeout)
        if not peers:
            out[stream] = leader
            continue
        wanted = min(peers, key=lambda p: (leads.get(p, 0), p != leader, p))
        leads[wanted] = leads.get(wanted, 0) + 1
        if leader != wanted:
            leader = await _move_leader(nc, js, stream, wanted, timeout)
        out[stream] = leader
    return out


async def _elected(js: JetStreamContext, stream: str, timeout: float) -> tuple[str | None, list[str]]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        leader, peers = await stream_leader(js, stream)
        if leader or not peers or asyncio.get_running_loop().time() >= deadline:
            return leader, peers
        await asyncio.sleep(0.1)


async def _move_leader(nc: Client, js: JetStreamContext, stream: str, wanted: str, timeout: float) -> str | None:
    subject = f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}"
    body = json.dumps({"placement": {"preferred": wanted}}).encode()
    leader: str | None = None
    for _ in range(5):
        try:
            reply = json.loads((await nc.request(subject, body, timeout=timeout)).data)
        except NatsError as exc:
            log.warning("stream %s: leader step-down failed: %s", stream, exc)
            return (await stream_leader(js, stream))[0]
        if reply.get("error") and body:
            body = b""  # a server without leader placement: step down and see who is elected
            continue
        leader, _ = await _elected(js, stream, timeout)
        if leader == wanted:
            return leader
    log.info("stream %s: led by %s, not %s, after step-downs", stream, leader, wanted)
    return leader


def config_bucket(namespace: str = "") -> str:
    """The KV bucket of the live configuration (`infra.liveconfig`)."""
    return f"{namespace.upper()}_CONFIG" if namespace else "CONFIG"


def config_stream(bucket: str, *, replicas: int = 1, history: int = 16) -> StreamConfig:
    """The stream of a NATS KV bucket, as `nats kv add` makes it but for purges and roll-ups
    (so the NATS CLI sees a bucket: `nats kv ls`, `nats kv get CONFIG <key>`), keeping
    `history` values per key."""
    return StreamConfig(
        name=f"KV_{bucket}",
        description="jetsource live configuration (jetsource config get|set|list)",
        subjects=[f"$KV.{bucket}.>"],
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_msgs_per_subject=history,
        discard=DiscardPolicy.NEW,
        # `config unset` stores a delete marker; a purge (or a roll-up, which needs the purge
        # permission) would wipe a key's history, so neither is allowed
        allow_rollup_hdrs=False,
        deny_delete=True,
        deny_purge=True,
        allow_direct=True,
        max_consumers=-1,
        max_msgs=-1,
        max_bytes=-1,
        max_age=0,
        duplicate_window=120,
    )
