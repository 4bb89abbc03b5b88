"""Re-send marks across the cluster, through the ``tg_marks`` key-value bucket.

The embedded engine drops a re-send of an event it accepted within 30 days (by Antavo's id;
24 hours by content hash for an event without one) with marks in its own database. On
JetStream the stream's duplicate window (10 minutes) drops re-sends cluster-wide, and each
worker keeps the embedded marks for what it ingested. A partition that moved to another
worker since would lose them: so marks also live per customer in the bucket, keyed by the
customer token, the value ``[[event id, receive time], ...]``.

Writing. A worker notes each event it acks (never one it did not: an unacked event comes
back to the next owner, which must not take it for a re-send) and puts the marks of the
customers it noted every ``FLUSH_INTERVAL``, and at a clean stop: it reads the customer's
entry, merges, drops marks past their window, keeps the newest ``MAX_MARKS``, and writes
on the condition that the entry did not change meanwhile (another worker's flush; else it
reads again). A flush well inside the stream's duplicate window is what makes that safe:
until a mark is in the bucket, the stream itself drops a re-send. A worker killed between
an ack and its flush loses those marks: an Antavo re-send of those events more than 10
minutes later is sent again (at-least-once, as after a ``kill -9`` of the embedded engine).

Reading. The first time a worker meets a customer in an ownership (with the profile,
``PartitionWorker._load_customers``), it merges the customer's marks into its own
``seen_events`` before it ingests the customer's events.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

import nats.errors
import nats.js.errors
import orjson
import structlog
from nats.js.kv import KeyValue

from engine.broker.streams import customer_token
from engine.ingest.ingestor import CONTENT_DEDUP_WINDOW, ID_DEDUP_WINDOW
from engine.ingest.parse import CONTENT_ID_PREFIX
from engine.periodic import Periodic
from engine.state.database import Database

log = structlog.get_logger("tidegate.broker")

FLUSH_INTERVAL = 60.0
"""Seconds between flushes: far inside the stream's 10-minute duplicate window."""
MAX_MARKS = 5000
"""Marks kept per customer, the newest: about 250 KB for long ids."""
CONCURRENCY = 64
"""Customers whose marks are written at a time."""
STOP_FLUSH = 10.0
"""Seconds a stop or a hand-back spends writing marks, at most (plus one chunk)."""
ATTEMPTS = 5
TIMEOUT = 5.0

Marks = dict[str, float]
"""Event id -> when it was received."""


def live(marks: Marks, now: float) -> Marks:
    """The marks still inside their window, the newest ``MAX_MARKS``."""
    id_cutoff, content_cutoff = now - ID_DEDUP_WINDOW, now - CONTENT_DEDUP_WINDOW
    kept = {
        event_id: received
        for event_id, received in marks.items()
        if received >= (content_cutoff if event_id.startswith(CONTENT_ID_PREFIX) else id_cutoff)
    }
    if len(kept) > MAX_MARKS:
        kept = dict(sorted(kept.items(), key=lambda m: m[1])[-MAX_MARKS:])
    return kept


def decode(value: bytes | None) -> Marks:
    if not value:
        return {}
    raw: list[Any] = orjson.loads(value)
    return {str(event_id): float(received) for event_id, received in raw}


def encode(marks: Marks) -> bytes:
    return orjson.dumps([[event_id, received] for event_id, received in marks.items()])


def merge_into_seen(c: sqlite3.Connection, marks: Marks) -> None:
    c.executemany(
        "INSERT INTO seen_events (event_id, receive_time) VALUES (?, ?)"
        " ON CONFLICT (event_id) DO UPDATE SET receive_time ="
        " MAX(receive_time, excluded.receive_time)",
        list(marks.items()),
    )


