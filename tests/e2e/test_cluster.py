"""`jetsource up --cluster 3 --partitions 3`: three nats-server nodes, R3 streams (three
partitions per context) with their leaders spread, and more than one process of the orders
actor, the worker and the projector. Under a small load of keyed orders and tasks, kill -9 a
node (the one leading the first orders partition, and others), then restart every node in turn:
no acknowledged write is lost, requests during the election fail fast (503, or 504 at the
edge's timeout, never a hang), and the system serves again with no manual step."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp
import psutil
import pytest
from nats.aio.client import Client
from nats.errors import Error as NatsError

from bus.connection import Credentials, connect
from infra.embedded import free_port
from tests.e2e.test_chaos import Command, Ledger, _classify, derived_id, fold_streams, recovered, stored_keys
from tests.e2e.test_up import PLACE, _cli, _env, _free_run, _stop, _wait_ready

NODES = 3
PARTITIONS = 3
STREAMS = (*(f"{c}_P{p}" for c in ("ORDERS", "TASKS", "INVENTORY") for p in range(PARTITIONS)), "PARKED")
WATCHED = "ORDERS_P0"  # the victim is the node leading it
T = TypeVar("T")
EDGE_TIMEOUT_S = 5.0  # the edge's request timeout (the default): its 504 comes after this


@dataclass
class Attempt:
    """One HTTP request of the load: when it was sent, how long its answer took, its status."""

    sent: float
    took: float
    status: int  # 0: no HTTP answer


@dataclass
class Load:
    """What the clients were told, and how fast."""

    ledger: Ledger = field(default_factory=Ledger)
    attempts: list[Attempt] = field(default_factory=list)

    async def post(self, http: aiohttp.ClientSession, command: Command, url: str, body: object,
                   headers: dict[str, str] | None = None) -> None:
        """POST a keyed command; an unknown outcome is retried with the same key, as a client would."""
        for _ in range(4):
            sent = time.monotonic()
            try:
                async with http.post(url, json=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, asyncio.TimeoutError):
                status = 0
            self.attempts.append(Attempt(sent, time.monotonic() - sent, status))
            self.ledger.statuses[status] = self.ledger.statuses.get(status, 0) + 1
            outcome = "unknown" if status == 0 else _classify(status)
            command.attempts.append(outcome)
            if outcome != "unknown":
                return
            await asyncio.sleep(0.2)

    def order_gap(self, moment: float) -> float | None:
        """Seconds from `moment` until an order sent after it was acknowledged (201)."""
        acked = [a.sent + a.took for a in self.attempts if a.sent >= moment and a.status == 201]
        return min(acked) - moment if acked else None

    def failed_since(self, moment: float) -> list[Attempt]:
        return [a for a in self.attempts if a.sent >= moment and a.status >= 500]


async def client(http: aiohttp.ClientSession, base: str, load: Load, name: str, stop: asyncio.Event) -> None:
    """Place keyed orders, and submit a keyed task every third one."""
    for n in itertools.count():
        if stop.is_set():
            return
        key = f"{name}-{n}"
        order = load.ledger.command("place", key, derived_id(key))
        await load.post(http, order, base + "/orders", PLACE, headers={"Idempotency-Key": key})
        if n % 3 == 0:
            task = load.ledger.command("submit", f"{key}:task", derived_id(f"{key}:task"))
            await load.post(http, task, base + "/tasks",
                            {"type": "echo", "payload": {"key": key}, "idempotency_key": task.key})
        if order.outcome != "acknowledged":
            await asyncio.sleep(0.05)  # an outage: don't spin


def _node(up: psutil.Process, n: int) -> psutil.Process | None:
    """The running nats-server of node n (1-based), a child of the supervisor."""
    for p in up.children():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and any(f"nats-{n}/nats-server.conf" in a for a in p.cmdline()):
                return p
        except psutil.NoSuchProcess:
            continue
    return None


async def _until(probe: Callable[[], Awaitable[T]], what: str, log: Path, timeout: float = 30.0) -> T:
    """Await probe() until its result is true, and return that."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            found = await probe()
        except (NatsError, asyncio.TimeoutError, OSError) as exc:
            last = exc
        else:
            if found:
                return found
            last = found
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} within {timeout:g} s; last: {last!r}\n{log.read_text()[-10000:]}")


async def _leaders(nc: Client) -> dict[str, str | None]:
    js = nc.jetstream()
    out = {}
    for stream in STREAMS:
        cluster = (await js.stream_info(stream)).cluster
        out[stream] = cluster.leader if cluster else None
    return out


