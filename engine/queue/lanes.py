"""The durable delivery queue: one FIFO lane per (connection, customer) in SQLite.

A lane whose head is waiting for a retry holds back that customer's later items (the
ordering barrier) and nobody else's. Items leave the queue only when they are delivered
or dead-lettered, in the same transaction that records why, so a crash at any moment
leaves every acknowledged item either queued or settled.

Settling a send also stages its outbound-log rows (``engine.outbound_log.outbox``) in the
same transaction: that is why this stage imports the outbound log, and it is what makes a
settled request's log row survive a kill.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from engine.outbound_log import outbox
from engine.queue.dead_letters import (
    DeadLetter,
    DeadLetterQuery,
    ReplayResult,
    StoredDeadLetter,
    insert_dead_letters,
    requeue_dead_letters,
    select_dead_letters,
)
from engine.queue.items import QueueItem
from engine.state.database import Database

CLAIM_COLUMNS = (
    "seq, customer_id, kind, event_id, payload, enqueue_time, attempts, first_attempt_time, origin"
)


@dataclass(frozen=True)
class Retry:
    seq: int
    next_attempt_time: float
    error: str


@dataclass(frozen=True)
class QueueStats:
    depth: int
    oldest_enqueue_time: float | None
    dead_letters: int


DELETE_CHUNK = 500
"""Items deleted per statement: below SQLite's default limit of 999 parameters."""


def _delete_items(c: sqlite3.Connection, seqs: Sequence[int]) -> int:
    """Deletes queue items by seq; returns how many there were. One ``IN`` statement per
    chunk costs less than a statement per item."""
    removed = 0
    for start in range(0, len(seqs), DELETE_CHUNK):
        chunk = seqs[start : start + DELETE_CHUNK]
        marks = ",".join("?" * len(chunk))
        removed += c.execute(f"DELETE FROM queue WHERE seq IN ({marks})", chunk).rowcount
    return removed


def _queued(c: sqlite3.Connection, seqs: Sequence[int]) -> list[int]:
    """Which of ``seqs`` are still in the queue."""
    found: list[int] = []
    for start in range(0, len(seqs), DELETE_CHUNK):
        chunk = seqs[start : start + DELETE_CHUNK]
        marks = ",".join("?" * len(chunk))
        found += [r[0] for r in c.execute(f"SELECT seq FROM queue WHERE seq IN ({marks})", chunk)]
    return found


class DurableQueue:
    """The queue. ``depth`` counts queued items across connections without a query, so
    ingest can refuse work when the backlog is full."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.depth = 0

    async def load(self) -> None:
        self.depth = await self._db.read(
            lambda c: c.execute("SELECT COUNT(*) FROM queue").fetchone()[0]
        )

    def added(self, count: int) -> None:
        self.depth += count

    async def claim(
        self,
        connection_id: str,
        limit: int,
        now: float | None = None,
        exclude: Collection[int] = (),
    ) -> list[QueueItem]:
        """The oldest ready items of the connection, skipping lanes held by a pending retry
        and the items in ``exclude`` (a settle of theirs is still committing)."""
        at = time.time() if now is None else now
        skip = ""
        params: tuple[Any, ...] = ()
        if exclude:
            skip = " AND seq NOT IN (SELECT value FROM json_each(?))"
            params = (orjson.dumps(list(exclude)).decode(),)

        def fetch(c: sqlite3.Connection) -> list[QueueItem]:
            held = c.execute(
                "SELECT 1 FROM queue WHERE connection_id = ? AND attempts > 0"
                " AND next_attempt_time > ? LIMIT 1",
                (connection_id, at),
            ).fetchone()
            if held:
                rows = c.execute(
                    f"SELECT {CLAIM_COLUMNS} FROM queue q WHERE connection_id = ? AND NOT EXISTS ("
                    "  SELECT 1 FROM queue h WHERE h.connection_id = q.connection_id"
                    "  AND h.customer_id = q.customer_id AND h.attempts > 0"
                    f"  AND h.next_attempt_time > ?){skip}"
                    " ORDER BY seq LIMIT ?",
                    (connection_id, at, *params, limit),
                ).fetchall()
            else:  # no lane is held: the oldest items, straight off the index
                rows = c.execute(
                    f"SELECT {CLAIM_COLUMNS} FROM queue WHERE connection_id = ?{skip}"
                    " ORDER BY seq LIMIT ?",
                    (connection_id, *params, limit),
                ).fetchall()
            # Hot path (bench.delivery_cpu): tuple.__new__ is what QueueItem(...) calls,
            # without the named tuple's Python-level __new__.
            new, loads, conn = tuple.__new__, orjson.loads, connection_id
            return [
                new(QueueItem, (seq, conn, cust, kind, eid, loads(data), enq, att, at1, org))
                for seq, cust, kind, eid, data, enq, att, at1, org in rows
            ]

        return await self._db.read(fetch)

    async def settle(
        self,
        delivered: Iterable[int] = (),
        retries: Sequence[Retry] = (),
        dead: Sequence[DeadLetter] = (),
        attempt_time: float | None = None,
        log_rows: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        """Records the outcome of one send, and its outbound-log rows (see
        ``engine.outbound_log.outbox``), in one transaction."""
        now = time.time() if attempt_time is None else attempt_time
        done = list(delivered)

        def apply(c: sqlite3.Connection) -> int:
            outbox.stage(c, log_rows)
            removed = _delete_items(c, done)
            c.executemany(
                "UPDATE queue SET attempts = attempts + 1, next_attempt_time = ?, last_error = ?,"
                " first_attempt_time = COALESCE(first_attempt_time, ?) WHERE seq = ?",
                [(r.next_attempt_time, r.error, now, r.seq) for r in retries],
            )
            # Only items still queued: one taken away while its send was in flight (a
            # partition handed to another worker, an erased customer) is not this send's
            # to dead-letter; whoever holds it now decides.
            queued = set(_queued(c, [d.item.seq for d in dead])) if dead else set()
            insert_dead_letters(c, [d for d in dead if d.item.seq in queued], now)
            removed += _delete_items(c, list(queued))
            return removed

        # Not ``self.depth -= await ...``: that reads depth before the await, and would undo
        # every ``added()`` made while the transaction ran.
        removed = await self._db.write(apply)
        self.depth -= removed

    async def next_due(self, connection_id: str, now: float | None = None) -> float | None:
        """When the earliest held item of the connection becomes ready, if any is held."""
        at = time.time() if now is None else now
        return await self._db.read(
            lambda c: c.execute(
                "SELECT MIN(next_attempt_time) FROM queue WHERE connection_id = ?"
                " AND attempts > 0 AND next_attempt_time > ?",
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

    # -- dead letters ------------------------------------------------------------------

    async def dead_letters(
        self, query: DeadLetterQuery, limit: int, after_id: int = 0
    ) -> list[StoredDeadLetter]:
        """Dead letters matching ``query`` with id > ``after_id``, oldest first."""
        return await self._db.read(lambda c: select_dead_letters(c, query, limit, after_id))

    async def replay(self, query: DeadLetterQuery, stored: bool, dry_run: bool) -> ReplayResult:
        """Moves matching dead letters back to the end of their lanes.

        By default the source record is queued again, so it is rendered with the current
        mapping. With ``stored``, the destination fragment kept at failure time is resent
        as it was; dead letters that never got rendered cannot be resent that way and are
        left in place (counted in ``without_stored_request``).
        """
        now = time.time()
        result: ReplayResult = await self._db.write(
            lambda c: requeue_dead_letters(c, query, stored, dry_run, now)
        )
        if not dry_run:
            self.depth += result.replayed
        return result
