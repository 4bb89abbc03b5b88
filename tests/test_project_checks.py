"""Checks on the repository itself: generated code matches proto/, buf lint passes, and
ruff finds nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_generated_grpc_code_matches_the_protos() -> None:
    result = run(sys.executable, "proto/generate.py", "--check")
    assert result.returncode == 0, result.stderr


def test_buf_lint_passes() -> None:
    result = run(BIN / "buf", "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_finds_nothing() -> None:
    result = run(BIN / "ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_finds_nothing() -> None:
    result = run(BIN / "mypy")  # strict, on engine/, plugins/ and clients/ (pyproject.toml)
    assert result.returncode == 0, result.stdout + result.stderr
