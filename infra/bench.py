"""`jetsource bench`: load against the actors (NATS) and the edge (HTTP), next to raw ceilings
measured in the same run. Without a running system it starts `jetsource up` in a temp dir."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from actors.orders.messages import ItemAdded, OrderConfirmed, OrderLine, OrderPlaced, OrderReserved
from actors.runtime import Actor
from actors.tasks.messages import PRIORITIES
from actors.upcasting import EventCodec
from bus import subjects as h
from bus.codec import encode
from bus.connection import Credentials, connect, request
from bus.eventstore import MAX_ATOMIC_BATCH, NewEvent, PartitionedStore
from bus.subjects import Context
from infra.auth import ADMIN, credentials
from infra.bootstrap import orders_context, tasks_context
from infra.embedded import free_port, free_run
from infra.settings import Settings
from projections.schema import create_pool

PLACE = json.dumps(
    {"customer_id": "bench", "currency": "EUR", "lines": [{"sku": "sku-1", "quantity": 2, "unit_price": 1250}]}
).encode()


@dataclass(frozen=True)
class Nats:
    """Where the bench's own connections go, and as whom (the admin: it drives every subject)."""

    url: str
    credentials: Credentials

    async def connect(self, name: str) -> Client:
        return await connect(self.url, name, credentials=self.credentials)


def _pct(sorted_ms: list[float], p: float) -> float:
    if not sorted_ms:
        return 0.0
    return sorted_ms[min(len(sorted_ms) - 1, int(len(sorted_ms) * p))]


async def _drive(count: int, inflight: int, op: Callable[[], Awaitable[bool]]) -> dict[str, float]:
    """Run `op` count times with `inflight` workers; rate, latency percentiles, failures."""
    latencies: list[float] = []
    failures = 0
    remaining = count

    async def worker() -> None:
        nonlocal remaining, failures
        while remaining > 0:
            remaining -= 1
            t = time.perf_counter()
            ok = await op()
            latencies.append((time.perf_counter() - t) * 1000)
            failures += not ok

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"per_s": round(count / elapsed), "p50_ms": round(_pct(latencies, 0.5), 2),
            "p99_ms": round(_pct(latencies, 0.99), 2), "failed": failures, "count": count}


async def ceiling_request_reply(url: Nats, count: int, inflight: int) -> Mapping[str, object]:
    """A trivial responder in another process, driven like an actor."""
    env = {**os.environ, "JETSOURCE_NATS_USER": url.credentials.user or "",
           "JETSOURCE_NATS_PASSWORD": url.credentials.password or ""}
    responder = subprocess.Popen([sys.executable, "-m", "infra.bench_responder", url.url, "bench.echo"], env=env)
    try:
        nc = await url.connect("bench-ceiling")
        for _ in range(100):
            try:
                await request(nc, "bench.echo", b"x", timeout=0.2)
                break
            except Exception:  # noqa: BLE001 - responder still starting
                await asyncio.sleep(0.1)

        async def op() -> bool:
            await request(nc, "bench.echo", PLACE, timeout=5)
            return True

        result = await _drive(count, inflight, op)
        await nc.close()
        return result
    finally:
        responder.terminate()
        responder.wait(10)


async def ceiling_js_publish(url: Nats, count: int, inflight: int) -> Mapping[str, object]:
    """Plain JetStream publish (one message per publish, same server sync policy)."""
    nc = await url.connect("bench-js")
    js = nc.jetstream()
    name = f"BENCH_{os.getpid()}"
    await js.add_stream(StreamConfig(name=name, subjects=[f"bench.{os.getpid()}.>"], storage=StorageType.FILE))
    try:
        n = 0

        async def op() -> bool:
            nonlocal n
            n += 1
            await js.publish(f"bench.{os.getpid()}.{n % 1000}", PLACE, timeout=5)
            return True

        return await _drive(count, inflight, op)
    finally:
        await js.delete_stream(name)
        await nc.close()


SAGA_SKUS = 200  # tracked SKUs the saga phase's orders draw from (two lines each)


