"""Task types: built-ins are there, and a module named in settings adds its own."""

from __future__ import annotations

import asyncio

import pytest

from actors.tasks.registry import (
    FULFIL_ORDER,
    FulfilOrderPayload,
    SleepPayload,
    TaskContext,
    TaskFailure,
    build_registry,
    fulfil_order,
    sleep,
)


def test_builtins_and_a_user_module_are_registered() -> None:
    names = build_registry("examples.my_tasks").names()
    assert {"echo", "sleep", "http.request", "order.fulfil", "images.resize"} <= names
    assert "images.resize" not in build_registry().names()


def test_builtins_declare_payload_schemas_and_a_user_module_needs_none() -> None:
    types = build_registry("examples.my_tasks").types()
    assert types["sleep"].payload is SleepPayload and not types["sleep"].internal
    assert types[FULFIL_ORDER].payload is FulfilOrderPayload and types[FULFIL_ORDER].internal
    assert types["echo"].payload is None and types["images.resize"].payload is None


def test_an_override_of_a_type_keeps_its_schema_and_stays_internal() -> None:
    registry = build_registry()
    registry.register(FULFIL_ORDER, fulfil_order)  # as tests/task_types.py does
    assert registry.types()[FULFIL_ORDER].internal and registry.types()[FULFIL_ORDER].payload is FulfilOrderPayload


def _ctx(payload: object) -> TaskContext:
    async def report(percent: float, message: str) -> None:
        pass

    return TaskContext(task_id="t", attempt=1, payload=payload, report=report)


def test_a_handler_fails_the_attempt_on_a_payload_stored_before_its_schema_existed() -> None:
    with pytest.raises(TaskFailure, match="payload does not fit"):
        asyncio.run(sleep(_ctx({"seconds": "soon"})))
    assert asyncio.run(sleep(_ctx({"seconds": 0}))) == {"slept": 0}
