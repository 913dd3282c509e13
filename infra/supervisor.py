"""`jetsource up`: embedded servers plus supervised role processes, restarted when they crash,
stopped (drained) on Ctrl-C or SIGTERM with nothing left behind."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from infra import auth
from infra.embedded import EmbeddedNats, EmbeddedPostgres, _die_with_parent, stop_process
from infra.settings import Settings

log = logging.getLogger("jetsource.up")


@dataclass
class Child:
    """One supervised role process."""

    name: str
    args: list[str]
    nice: int = 0
    env: dict[str, str] = field(default_factory=dict)  # on top of the supervisor's environment
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)

    def start(self, env: dict[str, str]) -> None:
        nice = self.nice

        def prepare() -> None:
            _die_with_parent()
            if nice:
                os.nice(nice)

        self.proc = subprocess.Popen(self.args, env={**env, **self.env}, preexec_fn=prepare)
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.proc.pid)


def role_commands(settings: Settings) -> list[Child]:
    cli = [sys.executable, "-m", "infra.cli"]
    # The projector is eventually consistent by design: on a shared machine it yields the CPU
    # to the request path under load and catches up when the load drops.
    children = [
        Child("actor orders", [*cli, "actor", "orders"]),
        Child("actor tasks", [*cli, "actor", "tasks"]),
        Child("worker", [*cli, "worker"]),
        Child("projector", [*cli, "projector"], nice=settings.projector_nice),
        Child("edge", [*cli, "edge"]),  # serves its own /metrics on the HTTP port
    ]
    for i, child in enumerate(children):
        port = settings.metrics_port + i if settings.metrics_port and child.name != "edge" else 0
        child.env["JETSOURCE_METRICS_PORT"] = str(port)
    return children


def metrics_ports(children: list[Child]) -> dict[str, int]:
    """Where these roles serve Prometheus metrics (none when the setting is 0)."""
    ports = {c.name: int(c.env["JETSOURCE_METRICS_PORT"]) for c in children}
    return {name: port for name, port in ports.items() if port}


def up(settings: Settings) -> int:
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    nats = pg = None
    children: list[Child] = []
    try:
        if settings.nats_embedded:
            # No anonymous access: every role connects as itself (infra.auth).
            authorization = auth.server_config_block(settings, auth.ensure_secrets(settings))
            nats = EmbeddedNats(settings.data_dir, settings.nats_port, settings.nats_monitor_port,
                                authorization=authorization)
            nats.start()
        if settings.postgres_embedded:
            pg = EmbeddedPostgres(settings.data_dir, settings.postgres_port)
            pg.start()
        # Children find the embedded server from the same settings (and their identities in the
        # data directory); only an external database URL is spelled out for them.
        env = dict(os.environ)
        env["JETSOURCE_DATA_DIR"] = str(settings.data_dir.resolve())
        env["JETSOURCE_DATABASE_URL"] = settings.resolved_database_url()
        child_settings = settings.model_copy(update={"database_url": env["JETSOURCE_DATABASE_URL"]})
        from infra.cli import prepare

        asyncio.run(prepare(child_settings))
        children = role_commands(settings)
        for child in children:
            child.start(env)
        _print_banner(settings, nats, pg, metrics_ports(children))
        while not stopping:
            time.sleep(0.2)
            now = time.monotonic()
            for child in children:
                assert child.proc is not None
                code = child.proc.poll()
                if code is None or stopping:
                    continue
                if child.next_start == 0.0:
                    # Crash-looping children back off: 0.5 s doubling to 30 s; a run of a
                    # minute or more resets the back-off.
                    delay = 0.5 if now - child.started_at > 60 else min(30.0, 0.5 * 2 ** min(child.restarts, 6))
                    child.next_start = now + delay
                    log.warning("%s exited with code %s; restarting in %.1fs", child.name, code, delay)
                elif now >= child.next_start:
                    child.restarts += 1
                    child.next_start = 0.0
                    child.start(env)
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
        if nats is not None:
            nats.stop()
        if children:
            print("jetsource: stopped", flush=True)


def _print_banner(
    settings: Settings, nats: EmbeddedNats | None, pg: EmbeddedPostgres | None, metrics: dict[str, int]
) -> None:
    lines = [
        "jetsource is up",
        f"  HTTP edge      http://{settings.http_host}:{settings.http_port}  (openapi: /openapi.json)",
        f"  NATS           {settings.resolved_nats_url()}" + ("  (embedded, JetStream, sync_interval: always)" if nats else ""),
    ]
    if nats:
        lines.append(f"  NATS monitor   http://127.0.0.1:{settings.nats_monitor_port}")
    lines.append(f"  PostgreSQL     {settings.resolved_database_url()}" + ("  (embedded)" if pg else ""))
    if nats or pg:
        lines.append(f"  data dir       {settings.data_dir.resolve()}")
    for role, port in metrics.items():
        lines.append(f"  metrics        http://{settings.http_host}:{port}/metrics  ({role})")
    lines.append("  Ctrl-C to stop")
    print("\n".join(lines), flush=True)
