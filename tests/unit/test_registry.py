"""Task types: built-ins are there, and a module named in settings adds its own."""

from __future__ import annotations

from actors.tasks.registry import build_registry


def test_builtins_and_a_user_module_are_registered() -> None:
    names = build_registry("examples.my_tasks").names()
    assert {"echo", "sleep", "http.request", "order.fulfil", "images.resize"} <= names
    assert "images.resize" not in build_registry().names()