async def bench_saga(url: Nats, settings: Settings, count: int, inflight: int) -> Mapping[str, object]:
    """Orders placed, confirmed and reserved end to end: each op places an order of two tracked
    SKUs and confirms it; confirm answers once the saga has reserved both lines in the
    inventory context (or rejected them), so an op's latency is the whole saga's."""
    from infra.bootstrap import context

    orders, inventory = context(settings, "orders"), context(settings, "inventory")
    nc = await url.connect("bench-saga")
    run = os.getpid()
    skus = [f"bench-{run}-{i}" for i in range(SAGA_SKUS)]
    for sku in skus:  # enough stock for every order of the phase and its warm-up
        await request(nc, inventory.command("receive"), json.dumps({"sku": sku, "quantity": 1_000_000}).encode(),
                      timeout=10)
    n = 0
    reserved = 0

    async def op() -> bool:
        nonlocal n, reserved
        n += 1
        lines = [{"sku": skus[(n * 7 + k * 13) % SAGA_SKUS], "quantity": 1, "unit_price": 100} for k in range(2)]
        placed = await request(nc, orders.command("place"), json.dumps(
            {"customer_id": "bench", "currency": "EUR", "lines": lines}).encode(), timeout=10)
        if placed.headers and "Nats-Service-Error-Code" in placed.headers:
            return False
        oid = json.loads(placed.data)["order_id"]
        confirmed = await request(nc, orders.command("confirm"), json.dumps({"order_id": oid}).encode(), timeout=10)
        if confirmed.headers and "Nats-Service-Error-Code" in confirmed.headers:
            return False
        ok = json.loads(confirmed.data)["status"] == "reserved"
        reserved += ok
        return ok

    await _drive(min(500, count), inflight, op)  # warm-up
    reserved = 0
    result = await _drive(count, inflight, op)
    await nc.close()
    return {**result, "reserved": reserved}


async def bench_nats(url: Nats, subject: str, count: int, inflight: int) -> Mapping[str, object]:
    nc = await url.connect("bench-nats")

    async def op() -> bool:
        msg = await request(nc, subject, PLACE, timeout=10)
        return not (msg.headers and "Nats-Service-Error-Code" in msg.headers)

    await _drive(min(2000, count), inflight, op)  # warm-up
    result = await _drive(count, inflight, op)
    await nc.close()
    return result


async def bench_http(base: str, count: int, inflight: int, seconds: float) -> Mapping[str, object]:
    if shutil.which("wrk"):
        return _wrk(base, inflight, seconds)
    connector = aiohttp.TCPConnector(limit=inflight)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def op() -> bool:
            async with http.post(base + "/orders", data=PLACE, headers={"Content-Type": "application/json"}) as resp:
                await resp.read()
                return resp.status == 201

        await _drive(min(2000, count), inflight, op)
        return {**await _drive(count, inflight, op), "client": "aiohttp (in-process; wrk is faster)"}


def _wrk(base: str, connections: int, seconds: float) -> Mapping[str, object]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write('wrk.method = "POST"\nwrk.body = [[%s]]\nwrk.headers["Content-Type"] = "application/json"\n'
                  'done = function(summary, latency, requests)\n'
                  '  io.write(string.format("JSON {\\"p50\\": %%f, \\"p99\\": %%f, \\"non2xx\\": %%d}\\n",'
                  ' latency:percentile(50)/1000, latency:percentile(99)/1000, summary.errors.status))\nend\n'
                  % PLACE.decode())
    subprocess.run(["wrk", "-t2", f"-c{connections}", "-d2s", "-s", lua.name, base + "/orders"], capture_output=True)
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds:g}s", "-s", lua.name, base + "/orders"],
                         capture_output=True, text=True).stdout
    os.unlink(lua.name)
    rate = next(float(line.split()[1]) for line in out.splitlines() if line.startswith("Requests/sec"))
    stats = json.loads(next(line[5:] for line in out.splitlines() if line.startswith("JSON ")))
    return {"per_s": round(rate), "p50_ms": round(stats["p50"], 2), "p99_ms": round(stats["p99"], 2),
            "failed": stats["non2xx"], "client": f"wrk -c{connections}"}


async def _queues_drained(js: JetStreamContext, ctx: Context) -> bool:
    """True when every work queue has nothing waiting and nothing unacknowledged: each task
    submitted so far has run and had its outcome stored (a worker acks only after that)."""
    for part in ctx.parts:
        for priority in PRIORITIES:
            info = await js.consumer_info(part.stream, part.work_consumer(priority))
            if info.num_pending or info.num_ack_pending:
                return False
    return True


