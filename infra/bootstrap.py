"""The composition root: builds each role from settings with owned lifetimes."""

from __future__ import annotations

import asyncio
import json
import contextlib
import functools
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

from aiohttp import web
from nats.aio.client import Client

from actors.runtime import Actor
from actors.tasks.registry import TaskRegistry, build_registry
from actors.tasks.worker import Worker
from bus.connection import connect
from bus.eventstore import PartitionedStore
from bus.streams import (
    config_bucket,
    config_stream,
    ensure_stream,
    event_stream,
    parked_stream,
    snapshot_stream,
    spread_leaders,
    wait_for_jetstream,
)
from bus.subjects import Context, Parked
from http_edge.app import GUARDS, create_app
from http_edge.dashboard import DashboardConfig, Recent
from http_edge.kit import BREAKERS, EdgeConfig
from infra import auth
from infra.asyncapi import asyncapi_document
from infra.contexts import BoundedContext, ProcessManager, declared
from infra.embedded import write_private
from infra.liveconfig import LiveConfig
from infra.settings import Settings
from projections.rebuild import Model, Rebuild, outdated
from projections.runner import Checkpoints, Projector
from projections.schema import create_pool, ensure_schema
from projections.service import QueryService

log = logging.getLogger(__name__)


def orders_context(settings: Settings) -> Context:
    return Context("orders", settings.namespace, settings.partitions)


def tasks_context(settings: Settings) -> Context:
    return Context("tasks", settings.namespace, settings.partitions)


def context(settings: Settings, name: str) -> Context:
    return declared(settings).context(name).context(settings)


def parked_subjects(settings: Settings) -> Parked:
    return Parked(settings.namespace)


def _store(settings: Settings, nc: Client, ctx: Context, work_queue: bool = False) -> PartitionedStore:
    return PartitionedStore.open(
        nc, ctx, work_queue=work_queue, timeout=settings.request_timeout_s,
        max_batch=settings.append_batch_max, max_inflight_batches=settings.append_batches_inflight,
    )


@contextlib.asynccontextmanager
async def nats_connection(settings: Settings, name: str, role: str = auth.ADMIN) -> AsyncIterator[Client]:
    """A connection with the identity of `role` (see infra.auth), drained on exit."""
    nc = await connect(settings.resolved_nats_url(), name, credentials=auth.credentials(settings, role))
    try:
        yield nc
    finally:
        if nc.is_connected:
            await nc.drain()
        else:
            await nc.close()


async def ensure_streams(nc: Client, settings: Settings) -> None:
    """Create or update every declared context's event stream, and what else it needs (idempotent)."""
    js = nc.jetstream()
    for bc in declared(settings).contexts:
        ctx = bc.context(settings)
        for part in ctx.parts:
            await ensure_stream(js, event_stream(part, replicas=settings.stream_replicas,
                                                 duplicate_window_s=settings.duplicate_window_s,
                                                 with_queue=bc.work_queue))
        await ensure_stream(js, snapshot_stream(ctx, replicas=settings.stream_replicas))
        if bc.prepare is not None:
            await bc.prepare(js, ctx, settings)
    await ensure_stream(js, parked_stream(parked_subjects(settings), replicas=settings.stream_replicas))
    await ensure_stream(js, config_stream(config_bucket(settings.namespace), replicas=settings.stream_replicas))


def stream_names(settings: Settings) -> list[str]:
    """Every stream jetsource declares: each context's event streams, the parked events', then
    each context's snapshots (in this order the leaders are spread: the event streams first)."""
    contexts = [bc.context(settings) for bc in declared(settings).contexts]
    return [*(s for ctx in contexts for s in ctx.streams), parked_subjects(settings).stream,
            *(ctx.snapshot_stream for ctx in contexts), f"KV_{config_bucket(settings.namespace)}"]


