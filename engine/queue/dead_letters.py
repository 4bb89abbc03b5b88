"""Dead letters: items that failed for good, kept with why and where they failed.

A dead letter keeps the queued record and, when it got that far, the fragment rendered for
the destination, so it can be replayed: re-rendered with the current mapping, or resent
as it was (a ``rendered`` item). Rows are written in the transaction that settles the
send (``DurableQueue.settle``), so an item is always either queued or dead.

Retention (``engine.queue.retention``) deletes dead letters some days after they failed
and keeps, in ``dead_letter_expiry``, the highest id it deleted: a replay that names an
id at or below it that is gone is refused as expired (``DeadLettersExpiredError``),
not answered with "0 replayed".
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from engine.errors import NotFoundError
from engine.queue.items import (
    KIND_RENDERED,
    ORIGIN_REPLAY,
    ORIGIN_REPLAY_STORED,
    NewItem,
    QueueItem,
    enqueue_rows,
    new_items,
)


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
class ReplayResult:
    matched: int
    replayed: int
    without_stored_request: int
    connections: frozenset[str] = frozenset()


class DeadLettersExpiredError(NotFoundError):
    """A replay named dead letters that retention has deleted; nothing was replayed."""

    def __init__(self, ids: Sequence[int], expired_through: int, retention_seconds: float) -> None:
        shown = ", ".join(str(i) for i in ids[:20]) + (", ..." if len(ids) > 20 else "")
        letters = "dead letter" if len(ids) == 1 else "dead letters"
        super().__init__(
            f"ids: {letters} {shown} expired: dead letters are deleted"
            f" {retention_seconds / 86400:g} days after they failed (tidegate serve"
            f" --dead-letter-retention-days), and ids up to {expired_through} have been."
            " Nothing was replayed: send the request again without them"
        )
        self.ids = tuple(ids)
        self.expired_through = expired_through


def expired_ids(c: sqlite3.Connection, ids: Sequence[int]) -> DeadLettersExpiredError | None:
    """The error naming those of ``ids`` that retention deleted, or None when none was."""
    expiry = c.execute(
        "SELECT expired_through, retention_seconds FROM dead_letter_expiry WHERE id = 1"
    ).fetchone()
    if expiry is None:
        return None
    gone = [
        seq
        for (seq,) in c.execute(
            "SELECT DISTINCT j.value FROM json_each(?) AS j WHERE j.value <= ?"
            " AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.seq = j.value)"
            " ORDER BY j.value",
            (orjson.dumps(list(ids)), expiry[0]),
        )
    ]
    return DeadLettersExpiredError(gone, expiry[0], expiry[1]) if gone else None


def insert_dead_letters(c: sqlite3.Connection, dead: Sequence[DeadLetter], now: float) -> None:
    """Stores ``dead`` inside the caller's transaction (which deletes their items)."""
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


def select_dead_letters(
    c: sqlite3.Connection, query: DeadLetterQuery, limit: int, after_id: int = 0
) -> list[StoredDeadLetter]:
    """Dead letters matching ``query`` with id > ``after_id``, oldest first."""
    where, params = query.where()
    where += (" AND " if where else " WHERE ") + "seq > ?"
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


@dataclass(frozen=True)
class Replayable:
    """A dead letter as a replay queues it again: the source record (re-rendered with the
    current mapping), or the stored fragment (``KIND_RENDERED``, resent as it was)."""

    id: int
    connection_id: str
    customer_id: str
    kind: str
    event_id: str
    payload: bytes
    """The record or fragment as stored: JSON."""
    origin: str
    fail_time: float

    def items(self, now: float) -> list[NewItem]:
        return new_items(
            [self.connection_id],
            self.customer_id,
            self.kind,
            self.event_id,
            self.payload,
            now,
            self.origin,
        )


def select_replayable(
    c: sqlite3.Connection, query: DeadLetterQuery, stored: bool
) -> tuple[int, list[Replayable]]:
    """How many dead letters match ``query``, and those a replay can queue, oldest
    first: with ``stored``, only those that got a fragment rendered. Raises
    ``DeadLettersExpiredError`` when ``query.ids`` names dead letters retention deleted."""
    if query.ids:
        expired = expired_ids(c, query.ids)
        if expired is not None:
            raise expired
    where, params = query.where()
    rows = c.execute(
        "SELECT seq, connection_id, customer_id, kind, event_id, payload, rendered, fail_time"
        f" FROM dead_letters{where} ORDER BY seq",
        params,
    ).fetchall()
    usable = []
    for seq, connection_id, customer_id, kind, event_id, payload, rendered, failed in rows:
        if not stored:
            usable.append(
                Replayable(
                    seq, connection_id, customer_id, kind, event_id, payload, ORIGIN_REPLAY, failed
                )
            )
        elif rendered is not None:
            usable.append(
                Replayable(
                    seq,
                    connection_id,
                    customer_id,
                    KIND_RENDERED,
                    event_id,
                    rendered,
                    ORIGIN_REPLAY_STORED,
                    failed,
                )
            )
    return len(rows), usable


def replay_result(matched: int, usable: Sequence[Replayable]) -> ReplayResult:
    return ReplayResult(
        matched,
        len(usable),
        matched - len(usable),
        frozenset(r.connection_id for r in usable),
    )


def delete_dead_letters(c: sqlite3.Connection, ids: Sequence[int]) -> None:
    c.executemany("DELETE FROM dead_letters WHERE seq = ?", [(i,) for i in ids])


def requeue_dead_letters(
    c: sqlite3.Connection, query: DeadLetterQuery, stored: bool, dry_run: bool, now: float
) -> ReplayResult:
    """Moves matching dead letters back to the end of their lanes, inside the caller's
    transaction (see ``DurableQueue.replay``). Raises ``DeadLettersExpiredError``, having
    changed nothing, when ``query.ids`` names dead letters retention deleted."""
    matched, usable = select_replayable(c, query, stored)
    if not dry_run:
        for replayable in usable:
            enqueue_rows(c, replayable.items(now))
        delete_dead_letters(c, [r.id for r in usable])
    return replay_result(matched, usable)
