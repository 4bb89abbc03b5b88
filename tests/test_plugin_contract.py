"""Meta-tests that keep the plugin contract and the layout honest: every hook is documented
with its exact signature; every connector in this repository has tests named after each
hook; engine/ never imports plugins/; and the stages import only the floors below them."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from engine.connector import hookspecs
from engine.plugins import CONNECTOR_HOOKS, HOOK_SPECS

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(HOOK_SPECS)
REPO_CONNECTORS = sorted(
    (ep.name, ep.value)
    for ep in entry_points(group=hookspecs.PROJECT_NAME)
    if ep.value.startswith("plugins.") and ep.value.endswith(".plugin")
)


def test_hook_list_is_the_expected_one() -> None:
    assert HOOKS == sorted(
        [
            "connector_info",
            "prepare",
            "identify",
            "map_profile",
            "map_event",
            "send",
            "erase",
            "commands",
        ]  # fmt: skip
    )


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_are_documented_with_their_exact_signature(hook: str) -> None:
    fn = getattr(hookspecs, hook)
    assert fn.__doc__, f"hook {hook} has no docstring"
    prefix = "async " if inspect.iscoroutinefunction(fn) else ""
    signature = f"{prefix}{hook}{inspect.signature(fn)}".replace("'", "")
    readme = (ROOT / "README.md").read_text().replace("\\|", "|")
    assert f"`{signature}`" in readme, f"README does not document `{signature}`"


def test_the_repository_declares_its_connectors_by_entry_point() -> None:
    assert ("insider", "plugins.insider.plugin") in REPO_CONNECTORS


IMPLEMENTED_HOOKS = [
    (name, hook)
    for name, module in REPO_CONNECTORS
    for hook in ["connector_info", *CONNECTOR_HOOKS]
    if hasattr(importlib.import_module(module), hook)
]
"""Each repository connector with each hook it implements (optional ones only if it does)."""


@pytest.mark.parametrize(("connector", "hook"), IMPLEMENTED_HOOKS)
def test_every_connector_has_tests_named_after_each_hook(connector: str, hook: str) -> None:
    """A connector's tests live in ``tests/test_<connector>_*.py``: a connector without
    tests of its own fails here, whatever another connector's tests cover."""
    pattern = re.compile(rf"def test_hook_{hook}\w*\(")
    files = sorted((ROOT / "tests").glob(f"test_{connector}_*.py"))
    found = [p.name for p in files if pattern.search(p.read_text())]
    assert found, f"no test_hook_{hook}_* in tests/test_{connector}_*.py"


def test_hook_commands_has_a_test() -> None:
    pattern = re.compile(r"def test_hook_commands\w*\(")
    assert any(pattern.search(p.read_text()) for p in (ROOT / "tests").glob("test_*.py"))


def imports_of(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_engine_never_imports_plugins() -> None:
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in (ROOT / "engine").rglob("*.py")
        for name in imports_of(path)
        if name.split(".")[0] == "plugins"
    ]
    assert offenders == []


# The pipeline, bottom up: a module may import its own part and the floors below it.
FLOORS = [
    {
        "engine.errors",
        "engine.logconfig",
        "engine.gc_settings",
        "engine.periodic",
        "engine.metrics",
        "engine.pb",
        "engine",
    },
    {"engine.schema", "engine.security"},
    {"engine.connector"},
    {"engine.plugins"},
    {"engine.state"},
    {"engine.outbound_log"},
    {"engine.upgrade", "engine.backup"},
    {"engine.queue"},
    {"engine.ingest", "engine.delivery"},
    {"engine.broker"},  # runs the embedded ingest and delivery behind JetStream
    {"engine.admin"},
    {"engine.metrics_server", "engine.ui"},  # the page reuses engine.admin's log calls
    {"engine.app"},
    # The admin commands: engine.cli registers them and hands them its client helpers.
    {"engine.cli_admin"},
    {"engine.cli"},
]
KIT = "engine.connector.testing"
"""The connector kit's test half runs the engine, so it stands above delivery."""


def part_of(module: str) -> str:
    """The longest part ``module`` is or lies in."""
    parts = [p for floor in FLOORS for p in floor if module == p or module.startswith(p + ".")]
    assert parts, f"{module} belongs to no floor"
    return max(parts, key=len)


def floor_of(part: str) -> int:
    return next(i for i, floor in enumerate(FLOORS) if part in floor)


def test_stages_import_only_the_floors_below_them() -> None:
    upward = []
    for path in (ROOT / "engine").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if module.startswith("engine.pb") or module == KIT:
            continue
        mine = part_of(module)
        for name in imports_of(path):
            if not name.startswith("engine") or name == KIT:
                continue
            theirs = part_of(name)
            if theirs != mine and floor_of(theirs) >= floor_of(mine):
                upward.append(f"{module} imports {name}")
    assert upward == []


def test_only_the_kit_imports_the_kit() -> None:
    users = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "engine").rglob("*.py")
        if KIT in imports_of(path)
    ]
    assert users == []


def test_loading_the_installed_plugins_leaves_the_outbound_log_unloaded() -> None:
    """Every ``tidegate`` process loads every plugin, the ingest worker included; a plugin
    that imports the engine's composition root at load time drags DuckDB into the worker,
    which then reports leaked DuckDB objects on every exit (seen once, and fixed)."""
    probe = (
        "import sys\n"
        "from engine.plugins import Connectors, plugin_commands, plugin_manager\n"
        "pm = plugin_manager()\n"
        "Connectors(pm); plugin_commands(pm)\n"
        "print('duckdb' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
