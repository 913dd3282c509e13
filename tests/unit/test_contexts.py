"""The declared set: built-ins plus what a setting loads, and what follows from a declaration
(identities, permissions, `jetsource up`'s children)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra import auth
from infra.contexts import declared
from infra.settings import Settings
from infra.supervisor import role_commands

ROOT = Path(__file__).resolve().parents[2]


def test_the_built_in_contexts_and_process_managers() -> None:
    found = declared(Settings(_env_file=None))
    assert found.names() == ["orders", "tasks", "inventory"]
    assert [pm.name for pm in found.managers] == ["fulfilment", "order_saga"]


def test_a_context_module_setting_adds_a_context_with_its_own_identity_and_permissions() -> None:
    settings = Settings(_env_file=None, context_modules="examples.loyalty")
    assert "loyalty" in declared(settings).names()
    assert "loyalty_actor" in auth.roles(settings)
    actor = auth.permissions(settings, "loyalty_actor")
    assert "loyalty.events.>" in actor["publish"]["allow"]
    assert "orders.events.>" in actor["publish"]["deny"]
    edge = auth.permissions(settings, auth.EDGE)
    assert {"loyalty.cmd.earn", "loyalty.cmd.redeem", "loyalty.query.*"} <= set(edge["publish"]["allow"])
    assert "loyalty.events.>" in edge["publish"]["deny"]
    # Every other actor is kept off its stream and its commands.
    assert "loyalty.events.>" in auth.permissions(settings, auth.ORDERS_ACTOR)["publish"]["deny"]
    assert "actor loyalty" in [c.name for c in role_commands(settings)]


def test_internal_commands_are_only_for_those_that_declare_them() -> None:
    settings = Settings(_env_file=None)
    edge = auth.permissions(settings, auth.EDGE)["publish"]
    for internal in ("inventory.cmd.reserve", "orders.cmd.record_reserved", "tasks.cmd.submit_internal"):
        assert internal not in edge["allow"] and internal in edge["deny"]
    saga = auth.permissions(settings, "order_saga")["publish"]
    assert {"inventory.cmd.reserve", "inventory.cmd.release", "orders.cmd.record_rejected"} <= set(saga["allow"])
    assert "orders.cmd.pay" in saga["deny"] and "tasks.cmd.submit_internal" in saga["deny"]


def test_an_unknown_context_module_fails_loudly() -> None:
    with pytest.raises(ModuleNotFoundError):
        declared(Settings(_env_file=None, context_modules="examples.no_such_context"))


def test_names_that_would_share_an_identity_are_refused() -> None:
    from infra.contexts import ProcessManager, _check

    found = declared(Settings(_env_file=None))
    impostor = ProcessManager(name="admin", reader="x", consumes={}, sends={}, build=lambda *_: None)
    with pytest.raises(ValueError, match="admin"):
        _check(list(found.contexts), [*found.managers, impostor])
    typo = ProcessManager(name="pm", reader="pm", consumes={"orders": ("paid",)}, sends={"orders": ("shipp",)},
                          build=lambda *_: None)
    with pytest.raises(ValueError, match="shipp"):
        _check(list(found.contexts), [typo])


def test_an_extra_role_may_never_write_an_event_stream_whatever_it_allows_itself() -> None:
    worker = auth.permissions(Settings(_env_file=None), auth.WORKER)["publish"]["deny"]
    assert {"orders.events.>", "tasks.events.>", "inventory.events.>", "tasks.queue.>"} <= set(worker)


def test_the_openapi_document_has_every_context_and_every_ref_resolves() -> None:
    import json
    import re

    from http_edge.openapi import openapi_document

    found = declared(Settings(_env_file=None))
    doc = json.loads(openapi_document([c.openapi for c in found.contexts if c.openapi]))
    assert {"/orders", "/tasks", "/inventory/{sku}/receive", "/inventory"} <= set(doc["paths"])
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(doc)))
    assert refs and refs <= set(doc["components"]["schemas"])


def test_every_route_that_sends_a_command_or_query_documents_503() -> None:
    # Any of them may meet its subject's open circuit breaker (or no responder). History and
    # time travel read the streams (Direct Get), not a service.
    import json

    from http_edge.openapi import openapi_document

    found = declared(Settings(_env_file=None))
    doc = json.loads(openapi_document([c.openapi for c in found.contexts if c.openapi]))
    missing = [f"{method.upper()} {path}" for path, operations in doc["paths"].items()
               if path not in ("/healthz", "/metrics", "/openapi.json", "/asyncapi.json") and not path.endswith(("/events", "/state"))
               for method, operation in operations.items() if "503" not in operation["responses"]]
    assert not missing


def test_a_context_installed_as_an_entry_point_is_declared(tmp_path: Path) -> None:
    # A package the way pip installs one: its dist-info names `examples.loyalty` in the
    # `jetsource.contexts` group. A fresh interpreter (the declared set is loaded once).
    dist = tmp_path / "loyalty_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: loyalty-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[jetsource.contexts]\nloyalty = examples.loyalty\n")
    code = ("from infra.contexts import declared; from infra.settings import Settings; "
            "print(declared(Settings(_env_file=None)).names())")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['orders', 'tasks', 'inventory', 'loyalty']"
