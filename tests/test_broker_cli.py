"""``tidegate serve``'s broker flags: refused at start with what to fix, and documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import build_parser
from tests.faultload import free_port

TIDEGATE = str(Path(sys.executable).parent / "tidegate")
BROKER_FLAGS = [
    "--broker",
    "--role",
    "--partitions",
    "--lease-seconds",
    "--takeover-wait",
    "--broker-max-bytes",
]


def serve(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = [
        TIDEGATE,
        "serve",
        "--data-dir",
        str(tmp_path / "data"),
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        "--metrics-port",
        "off",
        "--ui-port",
        "off",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--role", "worker"], "--role needs --broker nats://HOST:PORT"),
        (["--partitions", "8"], "--partitions needs --broker"),
        (["--broker", "http://127.0.0.1:4222"], "is not a broker URL; write nats://HOST:PORT"),
        (["--broker", "nats://127.0.0.1:4222,nats://h:x"], "'nats://h:x' is not a broker URL"),
        (["--broker", "nats://127.0.0.1:4222", "--partitions", "0"], "--partitions: 0 is not"),
        (["--broker", "nats://127.0.0.1:4222\r\nX-Evil: 1"], "is not a broker URL"),
    ],
)
def test_bad_broker_flags_are_refused_with_what_to_fix(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = serve(tmp_path, *args)
    assert result.returncode == 1
    assert "tidegate: cannot start:" in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_cluster_is_refused_within_the_connect_timeout(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    result = serve(tmp_path, "--broker", url, "--role", "ingest")
    assert result.returncode == 1
    assert f"no NATS server of {url} answered within 10 s" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_readme_lists_every_broker_flag_of_serve() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    serve_parser = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = {o for a in serve_parser._actions for o in a.option_strings}
    assert set(BROKER_FLAGS) <= flags
    assert [f for f in BROKER_FLAGS if f"| `{f}` |" not in readme] == []
