"""Chaos: while clients place, change and confirm orders and submit tasks over HTTP, kill -9 in
turn the nats-server, PostgreSQL, each actor, the projector and the worker of a `jetsource up`;
afterwards no acknowledged command is lost, no command its client was told had failed was
stored, every task ended exactly once and the read models equal the fold of the streams.

One round of faults by default (CI). The long version: `JETSOURCE_CHAOS_ROUNDS` rounds (each
kills every process once), `JETSOURCE_CHAOS_CLIENTS` concurrent clients, and
`JETSOURCE_CHAOS_LOAD_S` seconds of load after each recovery before the next fault.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiohttp
import msgspec
import psutil
import pytest

from actors.runtime import _ID_NAMESPACE
from bus import subjects as h
from bus.connection import Credentials, connect
from bus.eventstore import PartitionedStore
from bus.subjects import Context
from infra.embedded import free_port
from tests.e2e.test_heal import _is_nats, _is_postmaster, _replaced, _server
from tests.e2e.test_up import PLACE, _env, _start, _stop, _wait_ready

ROUNDS = int(os.environ.get("JETSOURCE_CHAOS_ROUNDS", "1"))
CLIENTS = int(os.environ.get("JETSOURCE_CHAOS_CLIENTS", "4"))
LOAD_S = float(os.environ.get("JETSOURCE_CHAOS_LOAD_S", "1.0"))
RECOVERY_S = 60.0  # generous: a bound on each recovery, not a performance claim
SETTLE_S = 90.0

Outcome = Literal["acknowledged", "refused", "unknown"]
Kind = Literal["place", "add_item", "confirm", "submit"]
T = TypeVar("T")
TERMINAL = {"task.completed", "task.dead_lettered", "task.cancelled"}


def _role(*args: str) -> Callable[[list[str]], bool]:
    """Recognises the `python -m infra.cli <args>` child."""
    return lambda cmdline: "infra.cli" in cmdline and cmdline[-len(args):] == list(args)


ALL_FAULTS: list[tuple[str, Callable[[list[str]], bool]]] = [
    ("nats-server", _is_nats),
    ("postgres", _is_postmaster),
    ("actor orders", _role("actor", "orders")),
    ("actor tasks", _role("actor", "tasks")),
    ("actor inventory", _role("actor", "inventory")),
    ("projector", _role("projector")),
    ("worker", _role("worker")),
    ("managers", _role("managers")),
]
# A comma-separated subset, in this order, e.g. `postgres,projector` (to chase one fault).
_CHOSEN = os.environ.get("JETSOURCE_CHAOS_FAULTS")
FAULTS = [f for f in ALL_FAULTS if f[0] in _CHOSEN.split(",")] if _CHOSEN else ALL_FAULTS


def derived_id(key: str) -> str:
    """The aggregate id a keyed create gets (actors.runtime): known even when the create failed."""
    return uuid.uuid5(_ID_NAMESPACE, key).hex


@dataclass
class Command:
    """One keyed command a client sent, with the outcome of every attempt."""

    kind: Kind
    key: str
    aggregate_id: str
    attempts: list[Outcome] = field(default_factory=list)

    @property
    def outcome(self) -> Outcome:
        """Acknowledged once any attempt was; refused only if every attempt was (an earlier
        unknown one may have been stored)."""
        if "acknowledged" in self.attempts:
            return "acknowledged"
        return "refused" if self.attempts and all(a == "refused" for a in self.attempts) else "unknown"


@dataclass
class Ledger:
    """What the clients were told, by idempotency key."""

    commands: dict[str, Command] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)  # HTTP status (0: no response) → count

    def command(self, kind: Kind, key: str, aggregate_id: str) -> Command:
        """The command sent under this key (a retry adds attempts to the same one)."""
        command = self.commands.setdefault(key, Command(kind, key, aggregate_id))
        assert (command.kind, command.aggregate_id) == (kind, aggregate_id), f"key {key} reused"
        return command

    def outcomes(self, outcome: Outcome) -> list[Command]:
        return [c for c in self.commands.values() if c.outcome == outcome]

    def summary(self) -> str:
        by = {o: len(self.outcomes(o)) for o in ("acknowledged", "refused", "unknown")}
        return f"{len(self.commands)} commands {by}; HTTP statuses {dict(sorted(self.statuses.items()))}"


def _classify(status: int) -> Outcome:
    if 200 <= status < 300:
        return "acknowledged"
    if status == 504 or status >= 500 and status != 503:
        return "unknown"
    return "refused"  # 4xx, 503: the client was told it failed


async def send(http: aiohttp.ClientSession, ledger: Ledger, command: Command, url: str, body: dict[str, Any],
               *, retries: int = 3, headers: dict[str, str] | None = None) -> Outcome:
    """POST a keyed command; an unknown outcome is retried with the same key, as a client would."""
    for attempt in range(retries + 1):
        try:
            async with http.post(url, json=body, headers=headers) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError):
            status = 0
        ledger.statuses[status] = ledger.statuses.get(status, 0) + 1
        outcome = "unknown" if status == 0 else _classify(status)
        command.attempts.append(outcome)
        if outcome != "unknown" or attempt == retries:
            return outcome
        await asyncio.sleep(0.3)
    raise AssertionError("unreachable")


async def place(http: aiohttp.ClientSession, base: str, ledger: Ledger, key: str, **kw: Any) -> Command:
    command = ledger.command("place", key, derived_id(key))
    await send(http, ledger, command, base + "/orders", PLACE, headers={"Idempotency-Key": key}, **kw)
    return command


async def submit(http: aiohttp.ClientSession, base: str, ledger: Ledger, key: str, **kw: Any) -> Command:
    command = ledger.command("submit", key, derived_id(key))
    body = {"type": "echo", "payload": {"key": key}, "idempotency_key": key}
    await send(http, ledger, command, base + "/tasks", body, **kw)
    return command


async def client(http: aiohttp.ClientSession, base: str, ledger: Ledger, name: str, stop: asyncio.Event) -> None:
    """One client's loop: place an order, add an item to every other, confirm two in three, and
    submit a no-op task; every command keyed."""
    for n in itertools.count():
        if stop.is_set():
            return
        key = f"{name}-{n}"
        order = await place(http, base, ledger, key)
        if order.outcome == "acknowledged":
            oid = order.aggregate_id
            if n % 2 == 0:
                add = ledger.command("add_item", f"{key}:add", oid)
                await send(http, ledger, add, f"{base}/orders/{oid}/items",
                           {"sku": "b", "quantity": 2, "unit_price": 50}, headers={"Idempotency-Key": add.key})
            if n % 3 != 0:
                confirm = ledger.command("confirm", f"{key}:confirm", oid)
                await send(http, ledger, confirm, f"{base}/orders/{oid}/confirm", {},
                           headers={"Idempotency-Key": confirm.key})
        await submit(http, base, ledger, f"{key}:task")
        if order.outcome != "acknowledged":
            await asyncio.sleep(0.05)  # an outage: don't spin


async def _until(probe: Callable[[], Awaitable[T | None]], what: str, log: Path, timeout: float = RECOVERY_S) -> T:
    """Await probe() until it returns something other than None, and return that."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = await probe()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            last = exc
        else:
            if last is not None:
                return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what} within {timeout:g} s; last: {last!r}\n{log.read_text()[-20000:]}")


