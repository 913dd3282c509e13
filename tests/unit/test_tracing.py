"""W3C `traceparent` at the edge: its trace id is taken when valid, and only then."""

from __future__ import annotations

import pytest

from bus.tracing import w3c_trace_id

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize("header", [
    f"00-{TRACE}-00f067aa0ba902b7-01",
    f"00-{TRACE}-00f067aa0ba902b7-00",
    f" 00-{TRACE}-00f067aa0ba902b7-01 ",
    f"01-{TRACE}-00f067aa0ba902b7-01-what-a-later-version-adds",  # later versions may add fields
])
def test_a_valid_traceparent_gives_its_trace_id(header: str) -> None:
    assert w3c_trace_id(header) == TRACE


@pytest.mark.parametrize("header", [
    None, "", "garbage",
    f"ff-{TRACE}-00f067aa0ba902b7-01",  # version ff is invalid
    f"00-{'0' * 32}-00f067aa0ba902b7-01",  # all-zero trace id
    f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
    f"00-{TRACE.upper()}-00f067aa0ba902b7-01",  # upper-case hex is not allowed
    f"00-{TRACE[:-1]}-00f067aa0ba902b7-01",  # short
    f"00-{TRACE}-00f067aa0ba902b7-01-extra",  # version 00 has exactly four fields
    f"00-{TRACE[:-1]}g-00f067aa0ba902b7-01",
])
def test_an_invalid_traceparent_is_ignored(header: str | None) -> None:
    assert w3c_trace_id(header) is None
