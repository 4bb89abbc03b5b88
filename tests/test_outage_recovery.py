"""Outage recovery, with real ``tidegate serve`` and ``tidegate sandbox`` subprocesses:

* the sandbox answers 503 for a long stretch while traffic keeps coming; after it
  recovers, every acknowledged event is delivered, in order per customer, and the
  outbound log shows every 503 attempt;
* a 429 -> 503 -> 403 sequence (the API key was rotated at Insider) pauses the
  connection with its backlog kept, through a SIGKILL and restart; UpdateConnection with
  the new key resumes delivery and nothing is lost or reordered.

The engine runs with its default retry timings (1 s base backoff, full jitter, doubling;
``tidegate serve`` has no flag for them), so the outage is measured in seconds, not in a
count of requests: 8 s of outage is at least 3 attempts of the same items, and the
recovery then waits out the last backoff (up to 16-32 s), which bounds the test's length.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from engine.pb import connections_pb2
from tests.faultload import (
    Harness,
    check_load,
    get_connection,
    list_logs,
    update_api_key,
    wait_drained,
)

OUTAGE_SECONDS = 8.0
ROTATED_KEY = "faultload-key-0002"
PAUSED = connections_pb2.CONNECTION_STATE_PAUSED
ACTIVE = connections_pb2.CONNECTION_STATE_ACTIVE


async def wait_for_users(harness: Harness, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not await harness.control.users():
        assert time.monotonic() < deadline, "nothing reached the sandbox"
        await asyncio.sleep(0.05)


async def test_long_503_outage_then_everything_delivered_in_order(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    await harness.create_connection()
    target = harness.engine.target
    # churn: new customers keep arriving during the outage, as in real traffic, so the
    # engine keeps trying fresh lanes while the failed ones back off.
    load = harness.load(customers=16, workers=4, batch=50, pause=0.05, churn=1, run_id="outage")
    load.start()
    try:
        await load.wait_acknowledged(500)
        await wait_for_users(harness)
        await harness.control.fault(503, 100_000)  # every upsert fails until cleared
        outage_start = time.monotonic()
        acked_before = load.acknowledged_events
        await asyncio.sleep(OUTAGE_SECONDS)
        during = await get_connection(target)
        acked_during = load.acknowledged_events - acked_before
        await harness.control.clear_faults()
        outage = time.monotonic() - outage_start
        await asyncio.sleep(1.0)
    finally:
        await load.stop()
    recovered_at = time.monotonic()
    connection = await wait_drained(target, 60, harness.control)
    recovery = time.monotonic() - recovered_at
    report = await check_load(load, harness.control)
    statuses = [r["status"] for r in await harness.control.requests()]
    answered_503 = statuses.count(503)
    summary = (
        f"outage_recovery outage={outage:.1f}s 503_answers={answered_503} "
        f"queue_during_outage={during.queue_depth} acked_during_outage={acked_during} "
        f"drained_after={recovery:.1f}s customers={len(load.customers)} {report.summary()} "
        f"load={dict(load.stats.outcomes)}"
    )
    with capsys.disabled():  # shown in CI logs even when the test passes
        print(f"\n{summary}")
    assert acked_during > 0, f"ingest stopped acknowledging during the outage: {summary}"
    assert during.queue_depth > 0, summary
    assert answered_503 >= 20, f"too few attempts during the outage: {summary}"
    assert report.acknowledged > 0
    assert report.ok, f"{summary}\n{report.details()}\n{harness.engine.tail(3000)}"
    assert connection.dead_letter_count == 0, summary
    # Every 503 answer is in the outbound log (the log writer is batched: wait for it),
    # and the same items were tried again and again: attempts 1, 2, 3...
    deadline = time.monotonic() + 10
    while len(logged := await list_logs(target, status_codes=[503])) < answered_503:
        assert time.monotonic() < deadline, f"log shows {len(logged)} of {answered_503} 503s"
        await asyncio.sleep(0.2)
    assert len(logged) == answered_503, summary
    attempts = sorted(entry.attempt for entry in logged)
    assert attempts[-1] >= 3, f"503 attempts {attempts}: {summary}"


async def test_403_pauses_through_a_sigkill_and_new_key_resumes(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    await harness.create_connection()
    target = harness.engine.target
    control = harness.control
    load = harness.load(customers=12, workers=3, batch=50, pause=0.05, run_id="auth")
    load.start()
    try:
        await load.wait_acknowledged(300)
        await wait_for_users(harness)
        # 429 (Retry-After 1), two 503s, then the key Insider holds no longer matches: 403.
        await control.fault(429, 1, retry_after="1")
        await control.fault(503, 2)
        await control.configure(api_key=ROTATED_KEY)
        deadline = time.monotonic() + 20
        while (paused := await get_connection(target)).state != PAUSED:
            assert time.monotonic() < deadline, f"not paused: {paused}"
            await asyncio.sleep(0.1)
        assert "403" in paused.state_reason, paused.state_reason
        sent_while_paused = len(await control.requests())
        acked = load.acknowledged_events
        await load.wait_acknowledged(200)  # ingest still acknowledges while paused

        await harness.kill_engine()
        await asyncio.sleep(0.2)
        await harness.restart_engine()
        after_restart = await get_connection(target)
        assert after_restart.state == PAUSED, "the pause did not survive a restart"
        assert "403" in after_restart.state_reason, after_restart.state_reason
        assert after_restart.queue_depth > 0
        await load.wait_acknowledged(200)
        await asyncio.sleep(0.5)
        assert len(await control.requests()) == sent_while_paused, "sent while paused"

        acked_while_paused = load.acknowledged_events - acked
        resumed = await update_api_key(target, ROTATED_KEY)
        assert resumed.state == ACTIVE, resumed
        await load.wait_acknowledged(200)
    finally:
        await load.stop()
    connection = await wait_drained(target, 30, control)
    report = await check_load(load, control)
    statuses = [r["status"] for r in await control.requests()]
    summary = (
        f"auth_pause statuses_seen={sorted(set(statuses))} 403s={statuses.count(403)} "
        f"queue_at_restart={after_restart.queue_depth} acked_while_paused={acked_while_paused} "
        f"{report.summary()} load={dict(load.stats.outcomes)}"
    )
    with capsys.disabled():  # shown in CI logs even when the test passes
        print(f"\n{summary}")
    assert {429, 503, 403, 200} <= set(statuses), summary
    assert report.ok, f"{summary}\n{report.details()}\n{harness.engine.tail(3000)}"
    assert connection.dead_letter_count == 0, summary
    assert connection.state == ACTIVE