async def _completed_count(nc: Client, ctx: Context) -> int:
    reply = json.loads((await request(nc, ctx.query("stats"), b"{}", timeout=10)).data)
    return int(reply["by_status"].get("completed", 0))


def role_of(argv: list[str]) -> str:
    """What a process of a jetsource system is, from its command line: `actor tasks`, `worker`,
    `projector`, `edge`, `up` (the supervisor), `nats-server`, `postgres`, else its program."""
    for i, arg in enumerate(argv):
        if arg == "infra.cli" or os.path.basename(arg) == "jetsource":
            words = list(itertools.takewhile(lambda a: not a.startswith("-"), argv[i + 1:]))
            return " ".join(words[:2]) or "jetsource"
    program = os.path.basename(argv[0]) if argv else "?"
    if program.startswith("nats-server"):
        return "nats-server"
    if program.startswith("postgres"):  # backends retitle themselves `postgres: user db ...`
        return "postgres"
    return program


class ProcessCpu:
    """CPU seconds used so far by a process tree, summed by role (Linux `/proc`), plus this load
    generator's own: a phase's difference, divided by its tasks, charges its work to each
    process. Processes that exit during a phase take their share with them."""

    def __init__(self, root: int) -> None:
        self._root = root
        self._tick = os.sysconf("SC_CLK_TCK")

    def sample(self) -> dict[str, float]:
        tree: dict[int, list[int]] = {}
        used: dict[int, tuple[str, float]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            except OSError:
                continue  # gone meanwhile
            tree.setdefault(int(fields[1]), []).append(int(entry))
            used[int(entry)] = (role_of(argv), (int(fields[11]) + int(fields[12])) / self._tick)
        by_role: dict[str, float] = {}
        todo = [self._root]
        while todo:
            pid = todo.pop()
            if pid in used:
                role, seconds = used[pid]
                by_role[role] = by_role.get(role, 0.0) + seconds
            todo += tree.get(pid, [])
        own = os.times()
        by_role["load generator"] = own.user + own.system
        return by_role

    @staticmethod
    def per_item(before: Mapping[str, float], after: Mapping[str, float], items: int) -> dict[str, int]:
        """Microseconds of CPU per item by role, largest first, and their total."""
        spent = {role: (after[role] - before.get(role, 0.0)) * 1e6 / items for role in after}
        out = {role: round(us) for role, us in sorted(spent.items(), key=lambda kv: -kv[1]) if us >= 0.5}
        out["total"] = round(sum(spent.values()))
        return out


async def bench_tasks(
    url: Nats, settings: Settings, count: int, inflight: int, batch: int = 1, cpu: ProcessCpu | None = None,
) -> Mapping[str, object]:
    """No-op tasks submitted and completed end to end; then submit-to-start latency when idle.

    With batch > 1 the producer submits through `tasks.cmd.submit_batch`, `batch` tasks a
    request, and the latency part is skipped. With `cpu`, each process's CPU from the first
    submit until the read model has caught up, per task.

    The end of the run is seen by polling the work queues until they are drained (a worker acks
    a work item only once the outcome is stored), so the load generator does not also receive
    and parse every stored event; the read model's count of completed tasks, once it has caught
    up, confirms the figure. Start times for the latency part are observed live on the task
    event subjects (core NATS sees every event JetStream stores).
    """
    ctx = tasks_context(settings)
    nc = await url.connect("bench-tasks")
    js = nc.jetstream()
    completed_before = await _completed_count(nc, ctx)
    one = {"type": "echo", "payload": None, "priority": "normal"}
    body = json.dumps(one).encode()
    subject = ctx.command("submit")
    batch_body = json.dumps({"items": [one] * batch}).encode()

    async def op() -> bool:
        if batch > 1:
            msg = await request(nc, ctx.command("submit_batch"), batch_body, timeout=30)
            return b'"refused"' not in msg.data and not (msg.headers and "Nats-Service-Error-Code" in msg.headers)
        msg = await request(nc, subject, body, timeout=10)
        return not (msg.headers and "Nats-Service-Error-Code" in msg.headers)

    since = datetime.now(UTC)
    cpu_before = cpu.sample() if cpu else {}
    start = time.perf_counter()
    submitting = asyncio.Event()
    probe = asyncio.get_running_loop().create_task(_submit_high_tasks(nc, ctx, submitting))
    submitted = await _drive(count // batch, inflight, op)
    submitting.set()
    high = await probe
    submitted["per_s"] = submitted["per_s"] * batch
    deadline = time.perf_counter() + 120
    while not await _queues_drained(js, ctx) and time.perf_counter() < deadline:
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - start
    throughput: dict[str, object] = {"tasks": count, "per_s": round(count / elapsed),
                                     "submit_per_s": submitted["per_s"], "submit_p99_ms": submitted["p99_ms"]}
    await settle(url, settings)
    if cpu:
        throughput["cpu_us_per_task"] = ProcessCpu.per_item(cpu_before, cpu.sample(), count)
    throughput["completed"] = await _completed_count(nc, ctx) - completed_before
    throughput.update(await _priority_under_load(settings, high, since))
    if batch == 1:
        throughput.update(await _idle_start_latency(nc, ctx, body))
    await nc.close()
    if batch > 1:
        throughput.update(submitted_in_batches_of=batch, requests_in_flight=inflight)
    return throughput


async def _submit_high_tasks(nc: Client, ctx: Context, done: asyncio.Event, every_s: float = 0.25) -> list[str]:
    """While the load is being submitted, a `high` task now and then (their ids)."""
    body = json.dumps({"type": "echo", "payload": None, "priority": "high"}).encode()
    ids: list[str] = []
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), every_s)
        if done.is_set():
            return ids
        ids.append(json.loads((await request(nc, ctx.command("submit"), body, timeout=10)).data)["task_id"])


