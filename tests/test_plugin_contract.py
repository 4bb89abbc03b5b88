"""Meta-tests that keep the plugin contract honest: every hook is documented with its
exact signature and has tests named after it; engine/ never imports plugins/."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

from engine import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(
    name
    for name, fn in vars(hookspecs).items()
    if inspect.isfunction(fn) and hasattr(fn, f"{hookspecs.PROJECT_NAME}_spec")
)


def test_hook_list_is_the_expected_one() -> None:
    assert HOOKS == sorted(
        ["connector_info", "identify", "map_profile", "map_event", "send", "register_commands"]
    )


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_are_documented_with_their_exact_signature(hook: str) -> None:
    fn = getattr(hookspecs, hook)
    assert fn.__doc__, f"hook {hook} has no docstring"
    signature = f"{hook}{inspect.signature(fn)}".replace("'", "")
    readme = (ROOT / "README.md").read_text().replace("\\|", "|")
    assert f"`{signature}`" in readme, f"README does not document `{signature}`"


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_have_tests(hook: str) -> None:
    pattern = re.compile(rf"def test_hook_{hook}\w*\(")
    found = [p.name for p in (ROOT / "tests").glob("test_*.py") if pattern.search(p.read_text())]
    assert found, f"no test named test_hook_{hook}_* exists"


def test_engine_never_imports_plugins() -> None:
    offenders = []
    for path in (ROOT / "engine").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "plugins"
            ]
    assert offenders == []
