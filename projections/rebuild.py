"""Blue/green rebuilds of a read model: a new copy is built aside, from the streams, while the
live one keeps serving and following; when the copy has caught up, both are held at the same
stream sequence, compared (row counts and per-table checksums, a diff report when they differ),
and swapped in one transaction. Readers never see the read model empty or older than it was.

The steps, for one read model of K partitions:

1. A copy schema (`<schema>__<name>_next`) gets the model's DDL and its own checkpoints; copy
   projectors fold the streams into it from the first event, reading them by batched Direct
   Get of every subject (no consumer; outbox and queue messages are skipped here: a filtered
   read from the start cost the server ~30 µs an event on a stream of many subjects), each
   batch asked for while the one before is applied; progress: events/s, lag and ETA.
2. When the copy is within `HOLD_LAG` events of the streams' heads, both the live and the copy
   checkpoints are *held* at the heads' sequences T (per partition): each projector applies up
   to T and then waits (the live read model still serves, and only lags while held).
3. With both at T, each table is compared: row count and the sum of a hash of every row's text.
   A difference is reported (counts, checksums and up to `DIFF_ROWS` rows on each side only).
4. One transaction takes the live tables (a brief lock: readers wait, then read the new ones),
   moves them to `<schema>__<name>_old`, moves the copy's in, and releases the hold; the old
   copy is dropped unless kept.

A projection whose `version` (an attribute, default 1) is newer than the version recorded for
its read model is rebuilt this way by the projector when it starts (`ensure_current`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from nats.aio.client import Client

from bus import parking
from bus.eventstore import EventStore
from bus.subjects import Context, Parked
from projections.runner import Checkpoints, Projector
from projections.schema import create_pool, ensure_schema, quote_ident

log = logging.getLogger(__name__)

HOLD_LAG = 2_000  # events the copy may still be behind when both are held at the same sequence
DIFF_ROWS = 10
REBUILD_SUFFIX = "_rebuild"

VERSIONS_DDL = """
CREATE TABLE IF NOT EXISTS projection_versions (
    name        text PRIMARY KEY,
    version     integer NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
"""


@dataclass(frozen=True)
class Model:
    """What a rebuild needs of one read model."""

    name: str
    ctx: Context
    tables: tuple[str, ...]
    ddl: str
    make: Callable[[], Any]  # a new projection instance

    @property
    def version(self) -> int:
        return int(getattr(self.make(), "version", 1))

    @classmethod
    def of(cls, bc: Any, ctx: Context) -> Model:
        """A declared context's read model (a `BoundedContext` that has one) on `ctx`."""
        model = bc.read_model
        return cls(model.projection().name, ctx, model.tables, model.ddl, model.projection)


@dataclass
class TableParity:
    table: str
    live_rows: int
    copy_rows: int
    live_checksum: str
    copy_checksum: str
    only_live: list[str] = field(default_factory=list)
    only_copy: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return self.live_rows == self.copy_rows and self.live_checksum == self.copy_checksum


def _schema_name(base: str, name: str, what: str) -> str:
    return f"{base}__{name}_{what}"[:63]


def _qualified(schema: str, table: str) -> str:
    return f"{quote_ident(schema)}.{quote_ident(table)}"


class Rebuild:
    """One blue/green rebuild of one read model."""

    def __init__(self, nc: Client, dsn: str, schema: str, model: Model, *, batch: int = 5000,
                 parked: Parked | None = None, report: Callable[[dict[str, Any]], None] = lambda line: None,
                 hold_lag: int = HOLD_LAG) -> None:
        self._nc = nc
        self._dsn = dsn
        self._schema = schema
        self._model = model
        self._batch = batch
        self._parked = parked or Parked(model.ctx.namespace)
        self._report = report
        self._hold_lag = hold_lag
        self.copy_schema = _schema_name(schema, model.name, "next")
        self.old_schema = _schema_name(schema, model.name, "old")
        if len(f"{schema}__{model.name}_next") > 63:
            raise ValueError(f"schema {schema!r} and read model {model.name!r} make names longer than PostgreSQL's "
                             "63 characters: a shorter schema name, please")
        self._key = zlib.crc32(f"jetsource:rebuild:{schema}:{model.name}".encode())
        self._names = [part.checkpoint(model.name) for part in model.ctx.parts]

    async def run(self, *, keep: bool = False, require_parity: bool = False) -> dict[str, Any]:
        """Build, compare and swap; returns the report (`swapped`, `parity`, timings). One
        rebuild of a read model at a time (an advisory lock): another is refused."""
        model = self._model
        started = time.perf_counter()
        live = await create_pool(self._dsn, self._schema, max_size=2 * len(self._names) + 3)
        try:
            async with live.acquire() as lock:
                key = self._key  # held while it runs: a hold it sets lasts as long as this lock
                if not await lock.fetchval("SELECT pg_try_advisory_lock($1)", key):
                    return {"projection": model.name, "swapped": False, "reason": "another rebuild of it is running"}
                try:
                    await lock.execute(f"DROP SCHEMA IF EXISTS {quote_ident(self.copy_schema)} CASCADE")
                    await ensure_schema(self._dsn, self.copy_schema, [model.ddl])
                    copy = await create_pool(self._dsn, self.copy_schema, max_size=2 * len(self._names) + 2)
                    try:
                        return await self._build(live, copy, keep=keep, require_parity=require_parity,
                                                 started=started)
                    finally:
                        await copy.close()
                        await lock.execute(f"DROP SCHEMA IF EXISTS {quote_ident(self.copy_schema)} CASCADE")
                finally:
                    await lock.execute("SELECT pg_advisory_unlock($1)", key)
        finally:
            await live.close()

    async def _build(self, live: asyncpg.Pool, copy: asyncpg.Pool, *, keep: bool, require_parity: bool,
                     started: float) -> dict[str, Any]:
        model = self._model
        checkpoints = Checkpoints(copy)
        projectors = [Projector(self._nc, copy, part, model.make(), checkpoints, batch=self._batch, busy_linger_s=0.0,
                                parked=self._parked, durable_suffix=REBUILD_SUFFIX, direct=True)
                      for part in model.ctx.parts]
        # The live read model's own projectors, as hot standbys: with none running elsewhere
        # (the system is down) these follow the streams, so that the hold below is reached.
        standby = [Projector(self._nc, live, part, model.make(), Checkpoints(live), parked=self._parked)
                   for part in model.ctx.parts]
        running = [asyncio.get_running_loop().create_task(p.run()) for p in (*projectors, *standby)]
        held = False
        try:
            copied_at = await self._follow(checkpoints, started)
            heads = await self._hold(live, copy)
            held = True
            await self._until_at(live, copy, heads)
            parity = await self._parity(live)
            report: dict[str, Any] = {
                "projection": model.name, "phase": "compared", "at": heads,
                "parity": all(t.equal for t in parity),
                "tables": [t.__dict__ | {"equal": t.equal} for t in parity],
            }
            self._report(report)
            if require_parity and not report["parity"]:
                return {**report, "swapped": False, "reason": "the copy differs from the live read model"}
            for p in projectors:
                p.stop()
            await asyncio.gather(*running[:len(projectors)], return_exceptions=True)
            parked_by_copy = {seq for p in projectors for seq in p.parked_seqs}
            await self._swap(live, heads, keep=keep)
            held = False
            await self._forget_parked(heads, parked_by_copy)
            return {**report, "phase": "swapped", "swapped": True, "kept_old": self.old_schema if keep else None,
                    "seconds": round(time.perf_counter() - started, 2),
                    "copy_seconds": round(copied_at - started, 2)}
        finally:
            if held:  # gave up after holding: the live read model goes on from where it was held
                await self._release(live)
            for p in (*projectors, *standby):
                p.stop()
            await asyncio.gather(*running, return_exceptions=True)

    async def _follow(self, checkpoints: Checkpoints, started: float) -> float:
        """Report progress until the copy is within the hold lag of the streams' heads."""
        model = self._model
        last_done, last_t = 0, time.perf_counter()
        rate = 0.0
        while True:
            heads = {part.checkpoint(model.name): await _last_event(self._nc, part) for part in model.ctx.parts}
            done = sum([min(await checkpoints.get(name), heads[name]) for name in heads])
            target = sum(heads.values())
            now = time.perf_counter()
            if now > last_t:
                current = (done - last_done) / (now - last_t)
                rate = current if rate == 0 else 0.5 * rate + 0.5 * current
            last_done, last_t = done, now
            lag = target - done
            self._report({"projection": model.name, "phase": "copying", "applied_through": done, "target": target,
                          "lag": lag, "events_per_s": round(rate), "eta_s": round(lag / rate, 1) if rate > 0 else None,
                          "elapsed_s": round(now - started, 1)})
            if lag <= self._hold_lag:
                return now
            await asyncio.sleep(0.5)

    async def _hold(self, live: asyncpg.Pool, copy: asyncpg.Pool) -> dict[str, int]:
        """Hold both read models at one sequence per partition, the stream's head as it is now
        (or where either read model already is, if further): in one transaction that first
        locks both checkpoints, so that neither moves between reading and holding them."""
        model = self._model
        tables = [f"{quote_ident(schema)}.projection_checkpoints" for schema in (self._schema, self.copy_schema)]
        async with live.acquire() as conn, conn.transaction():
            at: dict[str, int] = {}
            for table in tables:
                await conn.execute(f"INSERT INTO {table} (name, last_seq) SELECT unnest($1::text[]), 0 "
                                   "ON CONFLICT (name) DO NOTHING", self._names)
                for row in await conn.fetch(f"SELECT name, last_seq FROM {table} WHERE name = ANY($1) FOR UPDATE",
                                            self._names):
                    at[row["name"]] = max(at.get(row["name"], 0), int(row["last_seq"]))
            heads = {}
            for part in model.ctx.parts:
                name = part.checkpoint(model.name)
                heads[name] = max(await _last_event(self._nc, part), at.get(name, 0))
            for table in tables:
                for name, seq in heads.items():
                    await conn.execute(f"UPDATE {table} SET hold_at = $2, hold_by = $3 WHERE name = $1", name, seq,
                                       self._key)
        self._report({"projection": model.name, "phase": "holding", "at": heads})
        return heads

    async def _until_at(self, live: asyncpg.Pool, copy: asyncpg.Pool, heads: dict[str, int],
                        timeout: float = 120.0) -> None:
        deadline = time.perf_counter() + timeout
        while True:
            behind = {}
            for which, pool in (("live", live), ("copy", copy)):
                rows = await pool.fetch("SELECT name, last_seq FROM projection_checkpoints WHERE name = ANY($1)",
                                        list(heads))
                at = {r["name"]: r["last_seq"] for r in rows}
                behind.update({f"{which}:{n}": heads[n] - at.get(n, 0) for n in heads if at.get(n, 0) != heads[n]})
            if not behind:
                return
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the read models did not reach the held sequences within {timeout:g}s: {behind}")
            await asyncio.sleep(0.05)

    async def _parity(self, live: asyncpg.Pool) -> list[TableParity]:
        out = []
        async with live.acquire() as conn:
            for table in self._model.tables:
                sides = {}
                for schema in (self._schema, self.copy_schema):
                    row = await conn.fetchrow(
                        f"SELECT count(*) AS n, coalesce(sum(hashtextextended(t::text, 0)::numeric), 0)::text AS h "
                        f"FROM {_qualified(schema, table)} t")
                    sides[schema] = (int(row["n"]), str(row["h"]))
                parity = TableParity(table, sides[self._schema][0], sides[self.copy_schema][0],
                                     sides[self._schema][1], sides[self.copy_schema][1])
                if not parity.equal:
                    a, b = _qualified(self._schema, table), _qualified(self.copy_schema, table)
                    parity.only_live = [r[0] for r in await conn.fetch(
                        f"SELECT t::text FROM {a} t EXCEPT SELECT t::text FROM {b} t LIMIT {DIFF_ROWS}")]
                    parity.only_copy = [r[0] for r in await conn.fetch(
                        f"SELECT t::text FROM {b} t EXCEPT SELECT t::text FROM {a} t LIMIT {DIFF_ROWS}")]
                out.append(parity)
        return out

    async def _swap(self, live: asyncpg.Pool, heads: dict[str, int], *, keep: bool) -> None:
        tables = self._model.tables
        async with live.acquire() as conn:
            async with conn.transaction():
                await conn.execute("SET LOCAL lock_timeout = '10s'")
                # Both still exactly where they were compared (nothing wrote past the hold).
                for schema in (self._schema, self.copy_schema):
                    rows = await conn.fetch(f"SELECT name, last_seq FROM {quote_ident(schema)}.projection_checkpoints "
                                            "WHERE name = ANY($1) FOR UPDATE", self._names)
                    if {r["name"]: r["last_seq"] for r in rows} != heads:
                        raise RuntimeError(f"{schema} moved past the held sequences before the swap; not swapped")
                await conn.execute(f"LOCK TABLE {', '.join(_qualified(self._schema, t) for t in tables)} "
                                   "IN ACCESS EXCLUSIVE MODE")
                await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(self.old_schema)} CASCADE")
                await conn.execute(f"CREATE SCHEMA {quote_ident(self.old_schema)}")
                for table in tables:
                    await conn.execute(f"ALTER TABLE {_qualified(self._schema, table)} "
                                       f"SET SCHEMA {quote_ident(self.old_schema)}")
                for table in tables:
                    await conn.execute(f"ALTER TABLE {_qualified(self.copy_schema, table)} "
                                       f"SET SCHEMA {quote_ident(self._schema)}")
                await conn.execute("UPDATE projection_checkpoints SET hold_at = NULL, hold_by = NULL WHERE name = ANY($1)",
                                   self._names)
                await conn.execute(VERSIONS_DDL)
                await conn.execute(
                    "INSERT INTO projection_versions (name, version) VALUES ($1, $2) ON CONFLICT (name) "
                    "DO UPDATE SET version = EXCLUDED.version, updated_at = now()", self._model.name, self._model.version)
            if not keep:
                await conn.execute(f"DROP SCHEMA IF EXISTS {quote_ident(self.old_schema)} CASCADE")
        self._report({"projection": self._model.name, "phase": "swapped"})

    async def _release(self, live: asyncpg.Pool) -> None:
        with contextlib.suppress(Exception):
            await live.execute("UPDATE projection_checkpoints SET hold_at = NULL, hold_by = NULL WHERE name = ANY($1)",
                               self._names)

    async def _forget_parked(self, heads: dict[str, int], parked_by_copy: set[tuple[str, int]]) -> None:
        """Parked events of the live reader that the copy applied are resolved now (as the
        admin; the projector's own rebuilds may not delete them, and leave them listed)."""
        reader = self._model.ctx.consumer(self._model.name)
        held = {part.stream: heads[part.checkpoint(self._model.name)] for part in self._model.ctx.parts}
        try:
            for event in await parking.unresolved(self._nc, self._parked, reader):
                # Only what the copy folded (up to the hold): the live projector parks on after it.
                if event.seq <= held.get(event.stream, 0) and (event.stream, event.seq) not in parked_by_copy:
                    await parking.delete(self._nc, self._parked, event)
        except Exception as exc:  # noqa: BLE001 - the swap is done; this is housekeeping
            log.warning("rebuild of %s: parked events it applied are still listed (%s)", self._model.name, exc)