async def _priority_under_load(settings: Settings, high: list[str], since: datetime) -> dict[str, object]:
    """How the `high` tasks submitted during the run fared against the `normal` load, from the
    read model (caught up): their submit-to-start wait, the normal tasks' wait, how many normal
    tasks already waiting when a high one was submitted started after it (overtaken), and how
    many started between its submission and its start (the ones workers had taken already)."""
    if not high:
        return {}
    pool = await create_pool(settings.resolved_database_url(), settings.db_schema, max_size=1)
    try:
        rows = await pool.fetch(
            """SELECT h.task_id, extract(epoch FROM h.started_at - h.submitted_at) * 1000 AS wait_ms,
                      (SELECT count(*) FROM tasks n WHERE n.priority = 'normal' AND n.submitted_at >= $2
                         AND n.submitted_at < h.submitted_at AND n.started_at > h.started_at) AS overtaken,
                      (SELECT count(*) FROM tasks n WHERE n.priority = 'normal' AND n.submitted_at >= $2
                         AND n.submitted_at < h.submitted_at
                         AND n.started_at BETWEEN h.submitted_at AND h.started_at) AS meanwhile
               FROM tasks h WHERE h.task_id = ANY($1::text[])""", high, since)
        normal_wait = await pool.fetchval(
            """SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - submitted_at))
               * 1000 FROM tasks WHERE priority = 'normal' AND submitted_at >= $1""", since)
    finally:
        await pool.close()
    waits = sorted(float(r["wait_ms"]) for r in rows)
    return {"high_tasks": len(rows), "high_wait_p50_ms": round(_pct(waits, 0.5), 1),
            "high_wait_max_ms": round(waits[-1], 1), "normal_wait_p50_ms": round(float(normal_wait or 0), 1),
            "normal_overtaken_per_high": round(sum(r["overtaken"] for r in rows) / len(rows)),
            "normal_started_meanwhile_max": max(r["meanwhile"] for r in rows)}


async def _idle_start_latency(nc: Client, ctx: Context, body: bytes, samples: int = 200) -> dict[str, float]:
    """Submit-to-start latency of one task at a time on an otherwise idle system."""
    started_at: dict[str, float] = {}
    started_event: dict[str, asyncio.Event] = {}

    async def on_event(msg: Msg) -> None:
        # When the worker began the handler: a `task.started`, or for a quick task (whose start
        # is recorded in its outcome) the outcome's `started_at`.
        event = json.loads(msg.data)
        at = event["at"] if event["type"] == "task.started" else event.get("started_at")
        if at is not None:
            task_id = msg.subject.rsplit(".", 1)[1]
            started_at.setdefault(task_id, at)
            if task_id in started_event:
                started_event[task_id].set()

    await asyncio.sleep(1.0)
    sub = await nc.subscribe(ctx.events_wildcard, cb=on_event)
    latencies = []
    for _ in range(samples):
        t = time.time()
        reply = json.loads((await request(nc, ctx.command("submit"), body, timeout=10)).data)
        started_event[reply["task_id"]] = event = asyncio.Event()
        if reply["task_id"] not in started_at:
            await asyncio.wait_for(event.wait(), 10)
        latencies.append((started_at[reply["task_id"]] - t) * 1000)
        await asyncio.sleep(0.01)
    await sub.unsubscribe()
    latencies.sort()
    return {"idle_submit_to_start_p50_ms": round(_pct(latencies, 0.5), 2),
            "idle_submit_to_start_p99_ms": round(_pct(latencies, 0.99), 2)}


