"""``tidegate braze-sandbox`` (the Braze tools plugin's ``commands`` hook) and ``tidegate
demo`` showing Insider and Braze side by side, run as real commands."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from engine.plugins import plugin_commands, plugin_manager

BIN = Path(sys.executable).parent


def test_hook_commands_adds_braze_sandbox() -> None:
    commands = {c.name: c for c in plugin_commands(plugin_manager())}
    assert {"braze-sandbox", "sandbox", "demo"} <= set(commands)
    parser = argparse.ArgumentParser()
    commands["braze-sandbox"].configure(parser)
    args = parser.parse_args(["--port", "9999", "--per-array-limit"])
    assert (args.port, args.per_array_limit, args.api_key) == (9999, True, "sandbox-key")


def test_braze_sandbox_refuses_a_bad_setting_without_a_traceback() -> None:
    result = subprocess.run(
        [str(BIN / "tidegate"), "braze-sandbox", "--rate-limit", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "tidegate braze-sandbox: rate_limit" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_shows_insider_and_braze_from_one_stream(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "tidegate"), "demo", "--customers", "20", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Braze sandbox    http://127.0.0.1:" in out
    assert "braze-demo   201" in out and "insider-demo 200" in out
    braze_line = next(line for line in out.splitlines() if line.startswith("Braze: "))
    assert "queue depth 0" in braze_line
    # Two of twenty customers have a malformed email and two checkouts lack a currency.
    assert "4 items are dead letters" in braze_line
    assert "Traceback" not in result.stderr