async def _all_current(nc: Client) -> bool:
    """Every stream has a leader and all its followers online and caught up."""
    js = nc.jetstream()
    for stream in STREAMS:
        cluster = (await js.stream_info(stream)).cluster
        if cluster is None or not cluster.leader:
            return False
        peers = cluster.replicas or []
        if len(peers) != NODES - 1 or not all(p.current and not p.offline for p in peers):
            return False
    return True


async def _restarted(up: psutil.Process, n: int, old: int, log: Path) -> psutil.Process:
    async def fresh() -> psutil.Process | None:
        node = _node(up, n)
        return node if node is not None and node.pid != old else None

    found = await _until(fresh, f"node {n} restarted by the supervisor", log)
    assert found is not None
    return found


@pytest.mark.timeout(240)
async def test_a_3_node_cluster_loses_no_acknowledged_write_to_a_leader_kill_or_a_rolling_restart(
    tmp_path: Path,
) -> None:
    ports = {name: free_port() for name in ("pg", "http")}
    ports |= {"nats": _free_run(NODES), "monitor": _free_run(NODES), "metrics": 0}
    env = _env(tmp_path / "data", ports)
    env["JETSOURCE_NATS_CLUSTER_PORT"] = str(_free_run(NODES))
    env["JETSOURCE_TASK_LEASE_S"] = "5"
    log = tmp_path / "up.log"
    base = f"http://127.0.0.1:{ports['http']}"
    proc = subprocess.Popen([sys.executable, "-m", "infra.cli", "up", "--cluster", str(NODES), "--partitions",
                             str(PARTITIONS)], env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)
    # Everything else knows the cluster from the setting the `--cluster` flag gave `up`'s children.
    cluster_env = env | {"JETSOURCE_NATS_CLUSTER": str(NODES)}
    extras: list[subprocess.Popen[bytes]] = []
    load = Load()
    try:
        await _wait_ready(base, proc, log)
        up = psutil.Process(proc.pid)
        # A second process of the orders actor, the worker and the projector (a hot standby).
        for role in (["actor", "orders"], ["worker"], ["projector"]):
            extras.append(subprocess.Popen([sys.executable, "-m", "infra.cli", *role], env=cluster_env,
                                           stdout=log.open("ab"), stderr=subprocess.STDOUT))
        password = (tmp_path / "data" / "secrets" / "admin.password").read_text().strip()
        url = ",".join(f"nats://127.0.0.1:{ports['nats'] + i}" for i in range(NODES))
        nc = await connect(url, "cluster-test", credentials=Credentials(user="admin", password=password))
        try:
            leaders = await _leaders(nc)
            # Every node leads its share of the ten streams (three or four each).
            led = [list(leaders.values()).count(f"jetsource-{i}") for i in range(1, NODES + 1)]
            assert max(led) - min(led) <= 1 and sum(led) == len(STREAMS), leaders
            # The live configuration's bucket is kept on every node, as the streams are.
            assert (await nc.jetstream().stream_info("KV_CONFIG")).config.num_replicas == NODES
            status = _cli(env, "status")  # the data directory says it is a cluster: no setting needed
            assert status.returncode == 0, status.stdout + status.stderr
            assert f"{WATCHED} " in status.stdout and f"leader={leaders[WATCHED]}" in status.stdout, status.stdout
            assert "(current)" in status.stdout, status.stdout
            assert all(f"jetsource-{i}" in status.stdout for i in range(1, NODES + 1)), status.stdout

            async def two_actors() -> bool:
                out = _cli(cluster_env, "status").stdout
                return out.count("orders_actor ") >= 2 and "tasks_actor " in out

            await _until(two_actors, "a second orders actor answering", log)

            timeout = aiohttp.ClientTimeout(total=3 * EDGE_TIMEOUT_S)  # a hang shows as a long attempt
            async with aiohttp.ClientSession(timeout=timeout) as http:
                stop = asyncio.Event()
                clients = [asyncio.create_task(client(http, base, load, f"c{i}", stop)) for i in range(3)]
                try:
                    await asyncio.sleep(1.0)

                    # 1. kill -9 the node that leads ORDERS_P0 (and more partitions), under load.
                    victim_name = leaders[WATCHED]
                    assert victim_name is not None
                    n = int(victim_name.rsplit("-", 1)[1])
                    victim = _node(up, n)
                    assert victim is not None
                    # Watch the election from a node that stays up.
                    survivor = f"nats://127.0.0.1:{ports['nats'] + n % NODES}"
                    watcher = await connect(survivor, "cluster-test-watch",
                                            credentials=Credentials(user="admin", password=password))
                    killed_at, killed_wall = time.monotonic(), time.time()
                    victim.kill()

                    async def new_leader() -> float | None:
                        cluster = (await watcher.jetstream(timeout=0.5).stream_info(WATCHED)).cluster
                        if cluster is None or not cluster.leader or cluster.leader_since is None:
                            return None
                        if cluster.leader_since.timestamp() <= killed_wall:
                            return None  # the old leadership, as a survivor last saw it
                        # Elected since the kill: another node, or the victim itself once the
                        # supervisor restarted it (with ten streams to elect, it sometimes wins).
                        return cluster.leader_since.timestamp() - killed_wall  # the election took this

                    try:
                        elected = await _until(new_leader, f"{WATCHED} led again", log)
                    finally:
                        await watcher.close()
                    await _restarted(up, n, victim.pid, log)
                    assert f"nats-server {n} exited with code -9" in log.read_text()
                    await recovered(http, base, load.ledger, "kill", log)
                    # The clients' own next acknowledged order: after the election, and after the
                    # edge's circuit breaker (opened by the requests the kill left unanswered) let
                    # its probe through — up to its cool-down later than the probe of `recovered`.
                    gap = await _until(lambda: asyncio.sleep(0, load.order_gap(killed_at)),
                                       "a client's order acknowledged after the kill", log)
                    failed = load.failed_since(killed_at)
                    await _until(lambda: _all_current(nc), f"node {n} caught up again", log)
                    victim_led = [s for s, leader in leaders.items() if leader == victim_name]
                    print(f"kill -9 of {victim_name} (led {', '.join(victim_led)}): a new {WATCHED} leader in {elected:.1f} s; the next order "
                          f"acknowledged {gap:.1f} s after "
                          f"the kill; meanwhile {sum(a.status == 503 for a in failed)} x 503, "
                          f"{sum(a.status == 504 for a in failed)} x 504; node back in "
                          f"{time.monotonic() - killed_at:.1f} s; {load.ledger.summary()}")

                    # 2. A rolling restart: each node in turn, once the others are caught up.
                    for i in range(1, NODES + 1):
                        node = _node(up, i)
                        assert node is not None
                        node.send_signal(signal.SIGTERM)
                        await _restarted(up, i, node.pid, log)
                        await _until(lambda: _all_current(nc), f"node {i} rejoined and caught up", log)
                        await asyncio.sleep(0.5)
                    await recovered(http, base, load.ledger, "rolling", log)
                    assert not any(c.done() for c in clients), [c.exception() for c in clients if c.done()]
                finally:
                    stop.set()
                    await asyncio.gather(*clients)
            print(load.ledger.summary())
        finally:
            await nc.close()

        orders, tasks = await fold_streams(url, password, PARTITIONS)
        acked = load.ledger.outcomes("acknowledged")
        assert sum(c.kind == "place" for c in acked) >= 20 and any(c.kind == "submit" for c in acked)
        # No acknowledged write is lost, and none is stored twice.
        lost = [c for c in acked if c.key not in stored_keys(c, orders, tasks)]
        assert not lost, f"acknowledged but not stored: {lost[:10]} ({len(lost)}); {load.ledger.summary()}"
        assert not [i for i, o in orders.items() if o.placed != 1], "an order placed twice"
        # Nothing told it failed (4xx, 503) was stored.
        refused = load.ledger.outcomes("refused")
        assert not [c for c in refused if c.key in stored_keys(c, orders, tasks)]
        # Failures were answers, fast: 503 at once, or the edge's 504 at its timeout; no hang.
        assert set(load.ledger.statuses) <= {201, 202, 503, 504}, load.ledger.summary()
        slowest = max(a.took for a in load.attempts)
        assert slowest < EDGE_TIMEOUT_S + 2, f"an answer took {slowest:.1f} s"
        failed = [a for a in load.attempts if a.status >= 500]
        print(f"{len(failed)} failed answers, {sum(a.status == 503 for a in failed)} of them 503, slowest "
              f"{max((a.took for a in failed), default=0):.2f} s; slowest answer {slowest:.2f} s")
        for extra in extras:
            extra.send_signal(signal.SIGTERM)
        for extra in extras:
            assert extra.wait(30) == 0
        _stop(proc)
    finally:
        for extra in extras:
            if extra.poll() is None:
                extra.kill()
        if proc.poll() is None:
            _stop(proc)