class MarkShare:
    """A worker's side of the bucket: ``note`` acked events, ``flush`` them, ``load`` a
    customer's."""

    def __init__(self, kv: KeyValue, db: Database) -> None:
        self._kv = kv
        self._db = db
        self._noted: dict[str, Marks] = {}
        self._job = Periodic(
            "marks_shared", self._flush_job, interval=FLUSH_INTERVAL, start_delay=FLUSH_INTERVAL
        )
        self._flushing = asyncio.Lock()
        self.flushed = 0
        """Customers whose marks this worker has put (for tests and logs)."""

    def start(self) -> None:
        self._job.start()

    async def stop(self) -> None:
        await self._job.stop()
        await self.flush(within=STOP_FLUSH)

    @property
    def waiting(self) -> int:
        """Customers whose noted marks are not written yet."""
        return len(self._noted)

    def note(self, customer: str, event_ids: Sequence[str], now: float) -> None:
        if event_ids:
            self._noted.setdefault(customer, {}).update(dict.fromkeys(event_ids, now))

    async def _flush_job(self) -> dict[str, int]:
        """The periodic flush, logged as ``marks_shared`` with how many customers."""
        before = self.flushed
        await self.flush()
        return {"customers": self.flushed - before}

    async def flush(self, within: float | None = None) -> None:
        """Writes what was noted, ``CONCURRENCY`` customers at a time. ``within``: seconds
        after which no further chunk starts (a stop or a hand-back must not wait on a
        cluster that does not answer); what is left stays noted, and is counted in the
        warning."""
        deadline = None if within is None else time.monotonic() + within
        async with self._flushing:
            items, self._noted = list(self._noted.items()), {}
            failed, error = 0, ""
            while items:
                if deadline is not None and time.monotonic() > deadline:
                    for customer, marks in items:
                        self._keep(customer, marks)
                    failed += len(items)
                    error = error or f"not written within {within:g} s"
                    break
                chunk = items[:CONCURRENCY]
                try:
                    results = await asyncio.gather(
                        *(self._put(customer, marks) for customer, marks in chunk),
                        return_exceptions=True,
                    )
                except BaseException:  # cancelled: what is not known written, next time
                    for customer, marks in items:
                        self._keep(customer, marks)
                    raise
                del items[: len(chunk)]
                for (customer, marks), result in zip(chunk, results, strict=True):
                    if result is None:
                        self.flushed += 1
                    elif isinstance(result, Exception):
                        self._keep(customer, marks)
                        failed += 1
                        error = f"{type(result).__name__}: {str(result)[:100]}"
                    else:
                        raise result
            if failed:
                log.warning("marks_share_failed", customers=failed, error=error)

    def _keep(self, customer: str, marks: Marks) -> None:
        """Back into the next flush, under what was noted since."""
        self._noted[customer] = {**marks, **self._noted.get(customer, {})}

    async def _put(self, customer: str, marks: Marks) -> None:
        key = customer_token(customer)
        for _ in range(ATTEMPTS):
            try:
                entry = await asyncio.wait_for(self._kv.get(key), TIMEOUT)
                stored, revision = decode(entry.value), entry.revision
            except nats.js.errors.NotFoundError as exc:  # none yet, or deleted
                stored = {}
                revision = getattr(getattr(exc, "entry", None), "revision", None) or 0
            merged = live({**stored, **marks}, time.time())
            value = encode(merged)
            try:
                if revision:
                    await asyncio.wait_for(self._kv.update(key, value, last=revision), TIMEOUT)
                else:
                    await asyncio.wait_for(self._kv.create(key, value), TIMEOUT)
                return
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # another worker's flush came first: read again
        raise nats.errors.Error(f"the marks kept changing ({ATTEMPTS} attempts)")

    async def load(self, customer: str) -> Marks:
        """The customer's marks in the bucket (none: empty)."""
        try:
            entry = await asyncio.wait_for(self._kv.get(customer_token(customer)), TIMEOUT)
        except nats.js.errors.NotFoundError:
            return {}
        return live(decode(entry.value), time.time())
