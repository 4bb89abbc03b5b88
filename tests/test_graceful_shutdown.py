"""Graceful shutdown of a real ``tidegate serve`` under load: SIGTERM finishes the
in-flight batches (or, past the shutdown deadline, parks them in the queue), the process
exits 0 within the deadline, nothing acknowledged is lost, and a restart resumes.

``Engine.stop`` gives in-flight deliveries 5 s, then gRPC 1 s; the exit deadline below
adds room for closing the stores and the interpreter.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.faultload import Harness, check_load, list_logs, wait_drained

EXIT_DEADLINE = 8.0


async def wait_in_flight(harness: Harness, within: float = 10.0) -> None:
    """Waits until the sandbox holds a request it has not answered yet (its recorded
    status stays 0 until the answer; these tests inject no connection resets)."""
    deadline = time.monotonic() + within
    while not any(r["status"] == 0 for r in await harness.control.requests()):
        assert time.monotonic() < deadline, "no request went out"
        await asyncio.sleep(0.01)


def deliveries_logged(harness: Harness) -> list[dict[str, object]]:
    """The engine's ``delivery`` log lines (JSON), over all of its runs."""
    rows = []
    for line in harness.engine.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"delivery"' in line:
            row = json.loads(line)
            if row.get("event") == "delivery":
                rows.append(row)
    return rows


async def test_sigterm_finishes_in_flight_batches_and_restart_resumes(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    await harness.create_connection()
    control = harness.control
    await control.configure(latency_ms=200)  # every send is in flight for 200 ms
    load = harness.load(customers=16, workers=4, batch=50, pause=0.02, run_id="term")
    load.start()
    try:
        await load.wait_acknowledged(1500)
        await wait_in_flight(harness)
        code, took = await asyncio.to_thread(harness.engine.terminate, EXIT_DEADLINE + 5)
        acked_at_stop = load.acknowledged_events
        sent_before_restart = len(await control.requests())
        logged_before_restart = len(deliveries_logged(harness))
        await asyncio.sleep(0.3)  # the load meets a closed port meanwhile
        await harness.restart_engine()
        await load.wait_acknowledged(500)  # the restarted engine takes traffic again
    finally:
        await load.stop()
    connection = await wait_drained(harness.engine.target, 30, control)
    report = await check_load(load, control)
    summary = (
        f"graceful_shutdown exit={code} in {took:.2f}s acked_at_sigterm={acked_at_stop} "
        f"requests_before_restart={sent_before_restart} logged={logged_before_restart} "
        f"{report.summary()} load={dict(load.stats.outcomes)}"
    )
    with capsys.disabled():  # shown in CI logs even when the test passes
        print(f"\n{summary}")
    output = harness.engine.tail(20_000)
    assert code == 0, f"{summary}\n{output[-3000:]}"
    assert took < EXIT_DEADLINE, summary
    assert "stopping" in output
    # Finished, not abandoned: every request that reached the sandbox before the
    # restart was settled and logged by the engine, so nothing is sent twice.
    assert sent_before_restart == logged_before_restart, summary
    assert report.ok, f"{summary}\n{report.details()}\n{output[-3000:]}"
    assert report.duplicates == 0, summary
    assert connection.dead_letter_count == 0, summary


async def test_sigterm_parks_a_batch_slower_than_the_deadline(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    await harness.create_connection()
    control = harness.control
    load = harness.load(customers=8, workers=2, batch=50, pause=0.05, run_id="slow")
    load.start()
    try:
        await load.wait_acknowledged(300)
        # The next answers take longer than the whole shutdown deadline.
        await control.configure(latency_ms=9000)
        await wait_in_flight(harness)
        await asyncio.sleep(0.2)
        code, took = await asyncio.to_thread(harness.engine.terminate, EXIT_DEADLINE + 5)
        await control.configure(latency_ms=0)
        await harness.restart_engine()
        await load.wait_acknowledged(300)
    finally:
        await load.stop()
    connection = await wait_drained(harness.engine.target, 30, control)
    report = await check_load(load, control)
    summary = (
        f"graceful_shutdown_slow exit={code} in {took:.2f}s {report.summary()} "
        f"load={dict(load.stats.outcomes)}"
    )
    with capsys.disabled():  # shown in CI logs even when the test passes
        print(f"\n{summary}")
    output = harness.engine.tail(20_000)
    assert code == 0, f"{summary}\n{output[-3000:]}"
    assert took < EXIT_DEADLINE, summary
    assert report.ok, f"{summary}\n{report.details()}\n{output[-3000:]}"
    assert connection.dead_letter_count == 0, summary


async def test_sigterm_cut_send_is_logged_as_ambiguous(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    await harness.create_connection()
    control = harness.control
    target = harness.engine.target
    await control.configure(latency_ms=9000)  # Insider applies it, answers too late
    load = harness.load(customers=4, workers=1, batch=50, run_id="cut")
    load.start()
    try:
        await load.wait_acknowledged(50)
    finally:
        await load.stop()
    await wait_in_flight(harness)
    code, took = await asyncio.to_thread(harness.engine.terminate, EXIT_DEADLINE + 5)
    await control.configure(latency_ms=0)
    await harness.restart_engine()
    await wait_drained(target, 30, control)
    report = await check_load(load, control)
    requests = await control.requests()
    deadline = time.monotonic() + 5  # the log writer is batched: give it time
    logs = await list_logs(target)
    while len(logs) < len(requests) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        logs = await list_logs(target)
    summary = (
        f"graceful_shutdown_cut exit={code} in {took:.2f}s {report.summary()} "
        f"sandbox_requests={len(requests)} log_rows={len(logs)} "
        f"log=[{' '.join(f'{e.status_code}/a{e.attempt}/amb={e.ambiguous}' for e in logs)}]"
    )
    with capsys.disabled():  # shown in CI logs even when the test passes
        print(f"\n{summary}")
    assert code == 0 and report.ok, summary
    # Every request that reached Insider is in the log, and the one the shutdown cut
    # (applied by Insider, so its events now arrive twice) is marked ambiguous.
    assert len(logs) == len(requests), summary
    assert report.duplicates > 0 and any(e.ambiguous for e in logs), summary