async def recovered(http: aiohttp.ClientSession, base: str, ledger: Ledger, tag: str, log: Path) -> None:
    """Every role serves again: ready, an order is stored and read back from the read model, a
    task is stored and a worker completes it."""

    async def ready() -> bool | None:
        async with http.get(base + "/readyz") as resp:
            return True if resp.status == 200 else None

    await _until(ready, f"/readyz 200 after {tag}", log)
    probe = await _until(lambda: _acked(place(http, base, ledger, f"probe-{tag}", retries=0)),
                         f"an order stored after {tag}", log)

    async def projected() -> bool | None:
        async with http.get(f"{base}/orders/{probe.aggregate_id}") as resp:
            return True if resp.status == 200 else None

    await _until(projected, f"the probe order projected after {tag}", log)
    task = await _until(lambda: _acked(submit(http, base, ledger, f"probe-{tag}:task", retries=0)),
                        f"a task stored after {tag}", log)

    async def completed() -> bool | None:
        async with http.get(f"{base}/tasks/{task.aggregate_id}") as resp:
            done = resp.status == 200 and (await resp.json())["status"] == "completed"
        return True if done else None

    await _until(completed, f"the probe task completed after {tag}", log)


async def _acked(sent: Awaitable[Command]) -> Command | None:
    command: Command = await sent
    return command if command.outcome == "acknowledged" else None


# ---- the truth: folds of the streams ------------------------------------------------------------------


class _Tag(msgspec.Struct):
    type: str


class _Line(msgspec.Struct):
    sku: str
    quantity: int
    unit_price: int


class _OrderEvent(msgspec.Struct):
    """The fields of any order event that the fold needs."""

    type: str
    lines: list[_Line] = []
    sku: str = ""
    quantity: int = 0
    unit_price: int = 0


