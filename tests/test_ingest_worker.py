"""The ingest worker process of a real ``tidegate serve``: it dies with the engine, is
restarted when it dies alone (losing nothing acknowledged), sees every connection change
before the admin call returns, and shares the backlog limit with the engine process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from bench.processes import family
from tests.faultload import (
    CONNECTION_ID,
    Harness,
    admin_client,
    check_load,
    listening,
    wait_drained,
)


def worker_pid(engine_pid: int, within: float = 10.0) -> int:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        children = family(engine_pid)[1:]
        if children:
            assert len(children) == 1, children
            return children[0]
        time.sleep(0.05)
    raise AssertionError("the engine has no ingest worker")


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie has exited


def gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not alive(pid)


def released(port: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while listening(port) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not listening(port)


def engine_pid(harness: Harness) -> int:
    assert harness.engine.process is not None
    return harness.engine.process.pid


async def post(url: str, body: object) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as response:
        return response.status, await response.json()


async def test_a_killed_worker_is_replaced_and_nothing_acknowledged_is_lost(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    await harness.create_connection()
    engine = engine_pid(harness)
    first = worker_pid(engine)
    load = harness.load(customers=16, workers=4, batch=50, pause=0.01, run_id="worker")
    load.start()
    try:
        await load.wait_acknowledged(1000)
        os.kill(first, signal.SIGKILL)
        acked_at_kill = load.acknowledged_events
        await load.wait_acknowledged(acked_at_kill + 1000, within=30)  # served again
    finally:
        await load.stop()
    second = worker_pid(engine)
    connection = await wait_drained(harness.engine.target, 30, harness.control)
    report = await check_load(load, harness.control)
    output = harness.engine.tail(20_000)
    with capsys.disabled():
        print(f"\ningest_worker_kill acked_at_kill={acked_at_kill} {report.summary()}")
    assert harness.engine.running and engine_pid(harness) == engine  # the engine lived on
    assert second != first
    assert '"ingest_worker_exited"' in output and '"ingest_worker_restarted"' in output
    assert report.ok, f"{report.summary()}\n{report.details()}\n{output[-3000:]}"
    assert connection.dead_letter_count == 0


def log_entries(harness: Harness, event: str) -> list[dict[str, object]]:
    """The engine's JSON log lines of ``event``, oldest first."""
    return [
        json.loads(line[line.index("{") :])
        for line in harness.engine.tail(50_000).splitlines()
        if f'"{event}"' in line
    ]


def restarted(harness: Harness, times: int, within: float) -> int:
    """The pid of the worker started by the ``times``-th restart, once it serves."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        restarts = log_entries(harness, "ingest_worker_restarted")
        if len(restarts) >= times:
            return int(str(restarts[times - 1]["pid"]))
        time.sleep(0.05)
    raise AssertionError(f"no restart number {times} within {within} s")


async def test_a_worker_that_keeps_dying_is_restarted_after_longer_and_longer_delays(
    harness: Harness,
) -> None:
    engine = engine_pid(harness)
    worker = worker_pid(engine)
    for n in (1, 2):
        os.kill(worker, signal.SIGKILL)
        worker = restarted(harness, n, within=15)
    delays = [entry["restart_in_s"] for entry in log_entries(harness, "ingest_worker_exited")]
    assert delays == [1.0, 2.0]  # doubled: the first replacement died within a minute
    assert worker_pid(engine) == worker
    status, _ = await post(harness.engine.ingest_url, {"customer": "c-1", "action": "opt_in"})
    assert status == 202  # and the last one serves


async def test_the_worker_dies_with_the_engine_and_frees_the_port(harness: Harness) -> None:
    worker = worker_pid(engine_pid(harness))
    await harness.kill_engine()
    assert gone(worker, within=5), "the ingest worker outlived a kill -9 of the engine"
    port = harness.engine.http_port
    assert released(port, within=1), "something still holds the ingest port"
    starts = harness.engine.starts
    await harness.restart_engine()
    assert harness.engine.starts == starts + 1  # the same ports bound at the first try
    assert listening(port)


async def test_a_mapping_is_in_force_for_the_next_event_the_worker_acknowledges(
    harness: Harness,
) -> None:
    """The admin call returns only after the worker reloaded the connection, so an event
    posted right after it is routed by the new mapping, every time."""
    await harness.create_connection()
    queued = []
    async with admin_client(harness.engine.target) as client:
        for n in range(20):
            action = f"custom_action_{n}"
            await client.create_event_mapping(CONNECTION_ID, action, f"custom_event_{n}")
            status, answer = await post(
                harness.engine.ingest_url, {"customer": f"c{n}", "action": action}
            )
            assert status == 202, answer
            queued.append(answer["deliveries_queued"])
    assert queued == [1] * 20


async def test_the_backlog_limit_holds_across_both_processes(harness: Harness) -> None:
    harness.engine.close()
    harness.engine.extra_args = ["--max-backlog", "100"]
    harness.engine.start()
    await harness.create_connection(api_key="refused-key")  # paused at the first send
    statuses = []
    for n in range(130):
        status, _ = await post(
            harness.engine.ingest_url,
            {"customer": f"c{n % 7}", "action": "point_add", "data": {"points": 1, "seq": n}},
        )
        statuses.append(status)
    accepted = statuses.count(202)
    # The refused send keeps its items queued, so the limit is reached at exactly 100.
    assert accepted == 100, f"{statuses}\n{harness.engine.tail(3000)}"
    assert set(statuses[accepted:]) == {503}, statuses
    await asyncio.sleep(0.5)  # the engine process learns of the worker's items too
    async with admin_client(harness.engine.target) as client:
        with pytest.raises(Exception, match="backlog"):
            await client.send_events([{"customer": "x", "action": "point_add"}])


async def test_ingest_in_process_runs_without_a_worker(harness: Harness) -> None:
    harness.engine.close()
    harness.engine.extra_args = ["--ingest-in-process"]
    harness.engine.start()
    await harness.create_connection()
    status, answer = await post(
        harness.engine.ingest_url,
        {"customer": "c1", "action": "point_add", "data": {"points": 5, "seq": 1}},
    )
    assert (status, answer["deliveries_queued"]) == (202, 1)
    assert family(engine_pid(harness)) == [engine_pid(harness)]
    await wait_drained(harness.engine.target, 30, harness.control)
    assert await harness.control.delivered() == {"c1": [1]}
