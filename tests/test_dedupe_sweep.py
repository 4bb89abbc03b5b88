"""Re-send marks past their window are deleted; marks within it keep dropping re-sends.

The windows are the README's: an event id is remembered for 30 days, the content of an
event without an id for 24 hours.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import aiohttp

from engine.app import Engine, EngineConfig
from engine.ingest.dedupe_sweep import sweep_seen_events
from engine.state.database import STATE_FILE, Database
from tests.conftest import eventually, post_events

DAY = 24 * 3600.0
HOUR = 3600.0


async def marks(db: Database) -> set[str]:
    rows = await db.read(lambda c: c.execute("SELECT event_id FROM seen_events").fetchall())
    return {row[0] for row in rows}


async def add_marks(db: Database, received: dict[str, float]) -> None:
    await db.write(
        lambda c: c.executemany(
            "INSERT INTO seen_events (event_id, receive_time) VALUES (?, ?)",
            list(received.items()),
        )
    )


async def test_marks_older_than_their_window_are_deleted_in_chunks(tmp_path: Path) -> None:
    db = Database(tmp_path / STATE_FILE)
    await db.start()
    try:
        now = time.time()
        stale = {f"evt-old-{n:02d}": now - 31 * DAY for n in range(7)}
        stale |= {f"sha256:{n:064x}": now - 25 * HOUR for n in range(6)}
        fresh = {f"evt-new-{n:02d}": now - 29 * DAY for n in range(5)}
        fresh |= {f"sha256:{n + 100:064x}": now - 23 * HOUR for n in range(4)}
        # An event id that is 25 hours old is far inside its own 30-day window.
        fresh["evt-day-old"] = now - 25 * HOUR
        await add_marks(db, stale | fresh)

        result = await sweep_seen_events(db, now=now, chunk=4)

        assert await marks(db) == set(fresh)
        assert (result.removed, result.kept) == (len(stale), len(fresh))
    finally:
        await db.close()


async def test_sweeping_an_empty_table_removes_nothing(tmp_path: Path) -> None:
    db = Database(tmp_path / STATE_FILE)
    await db.start()
    try:
        result = await sweep_seen_events(db, chunk=3)
        assert (result.removed, result.kept) == (0, 0)
    finally:
        await db.close()


async def test_the_engine_sweeps_after_start_and_re_sends_within_the_window_stay_dropped(
    engine_config: EngineConfig, http: aiohttp.ClientSession
) -> None:
    # Marks from an earlier run: one past the 30-day window, one within it.
    db = Database(engine_config.data_dir / STATE_FILE)
    await db.start()
    now = time.time()
    await add_marks(db, {"evt-expired": now - 31 * DAY, "evt-recent": now - 2 * DAY})
    await db.close()

    engine = Engine(dataclasses.replace(engine_config, dedupe_sweep_delay=0.0))
    await engine.start()
    try:

        async def expired_mark_deleted() -> bool:
            return "evt-expired" not in await marks(engine.db)

        await eventually(expired_mark_deleted)
        assert "evt-recent" in await marks(engine.db)

        event = {"customer": "c-1", "action": "point_add", "data": {"points": 5}}
        status, body = await post_events(http, engine, {**event, "id": "evt-recent"})
        assert (status, body["accepted"], body["duplicates"]) == (202, 0, 1)
        status, body = await post_events(http, engine, {**event, "id": "evt-expired"})
        assert (status, body["accepted"], body["duplicates"]) == (202, 1, 0)
    finally:
        await engine.stop(grace=1.0)
