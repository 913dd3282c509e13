"""The CLI fails fast and plainly: an unreachable NATS is one line on stderr and a non-zero exit
within the command's timeout; bad arguments are usage errors, not tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]


def _cli(tmp_path: Path, *args: str, nats_url: str | None = None,
         settings: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(settings or {})}
    if nats_url:
        env["JETSOURCE_NATS_URL"] = nats_url
    # cwd: an empty directory, so no .env file of the checkout changes the settings.
    return subprocess.run([sys.executable, "-m", "infra.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", [
    ["send", "orders.query.list", "{}"],
    ["status"],
    ["replay", "orders"],
])
def test_an_unreachable_nats_is_one_line_naming_the_url_and_a_failure_exit(tmp_path: Path, command: list[str]) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    done = _cli(tmp_path, *command, "--timeout", "1", nats_url=url)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [f"jetsource: cannot reach NATS at {url} within 1s"], done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("command", [["up"], ["bench"]])
@pytest.mark.parametrize("count", ["0", "9", "four"])
def test_a_bad_partition_count_is_a_usage_error_before_anything_starts(
    tmp_path: Path, command: list[str], count: str,
) -> None:
    done = _cli(tmp_path, *command, "--partitions", count)
    assert done.returncode == 2 and "a partition count from 1 to 8" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / ".jetsource").exists()


@pytest.mark.parametrize(("args", "complaint"), [
    (["--since", "yesterday"], "argument --since: not an ISO datetime"),
    (["--from-seq", "0"], "argument --from-seq: a stream sequence is an integer >= 1"),
    (["--from-seq", "x"], "argument --from-seq"),
])
def test_bad_replay_arguments_are_usage_errors(tmp_path: Path, args: list[str], complaint: str) -> None:
    done = _cli(tmp_path, "replay", "orders", *args)
    assert done.returncode == 2
    assert done.stderr.startswith("usage: jetsource replay") and complaint in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("modules", ["", "examples.loyalty"])
def test_docs_prints_the_asyncapi_and_openapi_documents_without_a_server(tmp_path: Path, modules: str) -> None:
    settings = {"JETSOURCE_CONTEXT_MODULES": modules}
    done = _cli(tmp_path, "docs", "asyncapi", settings=settings)
    assert (done.returncode, done.stderr) == (0, "")
    doc = json.loads(done.stdout)
    assert doc["asyncapi"] == "3.0.0" and doc["channels"]["orders.cmd.place"]["address"] == "orders.cmd.place"
    assert ("loyalty.cmd.earn" in doc["channels"]) == bool(modules)
    done = _cli(tmp_path, "docs", "openapi", settings=settings)
    assert (done.returncode, done.stderr) == (0, "")
    assert "/orders" in json.loads(done.stdout)["paths"]
    assert not (tmp_path / ".jetsource").exists()  # nothing started, nothing written
