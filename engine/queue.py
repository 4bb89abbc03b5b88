"""The durable delivery queue: one FIFO lane per (connection, customer) in SQLite.

A lane whose head is waiting for a retry holds back that customer's later items (the
ordering barrier) and nobody else's. Items leave the queue only when they are delivered
or dead-lettered, in the same transaction that records why, so a crash at any moment
leaves every acknowledged item either queued or settled. Dead letters keep the source
record (and, when it was rendered, the destination fragment) so they can be replayed.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from engine import log_outbox
from engine.database import Database

CLAIM_COLUMNS = (
    "seq, customer_id, kind, event_id, payload, enqueue_time, attempts, first_attempt_time, origin"
)
KIND_EVENT = "event"
KIND_PROFILE = "profile"
KIND_RENDERED = "rendered"
"""A destination fragment kept from a dead letter, resent as it was ("stored request")."""
ORIGIN_REPLAY = "replay"
ORIGIN_REPLAY_STORED = "replay-stored"


class QueueItem(NamedTuple):
    """One queued item as ``claim`` hands it out. A named tuple: immutable like a frozen
    dataclass, and built per claimed row at a quarter of the cost."""

    seq: int
    connection_id: str
    customer_id: str
    kind: str
    event_id: str
    payload: dict[str, Any]
    enqueue_time: float
    attempts: int
    first_attempt_time: float | None
    origin: str = ""


@dataclass(frozen=True)
class Retry:
    seq: int
    next_attempt_time: float
    error: str


@dataclass(frozen=True)
class DeadLetter:
    """An item that failed for good: at ``stage`` ("identify", "map_profile", "send",
    "destination", ...) with ``error``. ``rendered`` is the destination fragment when
    the item got that far."""

    item: QueueItem
    stage: str
    error: str
    request_id: str = ""
    rendered: dict[str, Any] | None = None


@dataclass(frozen=True)
class StoredDeadLetter:
    id: int
    connection_id: str
    customer_id: str
    kind: str
    event_id: str
    payload: dict[str, Any]
    enqueue_time: float
    attempts: int
    stage: str
    error: str
    request_id: str
    fail_time: float
    rendered: dict[str, Any] | None
    origin: str


@dataclass(frozen=True)
class DeadLetterQuery:
    connection_id: str = ""
    customer_id: str = ""
    stage: str = ""
    error_contains: str = ""
    start_time: float | None = None
    end_time: float | None = None
    ids: tuple[int, ...] = ()

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("connection_id", self.connection_id),
            ("customer_id", self.customer_id),
            ("stage", self.stage),
        ):
            if value:
                clauses.append(f"{column} = ?")
                params.append(value)
        if self.error_contains:
            clauses.append("instr(lower(error), lower(?)) > 0")
            params.append(self.error_contains)
        if self.start_time is not None:
            clauses.append("fail_time >= ?")
            params.append(self.start_time)
        if self.end_time is not None:
            clauses.append("fail_time < ?")
            params.append(self.end_time)
        if self.ids:
            clauses.append(f"seq IN ({','.join('?' * len(self.ids))})")
            params.extend(self.ids)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


@dataclass(frozen=True)
class QueueStats:
    depth: int
    oldest_enqueue_time: float | None
    dead_letters: int


@dataclass(frozen=True)
class ReplayResult:
    matched: int
    replayed: int
    without_stored_request: int
    connections: frozenset[str] = frozenset()


INSERT_ITEM = (
    "INSERT INTO queue (connection_id, customer_id, kind, event_id, payload, enqueue_time,"
    " next_attempt_time, origin) VALUES (?,?,?,?,?,?,?,?)"
)


def enqueue_rows(c: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Adds items, in order, inside the caller's transaction. A row is (connection_id,
    customer_id, kind, event_id, payload JSON bytes, enqueue_time, next_attempt_time,
    origin)."""
    c.executemany(INSERT_ITEM, rows)


