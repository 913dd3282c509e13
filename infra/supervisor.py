"""`jetsource up`: embedded servers plus supervised role processes, restarted when they crash,
stopped (drained) on Ctrl-C or SIGTERM with nothing left behind.

One loop watches every process it started, servers and roles alike: it polls each one (so an
exited one is reaped, never left a zombie) and starts a crashed one again with back-off.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Protocol

from infra import auth
from infra.embedded import Cluster, EmbeddedNats, EmbeddedPostgres, _die_with_parent, stop_process, wait_for_port
from infra.settings import Settings

log = logging.getLogger("jetsource.up")

UPTIME_RESETS_BACKOFF_S = 60.0


class Supervised(Protocol):
    """A process `jetsource up` keeps running: an embedded server or a role."""

    name: str
    proc: subprocess.Popen[bytes] | None

    def launch(self) -> None:
        """Start the process, without waiting for it to be ready."""

    def blocked(self) -> str | None:
        """Why it may not start now (a previous instance still holds something), or None."""


@dataclass
class Child:
    """One supervised role process."""

    name: str
    args: list[str]
    nice: int = 0
    env: dict[str, str] = field(default_factory=dict)  # on top of `base_env`
    base_env: dict[str, str] = field(default_factory=dict)  # the supervisor's environment
    proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        nice = self.nice

        def prepare() -> None:
            _die_with_parent()
            if nice:
                os.nice(nice)

        self.proc = subprocess.Popen(self.args, env={**self.base_env, **self.env}, preexec_fn=prepare)

    def blocked(self) -> str | None:
        return None


def backoff(restarts: int) -> float:
    """The delay before restarting a process that crashed `restarts` times in a row: 0.5 s
    doubling to 30 s."""
    return min(30.0, 0.5 * 2 ** min(restarts, 6))


@dataclass
class Watch:
    """A supervised process and its restart back-off."""

    process: Supervised
    restarts: int = 0  # crashes in a row, each within a minute of its start
    due: float = 0.0  # when a crashed process starts again; 0.0 while it runs
    started_at: float = 0.0
    waiting: str | None = None  # why it may not start yet, as last logged

    def started(self, now: float) -> None:
        assert self.process.proc is not None
        self.started_at, self.due, self.waiting = now, 0.0, None
        log.info("started %s (pid %d)", self.process.name, self.process.proc.pid)

    def _crashed(self, now: float, what: str) -> None:
        if now - self.started_at >= UPTIME_RESETS_BACKOFF_S:
            self.restarts = 0
        delay = backoff(self.restarts)
        self.restarts += 1
        self.due = now + delay
        log.warning("%s %s; restarting in %.1fs", self.process.name, what, delay)

    def check(self, now: float) -> None:
        """Reap the process if it exited and schedule its restart; restart it once due."""
        proc = self.process.proc
        if self.due == 0.0:
            code = proc.poll() if proc is not None else None
            if code is not None:
                self._crashed(now, f"exited with code {code}")
            return
        if now < self.due:
            return
        reason = self.process.blocked()
        if reason is not None:
            if reason != self.waiting:
                log.warning("%s: not restarting yet: %s", self.process.name, reason)
                self.waiting = reason
            return
        try:
            self.process.launch()
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            self._crashed(now, f"did not start ({exc})")
            return
        self.started(now)


def role_commands(settings: Settings) -> list[Child]:
    """One process per declared context's actor and extra role (workers), one for the process
    managers, the projector and the edge."""
    from infra.contexts import declared

    found = declared(settings)
    cli = [sys.executable, "-m", "infra.cli"]
    children = [Child(f"actor {bc.name}", [*cli, "actor", bc.name]) for bc in found.contexts]
    children += [Child(role.name, [*cli, *role.command]) for bc in found.contexts for role in bc.roles if role.command]
    if found.managers:
        children.append(Child("managers", [*cli, "managers"]))
    # The projector is eventually consistent by design: on a shared machine it yields the CPU
    # to the request path under load and catches up when the load drops.
    children.append(Child("projector", [*cli, "projector"], nice=settings.projector_nice))
    children.append(Child("edge", [*cli, "edge"]))  # serves its own /metrics on the HTTP port
    for i, child in enumerate(children):
        port = settings.metrics_port + i if settings.metrics_port and child.name != "edge" else 0
        child.env["JETSOURCE_METRICS_PORT"] = str(port)
    return children


def metrics_ports(children: list[Child]) -> dict[str, int]:
    """Where these roles serve Prometheus metrics (none when the setting is 0)."""
    ports = {c.name: int(c.env["JETSOURCE_METRICS_PORT"]) for c in children}
    return {name: port for name, port in ports.items() if port}


def nats_nodes(settings: Settings) -> list[EmbeddedNats]:
    """The embedded nats-server, or each node of the embedded cluster (`nats_cluster`)."""
    # No anonymous access: every role connects as itself (infra.auth).
    authorization = auth.server_config_block(settings, auth.ensure_secrets(settings))
    if not settings.nats_cluster:
        return [EmbeddedNats(settings.data_dir, settings.nats_port, settings.nats_monitor_port,
                             authorization=authorization)]
    cluster = Cluster(settings.nats_cluster, settings.nats_cluster_port, auth.route_password(settings))
    return [EmbeddedNats(settings.data_dir, settings.nats_port, settings.nats_monitor_port,
                         authorization=authorization, cluster=cluster, index=i) for i in range(cluster.size)]


def up(settings: Settings) -> int:
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    from infra.bootstrap import PartitionsMismatch, record_cluster, with_recorded_partitions

    try:
        settings = with_recorded_partitions(settings)  # before the servers' permissions are written
        record_cluster(settings)
    except PartitionsMismatch as exc:
        print(f"jetsource: {exc}", file=sys.stderr, flush=True)
        return 2
    nodes: list[EmbeddedNats] = []
    pg = None
    children: list[Child] = []
    watches: list[Watch] = []
    try:
        # The first start waits for each server: the roles' preparation needs them. A restart
        # does not (clients reconnect on their own), so role crashes are seen meanwhile.
        if settings.nats_embedded:
            nodes = nats_nodes(settings)
            for node in nodes:  # all at once: a cluster's nodes wait for each other's routes
                node.launch()
                watches.append(Watch(node))
                watches[-1].started(time.monotonic())
            for node in nodes:
                assert node.proc is not None
                wait_for_port(node.port, 20.0, node.proc, node.name)
        if settings.postgres_embedded:
            pg = EmbeddedPostgres(settings.data_dir, settings.postgres_port)
            pg.start()
            watches.append(Watch(pg))
            watches[-1].started(time.monotonic())
        # Children find the embedded server (or cluster) from the same settings (and their
        # identities in the data directory); only an external database URL is spelled out for them.
        env = dict(os.environ)
        env["JETSOURCE_DATA_DIR"] = str(settings.data_dir.resolve())
        if settings.nats_cluster:
            env["JETSOURCE_NATS_CLUSTER"] = str(settings.nats_cluster)
            env["JETSOURCE_STREAM_REPLICAS"] = str(settings.stream_replicas)
        env["JETSOURCE_DATABASE_URL"] = settings.resolved_database_url()
        child_settings = settings.model_copy(update={"database_url": env["JETSOURCE_DATABASE_URL"]})
        from infra.bootstrap import prepare

        try:
            partitions = asyncio.run(prepare(child_settings)).partitions
        except PartitionsMismatch as exc:
            print(f"jetsource: {exc}", file=sys.stderr, flush=True)
            return 2
        if partitions != settings.partitions:
            # The server's permissions were written for the other count (the data directory had
            # no record of the streams'): it is recorded now, and the next start is right.
            print(f"jetsource: the streams have {partitions} partition(s), not the {settings.partitions} this "
                  "server was configured for; the count is now recorded: start `jetsource up` again",
                  file=sys.stderr, flush=True)
            return 2
        settings = settings.model_copy(update={"partitions": partitions})
        env["JETSOURCE_PARTITIONS"] = str(partitions)  # what the streams have
        children = role_commands(settings)
        for child in children:
            child.base_env = env
            child.launch()
            watches.append(Watch(child))
            watches[-1].started(time.monotonic())
        _print_banner(settings, nodes, pg, metrics_ports(children))
        while not stopping:
            time.sleep(0.2)
            now = time.monotonic()
            for watch in watches:
                if not stopping:
                    watch.check(now)
        print("jetsource: stopping (draining)...", flush=True)
        return 0
    finally:
        for child in children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        for child in children:
            if child.proc is not None:
                stop_process(child.proc, signal.SIGTERM, timeout=20)
        if pg is not None:
            pg.stop()
        for node in nodes:
            node.stop()
        if children:
            print("jetsource: stopped", flush=True)


def _print_banner(
    settings: Settings, nodes: list[EmbeddedNats], pg: EmbeddedPostgres | None, metrics: dict[str, int]
) -> None:
    embedded = "  (embedded, JetStream, sync_interval: always)" if nodes else ""
    if settings.nats_cluster:
        embedded = (f"  (embedded cluster of {len(nodes)} nodes, R{settings.stream_replicas} streams, "
                    "sync_interval: always)")
    lines = [
        "jetsource is up",
        f"  HTTP edge      http://{settings.http_host}:{settings.http_port}  "
        "(dashboard: /dashboard, openapi: /openapi.json, asyncapi: /asyncapi.json)",
        f"  NATS           {settings.resolved_nats_url()}" + embedded,
    ]
    if settings.partitions > 1:
        lines.append(f"  partitions     {settings.partitions} streams per context")
    for node in nodes:
        lines.append(f"  NATS monitor   http://127.0.0.1:{node.monitor_port}" + (f"  ({node.server_name})" if settings.nats_cluster else ""))
    lines.append(f"  PostgreSQL     {settings.resolved_database_url()}" + ("  (embedded)" if pg else ""))
    if nodes or pg:
        lines.append(f"  data dir       {settings.data_dir.resolve()}")
    for role, port in metrics.items():
        lines.append(f"  metrics        http://{settings.http_host}:{port}/metrics  ({role})")
    lines.append("  Ctrl-C to stop")
    print("\n".join(lines), flush=True)
