"""A third party's connector, built by following CONTRIBUTING.md ("Adding a connector")
literally.

The blocks marked ``<!-- kit-example: PATH -->`` there are written out as a distribution
of its own, pip-installed without network into a folder that only ``PYTHONPATH`` puts
on the path (so the engine finds the connector by its entry point, as an installed
plugin), and its own kit tests are run. Then a real ``tidegate serve`` process with that
``PYTHONPATH`` delivers one Antavo event to an Insider connection (the sandbox) and to a
webhook connection (a small receiver), both on 127.0.0.1.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from importlib.metadata import distributions
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from google.protobuf import json_format

from clients.client import TidegateClient, read_token
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import API_KEY as INSIDER_KEY
from tests.conftest import eventually, insider_connection

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EXAMPLE = re.compile(r"<!-- kit-example: (\S+) -->\n```\w*\n(.*?)^```$", re.DOTALL | re.MULTILINE)
FILES = {"pyproject.toml", "src/tidegate_webhook/__init__.py", "tests/test_webhook.py"}
WEBHOOK_KEY = "whk-e2e-key-5d0c91f3"
EVENT = {
    "id": "evt-1001",
    "customer": "cust-7",
    "action": "point_add",
    "data": {"points": 120, "reason": "birthday"},
    "timestamp": "2026-03-01T10:00:00Z",
}


def guide_files() -> dict[str, str]:
    """The marked blocks of CONTRIBUTING.md, by the path each is marked with."""
    text = (ROOT / "CONTRIBUTING.md").read_text()
    files: dict[str, str] = {}
    for path, code in EXAMPLE.findall(text):
        assert path not in files, f"CONTRIBUTING.md marks two blocks as {path}"
        files[path] = code
    return files


@dataclass(frozen=True)
class Distribution:
    source: Path
    """The distribution's folder, as the guide lays it out."""
    site: Path
    """Where pip installed it: put on ``PYTHONPATH`` to install it for a process."""


