"""How `jetsource up` hands out metrics ports to its roles, lays out an embedded cluster,
restarts what crashed (with back-off, reaping every exit) and tells a stale PostgreSQL lock
from a held one."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from infra.embedded import EmbeddedPostgres, is_postgres
from infra.settings import Settings
from infra.supervisor import Watch, metrics_ports, nats_nodes, role_commands


def test_roles_get_consecutive_metrics_ports_and_the_edge_none_of_them() -> None:
    settings = Settings(_env_file=None, metrics_port=9400)
    children = role_commands(settings)
    assert metrics_ports(children) == {"actor orders": 9400, "actor tasks": 9401, "actor inventory": 9402,
                                       "worker": 9403, "managers": 9404, "projector": 9405}
    edge = next(c for c in children if c.name == "edge")
    assert edge.env["JETSOURCE_METRICS_PORT"] == "0"  # it serves /metrics on the HTTP port


def test_no_metrics_ports_unless_asked_even_when_the_environment_has_one() -> None:
    settings = Settings(_env_file=None, metrics_port=0)
    assert metrics_ports(role_commands(settings)) == {}
    assert all(c.env["JETSOURCE_METRICS_PORT"] == "0" for c in role_commands(settings))


def test_a_cluster_is_an_odd_number_of_nodes_each_on_its_own_ports_and_store_and_streams_default_to_its_size(
    tmp_path: Path,
) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path, nats_cluster=3, nats_port=5000, nats_monitor_port=6000,
                        nats_cluster_port=7000)
    assert settings.stream_replicas == 3
    assert settings.nats_embedded  # identities still come from the data directory
    assert settings.resolved_nats_url() == "nats://127.0.0.1:5000,nats://127.0.0.1:5001,nats://127.0.0.1:5002"
    assert Settings(_env_file=None, nats_cluster=3, stream_replicas=1).stream_replicas == 1  # asked for
    for size in (1, 2, 4, -3):
        with pytest.raises(ValidationError):
            Settings(_env_file=None, nats_cluster=size)

    nodes = nats_nodes(settings)
    assert [(n.name, n.port, n.monitor_port, n.dir.name) for n in nodes] == [
        ("nats-server 1", 5000, 6000, "nats-1"), ("nats-server 2", 5001, 6001, "nats-2"),
        ("nats-server 3", 5002, 6002, "nats-3")]
    config = nodes[1].config()
    password = (tmp_path / "secrets" / "cluster_route.password").read_text()
    assert "server_name: jetsource-2" in config and "listen: 127.0.0.1:7001" in config
    assert "sync_interval: always" in config and "authorization:" in config  # the clients' users
    # Routes to the other two nodes only, authenticated with the data directory's route password.
    assert f"routes: [nats-route://route:{password}@127.0.0.1:7000, nats-route://route:{password}@127.0.0.1:7002]" in config
    assert f'authorization {{ user: "route", password: "{password}" }}' in config


def test_one_server_when_no_cluster_is_asked_for(tmp_path: Path) -> None:
    [node] = nats_nodes(Settings(_env_file=None, data_dir=tmp_path, nats_port=5000))
    assert (node.name, node.port, node.dir.name, node.cluster) == ("nats-server", 5000, "nats", None)
    assert "cluster {" not in node.config() and "server_name: jetsource\n" in node.config()


class _Script:
    """A supervised process running a short Python script (real processes, no fakes of them)."""

    def __init__(self, code: str) -> None:
        self.name = "script"
        self.code = code
        self.proc: subprocess.Popen[bytes] | None = None
        self.launches = 0
        self.holder: str | None = None

    def launch(self) -> None:
        self.launches += 1
        self.proc = subprocess.Popen([sys.executable, "-c", self.code])

    def blocked(self) -> str | None:
        return self.holder


def _exited(watch: Watch) -> None:
    """Until the process has exited, leaving it a zombie: reaping it is `check`'s job."""
    assert watch.process.proc is not None
    os.waitid(os.P_PID, watch.process.proc.pid, os.WEXITED | os.WNOWAIT)


def test_a_crashing_process_is_reaped_and_restarted_with_doubling_backoff_reset_by_a_minute_up() -> None:
    script = _Script("import sys; sys.exit(3)")
    script.launch()
    watch = Watch(script)
    watch.started(now := 1000.0)
    delays = []
    for _ in range(8):
        _exited(watch)
        watch.check(now)
        assert script.proc is not None and script.proc.returncode == 3
        assert not Path(f"/proc/{script.proc.pid}").exists()  # reaped: no zombie left
        delays.append(watch.due - now)
        watch.check(watch.due - 0.01)
        assert script.launches == len(delays)  # not before it is due
        now = watch.due
        watch.check(now)
        assert script.launches == len(delays) + 1
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    _exited(watch)
    watch.check(now + 61)  # it had run for more than a minute
    assert watch.due - (now + 61) == 0.5


