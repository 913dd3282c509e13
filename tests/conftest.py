"""Real servers for the test session: a nats-server with JetStream and a PostgreSQL, on free
ports in temporary directories. Each test gets its own namespace (subjects, streams, schema)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
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

from bus.runtime import Actor
from bus.subjects import Context
from actors.tasks.worker import Worker
from infra.bootstrap import (
    ensure_streams,
    nats_connection,
    orders_context,
    run_edge,
    run_orders_actor,
    run_projector,
    run_tasks_actor,
    run_worker,
    tasks_context,
)
from infra.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from infra.settings import Settings
from projections.runner import Projector

_counter = itertools.count(1)
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
    projector: Projector
    stack: contextlib.AsyncExitStack
    tasks_actor: contextlib.AsyncExitStack  # the task actor's lifetime, which a test may end early

    @property
    def orders(self) -> Context:
        return orders_context(self.settings)

    @property
    def tasks(self) -> Context:
        return tasks_context(self.settings)

    async def start_worker(self, name: str = "w1", **overrides: Any) -> Worker:
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        return await self.stack.enter_async_context(run_worker(settings, self.nc, name=name))

    async def stop_tasks_actor(self) -> None:
        """Take the task actor away, as in an outage: its commands get no responders."""
        await self.tasks_actor.aclose()

    async def start_tasks_actor(self) -> None:
        await self.tasks_actor.enter_async_context(run_tasks_actor(self.settings, self.nc))

    async def request(self, subject: str, body: dict[str, Any] | bytes, headers: dict[str, str] | None = None) -> Msg:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.nc.request(subject, data, timeout=10, headers=headers)


def make_settings(namespace: str, nats_url: str, database_url: str, **extra: Any) -> Settings:
    return Settings(
        nats_url=nats_url, database_url=database_url, namespace=namespace, db_schema=namespace,
        http_port=free_port(), _env_file=None, task_lease_s=3.0, task_modules="tests.task_types", **extra,
    )


@pytest.fixture
async def system(namespace: str, nats_url: str, database_url: str) -> AsyncIterator[System]:
    settings = make_settings(namespace, nats_url, database_url)
    async with contextlib.AsyncExitStack() as stack:
        nc = await stack.enter_async_context(nats_connection(settings, "test"))
        await ensure_streams(nc, settings)
        actor = await stack.enter_async_context(run_orders_actor(settings, nc))
        tasks_actor = await stack.enter_async_context(contextlib.AsyncExitStack())
        await tasks_actor.enter_async_context(run_tasks_actor(settings, nc))
        projector = await stack.enter_async_context(run_projector(settings, nc))
        await stack.enter_async_context(run_edge(settings, nc))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        yield System(settings, nc, http, f"http://127.0.0.1:{settings.http_port}", actor, projector, stack, tasks_actor)
