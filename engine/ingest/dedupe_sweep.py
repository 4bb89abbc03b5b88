"""Forgetting re-send marks once their window has passed.

Ingest keeps a mark in ``seen_events`` for every accepted event, so that a re-send is
dropped: by Antavo's event id for ``ID_DEDUP_WINDOW`` (30 days), by a content hash for
``CONTENT_DEDUP_WINDOW`` (24 hours). Once a mark is older than its window, ingest accepts
that event again anyway, so the mark is dead weight: about 100 bytes per event, forever.
The sweeper deletes such marks.

It walks the table in key order, one chunk of keys per write transaction, so ingest
waits at most one chunk for the database. The engine sweeps shortly after start-up and
then every ``SWEEP_INTERVAL``.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from engine.ingest.ingestor import CONTENT_DEDUP_WINDOW, ID_DEDUP_WINDOW
from engine.ingest.parse import CONTENT_ID_PREFIX
from engine.periodic import Periodic
from engine.state.database import Database

SWEEP_INTERVAL = 3600.0
SWEEP_START_DELAY = 60.0
"""The first sweep waits this long after start-up, out of the way of a restart's backlog."""
SWEEP_CHUNK = 5000


@dataclass(frozen=True)
class SweepResult:
    removed: int
    kept: int


async def sweep_seen_events(
    db: Database, now: float | None = None, chunk: int = SWEEP_CHUNK
) -> SweepResult:
    """Deletes the marks older than their window as of ``now``."""
    at = time.time() if now is None else now
    id_cutoff, content_cutoff = at - ID_DEDUP_WINDOW, at - CONTENT_DEDUP_WINDOW
    after = ""
    removed = kept = 0
    while True:

        def step(c: sqlite3.Connection, after: str = after) -> tuple[str | None, int, int]:
            marks = c.execute(
                "SELECT event_id, receive_time FROM seen_events WHERE event_id > ?"
                " ORDER BY event_id LIMIT ?",
                (after, chunk),
            ).fetchall()
            stale = [
                (event_id,)
                for event_id, received in marks
                if received
                < (content_cutoff if event_id.startswith(CONTENT_ID_PREFIX) else id_cutoff)
            ]
            c.executemany("DELETE FROM seen_events WHERE event_id = ?", stale)
            return (marks[-1][0] if len(marks) == chunk else None), len(stale), len(marks)

        last, gone, seen = await db.write(step)
        removed += gone
        kept += seen - gone
        if last is None:
            return SweepResult(removed, kept)
        after = last


def dedupe_sweeper(db: Database, interval: float, start_delay: float) -> Periodic:
    """``sweep_seen_events`` in the background, logged as ``seen_events_swept``."""

    async def sweep() -> dict[str, Any]:
        result = await sweep_seen_events(db)
        return {"removed": result.removed, "kept": result.kept}

    return Periodic("seen_events_swept", sweep, interval=interval, start_delay=start_delay)