@pytest.fixture(scope="module")
def distribution(tmp_path_factory: pytest.TempPathFactory) -> Distribution:
    source = tmp_path_factory.mktemp("tidegate-webhook")
    for path, code in guide_files().items():
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        (source / path).write_text(code)
    site = tmp_path_factory.mktemp("site")
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps"]
    result = subprocess.run(
        [*pip, "--no-build-isolation", "--no-index", "--target", str(site), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return Distribution(source, site)


def with_path(site: Path) -> dict[str, str]:
    """This process's environment with ``site`` first on ``PYTHONPATH``."""
    paths = [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


# -- the guide's files --------------------------------------------------------------------


def test_the_guide_marks_the_three_files_of_the_distribution() -> None:
    assert set(guide_files()) == FILES


def test_the_guides_distribution_declares_the_connector_by_entry_point() -> None:
    project = tomllib.loads(guide_files()["pyproject.toml"])["project"]
    assert project["entry-points"]["tidegate"] == {"webhook": "tidegate_webhook"}


def imported_modules(code: str) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


def test_the_guides_connector_imports_only_the_kit_of_the_engine() -> None:
    imported = imported_modules(guide_files()["src/tidegate_webhook/__init__.py"])
    not_stdlib = {m for m in imported if m.split(".")[0] not in sys.stdlib_module_names}
    assert not_stdlib == {"engine.connector"}


def test_the_guides_tests_import_only_the_kit_of_the_engine() -> None:
    imported = imported_modules(guide_files()["tests/test_webhook.py"])
    assert {m for m in imported if m.split(".")[0] == "engine"} <= {
        "engine.connector",
        "engine.connector.testing",
    }


def test_the_guides_code_is_formatted_and_lint_free(distribution: Distribution) -> None:
    style = ["--line-length", "100", "--target-version", "py311"]
    for command in (
        ["check", "--select", "E,F,W,I,B,ASYNC,UP", *style, "."],
        ["format", "--check", "--diff", *style, "."],
    ):
        result = subprocess.run(
            [str(BIN / "ruff"), *command],
            cwd=distribution.source,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr


# -- installed, it is a plugin with passing kit tests ---------------------------------------


def test_installing_the_distribution_registers_its_entry_point(
    distribution: Distribution,
) -> None:
    [installed] = distributions(path=[str(distribution.site)])
    assert installed.metadata["Name"] == "tidegate-webhook"
    [entry_point] = installed.entry_points.select(group="tidegate")
    assert (entry_point.name, entry_point.value) == ("webhook", "tidegate_webhook")


def test_the_distributions_own_kit_tests_pass(distribution: Distribution) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "tests"],
        cwd=distribution.source,
        env=with_path(distribution.site),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b4 passed\b", result.stdout), result.stdout


# -- a real tidegate serve delivers through it ----------------------------------------------


@dataclass
class Receiver:
    url: str
    requests: list[tuple[dict[str, str], Any]]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A webhook endpoint on 127.0.0.1 that records each request's headers and JSON."""
    requests: list[tuple[dict[str, str], Any]] = []

    async def receive(request: web.Request) -> web.Response:
        requests.append((dict(request.headers), await request.json()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/antavo", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield Receiver(f"http://127.0.0.1:{runner.addresses[0][1]}/antavo", requests)
    finally:
        await runner.cleanup()


SERVING = re.compile(r"tidegate serving: gRPC admin on (\S+), ingest on (\S+/v1/events)")


@dataclass
class Serve:
    process: subprocess.Popen[bytes]
    output: Path
    data_dir: Path

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    async def addresses(self, within: float = 60.0) -> tuple[str, str]:
        """The gRPC target and ingest URL the process prints once it serves."""
        deadline = time.monotonic() + within
        while (found := SERVING.search(self.text())) is None:
            assert self.process.poll() is None, f"tidegate serve exited:\n{self.text()}"
            assert time.monotonic() < deadline, f"tidegate serve not serving:\n{self.text()}"
            await asyncio.sleep(0.05)
        return found[1], found[2]


@pytest.fixture
def serve(distribution: Distribution, tmp_path: Path) -> Iterator[Serve]:
    """``tidegate serve`` on ports 0 of 127.0.0.1, with the distribution on its path."""
    output = tmp_path / "serve.out"
    with output.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "tidegate"), "serve", "--host", "127.0.0.1", "--grpc-port", "0",
             "--http-port", "0", "--metrics-port", "0", "--ui-port", "0",
             "--data-dir", str(tmp_path / "data"),
             "--allow-destination", "127.0.0.1"],
            env=with_path(distribution.site),
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield Serve(process, output, tmp_path / "data")
    finally:
        process.kill()  # the ingest worker dies with it (PR_SET_PDEATHSIG)
        process.wait(timeout=30)


async def test_tidegate_serve_delivers_an_event_through_the_guides_connector_and_insider(
    serve: Serve,
    sandbox: RunningSandbox,
    receiver: Receiver,
    http: aiohttp.ClientSession,
) -> None:
    grpc_target, ingest_url = await serve.addresses()
    async with TidegateClient(grpc_target, read_token(serve.data_dir)) as client:
        await insider_connection(client, sandbox)  # maps point_add with custom "points"
        await client.create_connection(
            "webhook-1", connector="webhook", api_key=WEBHOOK_KEY, settings={"url": receiver.url}
        )
        await client.create_event_mapping(
            "webhook-1", "point_add", "points_earned", [("points", "amount", False)]
        )
        async with http.post(ingest_url, json=EVENT) as answer:
            assert (answer.status, await answer.json()) == (
                202,
                {"accepted": 1, "duplicates": 0, "deliveries_queued": 2},
            )

        async def both_received() -> bool:
            user = sandbox.state.lookup("uuid", "cust-7")
            return bool(receiver.requests) and user is not None and bool(user.events)

        await eventually(both_received, within=30)

        # The webhook: the guide's body, the key as a Bearer header.
        [(headers, body)] = receiver.requests
        assert headers["Authorization"] == f"Bearer {WEBHOOK_KEY}"
        assert body == {
            "customers": [
                {
                    "identifiers": {"uuid": "cust-7"},
                    "attributes": {},
                    "events": [
                        {
                            "event": "points_earned",
                            "id": "evt-1001",
                            "time": "2026-03-01T10:00:00+00:00",
                            "parameters": {"amount": 120},
                        }
                    ],
                }
            ]
        }
        # Insider: the event as its upsert reference has it (the sandbox adds skip_hook).
        user = sandbox.state.lookup("uuid", "cust-7")
        assert user is not None
        [stored] = user.events
        assert {k: v for k, v in stored.items() if k != "skip_hook"} == {
            "event_name": "loyalty_points_earned",
            "timestamp": "2026-03-01T10:00:00Z",
            "event_params": {"custom": {"points": 120}},
        }

        # The outbound log: a request per connection, and neither key in any of it.
        async def both_logged() -> bool:
            logs = (await client.list_logs()).logs
            return {e.connection_id for e in logs} == {"insider-main", "webhook-1"}

        await eventually(both_logged, within=10)
        entries = (await client.list_logs()).logs
        assert sorted((e.connection_id, e.method, e.status_code) for e in entries) == [
            ("insider-main", "POST", 200),
            ("webhook-1", "POST", 204),
        ]
        webhook_entry = next(e for e in entries if e.connection_id == "webhook-1")
        assert webhook_entry.url == receiver.url
        assert [(c.customer_id, c.outcome) for c in webhook_entry.customers] == [
            ("cust-7", "delivered")
        ]
        for entry in entries:
            full = json_format.MessageToJson(await client.get_log(entry.id))
            assert WEBHOOK_KEY not in full and INSIDER_KEY not in full
    assert WEBHOOK_KEY not in serve.text() and INSIDER_KEY not in serve.text()