def enqueue(
    c: sqlite3.Connection,
    connection_id: str,
    customer_id: str,
    kind: str,
    event_id: str,
    payload: dict[str, Any],
    now: float,
    origin: str = "",
) -> None:
    """Adds an item inside the caller's transaction (ingest commits it with the dedupe row)."""
    c.execute(
        INSERT_ITEM,
        (connection_id, customer_id, kind, event_id, orjson.dumps(payload), now, now, origin),
    )


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
            # tuple.__new__ is what QueueItem(...) calls, without its Python-level __new__.
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
        ``engine.log_outbox``), in one transaction."""
        now = time.time() if attempt_time is None else attempt_time
        done = list(delivered)

        def apply(c: sqlite3.Connection) -> int:
            log_outbox.stage(c, log_rows)
            removed = _delete_items(c, done)
            c.executemany(
                "UPDATE queue SET attempts = attempts + 1, next_attempt_time = ?, last_error = ?,"
                " first_attempt_time = COALESCE(first_attempt_time, ?) WHERE seq = ?",
                [(r.next_attempt_time, r.error, now, r.seq) for r in retries],
            )
            c.executemany(
                "INSERT OR REPLACE INTO dead_letters (seq, connection_id, customer_id, kind,"
                " event_id, payload, enqueue_time, attempts, stage, error, request_id, fail_time,"
                " rendered, origin) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
                        None if d.rendered is None else orjson.dumps(d.rendered),
                        d.item.origin,
                    )
                    for d in dead
                ],
            )
            removed += _delete_items(c, [d.item.seq for d in dead])
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
        where, params = query.where()
        where += (" AND " if where else " WHERE ") + "seq > ?"

        def fetch(c: sqlite3.Connection) -> list[StoredDeadLetter]:
            rows = c.execute(
                "SELECT seq, connection_id, customer_id, kind, event_id, payload, enqueue_time,"
                " attempts, stage, error, request_id, fail_time, rendered, origin"
                f" FROM dead_letters{where} ORDER BY seq LIMIT ?",
                (*params, after_id, limit),
            ).fetchall()
            return [
                StoredDeadLetter(
                    id=row[0],
                    connection_id=row[1],
                    customer_id=row[2],
                    kind=row[3],
                    event_id=row[4],
                    payload=orjson.loads(row[5]),
                    enqueue_time=row[6],
                    attempts=row[7],
                    stage=row[8],
                    error=row[9],
                    request_id=row[10],
                    fail_time=row[11],
                    rendered=None if row[12] is None else orjson.loads(row[12]),
                    origin=row[13],
                )
                for row in rows
            ]

        return await self._db.read(fetch)

    async def replay(self, query: DeadLetterQuery, stored: bool, dry_run: bool) -> ReplayResult:
        """Moves matching dead letters back to the end of their lanes.

        By default the source record is queued again, so it is rendered with the current
        mapping. With ``stored``, the destination fragment kept at failure time is resent
        as it was; dead letters that never got rendered cannot be resent that way and are
        left in place (counted in ``without_stored_request``).
        """
        where, params = query.where()

        def apply(c: sqlite3.Connection) -> ReplayResult:
            rows = c.execute(
                "SELECT seq, connection_id, customer_id, kind, event_id, payload, rendered"
                f" FROM dead_letters{where} ORDER BY seq",
                params,
            ).fetchall()
            usable = [r for r in rows if not stored or r[6] is not None]
            if not dry_run:
                now = time.time()
                for seq, connection_id, customer_id, kind, event_id, payload, rendered in usable:
                    if stored:
                        kind, payload, origin = KIND_RENDERED, rendered, ORIGIN_REPLAY_STORED
                    else:
                        origin = ORIGIN_REPLAY
                    c.execute(
                        "INSERT INTO queue (connection_id, customer_id, kind, event_id, payload,"
                        " enqueue_time, next_attempt_time, origin) VALUES (?,?,?,?,?,?,?,?)",
                        (connection_id, customer_id, kind, event_id, payload, now, now, origin),
                    )
                    c.execute("DELETE FROM dead_letters WHERE seq = ?", (seq,))
            return ReplayResult(
                len(rows), len(usable), len(rows) - len(usable), frozenset(r[1] for r in usable)
            )

        result = await self._db.write(apply)
        if not dry_run:
            self.depth += result.replayed
        return result
