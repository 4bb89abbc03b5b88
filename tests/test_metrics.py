"""The Prometheus endpoint, scraped over HTTP and parsed with prometheus_client's own
parser: during real traffic through a real ``tidegate serve`` (its ingest worker a
process of its own) and the Insider sandbox, every count must match what was sent, as
the load generator and the sandbox recorded it (never as the engine reports it)."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from engine.app import Engine, EngineConfig
from engine.cli import build_parser
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import (
    FAST_DELIVERY,
    TEST_DESTINATIONS,
    engine_client,
    eventually,
    insider_connection,
    post_events,
)
from tests.faultload import (
    CONNECTION_ID,
    SOURCE_EVENT,
    TARGET_EVENT,
    Harness,
    SandboxControl,
    admin_client,
    wait_drained,
)
from tests.test_cli import BIN, tidegate
from tests.test_ingest_worker import engine_pid, restarted, worker_pid

ROOT = Path(__file__).resolve().parent.parent
UPSERT = "/api/user/v1/upsert"
JSON = {"Content-Type": "application/json"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scrape:
    """One parsed ``GET /metrics``: families by name, and every sample's value."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: Samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in self.families.values()
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 for a labelled child not made yet (a counter not
        incremented), as Prometheus would treat a series that is absent."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(url: str) -> Scrape:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain;")
        return Scrape(await response.text())


def items_in(request: Mapping[str, Any]) -> int:
    """Events carried by one upsert the sandbox recorded (one per queued item here)."""
    return sum(len(user.get("events", [])) for user in request["body"]["users"])


def stored_events(users: Iterable[Mapping[str, Any]]) -> int:
    return sum(1 for u in users for e in u["events"] if e.get("event_name") == TARGET_EVENT)


