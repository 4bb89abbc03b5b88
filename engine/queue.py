"""The durable delivery queue: one FIFO lane per (connection, customer) in SQLite.

A lane whose head is waiting for a retry holds back that customer's later items (the
ordering barrier) and nobody else's. Items leave the queue only when they are delivered
or dead-lettered, in the same transaction that records why, so a crash at any moment
leaves every acknowledged item either queued or settled.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from engine.database import Database

KIND_EVENT = "event"
KIND_PROFILE = "profile"


@dataclass(frozen=True)
class QueueItem:
    seq: int
    connection_id: str
    customer_id: str
    kind: str
    event_id: str
    payload: dict[str, Any]
    enqueue_time: float
    attempts: int
    first_attempt_time: float | None


@dataclass(frozen=True)
class Retry:
    seq: int
    next_attempt_time: float
    error: str


@dataclass(frozen=True)
class DeadLetter:
    item: QueueItem
    stage: str
    error: str
    request_id: str = ""


@dataclass(frozen=True)
class QueueStats:
    depth: int
    oldest_enqueue_time: float | None
    dead_letters: int


def enqueue(
    c: sqlite3.Connection,
    connection_id: str,
    customer_id: str,
    kind: str,
    event_id: str,
    payload: dict[str, Any],
    now: float,
) -> None:
    """Adds an item inside the caller's transaction (ingest commits it with the dedupe row)."""
    c.execute(
        "INSERT INTO queue (connection_id, customer_id, kind, event_id, payload, enqueue_time,"
        " next_attempt_time) VALUES (?,?,?,?,?,?,?)",
        (connection_id, customer_id, kind, event_id, orjson.dumps(payload), now, now),
    )


class DurableQueue:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def claim(
        self, connection_id: str, limit: int, now: float | None = None
    ) -> list[QueueItem]:
        """The oldest ready items of the connection, skipping lanes held by a pending retry."""
        at = time.time() if now is None else now

        def fetch(c: sqlite3.Connection) -> list[QueueItem]:
            rows = c.execute(
                "SELECT seq, customer_id, kind, event_id, payload, enqueue_time, attempts,"
                " first_attempt_time FROM queue q WHERE connection_id = ? AND NOT EXISTS ("
                "  SELECT 1 FROM queue h WHERE h.connection_id = q.connection_id"
                "  AND h.customer_id = q.customer_id AND h.next_attempt_time > ?)"
                " ORDER BY seq LIMIT ?",
                (connection_id, at, limit),
            ).fetchall()
            return [
                QueueItem(
                    seq, connection_id, cust, kind, eid, orjson.loads(payload), enq, att, first
                )
                for seq, cust, kind, eid, payload, enq, att, first in rows
            ]

        return await self._db.read(fetch)

    async def settle(
        self,
        delivered: Iterable[int] = (),
        retries: Sequence[Retry] = (),
        dead: Sequence[DeadLetter] = (),
        attempt_time: float | None = None,
    ) -> None:
        """Records the outcome of one send in one transaction."""
        now = time.time() if attempt_time is None else attempt_time
        done = [(seq,) for seq in delivered]

        def apply(c: sqlite3.Connection) -> None:
            c.executemany("DELETE FROM queue WHERE seq = ?", done)
            c.executemany(
                "UPDATE queue SET attempts = attempts + 1, next_attempt_time = ?, last_error = ?,"
                " first_attempt_time = COALESCE(first_attempt_time, ?) WHERE seq = ?",
                [(r.next_attempt_time, r.error, now, r.seq) for r in retries],
            )
            c.executemany(
                "INSERT OR REPLACE INTO dead_letters (seq, connection_id, customer_id, kind,"
                " event_id,"
                " payload, enqueue_time, attempts, stage, error, request_id, fail_time)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        d.item.seq,
                        d.item.connection_id,
                        d.item.customer_id,
                        d.item.kind,
                        d.item.event_id,
                        orjson.dumps(d.item.payload),
                        d.item.enqueue_time,
                        d.item.attempts + 1,
                        d.stage,
                        d.error,
                        d.request_id,
                        now,
                    )
                    for d in dead
                ],
            )
            c.executemany("DELETE FROM queue WHERE seq = ?", [(d.item.seq,) for d in dead])

        await self._db.write(apply)

    async def next_due(self, connection_id: str, now: float | None = None) -> float | None:
        """When the earliest held item of the connection becomes ready, if any is held."""
        at = time.time() if now is None else now
        return await self._db.read(
            lambda c: c.execute(
                "SELECT MIN(next_attempt_time) FROM queue WHERE connection_id = ?"
                " AND next_attempt_time > ?",
                (connection_id, at),
            ).fetchone()[0]
        )

    async def stats(self, connection_id: str) -> QueueStats:
        def fetch(c: sqlite3.Connection) -> QueueStats:
            depth, oldest = c.execute(
                "SELECT COUNT(*), MIN(enqueue_time) FROM queue WHERE connection_id = ?",
                (connection_id,),
            ).fetchone()
            (dead,) = c.execute(
                "SELECT COUNT(*) FROM dead_letters WHERE connection_id = ?", (connection_id,)
            ).fetchone()
            return QueueStats(int(depth), oldest, int(dead))

        return await self._db.read(fetch)

    async def dead_letters(self, connection_id: str) -> list[tuple[str, str, str, str]]:
        """(customer_id, event_id, stage, error) of every dead letter, oldest first."""
        return await self._db.read(
            lambda c: [
                (str(a), str(b), str(s), str(e))
                for a, b, s, e in c.execute(
                    "SELECT customer_id, event_id, stage, error FROM dead_letters"
                    " WHERE connection_id = ? ORDER BY seq",
                    (connection_id,),
                )
            ]
        )
