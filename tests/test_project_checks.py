"""Checks on the repository itself: generated code matches proto/, buf lint passes, and
ruff finds nothing."""

from __future__ import annotations

import shutil
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


def test_buf_lint_refuses_comment_ignores_missing_comments_and_other_streams(
    tmp_path: Path,
) -> None:
    # A copy of the module with what buf.yaml must not let through: a field without a
    # comment, excused by a `buf:lint:ignore` comment, and a streaming RPC other than the
    # one exception (StreamLogs).
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    mappings = tmp_path / "proto" / "tidegate" / "admin" / "v1" / "mappings.proto"
    text = mappings.read_text()
    text = text.replace(
        "  rpc ListProfileMappings(ListProfileMappingsRequest) returns"
        " (ListProfileMappingsResponse);",
        "  rpc ListProfileMappings(ListProfileMappingsRequest) returns"
        " (stream ListProfileMappingsResponse);",
    )
    text = text.replace(
        "  // The connection whose mappings to list. Required.\n  string connection_id = 1;",
        "  // buf:lint:ignore COMMENT_FIELD\n  string connection_id = 1;",
        1,
    )
    mappings.write_text(text)

    result = subprocess.run(
        [str(BIN / "buf"), "lint"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )

    assert result.returncode != 0
    assert 'RPC "ListProfileMappings" is server streaming' in result.stdout
    assert 'Field "connection_id" should have a non-empty comment' in result.stdout