async def _last_event(nc: Client, part: Context) -> int:
    """The sequence of a partition's newest event (a body-form Direct Get: the projector may)."""
    return await EventStore(nc, part.stream).last_seq(part.events_wildcard)


async def recorded_versions(pool: asyncpg.Pool) -> dict[str, int]:
    async with pool.acquire() as conn:
        await conn.execute(VERSIONS_DDL)
        return {r["name"]: r["version"] for r in await conn.fetch("SELECT name, version FROM projection_versions")}


async def record_version(pool: asyncpg.Pool, name: str, version: int) -> None:
    await pool.execute("INSERT INTO projection_versions (name, version) VALUES ($1, $2) ON CONFLICT (name) "
                       "DO NOTHING", name, version)


async def outdated(pool: asyncpg.Pool, models: Sequence[Model]) -> list[Model]:
    """The read models whose projection is newer than the version their tables were built with.
    One never recorded was built by version 1 if it holds anything (versions are recorded since
    they exist), else it is recorded at the code's version (it is about to be built by it)."""
    recorded = await recorded_versions(pool)
    out = []
    for model in models:
        version = recorded.get(model.name)
        if version is None:
            names = [part.checkpoint(model.name) for part in model.ctx.parts]
            built = await pool.fetchval("SELECT coalesce(max(last_seq), 0) FROM projection_checkpoints "
                                        "WHERE name = ANY($1)", names)
            version = 1 if built else model.version
            await record_version(pool, model.name, version)
        if version < model.version:
            out.append(model)
    return out
