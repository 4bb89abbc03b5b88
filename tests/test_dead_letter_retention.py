"""Dead-letter retention: dead letters older than the retention period are deleted in
chunks, and a replay that names one of them is refused as expired, naming it, instead of
answering "0 replayed"."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from clients.client import TidegateClient
from engine.app import Engine, EngineConfig
from engine.cli import build_parser, upgrade_settings
from engine.pb import dead_letters_pb2 as dpb
from engine.pb import dead_letters_pb2_grpc
from engine.queue.dead_letters import DeadLetter, DeadLetterQuery, DeadLettersExpiredError
from engine.queue.items import KIND_EVENT, enqueue
from engine.queue.lanes import DurableQueue
from engine.queue.retention import expire_dead_letters
from engine.state.database import STATE_FILE, Database
from engine.upgrade import migrate
from tests.conftest import eventually
from tests.upgrade_fixture import RELEASE_0_1_0, unpack

DAY = 86400.0
NOW = 1_800_000_000.0
BIN = Path(sys.executable).parent


async def dead_letters_failed_at(db: Database, fail_times: list[float]) -> list[int]:
    """One dead letter per time in ``fail_times`` (ids 1, 2, ... in that order), made the
    way delivery makes them: queued, claimed, settled as dead."""
    queue = DurableQueue(db)

    def fill(c: sqlite3.Connection) -> None:
        for n in range(len(fail_times)):
            enqueue(c, "conn", f"customer-{n}", KIND_EVENT, f"e{n}", {"n": n}, NOW - 60 * DAY)

    await db.write(fill)
    items = await queue.claim("conn", len(fail_times), now=NOW)
    for item, failed in zip(items, fail_times, strict=True):
        await queue.settle(dead=[DeadLetter(item, "send", "refused")], attempt_time=failed)
    return [item.seq for item in items]


async def stored(db: Database) -> list[int]:
    return await db.read(
        lambda c: [seq for (seq,) in c.execute("SELECT seq FROM dead_letters ORDER BY seq")]
    )


async def test_retention_deletes_only_dead_letters_older_than_it(tmp_path: Path) -> None:
    db = Database(tmp_path / STATE_FILE)
    await db.start()
    try:
        old, new = NOW - 31 * DAY, NOW - 29 * DAY
        ids = await dead_letters_failed_at(db, [old, new, old, old, new, old, old])
        assert ids == [1, 2, 3, 4, 5, 6, 7]

        removed = await expire_dead_letters(db, 30 * DAY, now=NOW, chunk=2)

        assert removed == 5
        assert await stored(db) == [2, 5]
        expiry = await db.read(
            lambda c: c.execute(
                "SELECT expired_through, expired_count, retention_seconds FROM dead_letter_expiry"
            ).fetchall()
        )
        assert expiry == [(7, 5, 30 * DAY)]
        assert await expire_dead_letters(db, 30 * DAY, now=NOW) == 0
    finally:
        await db.close()


async def test_a_replay_naming_expired_ids_is_refused_and_replays_nothing(tmp_path: Path) -> None:
    db = Database(tmp_path / STATE_FILE)
    await db.start()
    try:
        queue = DurableQueue(db)
        old, new = NOW - 31 * DAY, NOW - DAY
        await dead_letters_failed_at(db, [old, new, old, new])
        await expire_dead_letters(db, 30 * DAY, now=NOW)

        with pytest.raises(DeadLettersExpiredError) as refused:
            await queue.replay(DeadLetterQuery(ids=(2, 3, 1)), stored=False, dry_run=False)
        assert refused.value.ids == (1, 3)
        assert str(refused.value).startswith("ids: dead letters 1, 3 expired")
        assert "deleted 30 days after they failed" in str(refused.value)
        assert "ids up to 3 have been" in str(refused.value)
        assert await stored(db) == [2, 4]  # nothing replayed: 2 is still a dead letter
        assert queue.depth == 0

        with pytest.raises(DeadLettersExpiredError):  # a dry run is told the same
            await queue.replay(DeadLetterQuery(ids=(3,)), stored=False, dry_run=True)
        by_filter = await queue.replay(
            DeadLetterQuery(connection_id="conn"), stored=False, dry_run=True
        )
        assert (by_filter.matched, by_filter.replayed) == (2, 2)
        # An id above any retention deleted never was a dead letter: as before, no match.
        unknown = await queue.replay(DeadLetterQuery(ids=(99,)), stored=False, dry_run=False)
        assert (unknown.matched, unknown.replayed) == (0, 0)
        live = await queue.replay(DeadLetterQuery(ids=(2,)), stored=False, dry_run=False)
        assert (live.matched, live.replayed) == (1, 1)
    finally:
        await db.close()


async def test_the_admin_api_says_which_ids_expired(engine: Engine, client: TidegateClient) -> None:
    await dead_letters_failed_at(engine.db, [time.time() - 40 * DAY, time.time()])
    await expire_dead_letters(engine.db, 30 * DAY)
    stub = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ReplayDeadLetters(dpb.ReplayDeadLettersRequest(ids=[1, 2]))

    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert refused.value.details().startswith("ids: dead letter 1 expired")
    listed = await stub.ListDeadLetters(dpb.ListDeadLettersRequest())
    assert [d.id for d in listed.dead_letters] == [2]
    by_filter = await stub.ReplayDeadLetters(
        dpb.ReplayDeadLettersRequest(filter=dpb.DeadLetterFilter(connection_id="conn"))
    )
    assert (by_filter.matched, by_filter.replayed) == (1, 1)


async def test_the_engine_deletes_expired_dead_letters_in_the_background(
    engine_config: EngineConfig,
) -> None:
    config = replace(
        engine_config,
        dead_letter_retention=DAY,
        dead_letter_sweep_delay=0.0,
        dead_letter_sweep_interval=0.05,
    )
    engine = Engine(config)
    await engine.start()
    try:
        await dead_letters_failed_at(engine.db, [time.time() - 2 * DAY, time.time()])

        async def expired() -> bool:
            return await stored(engine.db) == [2]

        await eventually(expired)
    finally:
        await engine.stop(grace=0.5)


async def test_retention_works_on_a_folder_migrated_from_0_1_0(tmp_path: Path) -> None:
    data_dir, manifest = unpack(RELEASE_0_1_0, tmp_path / "fixture")
    migrate(data_dir)
    db = Database(data_dir / STATE_FILE)
    await db.start()
    try:
        ids = [int(d["id"]) for d in manifest["dead_letters"]]
        assert await stored(db) == ids
        assert await expire_dead_letters(db, 30 * DAY, now=time.time() + 365 * DAY) == 2
        with pytest.raises(DeadLettersExpiredError) as refused:
            await DurableQueue(db).replay(DeadLetterQuery(ids=tuple(ids)), False, False)
        assert refused.value.ids == tuple(sorted(ids))
    finally:
        await db.close()


def test_serve_takes_the_retention_in_days() -> None:
    args = build_parser().parse_args(["serve", "--dead-letter-retention-days", "7.5"])
    assert upgrade_settings(args)["dead_letter_retention"] == 7.5 * DAY
    default = build_parser().parse_args(["serve"])
    assert upgrade_settings(default)["dead_letter_retention"] == 30 * DAY
    refused = subprocess.run(
        [str(BIN / "tidegate"), "serve", "--dead-letter-retention-days", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "0 is not a positive number" in refused.stderr
