"""The layers hold: the bus knows no context, a domain knows no transport, and no two modules
import each other (at module level) through any chain, so every module imports on its own."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("bus", "actors", "projections", "http_edge", "infra", "examples")
# The bus builds its code -> error table from the domain's errors: its one look outside itself.
BUS_MAY_IMPORT = {"actors.errors"}
TRANSPORTS = ("bus", "nats", "aiohttp", "asyncpg")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The import statements run when the module is imported: not those in functions (run
    later, if at all) nor under `if TYPE_CHECKING:`; class bodies and other blocks do run."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            found += _module_level(node.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                for child in getattr(node, field, []):
                    found += _module_level(child.body if isinstance(child, ast.ExceptHandler | ast.match_case)
                                           else [child])
    return found


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The full names of what an import statement imports (`from a import b` is `a.b` when that
    is a module, else `a`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = module.split(".")
        is_package = MODULES.get(module, Path()).name == "__init__.py"
        base = package[: len(package) - node.level + (1 if is_package else 0)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    return [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source for alias in node.names]


def _imports(module: str, *, all_levels: bool) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)] if all_levels \
        else _module_level(tree.body)
    return {name for node in nodes for name in _imported(module, node)}


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_bus_imports_no_context_read_model_edge_or_composition_root() -> None:
    wrong = {module: sorted(name for name in _imports(module, all_levels=True)
                            if _within(name, ("actors", "projections", "http_edge", "infra"))
                            and name not in BUS_MAY_IMPORT)
             for module in MODULES if _within(module, ("bus",))}
    assert {m: names for m, names in wrong.items() if names} == {}


def test_a_domain_and_its_messages_import_no_transport() -> None:
    pure = [m for m in MODULES if m.startswith("actors.") and m.endswith((".domain", ".messages"))]
    assert len(pure) >= 6  # orders, tasks, inventory
    wrong = {module: sorted(name for name in _imports(module, all_levels=True) if _within(name, TRANSPORTS))
             for module in pure + ["actors.errors"]}
    assert {m: names for m, names in wrong.items() if names} == {}


def test_the_domain_errors_import_only_the_standard_library() -> None:
    imported = _imports("actors.errors", all_levels=True)
    assert {name.split(".")[0] for name in imported} - set(sys.stdlib_module_names) == set()


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A chain of imports in `graph` (module -> what it imports) that comes back to its start."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for name in sorted(graph[module]):
            if state.get(name) == 1:
                return path[path.index(name):] + [name]
            if name not in state and (found := visit(name)) is not None:
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)) is not None:
            return found
    return None


def test_no_module_imports_itself_through_others() -> None:
    graph = {m: {n for n in _imports(m, all_levels=False) if n in MODULES and n != m} for m in MODULES}
    assert _cycle(graph) is None


def test_the_checks_can_fail() -> None:
    """A chain back to its start is a cycle; imports in functions and under TYPE_CHECKING are
    not module-level, those in class bodies and try blocks are."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert _imported("bus.codec", ast.parse("from bus import subjects").body[0]) == ["bus.subjects"]  # type: ignore[arg-type]
    body = ast.parse("import a\nif TYPE_CHECKING:\n    import b\ndef f():\n    import c\nclass K:\n    import d\n"
                     "try:\n    import e\nexcept ImportError:\n    import f\n").body
    assert sorted(n.names[0].name for n in _module_level(body)) == ["a", "d", "e", "f"]


# Imported before the forks, so that each child pays only for the repo's own modules (which
# it imports from scratch: nothing of the repo is loaded in the parent).
_IMPORT_EACH = """
import importlib, os, sys, traceback
import aiohttp, asyncpg, msgspec, nats, nats.js, nats.micro, prometheus_client, pydantic_settings
assert not any(m.split('.')[0] in {packages!r} for m in sys.modules)
failed = 0
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(module)
        except BaseException:
            print(module + ': ' + traceback.format_exc().strip().splitlines()[-1], flush=True)
            os._exit(1)
        os._exit(0)
    failed |= os.waitpid(pid, 0)[1] != 0
sys.exit(failed)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a fresh child per module")
def test_every_module_imports_in_a_fresh_interpreter() -> None:
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH.format(packages=PACKAGES), *sorted(MODULES)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