@dataclass
class FoldedOrder:
    status: str = "placed"
    lines: dict[str, tuple[int, int]] = field(default_factory=dict)
    version: int = 0
    placed: int = 0  # how many order.placed events: must be 1
    command_ids: set[str] = field(default_factory=set)

    @property
    def total(self) -> int:
        return sum(q * p for q, p in self.lines.values())


@dataclass
class FoldedTask:
    types: list[str] = field(default_factory=list)
    version: int = 0
    command_ids: set[str] = field(default_factory=set)

    @property
    def status(self) -> str:
        last = self.types[-1]
        return {"task.submitted": "pending", "task.started": "running", "task.failed": "retrying",
                "task.completed": "completed", "task.dead_lettered": "dead", "task.cancelled": "cancelled",
                "task.requeued": "pending", "task.progressed": "running"}[last]


_STATUS_OF = {"order.confirmed": "confirmed", "order.reserved": "reserved", "order.rejected": "rejected",
              "order.paid": "paid", "order.shipped": "shipped", "order.cancelled": "cancelled"}


async def fold_streams(url: str, password: str, partitions: int = 1) -> tuple[dict[str, FoldedOrder], dict[str, FoldedTask]]:
    """Read both contexts' streams (every partition) as the admin and fold them independently of
    the projections' code."""
    nc = await connect(url, "chaos-test", credentials=Credentials(user="admin", password=password))
    try:
        orders: dict[str, FoldedOrder] = {}
        ctx = Context("orders", "", partitions)
        async for e in PartitionedStore.open(nc, ctx).read(ctx.events_wildcard):
            event = msgspec.json.decode(e.data, type=_OrderEvent)
            order = orders.setdefault(ctx.aggregate_id(e.subject), FoldedOrder())
            match event.type:
                case "order.placed":
                    order.placed += 1
                    order.lines = {line.sku: (line.quantity, line.unit_price) for line in event.lines}
                case "order.item_added":
                    order.lines[event.sku] = (order.lines.get(event.sku, (0, 0))[0] + event.quantity, event.unit_price)
                case "order.item_removed":
                    order.lines.pop(event.sku, None)
                case t if t in _STATUS_OF:
                    order.status = _STATUS_OF[t]
            order.version = e.seq
            order.command_ids.add(e.headers.get(h.EV_COMMAND_ID, ""))
        tasks: dict[str, FoldedTask] = {}
        ctx = Context("tasks", "", partitions)
        async for e in PartitionedStore.open(nc, ctx).read(ctx.events_wildcard):
            task = tasks.setdefault(ctx.aggregate_id(e.subject), FoldedTask())
            task.types.append(msgspec.json.decode(e.data, type=_Tag).type)
            task.version = e.seq
            task.command_ids.add(e.headers.get(h.EV_COMMAND_ID, ""))
        return orders, tasks
    finally:
        await nc.close()


