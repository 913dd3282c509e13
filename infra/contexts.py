"""Bounded contexts and process managers as declarations, and the set a deployment runs.

A context declares, once, everything the rest of jetsource needs of it: its aggregate (messages,
decider, commands), which commands the public may send, its read model (projection, tables,
DDL, queries), its HTTP routes and OpenAPI paths, and anything its stream or roles need beyond
the usual. Bootstrap, the role commands, `jetsource up`'s children, `status`, schema creation,
the query service, the edge's routes, OpenAPI and AsyncAPI, the NATS permissions and the test
fixtures all work from the declared set (`declared(settings)`).

The built-in contexts are listed in `BUILTIN`; others load from modules named in the
`JETSOURCE_CONTEXT_MODULES` setting or from the `jetsource.contexts` entry-point group. A module
exposes `CONTEXT` (a `BoundedContext`) and/or `PROCESS_MANAGERS` (a sequence of
`ProcessManager`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from bus.subjects import Context

if TYPE_CHECKING:
    import asyncpg
    from aiohttp import web
    from nats.aio.client import Client
    from nats.js.client import JetStreamContext

    from actors.runtime import AggregateSpec
    from infra.settings import Settings
    from projections.runner import Projection

# One line per built-in context (and its process managers): adding a context adds one here.
BUILTIN = (
    "actors.orders.context",
    "actors.tasks.context",
    "actors.inventory.context",
    "actors.fulfilment",
    "actors.order_saga",
)
ENTRY_POINT_GROUP = "jetsource.contexts"


@dataclass(frozen=True, eq=False)
class Query:
    """One query endpoint (`<context>.query.<name>`): its request Struct and how to answer it."""

    request: type
    run: Callable[[asyncpg.Pool, Any], Awaitable[Any]]
    # The request field naming one aggregate (a get's id): with partitioned streams, its
    # `min_seq` is a sequence of that aggregate's partition. A query that names none, asked for
    # `min_seq` there, waits for every partition to have projected all it held when it came.
    aggregate: str | None = None
    # The Struct `run` answers with: the reply schema of the AsyncAPI document (None: not declared).
    reply: type | None = None


@dataclass(frozen=True, eq=False)
class ReadModel:
    """A context's PostgreSQL read model."""

    projection: Callable[[], Projection]
    tables: tuple[str, ...]  # what `jetsource projections rebuild` builds aside, compares and swaps
    ddl: str  # idempotent (CREATE ... IF NOT EXISTS), run in the read-model schema
    queries: Mapping[str, Query] = field(default_factory=dict)


@dataclass(frozen=True)
class Parameter:
    """A `{name}` token of a subject in the AsyncAPI document: what it is, and the values it takes."""

    description: str
    enum: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class Published:
    """A subject a context's processes publish besides replies and events (work items, live
    signals), as the AsyncAPI document describes it."""

    name: str  # the channel's id within the context, e.g. "live.progress"
    # The subject, `{name}` marking a parameter: `lambda ctx: ctx.live("progress", "{task_id}")`.
    address: Callable[[Context], str]
    payload: type | None  # the body's Struct; None: an empty body
    summary: str
    parameters: Mapping[str, Parameter] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Role:
    """An identity beyond the context's actor (a worker): its name, the `jetsource` command that
    runs it under `jetsource up`, and its NATS permissions."""

    name: str
    command: tuple[str, ...] | None
    permissions: Callable[[Context, Settings], dict[str, Any]]


Command = tuple[str, dict[str, Any]]  # (command name, body)


@dataclass(frozen=True, eq=False)
class Contract:
    """What the behaviour suite every context must pass (`tests/integration/test_contracts.py`:
    idempotent repeats, conflicts, coded errors, read-your-writes) sends it. Each function takes
    an aggregate id the suite chose."""

    id_field: str  # the aggregate id's field in commands and in the `get` query
    create: Callable[[str], Command]  # brings a new aggregate into being
    change: Callable[[str], Command]  # valid on an existing aggregate
    refused: Callable[[str], tuple[str, dict[str, Any], str]]  # refused by the decider: (name, body, code)
    invalid: tuple[str, dict[str, Any], str]  # refused by validation: (name, body, the field it names)
    repeatable: bool = True  # `change` may be sent again and again (each time a new event)


