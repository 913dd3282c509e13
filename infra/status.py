"""`jetsource status` and `jetsource projections rebuild`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NotFoundError

from bus import parking
from bus import subjects as h
from bus.connection import connect
from bus.subjects import Context
from infra.auth import ADMIN, credentials
from infra.bootstrap import ensure_read_models, parked_subjects, stream_names
from infra.contexts import declared
from infra.settings import Settings
from projections.runner import Projection


@dataclass(frozen=True)
class ReadModel:
    """A projection, the stream it folds and the tables it owns."""

    ctx: Context
    projection: Projection
    tables: tuple[str, ...]
    make: Callable[[], Projection]  # a fresh projection (one per partition's projector)


def read_models(settings: Settings) -> list[ReadModel]:
    """Every declared context's read model."""
    return [ReadModel(bc.context(settings), bc.read_model.projection(), bc.read_model.tables, bc.read_model.projection)
            for bc in declared(settings).contexts if bc.read_model is not None]


async def last_event_seq(nc: Client, ctx: Context) -> int:
    """The sequence of the newest event of a stream (a partition's view, or a context of one
    stream): the stream also holds outbox and queue messages."""
    try:
        return int((await nc.jetstream().get_last_msg(ctx.stream, ctx.events_wildcard)).seq or 0)
    except NotFoundError:
        return 0


async def _discover(nc: Client, timeout: float = 0.5) -> list[dict[str, object]]:
    """Every NATS micro service instance answering $SRV.INFO."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish("$SRV.INFO", b"", reply=inbox)
    found = []
    try:
        while True:
            msg = await sub.next_msg(timeout)
            if msg.headers and h.STATUS in msg.headers:
                break  # "no responders": nothing answers (status must still report the rest)
            found.append(msgspec.json.decode(msg.data))
    except NatsTimeoutError:
        pass
    finally:
        await sub.unsubscribe()
    return found


async def consumer_line(nc: Client, stream: str, durable: str, label: str) -> str:
    try:
        info = await nc.jetstream().consumer_info(stream, durable)
    except NotFoundError:
        return f"  {label:<26} (no consumer yet)"
    floor = info.ack_floor.stream_seq if info.ack_floor else 0
    return f"  {label:<26} pending={info.num_pending or 0} in_flight={info.num_ack_pending or 0} acked_through={floor}"


async def status(settings: Settings, nc: Client) -> int:
    """Print services, streams, projection lag, work queues, process-manager lag and parked counts."""
    js = nc.jetstream()
    services = await _discover(nc)
    print("services:")
    for svc in sorted(services, key=lambda s: (str(s["name"]), str(s["id"]))):
        endpoints = ", ".join(str(e["subject"]) for e in svc.get("endpoints", []))  # type: ignore[attr-defined]
        print(f"  {svc['name']:<26} {svc['id']}  {endpoints}")
    if not services:
        print("  (none answering)")
    code = 0
    found = declared(settings)
    print("streams:")
    nodes: dict[str, list[str]] = {}  # node name -> the streams it leads
    offline: set[str] = set()
    for stream in stream_names(settings):
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            print(f"  {stream:<26} missing (run `jetsource up` once)")
            code = 1
            continue
        line = (f"  {stream:<26} messages={info.state.messages} last_seq={info.state.last_seq} "
                f"replicas={info.config.num_replicas}")
        if (cluster := info.cluster) is not None and (cluster.leader or cluster.replicas):
            leader = cluster.leader or "(electing)"
            if cluster.leader:
                nodes.setdefault(cluster.leader, []).append(stream)
            peers = []
            for peer in cluster.replicas or []:
                name = peer.name or "?"
                nodes.setdefault(name, [])
                if peer.offline:
                    offline.add(name)
                state = "offline" if peer.offline else "current" if peer.current else f"lag={peer.lag or 0}"
                peers.append(f"{name}({state})")
            line += f" leader={leader} followers={','.join(peers) or '-'}"
        print(line)
    if nodes:
        print("nodes (as the streams see them):")
        for name in sorted(nodes):
            leads = ", ".join(nodes[name]) or "-"
            print(f"  {name:<26} {'offline' if name in offline else 'up':<8} leads: {leads}")
    print("projections (lag = events not yet applied):")
    for model in read_models(settings):
        durable = model.ctx.consumer(model.projection.name)
        for part in model.ctx.parts:
            print(await consumer_line(nc, part.stream, durable, part.checkpoint(model.projection.name)))
    for bc in found.contexts:
        if bc.status is not None:
            print("\n".join(await bc.status(nc, bc.context(settings))))
    print("process managers:")
    subjects = found.subjects(settings)
    for pm in found.managers:
        for name in pm.consumes:
            for stream in subjects[name].streams:
                print(await consumer_line(nc, stream, pm.reader, f"{pm.name} <- {stream}"))
    print("parked (events a reader could not decode or apply, and moved past):")
    parked = await parking.counts(nc, parked_subjects(settings))
    for reader, n in sorted(parked.items()):
        print(f"  {reader:<26} {n}")
    if parked:
        print("  list them with `jetsource projections parked`; then `... parked retry` or `... parked skip`")
    else:
        print("  (none)")
    return code


async def rebuild(settings: Settings, only: str | None = None, *, keep: bool = False,
                  require_parity: bool = False) -> int:
    """Blue/green rebuilds (`projections.rebuild`) of every read model (or `only` one), printing
    progress as JSON lines; 1 when one was not swapped (`require_parity` and a difference)."""
    from projections.rebuild import Model, Rebuild

    await ensure_read_models(settings)
    nc = await connect(settings.resolved_nats_url(), "jetsource-rebuild", credentials=credentials(settings, ADMIN))
    code = 0
    try:
        for bc in declared(settings).contexts:
            if bc.read_model is None:
                continue
            name = bc.read_model.projection().name
            if only and name != only:
                continue
            model = Model.of(bc, bc.context(settings))
            job = Rebuild(nc, settings.resolved_database_url(), settings.db_schema, model,
                          parked=parked_subjects(settings), report=lambda line: print(json.dumps(line), flush=True))
            done = await job.run(keep=keep, require_parity=require_parity)
            if not done["swapped"]:
                print(json.dumps({"projection": name, "phase": "kept", "reason": done.get("reason")}), flush=True)
                code = 1
        return code
    finally:
        await nc.close()