@contextlib.asynccontextmanager
async def _system(
    settings: Settings, pid: int | None, partitions: int = 0, cluster: int = 0, log_format: str | None = None,
) -> AsyncIterator[tuple[Settings, str, int | None]]:
    """The settings of a running system, its edge base URL and its supervisor's pid (as given,
    for a running one); starts `jetsource up [--partitions K] [--cluster N]` if none answers."""
    base = f"http://{settings.http_host}:{settings.http_port}"
    try:
        async with aiohttp.ClientSession() as http, http.get(base + "/readyz") as resp:
            if resp.status == 200:
                yield settings, base, pid
                return
    except aiohttp.ClientError:
        pass
    with tempfile.TemporaryDirectory(prefix="jetsource-bench-") as tmp:
        nodes = max(1, cluster)
        ports = {k: free_run(nodes) for k in ("NATS_PORT", "NATS_MONITOR_PORT", "NATS_CLUSTER_PORT")}
        ports.update({k: free_port() for k in ("POSTGRES_PORT", "HTTP_PORT")})
        env = {k: v for k, v in os.environ.items() if not k.startswith("JETSOURCE_")}
        env.update({f"JETSOURCE_{k}": str(v) for k, v in ports.items()}, JETSOURCE_DATA_DIR=tmp,
                   JETSOURCE_LOG_LEVEL="WARNING", JETSOURCE_NAMESPACE=settings.namespace,
                   JETSOURCE_DB_SCHEMA=settings.db_schema)
        if log_format:
            env["JETSOURCE_LOG_FORMAT"] = log_format
        extra = ["--partitions", str(partitions)] if partitions else []
        extra += ["--cluster", str(cluster)] if cluster else []
        proc = subprocess.Popen([sys.executable, "-m", "infra.cli", "up", *extra], env=env, stdout=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{ports['HTTP_PORT']}"
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(600):
                    try:
                        async with http.get(base + "/readyz") as resp:
                            if resp.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            update: dict[str, object] = {**{k.lower(): v for k, v in ports.items()}, "nats_url": None,
                                         "database_url": None, "data_dir": Path(tmp)}
            # What the started system is, whatever this process's own settings say.
            update.update(partitions=partitions or 1, nats_cluster=cluster, stream_replicas=max(1, cluster))
            yield settings.model_copy(update=update), base, proc.pid
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


async def _history(store: PartitionedStore, ctx: Context, order_id: str, events: int) -> None:
    """An order with `events` events (placed, then items added), written straight to its stream
    in atomic batches of up to 1,000, each event with the headers an actor gives it."""
    lines = [OrderLine(sku="sku-0", quantity=1, unit_price=100)]
    body = [encode(OrderPlaced(order_id=order_id, customer_id="bench", currency="EUR", lines=lines))]
    body += [encode(ItemAdded(order_id=order_id, sku=f"sku-{i % 50}", quantity=1, unit_price=100))
             for i in range(1, events)]
    now = datetime.now(UTC).isoformat()
    for start in range(0, events, MAX_ATOMIC_BATCH):
        batch = [NewEvent(data, {h.EV_COMMAND_ID: f"bench-{order_id}-{start + i}", h.EV_TRACE_ID: "bench",
                                 h.EV_TIME: now})
                 for i, data in enumerate(body[start:start + MAX_ATOMIC_BATCH])]
        await store.append(ctx.events(order_id), batch, None)


async def _median_ms(op: Callable[[], Awaitable[object]], rounds: int) -> float:
    took = []
    for _ in range(rounds):
        start = time.perf_counter()
        await op()
        took.append((time.perf_counter() - start) * 1000)
    took.sort()
    return round(took[len(took) // 2], 2)


async def bench_read(url: Nats, settings: Settings, rounds: int = 21) -> Mapping[str, object]:
    """The read side: loading a 1,000- and a 10,000-event aggregate with and without a snapshot
    (median of `rounds` loads, each from the stream: a fresh fold, no cache), and reading the
    whole orders stream back decoded, next to the same read without decoding and `nats bench
    js ordered` (the raw ordered replay ceiling, in Go) on the same stream."""
    from infra.contexts import declared

    nc = await url.connect("bench-read")
    try:
        ctx = orders_context(settings)
        spec = declared(settings).context("orders").spec(settings)
        store = PartitionedStore.open(nc, ctx)
        actor = Actor(nc, store, dataclasses.replace(spec, snapshot_every=max(spec.snapshot_every, 100)))
        out: dict[str, object] = {}
        run = uuid.uuid4().hex[:8]
        for events in (1_000, 10_000):
            oid = f"bench-read-{run}-{events}"
            await _history(store, ctx, oid, events)
            state, version = await actor.load(oid, use_snapshot=False)
            assert len(state.lines) == 50, "the bench history did not fold as written"
            out[f"load_{events}_events_no_snapshot_ms"] = await _median_ms(
                lambda: actor.load(oid, use_snapshot=False), rounds if events == 1_000 else max(5, rounds // 4))
            await actor.snapshot_now(oid)
            out[f"load_{events}_events_snapshot_ms"] = await _median_ms(lambda: actor.load(oid), rounds)
        codec = EventCodec.of(spec.event_type)
        for decoded in (False, True):
            start, count = time.perf_counter(), 0
            async for stored in store.read(ctx.events_wildcard):
                if decoded:
                    codec.decode(stored.data)
                count += 1
            rate = round(count / (time.perf_counter() - start))
            out["stream_read_decoded_per_s" if decoded else "stream_read_raw_per_s"] = rate
        out["stream_events"] = count
        out["natscli_ordered_replay_per_s"] = await asyncio.to_thread(
            nats_cli_ordered, settings, ctx.parts[0].stream, (await nc.jetstream().stream_info(ctx.parts[0].stream))
            .state.messages)
        return out
    finally:
        await nc.close()


async def _order_histories(store: PartitionedStore, ctx: Context, events: int, run: str) -> int:
    """Orders of five events each (placed, two items added, confirmed, reserved), written
    straight to the streams in atomic batches of 1,000 (200 orders each, concurrently per
    partition); returns how many events were written."""
    lines = [OrderLine(sku="sku-0", quantity=2, unit_price=1250)]
    now = datetime.now(UTC).isoformat()
    pending: dict[int, list[tuple[str, bytes]]] = {}
    written = 0

    async def flush(part: int) -> None:
        nonlocal written
        batch = pending.pop(part, [])
        if not batch:
            return
        first_subject = batch[0][0]
        events = [NewEvent(data, {h.EV_COMMAND_ID: f"bench-{run}-{written + i}", h.EV_TRACE_ID: "bench", h.EV_TIME: now})
                  for i, (_, data) in enumerate(batch)]
        # One atomic batch of many subjects: the first is the batch's subject, the rest extra.
        await store.append(first_subject, events[:1], None, [(s, e.data) for (s, _), e in zip(batch[1:], events[1:])])
        written += len(batch)

    for n in range(events // 5):
        oid = f"rb-{run}-{n}"
        subject = ctx.events(oid)
        body = [OrderPlaced(order_id=oid, customer_id=f"c-{n % 1000}", currency="EUR", lines=lines),
                ItemAdded(order_id=oid, sku="sku-1", quantity=1, unit_price=300),
                ItemAdded(order_id=oid, sku="sku-2", quantity=3, unit_price=50),
                OrderConfirmed(order_id=oid, total=2950, lines=lines), OrderReserved(order_id=oid)]
        part = ctx.partition_of(oid)
        pending.setdefault(part, []).extend((subject, encode(e)) for e in body)
        if len(pending[part]) >= MAX_ATOMIC_BATCH:
            await flush(part)
    for part in list(pending):
        await flush(part)
    return written


async def bench_rebuild(url: Nats, settings: Settings, events: int) -> Mapping[str, object]:
    """A blue/green rebuild of the orders read model from `events` order events (written first,
    on top of whatever the stream holds), parity check included; next to raw ordered replay of
    the same stream (`nats bench js ordered`) measured in the same run."""
    from infra.bootstrap import parked_subjects
    from infra.contexts import declared
    from projections.rebuild import Model, Rebuild

    nc = await url.connect("bench-rebuild")
    try:
        ctx = orders_context(settings)
        store = PartitionedStore.open(nc, ctx)
        start = time.perf_counter()
        written = await _order_histories(store, ctx, events, uuid.uuid4().hex[:8])
        write_s = time.perf_counter() - start
        await settle(url, settings, limit_s=1800)  # the live projector has folded them: a rebuild, not a catch-up
        bc = declared(settings).context("orders")
        assert bc.read_model is not None
        model = Model.of(bc, ctx)
        total = sum([(await nc.jetstream().stream_info(s)).state.messages for s in ctx.streams])
        lines: list[dict[str, object]] = []
        job = Rebuild(nc, settings.resolved_database_url(), settings.db_schema, model, parked=parked_subjects(settings),
                      report=lines.append)
        start = time.perf_counter()
        done = await job.run()
        seconds = time.perf_counter() - start
        folded = sum(int(v) for v in done.get("at", {}).values()) if isinstance(done.get("at"), dict) else 0
        return {"events_written": written, "write_s": round(write_s, 1), "stream_messages": total,
                "rebuild_s": round(seconds, 1), "rebuild_events_per_s": round(total / seconds),
                "copy_s": done.get("copy_seconds"), "parity": done.get("parity"), "swapped": done.get("swapped"),
                "natscli_ordered_replay_per_s": await asyncio.to_thread(nats_cli_ordered, settings, ctx.parts[0].stream,
                                                                        min(total, 1_000_000)),
                "held_at_sum": folded}
    finally:
        await nc.close()


def nats_cli_ordered(settings: Settings, stream: str, count: int) -> object:
    """`nats bench js ordered` on a stream: the raw ordered replay ceiling (messages/s)."""
    exe = shutil.which("nats")
    if exe is None:
        return {"skipped": "the nats CLI is not on the PATH (go install github.com/nats-io/natscli/nats@v0.5.0)"}
    who = credentials(settings, ADMIN)
    env = {**os.environ, "NATS_URL": settings.resolved_nats_url(), "NATS_USER": who.user or "",
           "NATS_PASSWORD": who.password or ""}
    with tempfile.TemporaryDirectory() as home:
        done = subprocess.run([exe, "bench", "js", "ordered", "--stream", stream, "--msgs", str(count),
                               "--no-progress"], env={**env, "HOME": home}, capture_output=True, text=True, timeout=600)
    import re

    rate = re.search(r"stats: ([\d,]+) msgs/sec", done.stdout + done.stderr)
    if done.returncode != 0 or rate is None:
        return {"failed": (done.stdout + done.stderr).strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
    return int(rate.group(1).replace(",", ""))


def nats_cli_bench(settings: Settings, subject: str, count: int, clients: int) -> dict[str, object]:
    """`nats bench service request SUBJECT --payload examples/payloads/place_order.json` as
    users run it (the NATS CLI, when on the PATH), as the admin: its rate, next to ours."""
    exe = shutil.which("nats")
    if exe is None:
        return {"skipped": "the nats CLI is not on the PATH (go install github.com/nats-io/natscli/nats@v0.5.0)"}
    payload = Path(__file__).resolve().parents[1] / "examples" / "payloads" / "place_order.json"
    who = credentials(settings, ADMIN)
    env = {**os.environ, "NATS_URL": settings.resolved_nats_url(), "NATS_USER": who.user or "",
           "NATS_PASSWORD": who.password or ""}
    with tempfile.TemporaryDirectory() as home:  # no user context of the CLI's own interferes
        out = subprocess.run([exe, "bench", "service", "request", subject, "--payload", str(payload),
                              "--clients", str(clients), "--msgs", str(count), "--no-progress"],
                             env={**env, "HOME": home}, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    import re

    rate = re.search(r"stats: ([\d,]+) msgs/sec", text)
    if out.returncode != 0 or rate is None:
        return {"failed": text.strip().splitlines()[-1:] or [f"exit {out.returncode}"]}
    return {"per_s": int(rate.group(1).replace(",", "")), "clients": clients, "count": count,
            "client": "nats bench service request (natscli)"}


async def settle(url: Nats, settings: Settings, limit_s: float = 180.0) -> float:
    """Wait until the projections have applied everything stored, so that a phase does not
    compete with the projector catching up on the phase before it; returns the seconds waited."""
    from infra.status import read_models

    nc = await url.connect("bench-settle")
    js = nc.jetstream()
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < limit_s:
            busy = 0
            for model in read_models(settings):
                for part in model.ctx.parts:
                    try:
                        info = await js.consumer_info(part.stream, model.ctx.consumer(model.projection.name))
                    except Exception:  # noqa: BLE001 - no projector consumer yet: nothing to wait for
                        continue
                    busy += (info.num_pending or 0) + (info.num_ack_pending or 0)
            if not busy:
                break
            await asyncio.sleep(0.2)
        return round(time.perf_counter() - start, 1)
    finally:
        await nc.close()


async def bench(settings: Settings, args: argparse.Namespace) -> int:
    only = set(args.only or ["ceilings", "nats", "saga", "http", "tasks", "read"])
    results: dict[str, object] = {"inflight": args.inflight}
    async with (_system(settings, args.pid, args.partitions, args.cluster, args.log_format) as (settings, base, pid),
                _watching(base if args.dashboard else None) as watched):
        results["partitions"] = settings.partitions
        if settings.nats_cluster:
            results["cluster_nodes"] = settings.nats_cluster
        url = Nats(settings.resolved_nats_url(), credentials(settings, ADMIN))
        cpu = ProcessCpu(pid) if pid is not None and os.path.isdir("/proc") else None
        if "ceilings" in only:
            results["ceiling_nats_request_reply"] = await ceiling_request_reply(url, args.count, args.inflight)
            results["ceiling_jetstream_publish"] = await ceiling_js_publish(url, min(args.count, 10000), args.inflight)
        if "nats" in only:
            subject = orders_context(settings).command("place")
            await settle(url, settings)
            results["nats_orders_cmd_place"] = await bench_nats(url, subject, args.count, args.inflight)
            # What `nats bench service request --clients N` users see with more callers: the
            # group commit gets fuller batches per fsync.
            await settle(url, settings)
            results[f"nats_orders_cmd_place_x{4 * args.inflight}"] = await bench_nats(
                url, subject, args.count, 4 * args.inflight)
            await settle(url, settings)
            results["natscli_orders_cmd_place"] = await asyncio.to_thread(
                nats_cli_bench, settings, subject, args.count, args.inflight)
        if "saga" in only:
            await settle(url, settings)
            results["saga_place_confirm_reserved"] = await bench_saga(url, settings, max(1, args.count // 4), args.inflight)
        if "http" in only:
            await settle(url, settings)
            results["http_post_orders"] = await bench_http(base, args.count, args.inflight, seconds=10)
        if "tasks" in only:
            await settle(url, settings)
            results["tasks_noop_end_to_end"] = await bench_tasks(url, settings, args.count, args.inflight, cpu=cpu)
            # Many producers, each submitting one task a request (what a fleet of web workers does).
            await settle(url, settings)
            results[f"tasks_noop_end_to_end_x{4 * args.inflight}"] = await bench_tasks(
                url, settings, args.count, 4 * args.inflight, cpu=cpu)
            await settle(url, settings)
            results["tasks_noop_batched_submit"] = await bench_tasks(
                url, settings, args.count, max(1, args.inflight // 8), batch=100, cpu=cpu)
        if "read" in only:
            await settle(url, settings)
            results["read_side"] = await bench_read(url, settings)
        if "rebuild" in (args.only or []):  # long: asked for by name only
            await settle(url, settings)
            results["rebuild_orders"] = await bench_rebuild(url, settings, args.rebuild_events)
        if args.dashboard:
            results["dashboard_snapshots_received"] = watched[0]
    for key, value in results.items():
        print(f"{key:<28} {json.dumps(value)}")
    return 0


@contextlib.asynccontextmanager
async def _watching(base: str | None) -> AsyncIterator[list[int]]:
    """One dashboard page's worth of load while the phases run: a client of the edge's event
    stream (`--dashboard`), counting the snapshots it gets."""
    received = [0]
    if base is None:
        yield received
        return

    async def watch() -> None:
        async with aiohttp.ClientSession() as http, http.get(base + "/dashboard/events") as resp:
            async for line in resp.content:
                if line.startswith(b"data: "):
                    received[0] += 1

    task = asyncio.get_running_loop().create_task(watch())
    try:
        yield received
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