@dataclass(frozen=True, eq=False)
class BoundedContext:
    """Everything jetsource needs to run one context."""

    name: str
    aggregate: Callable[[Context, Settings], AggregateSpec[Any, Any, Any]]
    # Commands anyone with edge access may send (their `_batch` forms included when batchable).
    # The others are internal: only process managers and roles that declare them send them.
    public_commands: tuple[str, ...]
    read_model: ReadModel | None = None
    # Adds the context's routes to the edge (see `http_edge.kit` for the helpers).
    routes: Callable[[web.UrlDispatcher], None] | None = None
    # OpenAPI: (paths, the Structs their schemas refer to).
    openapi: Callable[[], tuple[dict[str, Any], list[type]]] | None = None
    # The stream also holds work items (`<ctx>.queue.>`), as the task queue does.
    work_queue: bool = False
    # Further core-NATS subjects the actor publishes and subscribes to (live signals).
    actor_publishes: Callable[[Context], list[str]] = lambda ctx: []
    # What those subjects and the work queue carry, for the AsyncAPI document.
    publishes: tuple[Published, ...] = ()
    actor_subscribes: Callable[[Context], list[str]] = lambda ctx: []
    # More streams' worth of setup, as the admin (the shared work-queue consumers).
    prepare: Callable[[JetStreamContext, Context, Settings], Awaitable[None]] | None = None
    roles: tuple[Role, ...] = ()
    # Extra lines for `jetsource status` (work queues).
    status: Callable[[Client, Context], Awaitable[list[str]]] | None = None
    # The behaviour suite's commands for this context (every context should declare one).
    contract: Contract | None = None

    @property
    def actor_role(self) -> str:
        return f"{self.name}_actor"

    def context(self, settings: Settings) -> Context:
        return Context(self.name, settings.namespace, settings.partitions)

    def spec(self, settings: Settings) -> AggregateSpec[Any, Any, Any]:
        """The context's aggregate as these settings run it (`snapshot_every` overrides the
        declared snapshot policy)."""
        spec = self.aggregate(self.context(settings), settings)
        if settings.snapshot_every is not None:
            spec = dataclasses.replace(spec, snapshot_every=settings.snapshot_every)
        return spec

    @functools.cached_property
    def _command_names(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(every command endpoint's name, the batchable ones): what the aggregate declares,
        the same whatever the settings (built once: the permissions ask for it per role)."""
        from infra.settings import Settings

        spec = self.aggregate(Context(self.name), Settings.model_construct())
        return (*spec.commands, *(f"{n}_batch" for n in spec.batchable)), tuple(spec.batchable)

    def internal_commands(self, settings: Settings) -> tuple[str, ...]:
        public = self.public_edge_commands(settings)
        return tuple(n for n in self._command_names[0] if n not in public)

    def public_edge_commands(self, settings: Settings) -> tuple[str, ...]:
        batch = tuple(f"{n}_batch" for n in self._command_names[1] if n in self.public_commands)
        return (*self.public_commands, *batch)


@dataclass(frozen=True, eq=False)
class ProcessManager:
    """A process manager: what it consumes (outbox subjects per context), what it sends
    (commands per context), and how to build its loop (a `run()` / `stop()` / `stopping` object).
    It runs as its own NATS identity (`name`); `reader` names its durable consumers and what it
    parks."""

    name: str
    reader: str
    consumes: Mapping[str, tuple[str, ...]]
    sends: Mapping[str, tuple[str, ...]]
    build: Callable[[Client, Mapping[str, Context], Settings], Any]
    # Contexts whose aggregates it reads straight from their stream (Direct Get).
    reads: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class Declared:
    """The contexts and process managers one deployment runs."""

    contexts: tuple[BoundedContext, ...]
    managers: tuple[ProcessManager, ...]

    def context(self, name: str) -> BoundedContext:
        for ctx in self.contexts:
            if ctx.name == name:
                return ctx
        raise KeyError(f"no context {name!r}; declared: {', '.join(c.name for c in self.contexts)}")

    def names(self) -> list[str]:
        return [c.name for c in self.contexts]

    def subjects(self, settings: Settings) -> dict[str, Context]:
        return {c.name: c.context(settings) for c in self.contexts}


def _modules(extra: str) -> list[Any]:
    names = [*BUILTIN, *(m.strip() for m in extra.split(",") if m.strip())]
    mods = [importlib.import_module(n) for n in names]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        mods.append(ep.load())
    return mods


@functools.cache
def _load(extra: str) -> Declared:
    contexts: list[BoundedContext] = []
    managers: list[ProcessManager] = []
    for mod in _modules(extra):
        ctx = getattr(mod, "CONTEXT", None)
        if isinstance(ctx, BoundedContext) and ctx not in contexts:
            contexts.append(ctx)
        for pm in getattr(mod, "PROCESS_MANAGERS", ()):
            if pm not in managers:
                managers.append(pm)
    _check(contexts, managers)
    return Declared(tuple(contexts), tuple(managers))


_RESERVED_ROLES = ("admin", "edge", "projector")


def _check(contexts: list[BoundedContext], managers: list[ProcessManager]) -> None:
    """Refuse a declared set whose names would clash (a role named like another gets its
    permissions) or whose process managers name what does not exist (a typo would show only
    as requests refused by the server, retried forever)."""
    from bus.subjects import valid_token
    from infra.settings import Settings

    names = [c.name for c in contexts]
    if len(set(names)) != len(names):
        raise ValueError(f"two contexts share a name: {names}")
    bad = [n for n in names if not valid_token(n) or "-" in n]
    if bad:
        raise ValueError(f"context names must be letters, digits and '_': {bad}")
    roles = [*_RESERVED_ROLES, *(c.actor_role for c in contexts), *(r.name for c in contexts for r in c.roles),
             *(pm.name for pm in managers)]
    clashes = sorted({r for r in roles if roles.count(r) > 1})
    if clashes:
        raise ValueError(f"these NATS identities are declared twice (or are reserved): {clashes}")
    by_name = {c.name: c for c in contexts}
    settings = Settings.model_construct(namespace="", task_modules="", saga_wait_s=2.0)
    for pm in managers:
        missing = (set(pm.consumes) | set(pm.sends) | set(pm.reads)) - set(by_name)
        if missing:
            raise ValueError(f"process manager {pm.name} needs contexts that are not declared: {sorted(missing)}")
        for name, commands in pm.sends.items():
            bc = by_name[name]
            known = (*bc.public_edge_commands(settings), *bc.internal_commands(settings))
            unknown = [c for c in commands if c not in known]
            if unknown:
                raise ValueError(f"process manager {pm.name} sends {name} commands that do not exist: {unknown}")


def declared(settings: Settings) -> Declared:
    """The built-in contexts plus those the settings and installed packages add."""
    return _load(settings.context_modules)
