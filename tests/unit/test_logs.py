"""Log lines as JSON (or text) carry the role and, inside traced work, its trace and correlation."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from bus import tracing
from infra.logs import JsonLines, TextLines


def _line(formatter: logging.Formatter, *, exc: bool = False) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    log = logging.getLogger("test.logs")
    log.addHandler(handler)
    log.propagate = False
    try:
        if exc:
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("it failed: %s", "badly")
        else:
            log.warning("hello %s", "world")
    finally:
        log.removeHandler(handler)
    return stream.getvalue().strip()


def test_json_lines_name_the_role_and_the_trace_of_the_work_they_are_written_in() -> None:
    async def traced() -> str:
        tracing.follow("trace-1", "corr-1")
        return _line(JsonLines("orders_actor"))

    line = json.loads(asyncio.run(traced()))
    assert {k: line[k] for k in ("level", "role", "logger", "message", "trace_id", "correlation_id")} == {
        "level": "WARNING", "role": "orders_actor", "logger": "test.logs", "message": "hello world",
        "trace_id": "trace-1", "correlation_id": "corr-1"}
    # Outside traced work (another task's context): no trace.
    assert "trace_id" not in json.loads(_line(JsonLines("edge")))


def test_an_exception_is_part_of_its_json_line() -> None:
    line = json.loads(_line(JsonLines("projector"), exc=True))
    assert line["message"] == "it failed: badly" and "ValueError: boom" in line["exception"]
    assert "\n" not in _line(JsonLines("projector"), exc=True)


def test_text_lines_end_with_the_trace() -> None:
    async def traced() -> str:
        tracing.follow("t-9")
        return _line(TextLines("edge"))

    text = asyncio.run(traced())
    assert " WARNING edge test.logs: hello world [trace=t-9]" in text


def test_an_outage_is_two_lines_however_many_attempts_fail(caplog: pytest.LogCaptureFixture) -> None:
    from bus.outage import Outage

    log = logging.getLogger("test.outage")
    outage = Outage(log, "worker w1: taking work")
    with caplog.at_level(logging.INFO, logger="test.outage"):
        outage.ok()  # nothing was wrong: nothing to say
        for _ in range(50):
            outage.failed("NATS is not reachable")
        outage.ok()
        outage.ok()
        outage.failed("timed out")
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in messages] == ["WARNING", "INFO", "WARNING"], messages
    assert messages[0][1] == "worker w1: taking work: NATS is not reachable; retrying until it is back"
    assert messages[1][1].startswith("worker w1: taking work: back after ") and "NATS is not reachable" in messages[1][1]
