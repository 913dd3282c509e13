"""Query endpoints answered from the read models (`<context>.query.*`)."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg
from nats.aio.client import Client
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service

from bus.codec import Decoder
from bus.errors import DeadlineError, UnavailableError
from bus.eventstore import EventStore
from bus.service import Concurrency, add_service, respond
from bus.subjects import Context
from projections.runner import Checkpoints
from projections.schema import database_down

log = logging.getLogger(__name__)


class QueryService:
    """Serves queries concurrently (bounded), waiting for read-your-writes when asked."""

    def __init__(
        self, nc: Client, pool: asyncpg.Pool, checkpoints: Checkpoints, *, read_wait_timeout: float, concurrency: int = 64
    ) -> None:
        self._nc = nc
        self._pool = pool
        self._checkpoints = checkpoints
        self._wait = read_wait_timeout
        self._concurrency = Concurrency(concurrency)
        self._services: list[Service] = []
        self._outage = False  # logged once per database outage, not once per query

    async def add(self, ctx: Context, queries: Mapping[str, Any], projection: str,
                  stats: Callable[[], Any] | None = None) -> None:
        """Serve `<ctx>.query.<name>` for each declared query (`request` Struct, `run(pool, q)`),
        answered from the read model `projection` (whose checkpoint read-your-writes waits on);
        `stats()` is the service's `$SRV.STATS` data (the projectors' positions)."""
        pool = self._pool
        endpoints = {name: (Decoder(q.request), functools.partial(q.run, pool), self._fresh(ctx, projection, q))
                     for name, q in queries.items()}
        await self._add(ctx, endpoints, stats)

    def _fresh(self, ctx: Context, projection: str, query: Any) -> Callable[[Any, int], Awaitable[bool]]:
        """How a query waits (bounded) for the read model to have projected `min_seq`: the
        projection's checkpoint; over partitions, the checkpoint of the partition of the
        aggregate the query names, or else every partition's, up to what it held just now."""
        if not ctx.partitioned:
            return lambda _, seq: self._checkpoints.wait(projection, seq, self._wait)
        field = getattr(query, "aggregate", None)

        async def wait(q: Any, seq: int) -> bool:
            if field is not None and (aggregate_id := getattr(q, field, None)):
                return await self._checkpoints.wait(ctx.part_of(aggregate_id).checkpoint(projection), seq, self._wait)
            lasts = [(part, await EventStore(self._nc, part.stream).last_seq(part.events_wildcard))
                     for part in ctx.parts]
            done = await asyncio.gather(*(self._checkpoints.wait(part.checkpoint(projection), last, self._wait)
                                          for part, last in lasts if last))
            return all(done)

        return wait

    async def _add(
        self,
        ctx: Context,
        endpoints: Mapping[str, tuple[Decoder[Any], Callable[[Any], Awaitable[Any]], Callable[[Any, int], Awaitable[bool]]]],
        stats: Callable[[], Any] | None = None,
    ) -> None:
        first = next(iter(endpoints), None)
        service = await add_service(
            self._nc,
            name=f"{ctx.service_name}_query",
            version="1.0.0",
            description=f"jetsource {ctx.name} read models",
            queue_group=f"{ctx.queue_group}.query",
            # on the first endpoint only: one copy per instance
            stats_handler=(lambda endpoint: stats() if endpoint.name == first else None) if stats else None,
        )
        for name, (decoder, run, fresh) in endpoints.items():
            await service.add_endpoint(
                EndpointConfig(
                    name=name,
                    subject=ctx.query(name),
                    handler=self._endpoint(decoder, run, fresh, ctx.name),
                    metadata={"kind": "query"},
                )
            )
        self._services.append(service)

    def _endpoint(
        self, decoder: Decoder[Any], run: Callable[[Any], Awaitable[Any]],
        fresh: Callable[[Any, int], Awaitable[bool]], projection: str,
    ) -> Callable[[Request], Awaitable[None]]:
        async def execute(data: bytes) -> Any:
            query = decoder.decode(data)
            min_seq = getattr(query, "min_seq", None)
            try:
                if min_seq and not await fresh(query, min_seq):
                    raise DeadlineError(f"the {projection} read model has not reached sequence {min_seq} yet")
                result = await run(query)
            except Exception as exc:
                if not database_down(exc):
                    raise
                if not self._outage:
                    self._outage = True
                    log.warning("read-model database unavailable (%s: %s); answering queries 503 until it is back",
                                type(exc).__name__, exc)
                raise UnavailableError("the read-model database is unavailable; retry shortly") from None
            if self._outage:
                self._outage = False
                log.info("read-model database is back")
            return result

        async def handle(request: Request) -> None:
            await respond(request, lambda: execute(request.data))

        return self._concurrency.wrap(handle)

    async def stop(self) -> None:
        for service in self._services:
            await service.stop()
        await self._concurrency.drain()