async def prepare(settings: Settings) -> Settings:
    """Create streams, consumers and the read-model schema (idempotent), as the admin. On the
    embedded cluster, first wait for its nodes to agree, and then spread the stream leaders.
    Returns the settings with the partition count the streams have (see `existing_partitions`)."""
    async with nats_connection(settings, "jetsource-prepare") as nc:
        if settings.nats_cluster:
            await wait_for_jetstream(nc.jetstream(), 30.0)
        settings = await _partitioned_as_stored(nc, settings)
        record_partitions(settings)  # before any stream is created: a creation cut short is completed
        if settings.nats_cluster:
            await _clustered(nc, settings)
        else:
            await ensure_streams(nc, settings)
    await ensure_read_models(settings)
    return settings


class PartitionsMismatch(RuntimeError):
    """The streams were created with another partition count (or the data directory's embedded
    cluster with another size) than the settings ask for."""


def record_cluster(settings: Settings) -> None:
    """`up --cluster N` records N in the data directory: later starts and CLI commands on it
    find every node (and keep R(N) streams) without being told again."""
    if settings.nats_embedded and settings.nats_cluster:
        write_private(settings.data_dir / "cluster", f"{settings.nats_cluster}\n")


def _recorded_count(settings: Settings, name: str) -> int | None:
    """A count the data directory records (`partitions`, `cluster`); None where it records none
    (and for an external server, whose layout is its own)."""
    if not settings.nats_embedded:
        return None
    try:
        return int((settings.data_dir / name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _with_recorded_cluster(settings: Settings) -> Settings:
    nodes = _recorded_count(settings, "cluster")
    if nodes is None or nodes == settings.nats_cluster:
        return settings
    if "nats_cluster" in settings.model_fields_set:
        raise PartitionsMismatch(
            f"{settings.data_dir} holds an embedded cluster of {nodes} nodes and JETSOURCE_NATS_CLUSTER (or "
            f"--cluster) asks for {settings.nats_cluster}: leave it unset, or use another data directory")
    update: dict[str, int] = {"nats_cluster": nodes}
    if "stream_replicas" not in settings.model_fields_set:
        update["stream_replicas"] = nodes
    return settings.model_copy(update=update)


def with_recorded_partitions(settings: Settings) -> Settings:
    """On the embedded server, the layout its data directory was created with: the embedded
    cluster's size (recorded by `up --cluster N`) and the partition count of its streams
    (recorded by `prepare`). What every process started on it uses unless told otherwise —
    before any server starts, since the roles' permissions name every partition stream. Told
    another count explicitly, refuse (PartitionsMismatch)."""
    if not settings.nats_embedded:
        return settings
    settings = _with_recorded_cluster(settings)
    recorded = _recorded_count(settings, "partitions")
    if recorded is None or recorded == settings.partitions:
        return settings
    if "partitions" in settings.model_fields_set:
        raise PartitionsMismatch(
            f"the streams in {settings.data_dir} were created with {recorded} partition(s) and JETSOURCE_PARTITIONS "
            f"(or --partitions) asks for {settings.partitions}: partitions are fixed when the streams are created; "
            f"leave the setting unset (or {recorded}), or start with an empty data directory")
    return settings.model_copy(update={"partitions": recorded})


def record_partitions(settings: Settings) -> None:
    if settings.nats_embedded:
        write_private(settings.data_dir / "partitions", f"{settings.partitions}\n")


async def existing_partitions(nc: Client, settings: Settings) -> dict[str, tuple[int, bool]]:
    """What each declared context's streams already are (contexts with no stream yet are left
    out): (1, False) for the single stream `ORDERS`; (n, True) for `ORDERS_P0` … `ORDERS_P<n-1>`."""
    from nats.js.errors import NotFoundError

    js = nc.jetstream()

    async def exists(stream: str) -> bool:
        try:
            await js.stream_info(stream)
            return True
        except NotFoundError:
            return False

    found: dict[str, tuple[int, bool]] = {}
    for bc in declared(settings).contexts:
        if await exists(Context(bc.name, settings.namespace).stream):
            found[bc.name] = (1, False)
            continue
        count = 0
        while await exists(Context(bc.name, settings.namespace, count + 2, count).stream):
            count += 1
        if count:
            found[bc.name] = (count, True)
    return found


async def _partitioned_as_stored(nc: Client, settings: Settings) -> Settings:
    """Partitions are fixed when the streams are created: a data directory (or server) whose
    streams have K keeps K when the setting is left alone; asking explicitly for another count
    is refused rather than splitting a context's history over two layouts. A creation that did
    not finish (fewer partition streams than the count it was started with, recorded or asked
    for) is completed."""
    found = await existing_partitions(nc, settings)
    if not found:
        return settings
    single = sorted(n for n, (_, parted) in found.items() if not parted)
    parted = {n: k for n, (k, p) in found.items() if p}
    if single and parted:
        raise PartitionsMismatch(f"some contexts have one stream ({', '.join(single)}) and others partitions "
                                 f"({', '.join(f'{n} {k}' for n, k in sorted(parted.items()))})")
    explicit = "partitions" in settings.model_fields_set
    intended = _recorded_count(settings, "partitions") or (settings.partitions if explicit else None)
    if single:
        stored = 1
    elif intended is not None and intended > 1 and max(parted.values()) <= intended:
        stored = intended  # all there, or an unfinished creation that prepare completes now
    elif len(set(parted.values())) == 1:
        stored = next(iter(parted.values()))
    else:
        raise PartitionsMismatch("the contexts' streams have different partition counts ("
                                 + ", ".join(f"{n} {k}" for n, k in sorted(parted.items()))
                                 + "): an unfinished creation? run again with JETSOURCE_PARTITIONS set to its count")
    if stored == settings.partitions:
        return settings
    if explicit:
        raise PartitionsMismatch(
            f"the streams were created with {stored} partition(s) ({', '.join(sorted(found))}) and "
            f"JETSOURCE_PARTITIONS asks for {settings.partitions}: partitions are fixed when the streams are "
            f"created; leave the setting unset (or {stored}), or start with an empty data directory")
    log.info("the streams have %d partition(s); running with that many", stored)
    return settings.model_copy(update={"partitions": stored})


async def _clustered(nc: Client, settings: Settings, timeout: float = 30.0) -> None:
    from nats.errors import Error as NatsError

    js = nc.jetstream()
    await wait_for_jetstream(js, timeout)
    # Until every node has reported in, the meta leader may know too few peers for R3.
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await ensure_streams(nc, settings)
            break
        except NatsError as exc:
            if asyncio.get_running_loop().time() >= deadline:
                raise
            log.info("cluster not ready for the streams yet (%s); retrying", exc)
            await asyncio.sleep(0.5)
    leaders = await spread_leaders(nc, stream_names(settings))
    log.info("stream leaders: %s", ", ".join(f"{s} {n}" for s, n in leaders.items()))


async def ensure_read_models(settings: Settings) -> None:
    """Create the read-model schema and every declared context's tables (idempotent)."""
    ddls = [bc.read_model.ddl for bc in declared(settings).contexts if bc.read_model is not None]
    await ensure_schema(settings.resolved_database_url(), settings.db_schema, ddls)


class Loop(Protocol):
    """A role's long-running loop: `run` until `stop()`; `stopping` once it was called."""

    @property
    def stopping(self) -> bool: ...

    async def run(self) -> None: ...


async def keep_running(name: str, loop: Loop) -> None:
    """Run a role's loop again if it ever ends on an error its own loop does not handle: a dead
    loop inside a live process answers nothing and the supervisor, seeing the process alive,
    would never restart it (seen once after a PostgreSQL kill, before that error was known)."""
    backoff = 1.0
    while True:
        try:
            await loop.run()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            if loop.stopping:
                return
            log.exception("%s stopped on an unexpected error; running it again in %.0fs", name, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)


@contextlib.asynccontextmanager
async def _running(actor: Actor, nc: Client, ctx: Context) -> AsyncIterator[Actor]:
    await _streams_exist(nc, ctx)
    await actor.start()
    try:
        yield actor
    finally:
        await actor.stop()


def run_actor(settings: Settings, nc: Client, name: str) -> contextlib.AbstractAsyncContextManager[Actor]:
    """One declared context's actor, started, and stopped (drained) on exit."""
    bc = declared(settings).context(name)
    ctx = bc.context(settings)
    return _running(Actor(nc, _store(settings, nc, ctx, bc.work_queue), bc.spec(settings),
                          concurrency=settings.actor_concurrency, max_retries=settings.actor_max_retries), nc, ctx)


async def _streams_exist(nc: Client, ctx: Context) -> None:
    """An actor writes only where its partition count says: with another count than the
    streams' (a K = 4 actor on one stream, whose `orders.events.>` would take
    `orders.events.2.<id>` and hide it from every reader), it refuses to start."""
    from nats.js.errors import NotFoundError

    js = nc.jetstream()
    for stream in ctx.streams:
        try:
            await js.stream_info(stream)
        except NotFoundError:
            raise PartitionsMismatch(
                f"stream {stream} does not exist: this process has {ctx.partitions} partition(s) per context "
                f"(JETSOURCE_PARTITIONS) and the streams another count, or they were never created "
                f"(`jetsource prepare`)") from None


def run_orders_actor(settings: Settings, nc: Client) -> contextlib.AbstractAsyncContextManager[Actor]:
    return run_actor(settings, nc, "orders")


def run_tasks_actor(settings: Settings, nc: Client) -> contextlib.AbstractAsyncContextManager[Actor]:
    return run_actor(settings, nc, "tasks")


@contextlib.asynccontextmanager
async def run_worker(
    settings: Settings, nc: Client, registry: TaskRegistry | None = None, name: str | None = None,
    live: LiveConfig | None = None,
) -> AsyncIterator[Worker]:
    """Task workers: the handlers of every registered task type (their concurrency follows
    the live configuration, given `live`)."""
    worker = Worker(
        nc, tasks_context(settings), registry or build_registry(settings.task_modules),
        concurrency=settings.worker_concurrency, lease_s=settings.task_lease_s,
        name=name or f"{socket.gethostname()}:{os.getpid()}", request_timeout=settings.request_timeout_s,
    )
    if live is not None:
        live.on("worker_concurrency", worker.resize)
    task = asyncio.get_running_loop().create_task(keep_running("worker", worker))
    try:
        yield worker
    finally:
        await worker.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def run_managers(
    settings: Settings, connection: Callable[[ProcessManager], Awaitable[Client]], only: Sequence[str] = (),
) -> AsyncIterator[list[Any]]:
    """Every declared process manager (or those named), each on the connection `connection`
    gives it (its own identity's, under `jetsource managers`)."""
    found = declared(settings)
    subjects = found.subjects(settings)
    managers = [pm for pm in found.managers if not only or pm.name in only]
    loops = [pm.build(await connection(pm), subjects, settings) for pm in managers]
    tasks = [asyncio.get_running_loop().create_task(keep_running(f"process manager {pm.name}", loop))
             for pm, loop in zip(managers, loops, strict=True)]
    try:
        yield loops
    finally:
        for loop in loops:
            loop.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _read_models(settings: Settings) -> list[tuple[BoundedContext, Context]]:
    return [(bc, bc.context(settings)) for bc in declared(settings).contexts if bc.read_model is not None]


@contextlib.asynccontextmanager
async def run_projector(settings: Settings, nc: Client, live: LiveConfig | None = None) -> AsyncIterator[list[Projector]]:
    """Every declared read model's projection and the query endpoints that read it (their
    linger follows the live configuration, given `live`)."""
    await ensure_read_models(settings)
    # Each projector holds a connection for its advisory lock while it runs and borrows one per
    # batch: two per projector (one per read model and partition), and the queries' share.
    projectors_count = len(_read_models(settings)) * settings.partitions
    pool = await create_pool(settings.resolved_database_url(), settings.db_schema,
                             max_size=max(20, 2 * projectors_count + 10))
    try:
        checkpoints = Checkpoints(pool)
        projectors, queries = [], QueryService(nc, pool, checkpoints, read_wait_timeout=settings.read_wait_timeout_s)
        for bc, ctx in _read_models(settings):
            model = bc.read_model
            assert model is not None
            mine = [Projector(nc, pool, part, (projection := model.projection()), checkpoints,
                              batch=settings.projection_batch, busy_linger_s=settings.projection_busy_linger_s)
                    for part in ctx.parts]  # one projector (consumer, checkpoint) per partition
            projectors += mine
            await queries.add(ctx, model.queries, projection.name, functools.partial(_positions, mine))
        if live is not None:
            def linger(seconds: float) -> None:
                for projector in projectors:
                    projector.busy_linger_s = seconds

            live.on("projection_busy_linger_s", linger)
        running = [asyncio.get_running_loop().create_task(keep_running(f"projection {p.durable}", p))
                   for p in projectors]
        # A read model built by an older version of its projection is rebuilt aside (blue/green)
        # while this projector keeps the live one serving.
        models = [Model.of(bc, ctx) for bc, ctx in _read_models(settings)]
        rebuilds = [asyncio.get_running_loop().create_task(_rebuild_outdated(settings, nc, model))
                    for model in await outdated(pool, models)]
        try:
            yield projectors
        finally:
            for task in rebuilds:
                task.cancel()
            await asyncio.gather(*rebuilds, return_exceptions=True)
            for projector in projectors:
                projector.stop()
            await queries.stop()
            await asyncio.wait_for(asyncio.gather(*running), 10)
    finally:
        await pool.close()


def _positions(projectors: list[Projector]) -> dict[str, Any]:
    """A read model's projectors as the dashboard shows them (its query service's `$SRV.STATS`)."""
    return {"projection": [{"name": p.name, "stream": p.stream, "checkpoint": p.checkpoint, "lag": p.pending}
                           for p in projectors]}


async def _rebuild_outdated(settings: Settings, nc: Client, model: Model) -> None:
    log.warning("read model %s was built by an older version of its projection: rebuilding it aside (version %d)",
                model.name, model.version)
    try:
        done = await Rebuild(nc, settings.resolved_database_url(), settings.db_schema, model,
                             parked=parked_subjects(settings),
                             report=lambda line: log.info("rebuild %s", json.dumps(line))).run()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("rebuild of read model %s failed; the live one keeps serving (the next start retries)",
                      model.name)
        return
    log.warning("read model %s: %s", model.name, "rebuilt and swapped" if done.get("swapped")
                else f"not rebuilt: {done.get('reason')}")


def _tokens(setting: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in setting.split(",") if t.strip())


def edge_app(settings: Settings, nc: Client) -> web.Application:
    config = EdgeConfig(
        request_timeout=settings.request_timeout_s,
        read_wait_timeout=settings.read_wait_timeout_s,
        max_body_bytes=settings.max_body_bytes,
        max_inflight=settings.max_inflight,
        rate_limit_per_s=settings.rate_limit_per_s,
        api_tokens=_tokens(settings.api_tokens),
        api_read_tokens=_tokens(settings.api_read_tokens),
        metrics_open=settings.metrics_open,
        breaker_failures=settings.breaker_failures,
        breaker_cooldown_s=settings.breaker_cooldown_s,
    )
    found = declared(settings)
    subjects = found.subjects(settings)
    return create_app(nc, subjects, config,
                      [bc.routes for bc in found.contexts if bc.routes is not None],
                      [bc.openapi for bc in found.contexts if bc.openapi is not None],
                      {bc.name: bc.spec(settings) for bc in found.contexts},
                      asyncapi_document=asyncapi_document(settings),
                      dashboard_config=DashboardConfig(
                          recent=tuple(Recent(bc.name, bc.contract.id_field, f"/{bc.name}") for bc in found.contexts
                                       if bc.contract is not None and bc.read_model is not None
                                       and "list" in bc.read_model.queries),
                          tasks="tasks" if "tasks" in subjects else None,
                          parked=parked_subjects(settings)))


@contextlib.asynccontextmanager
async def run_edge(settings: Settings, nc: Client, live: LiveConfig | None = None) -> AsyncIterator[web.AppRunner]:
    """The HTTP edge (its limits follow the live configuration, given `live`)."""
    app = edge_app(settings, nc)
    if live is not None:
        guards = app[GUARDS]
        live.on("max_inflight", lambda n: guards.configure(max_inflight=n))
        live.on("rate_limit_per_s", lambda rate: guards.configure(rate_per_s=rate))
        breakers = app[BREAKERS]
        live.on("breaker_failures", lambda n: breakers.configure(failures=n))
        live.on("breaker_cooldown_s", lambda seconds: breakers.configure(cooldown_s=seconds))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port, backlog=1024)
    await site.start()
    try:
        yield runner
    finally:
        await runner.cleanup()