def test_a_blocked_process_waits_until_what_blocks_it_is_gone() -> None:
    script = _Script("import sys; sys.exit(1)")
    script.launch()
    watch = Watch(script)
    watch.started(0.0)
    _exited(watch)
    watch.check(0.0)
    script.holder = "the old one still runs"
    watch.check(10.0)
    watch.check(20.0)
    assert script.launches == 1
    script.holder = None
    watch.check(30.0)
    assert script.launches == 2 and watch.due == 0.0
    assert script.proc is not None
    script.proc.wait(10)


def test_a_stale_lock_names_a_postgres_process_only_while_one_runs_with_that_pid(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not is_postgres(dead.pid)
    assert not is_postgres(os.getpid())  # alive, but not PostgreSQL (a reused PID)
    impostor = subprocess.Popen(["bash", "-c", "exec -a postgres sleep 30"])
    try:
        for _ in range(100):  # until the exec has happened
            if is_postgres(impostor.pid):
                break
            time.sleep(0.02)
        assert is_postgres(impostor.pid)
        pg = EmbeddedPostgres(tmp_path, 5999)
        pg.pgdata.mkdir(parents=True)
        (pg.pgdata / "postmaster.pid").write_text(f"{impostor.pid}\n{pg.pgdata}\n")
        assert pg.blocked() == f"process {impostor.pid} of {pg.pgdata / 'postmaster.pid'} still runs"
        (pg.pgdata / "postmaster.pid").write_text(f"{dead.pid}\n{pg.pgdata}\n")
        (pg.pgdata / ".s.PGSQL.5999.lock").write_text(f"{impostor.pid}\n")
        assert "s.PGSQL.5999.lock still runs" in (pg.blocked() or "")
        (pg.pgdata / ".s.PGSQL.5999.lock").write_text(f"{dead.pid}\n")
        assert pg.blocked() is None
    finally:
        impostor.kill()
        impostor.wait()


def test_postgres_waits_while_processes_of_a_dead_postmaster_still_attach_its_shared_memory(tmp_path: Path) -> None:
    # A System V segment this test attaches, as an orphaned backend would hold the dead one's.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    libc.shmdt.argtypes = [ctypes.c_void_p]
    shmid = libc.shmget(0, 4096, 0o1000 | 0o600)  # IPC_PRIVATE, IPC_CREAT
    assert shmid >= 0, os.strerror(ctypes.get_errno())
    address = libc.shmat(shmid, None, 0)
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        pg = EmbeddedPostgres(tmp_path, 5998)
        pg.pgdata.mkdir(parents=True)
        (pg.pgdata / "postmaster.pid").write_text(
            f"{dead.pid}\n{pg.pgdata}\n0\n5998\n{pg.pgdata}\n127.0.0.1\n  5998001 {shmid:10d}\nready\n")
        assert pg.blocked() == f"1 processes of the old postmaster still attach its shared memory (id {shmid})"
        libc.shmdt(ctypes.c_void_p(address))
        address = None
        assert pg.blocked() is None
    finally:
        if address is not None:
            libc.shmdt(ctypes.c_void_p(address))
        libc.shmctl(shmid, 0, None)  # IPC_RMID


def test_a_data_directory_keeps_its_cluster_size_and_partition_count(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.bootstrap import PartitionsMismatch, record_cluster, record_partitions, with_recorded_partitions

    for name in ("JETSOURCE_NATS_CLUSTER", "JETSOURCE_PARTITIONS", "JETSOURCE_STREAM_REPLICAS", "JETSOURCE_NATS_URL"):
        monkeypatch.delenv(name, raising=False)
    created = Settings(_env_file=None, data_dir=tmp_path, nats_cluster=3, partitions=4)
    record_cluster(created)
    record_partitions(created)
    later = with_recorded_partitions(Settings(_env_file=None, data_dir=tmp_path))
    assert (later.nats_cluster, later.stream_replicas, later.partitions) == (3, 3, 4)
    assert later.resolved_nats_url().count("nats://") == 3  # every node, with no setting
    with pytest.raises(PartitionsMismatch, match="cluster of 3 nodes"):
        with_recorded_partitions(Settings(_env_file=None, data_dir=tmp_path, nats_cluster=5))
    with pytest.raises(PartitionsMismatch, match="created with 4 partition"):
        with_recorded_partitions(Settings(_env_file=None, data_dir=tmp_path, partitions=2))
    # An external server's layout is its own: nothing recorded here applies.
    external = with_recorded_partitions(Settings(_env_file=None, data_dir=tmp_path, nats_url="nats://elsewhere:4222"))
    assert (external.nats_cluster, external.partitions) == (0, 1)
