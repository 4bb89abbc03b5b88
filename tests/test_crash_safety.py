"""Crash safety: ``kill -9`` of a real ``tidegate serve`` at random moments under load,
while the sandbox answers 429s, 503s and connection resets, loses no acknowledged event
and keeps each customer's order (duplicates allowed, counted). The harness and the
checker's rules are in ``tests/faultload.py``.

Set ``TIDEGATE_FAULT_SEED`` to replay a run; the seed is in every assertion message.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import pytest

from tests.faultload import (
    Harness,
    check,
    check_load,
    get_connection,
    list_logs,
    wait_drained,
)

TRIALS = 10
SEED = int(os.environ.get("TIDEGATE_FAULT_SEED") or random.SystemRandom().randrange(2**32))


# -- the checker's rules ---------------------------------------------------------------


def test_checker_counts_missing_reordered_and_duplicates() -> None:
    report = check(
        {"a": [1, 2, 3, 4], "b": [1, 2, 3], "c": [1, 2]},
        {"a": [1, 2, 3, 2, 3, 4], "b": [1, 3, 2], "c": [1]},
        {"a": 4, "b": 3, "c": 2},
    )
    by = {c.customer: c for c in report.customers}
    assert (by["a"].missing, by["a"].reordered, by["a"].duplicates) == ([], [], 2)
    assert (by["b"].missing, by["b"].reordered, by["b"].duplicates) == ([], [2], 0)
    assert (by["c"].missing, by["c"].reordered, by["c"].duplicates) == ([2], [], 0)
    assert (report.missing, report.reordered, report.duplicates) == (1, 1, 2)
    assert not report.ok


def test_checker_allows_unacknowledged_arrivals_in_order_but_not_unknown_ones() -> None:
    # seq 3 was sent but never acknowledged: arriving is fine, out of order is not.
    assert check({"a": [1, 2, 4]}, {"a": [1, 2, 3, 4]}, {"a": 4}).ok
    assert check({"a": [1, 2, 4]}, {"a": [1, 2, 4]}, {"a": 4}).ok
    assert check({"a": [1, 2, 4]}, {"a": [1, 2, 4, 3]}, {"a": 4}).reordered == 1
    unknown = check({"a": [1]}, {"a": [1, 9], "z": [1]}, {"a": 1})
    assert unknown.unexpected == 2 and not unknown.ok


def test_checker_repeat_of_an_earlier_batch_is_a_duplicate_not_a_reorder() -> None:
    # A batch re-sent after a crash between send and settle: 3-5 arrive twice.
    report = check({"a": list(range(1, 8))}, {"a": [1, 2, 3, 4, 5, 3, 4, 5, 6, 7]}, {"a": 7})
    assert report.ok and report.duplicates == 3
    # A first occurrence after a later seq is a reorder even with duplicates around.
    report = check({"a": [1, 2, 3]}, {"a": [1, 3, 3, 2]}, {"a": 3})
    assert report.reordered == 1 and report.duplicates == 1


# -- SIGKILL under load ----------------------------------------------------------------


async def inject(harness: Harness, rng: random.Random, kind: str) -> str:
    """Queues one phase of faults at the sandbox (replacing any left over from the last
    engine life, so retries do not pile up); returns a description."""
    control = harness.control
    await control.clear_faults()
    if kind == "429":
        count = rng.randint(1, 2)
        await control.fault(429, count, retry_after="1")
        return f"429x{count}"
    if kind == "503":
        count = rng.randint(1, 2)
        await control.fault(503, count)
        return f"503x{count}"
    if kind == "reset":
        count = rng.randint(1, 2)
        apply = rng.random() < 0.5
        await control.fault(0, count, apply=apply)
        return f"reset{'+stored' if apply else ''}x{count}"
    return "none"


async def until(check, within: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"{check.__name__} not met within {within} s"
        await asyncio.sleep(0.02)


async def test_sigkill_at_random_moments_loses_no_acknowledged_event(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(SEED)
    control = harness.control
    await harness.create_connection()
    # Some latency keeps a request in flight most of the time, so kills land mid-send too.
    await control.configure(latency_ms=25)
    load = harness.load(customers=24, workers=4, batch=50, pause=0.05, run_id="crash")
    # Every other trial injects faults; the clean ones let the backlog through, so the
    # retry counts (and the engine's 1 s-based backoff) stay small.
    kinds = ["none", "429", "none", "503", "none", "reset"]
    kills: list[str] = []
    load.start()
    try:
        for trial in range(TRIALS):
            kind = kinds[trial % len(kinds)]
            delivered = await control.answered(200)
            fault = await inject(harness, rng, kind)

            async def fault_served() -> bool:
                return await control.pending_faults() == 0

            async def delivered_again(before: int = delivered) -> bool:
                return await control.answered(200) > before

            if kind == "none":
                await until(delivered_again)  # this engine life delivers
            elif rng.random() < 0.75:
                await until(fault_served)  # then kill during the retry
            moment = round(rng.uniform(0.0, 1.0), 2)
            await asyncio.sleep(moment)
            depth = (await get_connection(harness.engine.target)).queue_depth
            await harness.kill_engine()
            kills.append(f"t{trial}:{fault}@+{moment}s/ack{load.acknowledged_events}/q{depth}")
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            await harness.restart_engine()
        await load.wait_acknowledged(300)
    finally:
        await load.stop()
    await control.clear_faults()
    connection = await wait_drained(harness.engine.target, 60, control)
    report = await check_load(load, control)
    # Every settled request is in the outbound log, kills or not: rows are settled with
    # their items (the log outbox) and written on the next start. Only a request in
    # flight when its engine was killed can reach the stand-in unlogged (at most one a kill).
    logged = len(await list_logs(harness.engine.target))
    requests = len(await control.requests())
    summary = (
        f"crash_safety seed={SEED} trials={TRIALS} {report.summary()} "
        f"log_rows={logged}/{requests}_requests "
        f"load={dict(load.stats.outcomes)} engine_dedup={load.stats.engine_duplicates} "
        f"kills=[{' '.join(kills)}]"
    )
    with capsys.disabled():  # shown in CI logs even when the test passes
        print(f"\n{summary}")
    assert report.acknowledged > 0
    assert report.ok, f"{summary}\n{report.details()}\n{harness.engine.tail(3000)}"
    assert connection.dead_letter_count == 0, f"{summary}: dead letters"
    assert logged >= requests - len(kills), f"{summary}: outbound-log rows lost"
