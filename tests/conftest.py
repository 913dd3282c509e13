"""Real servers for the test session: a nats-server with JetStream and a PostgreSQL, on free
ports in temporary directories. Each test gets its own namespace (subjects, streams, schema)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from actors.runtime import Actor
from actors.tasks.worker import Worker
from bus.subjects import Context
from infra.bootstrap import (
    context,
    ensure_streams,
    nats_connection,
    run_actor,
    run_edge,
    run_managers,
    run_projector,
    run_tasks_actor,
    run_worker,
)
from infra.contexts import declared
from infra.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from infra.liveconfig import LiveConfig
from infra.settings import Settings
from projections.runner import Projector

_counter = itertools.count(1)
FULFILMENT = "fulfilment"
T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], object] = bool, *, timeout: float = 10.0,
    every: float = 0.05, failure: str = "never happened",
) -> T:
    """Await `probe` until `done` holds for what it returns, and return that; fail with
    `failure` and the last value seen once `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"{failure} (within {timeout:g} s); last seen: {value!r}"
        await asyncio.sleep(every)


async def until(condition: Callable[[], object], *, timeout: float = 10.0, every: float = 0.05,
                failure: str = "never happened") -> None:
    """`eventually` for a condition this process sees without awaiting anything."""

    async def check() -> object:
        return condition()

    await eventually(check, timeout=timeout, every=every, failure=failure)


@pytest.fixture(scope="session")
def servers_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="jetsource-test-") as d:
        yield Path(d)


@pytest.fixture(scope="session")
def nats_url(servers_dir: Path) -> Iterator[str]:
    if os.environ.get("JETSOURCE_TEST_NATS_URL"):
        yield os.environ["JETSOURCE_TEST_NATS_URL"]
        return
    server = EmbeddedNats(servers_dir, free_port(), free_port())
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def database_url(servers_dir: Path) -> Iterator[str]:
    if os.environ.get("JETSOURCE_DATABASE_URL"):
        yield os.environ["JETSOURCE_DATABASE_URL"]
        return
    server = EmbeddedPostgres(servers_dir, free_port(), durable=False)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def namespace() -> str:
    return f"t{os.getpid()}x{next(_counter)}"


@dataclass
class System:
    """One in-process jetsource (actor, projector, queries, edge) on the session's servers."""

    settings: Settings
    nc: Client
    http: aiohttp.ClientSession
    base: str
    actor: Actor
    projectors: list[Projector]
    stack: contextlib.AsyncExitStack
    tasks_actor: contextlib.AsyncExitStack  # the task actor's lifetime, which a test may end early
    actors: dict[str, Actor]
    live: LiveConfig  # the live configuration its edge, projector and workers follow

    def ctx(self, name: str) -> Context:
        return context(self.settings, name)

    @property
    def orders(self) -> Context:
        return self.ctx("orders")

    @property
    def tasks(self) -> Context:
        return self.ctx("tasks")

    @property
    def inventory(self) -> Context:
        return self.ctx("inventory")

    async def messages(self, ctx: Context) -> int:
        """Messages stored in every stream (partition) of a context."""
        js = self.nc.jetstream()
        return sum([(await js.stream_info(stream)).state.messages for stream in ctx.streams])

    @property
    def projector(self) -> Projector:
        return self.projectors[0]

    async def start_worker(self, name: str = "w1", *, fulfilment: bool = True, **overrides: Any) -> Worker:
        """A task worker and, unless told otherwise, the fulfilment process manager (paid orders
        are fulfilled by tasks: without workers nothing would run them)."""
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        worker = await self.stack.enter_async_context(run_worker(settings, self.nc, name=name, live=self.live))
        if fulfilment and not self._fulfilling:
            self._fulfilling = True
            await self.stack.enter_async_context(run_managers(settings, self._connection, [FULFILMENT]))
        return worker

    async def _connection(self, pm: Any) -> Client:
        return await self.stack.enter_async_context(nats_connection(self.settings, f"test-{pm.name}"))

    _fulfilling: bool = False

    async def stop_tasks_actor(self) -> None:
        """Take the task actor away, as in an outage: its commands get no responders."""
        await self.tasks_actor.aclose()

    async def start_tasks_actor(self) -> None:
        await self.tasks_actor.enter_async_context(run_tasks_actor(self.settings, self.nc))

    async def request(self, subject: str, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None) -> Msg:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.nc.request(subject, data, timeout=10, headers=headers)


ROOT = Path(__file__).resolve().parents[1]


async def cli(system: System, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`jetsource ARGS` in a subprocess, on this system's servers and namespace (plus `env`)."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "JETSOURCE_NATS_URL": system.settings.resolved_nats_url(),
               "JETSOURCE_DATABASE_URL": system.settings.resolved_database_url(),
               "JETSOURCE_NAMESPACE": system.settings.namespace, "JETSOURCE_DB_SCHEMA": system.settings.db_schema,
               "JETSOURCE_PARTITIONS": str(system.settings.partitions), **env}
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "infra.cli", *args], env=environ,
                                   capture_output=True, text=True, timeout=60, cwd=ROOT)


# Every test on a `system` (or `partitions`) runs once per count here: one stream per context,
# and four partitions. JETSOURCE_TEST_PARTITIONS=1 runs the suite on one stream only.
PARTITIONS = [int(k) for k in os.environ.get("JETSOURCE_TEST_PARTITIONS", "1,4").split(",")]


@pytest.fixture(params=PARTITIONS, ids=lambda k: f"k{k}")
def partitions(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture(autouse=True)
def _fresh_task_types() -> None:
    """The test task types' gates and records start empty (a test runs once per partition count:
    a gate its first run opened must not let the second run's task through)."""
    from tests import task_types

    for record in (task_types.STARTED, task_types.GATES, task_types.STOPPED, task_types.UNFULFILLABLE,
                   task_types.RUNS):
        record.clear()
    task_types.RUNNING.update(now=0, most=0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test of one stream's mechanics (`single_stream`) runs on one partition only."""
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        params = getattr(item, "callspec", None)
        many = params is not None and params.params.get("partitions", 1) != 1
        (drop if many and item.get_closest_marker("single_stream") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def make_settings(namespace: str, nats_url: str, database_url: str, **extra: Any) -> Settings:
    return Settings(
        nats_url=nats_url, database_url=database_url, namespace=namespace, db_schema=namespace,
        http_port=free_port(), _env_file=None, task_lease_s=3.0, task_modules="tests.task_types", **extra,
    )


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[System]:
    """Every declared context's actor, the projector, the edge and the process managers (the
    fulfilment manager starts with the first worker: `start_worker`), in this process."""
    async with contextlib.AsyncExitStack() as stack:
        nc = await stack.enter_async_context(nats_connection(settings, "test"))
        await ensure_streams(nc, settings)
        actors: dict[str, Actor] = {}
        tasks_actor = contextlib.AsyncExitStack()
        for name in declared(settings).names():
            if name == "tasks":
                tasks_actor = await stack.enter_async_context(contextlib.AsyncExitStack())
                actors[name] = await tasks_actor.enter_async_context(run_tasks_actor(settings, nc))
            else:
                actors[name] = await stack.enter_async_context(run_actor(settings, nc, name))
        live = await stack.enter_async_context(LiveConfig(nc, settings).running())
        projectors = await stack.enter_async_context(run_projector(settings, nc, live))
        await stack.enter_async_context(run_edge(settings, nc, live))
        others = [pm.name for pm in declared(settings).managers if pm.name != FULFILMENT]

        async def own(pm: Any) -> Client:  # each manager on its own connection, as in production
            return await stack.enter_async_context(nats_connection(settings, f"test-{pm.name}"))

        if others:
            await stack.enter_async_context(run_managers(settings, own, others))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        yield System(settings, nc, http, f"http://127.0.0.1:{settings.http_port}", actors["orders"], projectors,
                     stack, tasks_actor, actors, live)


@pytest.fixture
async def system(partitions: int, namespace: str, nats_url: str, database_url: str) -> AsyncIterator[System]:
    async with running(make_settings(namespace, nats_url, database_url, partitions=partitions)) as sys_:
        yield sys_