async def read_model(http: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    """Every row of a read model, through the paginated list route."""
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params = {"limit": "500", **({"cursor": cursor} if cursor else {})}
        async with http.get(url, params=params) as resp:
            assert resp.status == 200, await resp.text()
            page = await resp.json()
        rows += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return rows


@dataclass
class Snapshot:
    """The folded streams and the read models, read one after the other."""

    orders: dict[str, FoldedOrder]
    tasks: dict[str, FoldedTask]
    order_rows: dict[str, dict[str, Any]]
    task_rows: dict[str, dict[str, Any]]

    def consistent(self) -> bool:
        """Every task ended and the read models caught up with the streams."""
        return (all(t.types[-1] in TERMINAL for t in self.tasks.values())
                and {i: o.version for i, o in self.orders.items()} == {i: r["version"] for i, r in self.order_rows.items()}
                and {i: t.version for i, t in self.tasks.items()} == {i: r["version"] for i, r in self.task_rows.items()})


async def take_snapshot(http: aiohttp.ClientSession, base: str, nats_url: str, password: str) -> Snapshot:
    orders, tasks = await fold_streams(nats_url, password)
    order_rows = {r["order_id"]: r for r in await read_model(http, base + "/orders")}
    task_rows = {r["task_id"]: r for r in await read_model(http, base + "/tasks")}
    return Snapshot(orders, tasks, order_rows, task_rows)


def stored_keys(command: Command, orders: dict[str, FoldedOrder], tasks: dict[str, FoldedTask]) -> set[str]:
    """The command ids stored with the events of the command's aggregate."""
    if command.kind == "submit":
        task = tasks.get(command.aggregate_id)
        return task.command_ids if task else set()
    order = orders.get(command.aggregate_id)
    return order.command_ids if order else set()


# ---- the test ----------------------------------------------------------------------------------------


@pytest.mark.timeout(240 + ROUNDS * len(FAULTS) * 2 * RECOVERY_S)
async def test_kill_9_of_every_process_under_load_loses_no_acknowledged_command_and_the_read_models_equal_the_streams(
    tmp_path: Path,
) -> None:
    ports = {name: free_port() for name in ("nats", "monitor", "pg", "http")}
    ports["metrics"] = 0
    env = _env(tmp_path / "data", ports)
    env["JETSOURCE_TASK_LEASE_S"] = "5"  # a killed worker's tasks run again after 5 s, not 30
    log = tmp_path / "up.log"
    base = f"http://127.0.0.1:{ports['http']}"
    proc = _start(env, log)
    ledger = Ledger()
    try:
        await _wait_ready(base, proc, log)
        up = psutil.Process(proc.pid)
        password = (tmp_path / "data" / "secrets" / "admin.password").read_text().strip()
        timeout = aiohttp.ClientTimeout(total=15)  # above the edge's 5 s: its 504 is what we see
        async with aiohttp.ClientSession(timeout=timeout) as http:
            stop = asyncio.Event()
            clients = [asyncio.create_task(client(http, base, ledger, f"c{i}", stop)) for i in range(CLIENTS)]
            try:
                await asyncio.sleep(LOAD_S)
                for round_ in range(ROUNDS):
                    for name, is_it in FAULTS:
                        victim = _server(up, is_it)
                        victim.kill()
                        await _replaced(up, is_it, victim.pid, log, timeout=RECOVERY_S)
                        assert f"{name} exited with code -9" in log.read_text()
                        await recovered(http, base, ledger, f"{round_}-{name.replace(' ', '-')}", log)
                        await asyncio.sleep(LOAD_S)
                        assert not any(c.done() for c in clients), [c.exception() for c in clients if c.done()]
            finally:
                stop.set()
                await asyncio.gather(*clients)
            print(ledger.summary())

            # Settle: every stored task ends, the projections catch up with the streams. After
            # the bound the assertions below say what is still wrong.
            nats_url = f"nats://127.0.0.1:{ports['nats']}"
            deadline = time.monotonic() + SETTLE_S
            while True:
                snapshot = await take_snapshot(http, base, nats_url, password)
                if snapshot.consistent() or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
        orders, tasks, order_rows, task_rows = snapshot.orders, snapshot.tasks, snapshot.order_rows, snapshot.task_rows

        acked, refused = ledger.outcomes("acknowledged"), ledger.outcomes("refused")
        assert sum(c.kind == "place" for c in acked) >= 20 and any(c.kind == "submit" for c in acked), ledger.summary()

        # 1. No acknowledged command is lost: its events are in the aggregate's stream, under its key.
        lost = [c for c in acked if c.key not in stored_keys(c, orders, tasks)]
        assert not lost, f"acknowledged but not stored: {lost[:10]} ({len(lost)}); {ledger.summary()}"
        assert all(orders[c.aggregate_id].placed == 1 for c in acked if c.kind == "place")

        # 2. Nothing a client was told had failed was stored.
        stored_anyway = [c for c in refused if c.key in stored_keys(c, orders, tasks)]
        assert not stored_anyway, f"refused (4xx/503) but stored: {stored_anyway[:10]}; {ledger.summary()}"
        assert not [i for i, o in orders.items() if o.placed != 1], "an order placed twice (or never)"

        # 3. Every task ended exactly once (all are no-ops: completed).
        ended = {i: [t for t in task.types if t in TERMINAL] for i, task in tasks.items()}
        assert not {i: e for i, e in ended.items() if e != ["task.completed"]}, "a task did not end exactly once"
        assert all(task.types[0] == "task.submitted" for task in tasks.values())

        # 4. The read models are the fold of the streams, and hold nothing else.
        assert set(order_rows) == set(orders) and set(task_rows) == set(tasks)
        wrong_orders = {i: (r["status"], r["total"], r["version"], o.status, o.total, o.version)
                        for i, o in orders.items() if (r := order_rows[i])
                        and (r["status"], r["total"], r["version"]) != (o.status, o.total, o.version)}
        assert not wrong_orders, f"read model (status, total, version) != stream fold: {wrong_orders}"
        wrong_tasks = {i: (r["status"], r["version"], t.status, t.version) for i, t in tasks.items()
                       if (r := task_rows[i]) and (r["status"], r["version"]) != (t.status, t.version)}
        assert not wrong_tasks, f"task read model (status, version) != stream fold: {wrong_tasks}"
        _stop(proc)
    finally:
        if proc.poll() is None:
            _stop(proc)