def counters(scrape: Scrape) -> Samples:
    """The samples of every counter and histogram."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in scrape.families.values()
        if family.type in ("counter", "histogram")
        for s in family.samples
    }


async def test_a_scrape_during_real_traffic_counts_what_was_sent(harness: Harness) -> None:
    engine = harness.engine
    await harness.create_connection()
    # Two 500s (retried), then a 400 (the batch is dead-lettered), then the sandbox's own.
    await harness.control.fault(500, count=2)
    await harness.control.fault(400, count=1)
    load = harness.load(customers=20, workers=4, batch=50, pause=0.01, run_id="metrics")
    load.start()
    scrapes = []
    try:
        for _ in range(4):  # while the load runs: every counter only goes up
            await load.wait_acknowledged(400)
            scrapes.append(await scrape(engine.metrics_url))
    finally:
        await load.stop()
    for earlier, later in zip(scrapes, scrapes[1:], strict=False):
        later_counts = counters(later)
        for key, value in counters(earlier).items():
            assert later_counts[key] >= value, key

    # One request of each other kind: a re-send (its events are duplicates), a refused one,
    # and one over gRPC, which the engine process serves itself.
    resent = [{"customer": "metrics-w0-c00000", "action": SOURCE_EVENT, "id": "metrics-w0-c00000-1",
               "data": {"points": 1, "seq": 1}}]  # fmt: skip
    async with aiohttp.ClientSession() as http:
        async with http.post(engine.ingest_url, json={"events": resent}) as answer:
            assert answer.status == 202 and (await answer.json())["duplicates"] == 1
        async with http.post(engine.ingest_url, data=b"{not json", headers=JSON) as answer:
            assert answer.status == 400
    async with admin_client(engine.target) as client:
        grpc_event = {"customer": "grpc-1", "action": SOURCE_EVENT, "id": "grpc-1",
                      "data": {"points": 2, "seq": 1}}  # fmt: skip
        assert (await client.send_events([grpc_event])).accepted == 1
    await wait_drained(engine.target, 60, harness.control)

    final = await scrape(engine.metrics_url)
    requests = await harness.control.requests()
    assert {r["path"] for r in requests} == {UPSERT}
    users = await harness.control.users()
    stats = load.stats
    http = {"transport": "http"}
    grpc = {"transport": "grpc"}
    connection = {"connection": CONNECTION_ID}

    # Ingest, as the load generator saw it: the worker's counts (HTTP) and the engine's (gRPC).
    assert final.value("tidegate_ingest_requests_total", code="202", **http) == (
        stats.acknowledged_requests + 1
    )
    assert final.value("tidegate_ingest_requests_total", code="400", **http) == 1
    assert final.value("tidegate_ingest_requests_total", code="OK", **grpc) == 1
    accepted = load.acknowledged_events - stats.engine_duplicates
    assert final.value("tidegate_ingest_events_total", outcome="accepted", **http) == accepted
    assert final.value("tidegate_ingest_events_total", outcome="duplicate", **http) == (
        stats.engine_duplicates + 1
    )
    assert final.value("tidegate_ingest_events_total", outcome="accepted", **grpc) == 1
    assert final.value("tidegate_ingest_items_queued_total", **http) == accepted
    assert final.value("tidegate_ingest_ack_seconds_count", **http) == (
        stats.acknowledged_requests + 1
    )
    assert final.value("tidegate_ingest_ack_seconds_bucket", le="+Inf", **grpc) == 1

    # Delivery, as the sandbox saw it.
    statuses = Counter(r["status"] for r in requests)
    assert statuses[500] == 2 and statuses[400] == 1
    for status, count in statuses.items():
        code = {"code": str(status)}
        assert final.value("tidegate_delivery_requests_total", **code, **connection) == count
    assert final.value("tidegate_delivery_request_seconds_count", **connection) == len(requests)
    retried = sum(items_in(r) for r in requests if r["status"] == 500)
    dead = sum(items_in(r) for r in requests if r["status"] == 400)
    assert final.value("tidegate_items_delivered_total", **connection) == stored_events(users)
    assert final.value("tidegate_items_retried_total", **connection) == retried
    assert final.value("tidegate_items_dead_lettered_total", stage="send", **connection) == dead
    assert final.value("tidegate_items_failed_total", **connection) == retried + dead
    assert stored_events(users) + dead == accepted + 1  # every accepted event settled once

    # Gauges, read at scrape time.
    assert final.value("tidegate_queue_items", **connection) == 0
    assert final.value("tidegate_queue_oldest_item_age_seconds", **connection) == 0
    assert final.value("tidegate_dead_letters", **connection) == dead
    assert final.value("tidegate_connection_paused", **connection) == 0
    assert final.value("tidegate_data_file_bytes", file="state.sqlite3") > 0
    partitions = [
        dict(labels)["file"]
        for (name, labels), size in final.samples.items()
        if name == "tidegate_data_file_bytes"
        and size > 0
        and dict(labels)["file"].startswith("outbound-log/")
    ]
    assert partitions, "no outbound-log partition file measured"


async def test_the_worker_counts_go_on_after_it_is_killed_and_replaced(harness: Harness) -> None:
    """A replaced worker writes files of its own; the dead one's counts stay in the sum."""
    engine = harness.engine
    event = {"customer": "c-1", "action": "opt_in"}
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.post(engine.ingest_url, json=event) as answer:
                assert answer.status == 202
        os.kill(worker_pid(engine_pid(harness)), signal.SIGKILL)
        await asyncio.to_thread(restarted, harness, 1, 15)
        for _ in range(2):
            async with http.post(engine.ingest_url, json=event) as answer:
                assert answer.status == 202
    final = await scrape(engine.metrics_url)
    assert final.value("tidegate_ingest_requests_total", code="202", transport="http") == 5


