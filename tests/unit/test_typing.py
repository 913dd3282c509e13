"""The type checker is part of the suite: every package and the tests type-check (mypy, with
the pydantic plugin; settings in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_code_and_the_tests_type_check() -> None:
    packages = ["bus", "actors", "projections", "http_edge", "infra", "tests"]
    done = subprocess.run([sys.executable, "-m", "mypy", *packages], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
