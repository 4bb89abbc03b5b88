"""Dead-letter retention: deleting dead letters some days after they failed.

A dead letter is kept for replay, but not forever: a bad mapping can dead-letter millions
of items, each with its Antavo record and rendered fragment. The engine deletes the dead
letters whose ``fail_time`` is older than the retention period (``tidegate serve
--dead-letter-retention-days``, default 30), a minute after start-up and then hourly.

It deletes the oldest first, through the ``dead_letters_by_fail_time`` index, one chunk
per write transaction, so ingest and delivery wait at most one chunk for the database
(the pattern of ``engine.ingest.dedupe_sweep``). In the same transaction it raises
``dead_letter_expiry.expired_through`` to the highest id it deleted, which is how a
replay tells an expired id from one that never existed
(``engine.queue.dead_letters.expired_ids``).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from engine.periodic import Periodic
from engine.state.database import Database

DAY = 86400.0
DEFAULT_RETENTION_DAYS = 30.0
RETENTION_INTERVAL = 3600.0
RETENTION_START_DELAY = 60.0
"""The first deletion waits this long after start-up, out of the way of a restart's backlog."""
EXPIRE_CHUNK = 1000


async def expire_dead_letters(
    db: Database, retention: float, now: float | None = None, chunk: int = EXPIRE_CHUNK
) -> int:
    """Deletes the dead letters that failed more than ``retention`` seconds before ``now``;
    returns how many."""
    at = time.time() if now is None else now
    cutoff = at - retention

    def step(c: sqlite3.Connection) -> int:
        seqs = [
            seq
            for (seq,) in c.execute(
                "SELECT seq FROM dead_letters WHERE fail_time < ? ORDER BY fail_time LIMIT ?",
                (cutoff, chunk),
            )
        ]
        if not seqs:
            return 0
        c.executemany("DELETE FROM dead_letters WHERE seq = ?", [(seq,) for seq in seqs])
        c.execute(
            "INSERT INTO dead_letter_expiry"
            " (id, expired_through, expired_count, retention_seconds, last_time)"
            " VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
            " expired_through = max(expired_through, excluded.expired_through),"
            " expired_count = expired_count + excluded.expired_count,"
            " retention_seconds = excluded.retention_seconds, last_time = excluded.last_time",
            (max(seqs), len(seqs), retention, at),
        )
        return len(seqs)

    return await db.write_in_chunks(step, chunk)


def dead_letter_sweeper(
    db: Database,
    retention: float = DEFAULT_RETENTION_DAYS * DAY,
    interval: float = RETENTION_INTERVAL,
    start_delay: float = RETENTION_START_DELAY,
) -> Periodic:
    """``expire_dead_letters`` in the background, logged as ``dead_letters_expired``."""

    async def expire() -> dict[str, Any]:
        removed = await expire_dead_letters(db, retention)
        return {"removed": removed, "retention_days": round(retention / DAY, 3)}

    return Periodic("dead_letters_expired", expire, interval=interval, start_delay=start_delay)
