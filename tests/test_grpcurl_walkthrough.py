"""End to end with real processes: ``tidegate sandbox`` and ``tidegate serve`` as
subprocesses, administered with the real grpcurl binary by running the README's
walkthrough exactly as written (ports aside)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def readme_block(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {name}:start -->\n```sh\n(.*?)```\n<!-- {name}:end -->", text, re.S)
    assert match, f"README has no {name} block"
    return match.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"process exited early with {process.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} after {timeout} s")


@pytest.fixture
def ports() -> dict[str, int]:
    return {"sandbox": free_port(), "grpc": free_port(), "http": free_port()}


@pytest.fixture
def processes(
    tmp_path: Path, ports: dict[str, int]
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    # Output goes to files: a pipe nobody reads would stall a chatty process.
    sandbox_out = (tmp_path / "sandbox.out").open("wb")
    serve_out = (tmp_path / "serve.out").open("wb")
    sandbox = subprocess.Popen(
        [BIN / "tidegate", "sandbox", "--port", str(ports["sandbox"])],
        env=env,
        stdout=sandbox_out,
        stderr=subprocess.STDOUT,
    )
    serve = subprocess.Popen(
        [
            BIN / "tidegate",
            "--log-format",
            "json",
            "serve",
            "--grpc-port",
            str(ports["grpc"]),
            "--http-port",
            str(ports["http"]),
            "--metrics-port",
            "0",
            "--ui-port",
            "0",
            "--data-dir",
            str(tmp_path / "tidegate-data"),  # the README's default, seen from cwd=tmp_path
            "--allow-destination",
            f"http://127.0.0.1:{ports['sandbox']}",
        ],
        env=env,
        stdout=serve_out,
        stderr=subprocess.STDOUT,
    )
    running = {"sandbox": sandbox, "serve": serve}
    try:
        wait_for_port(ports["sandbox"], sandbox)
        wait_for_port(ports["grpc"], serve)
        wait_for_port(ports["http"], serve)
        yield running
    finally:
        for process in running.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in running.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        sandbox_out.close()
        serve_out.close()


def localize(script: str, ports: dict[str, int]) -> str:
    return (
        script.replace("127.0.0.1:50051", f"127.0.0.1:{ports['grpc']}")
        .replace("127.0.0.1:8080", f"127.0.0.1:{ports['http']}")
        .replace("127.0.0.1:8090", f"127.0.0.1:{ports['sandbox']}")
    )


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_readme_grpcurl_walkthrough_drives_a_real_engine(
    processes: dict[str, subprocess.Popen[bytes]], ports: dict[str, int], tmp_path: Path
) -> None:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    stream = subprocess.Popen(
        ["bash", "-c", localize(readme_block("walkthrough-stream"), ports)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,  # where tidegate-data/admin-token is
        # Ctrl-C must reach it even when this run inherited SIGINT ignored (a background
        # job of a non-interactive shell), which a child would inherit in turn.
        preexec_fn=default_sigint,
    )
    try:
        time.sleep(0.5)  # the stream is open before any traffic, as in the README's order
        assert stream.poll() is None, stream.stderr.read() if stream.stderr else ""
        walk = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + localize(readme_block("walkthrough"), ports)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert walk.returncode == 0, walk.stdout[-3000:] + walk.stderr[-3000:]
    finally:
        stream.send_signal(signal.SIGINT)
        try:
            streamed, _ = stream.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            stream.kill()  # not left running into the next tests
            stream.communicate()
            raise

    out = walk.stdout + walk.stderr
    for service in (
        "ConnectionService",
        "MappingService",
        "LogService",
        "IngestService",
        "DeadLetterService",
    ):
        assert f"tidegate.admin.v1.{service}" in out
    assert "grpc.reflection" in out and "grpc.health.v1.Health" in out
    assert '"api_key_hint": "****' in out
    assert "sandbox-key" not in out.replace('"api_key": "sandbox-key"', "")
    assert "InvalidArgument" in out and "mapping.target_attribute" in out
    assert '"status": "SERVING"' in out
    assert '{"accepted":2,"duplicates":0,"deliveries_queued":2}' in out  # the HTTP ingest answer
    assert '"request_body"' in out  # GetLog returns bodies
    assert "tidegate.admin.v1.CatalogService" in out
    assert '"built_in": true' in out and '"required_for_events"' in out  # the two catalogs
    # The previews: a purchase with the currency converted, and an attribute delete.
    assert '\\"currency\\":\\"EUR\\"' in out
    assert "/api/user/v1/attribute/delete" in out
    assert "mapping.parameters" in out  # the refused cart_page_view mapping
    assert '"stage": "destination"' in out and "not a valid email address" in out
    assert '"matched": 1' in out  # the dry run and the replay each found the dead letter
    assert '"display_name": "Insider (EU workspace)"' in out  # the update with a mask
    assert '"next_page_token": "' in out  # the first page of profile mappings

    assert "cust-1" in streamed, "StreamLogs opened before the traffic saw no row"

    with urllib.request.urlopen(
        f"http://127.0.0.1:{ports['sandbox']}/sandbox/users/lookup?key=uuid&value=cust-1"
    ) as r:
        user = json.load(r)
    assert user["attributes"]["email"] == "ana@example.com"
    assert user["attributes"]["name"] == "Ana"
    # The mapping was updated to loyalty_tier before the traffic, then removed after it.
    assert user["attributes"]["custom"] == {"loyalty_tier": "gold"}
    names = [e["event_name"] for e in user["events"]]
    assert names == ["purchase", "loyalty_points_earned"]
    purchase = user["events"][0]["event_params"]
    assert purchase == {
        "event_group_id": "ORD-1",
        "unit_sale_price": 129.9,
        "currency": "EUR",
        "custom": {"store_code": "BUD-01"},
    }


def test_serve_stops_cleanly_on_sigterm(
    processes: dict[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    serve = processes["serve"]
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(timeout=15) == 0
    assert "stopping" in (tmp_path / "serve.out").read_text()
