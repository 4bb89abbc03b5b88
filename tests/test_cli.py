"""The ``tidegate`` command: the demo a newcomer runs, and clear errors for bad input."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

from engine.cli import build_parser
from engine.plugins import plugin_commands, plugin_manager

BIN = Path(sys.executable).parent


def tidegate(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "tidegate"), *args], capture_output=True, text=True, timeout=timeout
    )


def test_demo_runs_the_whole_product_and_shows_rejections(tmp_path: Path) -> None:
    result = tidegate("demo", "--customers", "20", "--data-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Outbound log, streamed live" in out
    assert "200" in out
    # Two customers of twenty have a malformed email and two checkouts lack a currency.
    assert "not a valid email address" in out
    assert "currency parameter is required on purchase event" in out
    assert "queue depth 0" in out
    assert "Traceback" not in result.stderr
    assert list((tmp_path / "outbound-log").glob("*.duckdb"))  # this week's partition


def test_hook_commands_adds_sandbox_and_demo() -> None:
    commands = {c.name: c for c in plugin_commands(plugin_manager())}
    assert {"sandbox", "demo"} <= set(commands)
    parser = argparse.ArgumentParser()
    commands["sandbox"].configure(parser)
    assert parser.parse_args(["--port", "9999"]).port == 9999


def test_a_plugin_command_runs_from_the_tidegate_command() -> None:
    args = build_parser().parse_args(["sandbox", "--port", "9999"])
    assert args.port == 9999 and args.func.__name__ == "_run_sandbox"


def test_every_command_is_listed_in_help() -> None:
    help_text = build_parser().format_help()
    for command in ("serve", "sandbox", "demo"):
        assert command in help_text


def test_out_of_range_port_is_a_usage_error() -> None:
    result = tidegate("serve", "--grpc-port", "70000")
    assert result.returncode == 2
    assert "70000 is not a TCP port" in result.stderr


def test_busy_port_gives_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = tidegate(
            "serve",
            "--http-port",
            str(port),
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            "--data-dir",
            str(tmp_path),
        )
    assert result.returncode == 1
    assert "cannot start" in result.stderr
    assert "Traceback" not in result.stderr


def test_sandbox_refuses_an_uppercase_partner_name() -> None:
    result = tidegate("sandbox", "--port", "0", "--partner-name", "ACME")
    assert result.returncode != 0
    assert "lowercase" in result.stderr


def test_non_positive_retry_delay_is_a_usage_error() -> None:
    result = tidegate("serve", "--retry-base-seconds", "0")
    assert result.returncode == 2
    assert "0 is not a positive number" in result.stderr


def test_demo_runs_on_a_three_node_jetstream_cluster(tmp_path: Path) -> None:
    result = tidegate("demo", "--broker", "--customers", "10", "--data-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Tidegate demo on NATS JetStream" in out
    assert out.count("nats://127.0.0.1:") == 3
    assert "not a valid email address" in out  # the same rejections as the embedded demo
    assert "queue depth 0" in out
    assert "Traceback" not in result.stderr and "warning" not in result.stdout
    # The cluster's servers stopped with the demo.
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "nats")], capture_output=True, text=True)
    assert left.stdout == "", left.stdout