async def test_a_paused_connection_and_its_backlog_show_in_one_process(
    tmp_path: Path, sandbox: RunningSandbox
) -> None:
    """``--ingest-in-process``: the engine process counts HTTP ingest itself."""
    config = EngineConfig(
        data_dir=tmp_path / "data", grpc_port=0, http_port=0, metrics_port=0,
        delivery=FAST_DELIVERY, allowed_destinations=TEST_DESTINATIONS,
    )  # fmt: skip
    engine = Engine(config)
    await engine.start()
    try:
        url = f"http://127.0.0.1:{engine.metrics_port}/metrics"
        async with engine_client(engine) as client:
            await insider_connection(client, sandbox)
            await SandboxControl(sandbox.url).fault(401)  # the key is refused: pause
            events = [{"customer": f"c-{n}", "action": "point_add", "id": f"e-{n}",
                       "data": {"points": n}} for n in range(1, 8)]  # fmt: skip
            async with aiohttp.ClientSession() as http:
                status, body = await post_events(http, engine, {"events": events})
            assert status == 202 and body["deliveries_queued"] == 7

            async def paused() -> bool:
                shown = await scrape(url)
                return shown.value("tidegate_connection_paused", connection="insider-main") == 1

            await eventually(paused)
            shown = await scrape(url)
            main = {"connection": "insider-main"}
            assert shown.value("tidegate_queue_items", **main) == 7
            assert shown.value("tidegate_queue_oldest_item_age_seconds", **main) > 0
            assert shown.value("tidegate_delivery_requests_total", code="401", **main) == 1
            refused = [r for r in await SandboxControl(sandbox.url).requests()]
            assert [r["status"] for r in refused] == [401]
            assert shown.value("tidegate_items_failed_total", **main) == items_in(refused[0])
            assert shown.value("tidegate_items_delivered_total", **main) == 0
            assert shown.value("tidegate_ingest_events_total", outcome="accepted",
                               transport="http") == 7  # fmt: skip
    finally:
        await engine.stop(grace=1.0)


async def test_every_metric_is_listed_in_the_readme(tmp_path: Path) -> None:
    engine = Engine(EngineConfig(data_dir=tmp_path / "data", grpc_port=0, http_port=0,
                                 metrics_port=0))  # fmt: skip
    await engine.start()
    try:
        shown = await scrape(f"http://127.0.0.1:{engine.metrics_port}/metrics")
    finally:
        await engine.stop(grace=1.0)
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Metrics") :]
    section = section[: section.index("\n## ", 1)]
    listed = set(re.findall(r"`(tidegate_\w+)`", section))
    exposed = {f.name + ("_total" if f.type == "counter" else "") for f in shown.families.values()}
    assert exposed == listed


def test_metrics_port_takes_a_port_any_free_port_or_off() -> None:
    assert serve_args().metrics_port == 9464  # the documented default
    assert serve_args("--metrics-port", "0").metrics_port == 0
    assert serve_args("--metrics-port", "off").metrics_port is None
    result = tidegate("serve", "--metrics-port", "ninety")
    assert result.returncode == 2
    assert "ninety is neither a TCP port nor off" in result.stderr


def test_serve_with_metrics_off_says_so_and_leaves_no_metric_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    command = [str(BIN / "tidegate"), "serve", "--grpc-port", "0", "--http-port", "0",
               "--metrics-port", "off", "--ui-port", "off", "--data-dir", str(data)]  # fmt: skip
    with subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stderr is not None
            line = ""
            while not line.startswith("tidegate serving"):
                line = process.stderr.readline()
                assert line, "tidegate serve exited before serving"
            assert re.match(r"tidegate serving: gRPC admin on \S+, ingest on \S+/v1/events, ", line)
            assert line.rstrip().endswith(f"data in {data}, metrics off"), line
            assert not (data / "metrics").exists()  # the worker counts in its memory
        finally:
            process.terminate()
            process.wait(timeout=30)


def serve_args(*args: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *args])


def test_a_busy_metrics_port_is_a_clear_error_naming_it(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = tidegate("serve", "--grpc-port", "0", "--http-port", "0", "--metrics-port",
                          str(port), "--data-dir", str(tmp_path))  # fmt: skip
    assert result.returncode == 1
    assert "cannot start" in result.stderr and str(port) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_an_inherited_multiprocess_folder_that_is_missing_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    result = subprocess.run(
        [str(BIN / "tidegate"), "serve", "--grpc-port", "0", "--http-port", "0",
         "--metrics-port", "0", "--data-dir", str(tmp_path / "data")],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(missing)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"PROMETHEUS_MULTIPROC_DIR={missing} is not a folder; unset it" in result.stderr
    assert "Traceback" not in result.stderr
