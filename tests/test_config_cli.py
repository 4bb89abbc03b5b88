"""``tidegate config export`` / ``apply`` and grpcurl's ConfigService calls as real
processes against a real ``tidegate serve`` (with its ingest worker) and ``tidegate
sandbox``, using the README's example document and grpcurl block as written (ports
aside)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
import yaml

from tests.test_grpcurl_walkthrough import BIN, ROOT, free_port, localize, wait_for_port

SANDBOX_KEY = "sandbox-key"  # what `tidegate sandbox` expects by default


def readme_block(name: str, language: str) -> str:
    text = (ROOT / "README.md").read_text()
    pattern = rf"<!-- {name}:start -->\n```{language}\n(.*?)```\n<!-- {name}:end -->"
    match = re.search(pattern, text, re.S)
    assert match, f"README has no {name} block"
    return match.group(1)


class Running:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.ports = {"sandbox": free_port(), "grpc": free_port(), "http": free_port()}
        self.target = f"127.0.0.1:{self.ports['grpc']}"
        self.processes: list[subprocess.Popen[bytes]] = []
        self._out: BinaryIO | None = None

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "INSIDER_KEY"}
        return {**env, "PATH": f"{BIN}:{os.environ['PATH']}", **extra}

    def start(self) -> None:
        # Output goes to a file: a pipe nobody reads would stall a chatty process.
        out = self._out = (self.tmp_path / "processes.out").open("wb")
        for command in (
            ["sandbox", "--port", str(self.ports["sandbox"])],
            [
                "--log-format",
                "json",
                "serve",
                "--grpc-port",
                str(self.ports["grpc"]),
                "--http-port",
                str(self.ports["http"]),
                "--metrics-port",
                "0",  # not the fixed default 9464, which another test run may hold
                "--ui-port",
                "0",  # nor the page's 8081
                "--data-dir",
                str(self.tmp_path / "tidegate-data"),  # the default, seen from cwd=tmp_path
                "--allow-destination",
                "127.0.0.1",
            ],
        ):
            self.processes.append(
                subprocess.Popen(
                    [BIN / "tidegate", *command], env=self.env(), stdout=out, stderr=out
                )
            )
        wait_for_port(self.ports["sandbox"], self.processes[0])
        wait_for_port(self.ports["grpc"], self.processes[1])
        wait_for_port(self.ports["http"], self.processes[1])

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._out is not None:
            self._out.close()

    def config(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "tidegate"), "config", *args, "--target", self.target],
            env=self.env(**env),
            cwd=self.tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def example(self, name: str = "tidegate.yaml", text: str | None = None) -> Path:
        path = self.tmp_path / name
        path.write_text(localize(text or readme_block("config-example", "yaml"), self.ports))
        return path


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    r = Running(tmp_path)
    try:
        r.start()
        yield r
    finally:
        r.stop()


def ingest(running: Running, action: str, data: dict[str, object]) -> str:
    """Posts one Antavo event to the ingest worker with curl, as Antavo would."""
    body = {"customer": "cust-1", "action": action, "id": f"{action}-1", "data": data}
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-X",
            "POST",
            f"http://127.0.0.1:{running.ports['http']}/v1/events",
            "-H",
            "Content-Type: application/json",
            "-d",
            json.dumps(body),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_readme_example_applies_through_the_cli_and_exports_back(running: Running) -> None:
    example = running.example()

    applied = running.config("apply", "-f", str(example), INSIDER_KEY=SANDBOX_KEY)

    assert applied.returncode == 0, applied.stderr
    lines = applied.stdout.splitlines()
    assert lines[0] == "created connection insider-main"
    assert "created profile mapping labels of connection insider-main" in lines
    assert "created event mapping points of connection insider-main" in lines
    assert lines[-1] == "applied 7 change(s)"  # a connection, 4 profile and 2 event mappings

    again = running.config("apply", "-f", str(example), INSIDER_KEY=SANDBOX_KEY)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        "no changes: the engine's configuration already matches the document"
    ]

    exported = running.config("export")
    assert exported.returncode == 0, exported.stderr
    assert SANDBOX_KEY not in exported.stdout
    expected = yaml.safe_load(example.read_text())
    expected["connections"][0]["api_key_env"] = "TIDEGATE_API_KEY_INSIDER_MAIN"
    assert yaml.safe_load(exported.stdout) == expected

    # The ingest worker reloaded: an event of a mapped action is queued for the connection.
    assert '"deliveries_queued":1' in ingest(running, "point_add", {"points": 5})


def test_dry_run_prints_the_diff_and_changes_nothing(running: Running) -> None:
    example = running.example()
    assert running.config("apply", "-f", str(example), INSIDER_KEY=SANDBOX_KEY).returncode == 0
    before = running.config("export").stdout
    changed = running.example(
        "changed.yaml",
        readme_block("config-example", "yaml").replace(
            "display_name: Insider\n", "display_name: Insider EU\n"
        ),
    )

    dry = running.config("apply", "-f", str(changed), "--dry-run", INSIDER_KEY=SANDBOX_KEY)

    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        "would update connection insider-main",
        '    display_name: "Insider" -> "Insider EU"',
        "dry run: 1 change(s) found, nothing was changed",
    ]
    assert running.config("export").stdout == before


def test_a_bad_document_exits_1_naming_the_field_and_changes_nothing(running: Running) -> None:
    bad = running.example(
        "bad.yaml",
        readme_block("config-example", "yaml").replace(
            "target_event: loyalty_points_earned", "target_event: Loyalty Points"
        ),
    )

    refused = running.config("apply", "-f", str(bad), INSIDER_KEY=SANDBOX_KEY)
    no_key = running.config("apply", "-f", str(running.example()))

    assert refused.returncode == 1
    assert refused.stderr.startswith(
        "tidegate: the document was refused, nothing was changed: "
        "connections[0].event_mappings[1].target_event: 'Loyalty Points'"
    )
    assert no_key.returncode == 1
    assert "connections[0].api_key_env: the environment variable INSIDER_KEY is not set" in (
        no_key.stderr
    )
    assert "Traceback" not in refused.stderr + no_key.stderr
    assert "connections: []" in running.config("export").stdout


def test_a_missing_file_is_a_clear_error(running: Running) -> None:
    result = running.config("apply", "-f", "no-such.yaml")

    assert result.returncode == 1
    assert result.stderr == "tidegate: cannot read no-such.yaml: No such file or directory\n"


def test_config_commands_say_so_when_no_engine_listens(tmp_path: Path) -> None:
    nobody = Running(tmp_path)  # its ports are free, and nothing is started
    (tmp_path / "empty.yaml").write_text("connections: []\n")

    for args in (("export",), ("apply", "-f", "empty.yaml")):
        result = nobody.config(*args)
        assert result.returncode == 1
        assert result.stderr.startswith(
            f"tidegate: cannot reach the engine at {nobody.target}: nothing answers there."
        )
        assert "Traceback" not in result.stderr


def test_grpcurl_calls_export_and_apply_as_the_readme_shows(running: Running) -> None:
    running.example()  # the README's grpcurl block reads tidegate.yaml

    result = subprocess.run(
        [
            "bash",
            "-c",
            "set -euo pipefail\n" + localize(readme_block("config-grpcurl", "sh"), running.ports),
        ],
        env=running.env(),
        cwd=running.tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert '"document": "# Tidegate configuration.' in result.stdout  # ExportConfig
    assert '"action": "CHANGE_ACTION_CREATE"' in result.stdout  # the dry run of ApplyConfig
    assert '"connection_id": "insider-main"' in result.stdout
    assert '"applied"' not in result.stdout  # false: a dry run writes nothing
    assert "connections: []" in running.config("export").stdout
