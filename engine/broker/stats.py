"""A connection's backlog and dead letters across the cluster, through the ``tg_stats``
key-value bucket.

On JetStream each worker queues, and dead-letters, the items of the partitions it owns,
in its own database; the page and ``connections list`` are usually read from a log
process, whose database holds neither. So every worker puts its counts under a key of
its own (``w.<process id>``) every ``SHARE_INTERVAL``: for each connection with anything
queued or dead-lettered, ``[queued items, oldest enqueue time, dead letters]``. Entries
expire ``STALE_AFTER`` after their last write (the bucket's TTL): a worker that stopped
or died drops out of the counts (a stopping one deletes its key at once), its dead
letters with it until it runs again.

``stats(connection)`` answers from this process's own database (exact and live) plus the
other processes' entries, read at most once a second. Counts are advice for operators: a
read that fails logs ``stats_read_failed`` and answers with the last entries read.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
import time
from typing import Any

import nats.errors
import nats.js.errors
import orjson
import structlog
from nats.aio.client import Client as NATS
from nats.js import api as js_api
from nats.js.kv import KeyValue

from engine.broker.streams import SETUP_TIMEOUT, _bucket, retrying
from engine.queue.lanes import DurableQueue, QueueStats
from engine.state.database import Database

log = structlog.get_logger("tidegate.broker")

STATS_BUCKET = "tg_stats"
SHARE_INTERVAL = 2.0
STALE_AFTER = 3 * SHARE_INTERVAL
READ_EVERY = 1.0
TIMEOUT = 2.0

Counts = dict[str, tuple[int, float | None, int]]
"""Per connection id: queued items, the oldest one's enqueue time, dead letters."""


def local_counts(c: sqlite3.Connection) -> Counts:
    counts: Counts = {}
    for connection_id, depth, oldest in c.execute(
        "SELECT connection_id, COUNT(*), MIN(enqueue_time) FROM queue GROUP BY connection_id"
    ):
        counts[connection_id] = (int(depth), oldest, 0)
    for connection_id, dead in c.execute(
        "SELECT connection_id, COUNT(*) FROM dead_letters GROUP BY connection_id"
    ):
        depth, oldest, _ = counts.get(connection_id, (0, None, 0))
        counts[connection_id] = (depth, oldest, int(dead))
    return counts


class ClusterStats:
    """Shares this worker's counts (``share``) and adds the other processes' to its own."""

    def __init__(
        self, nc: NATS, db: Database, queue: DurableQueue, replicas: int, share: bool
    ) -> None:
        self._js = nc.jetstream()
        self._db = db
        self._queue = queue
        self._replicas = replicas
        self._share = share
        self.key = f"w.{secrets.token_hex(6)}"
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None
        self._others: list[Counts] = []
        self._read_at = -READ_EVERY
        self._reading = asyncio.Lock()

    async def start(self) -> None:
        config = js_api.KeyValueConfig(
            bucket=STATS_BUCKET, history=1, ttl=STALE_AFTER, replicas=self._replicas
        )
        self._kv = await retrying(
            lambda: _bucket(self._js, config), "creating the stats bucket", SETUP_TIMEOUT
        )
        if self._share:
            self._task = asyncio.create_task(self._share_loop())

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        assert self._kv is not None
        with contextlib.suppress(Exception):  # else it expires within STALE_AFTER
            await asyncio.wait_for(self._kv.delete(self.key), TIMEOUT)

    async def _share_loop(self) -> None:
        assert self._kv is not None
        while True:
            try:
                counts = await self._db.read(local_counts)
                await asyncio.wait_for(self._kv.put(self.key, orjson.dumps(counts)), TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("stats_share_failed", error=f"{type(exc).__name__}: {exc}"[:200])
            await asyncio.sleep(SHARE_INTERVAL)

    async def stats(self, connection_id: str) -> QueueStats:
        own = await self._queue.stats(connection_id)
        depth, oldest, dead = own.depth, own.oldest_enqueue_time, own.dead_letters
        for counts in await self._other_counts():
            their = counts.get(connection_id)
            if their is None:
                continue
            depth += their[0]
            dead += their[2]
            if their[1] is not None and (oldest is None or their[1] < oldest):
                oldest = their[1]
        return QueueStats(depth, oldest, dead)

    async def _other_counts(self) -> list[Counts]:
        async with self._reading:
            if time.monotonic() - self._read_at < READ_EVERY:
                return self._others
            try:
                self._others = await asyncio.wait_for(self._read(), TIMEOUT)
            except (TimeoutError, nats.errors.Error) as exc:
                log.warning("stats_read_failed", error=f"{type(exc).__name__}: {exc}"[:200])
            self._read_at = time.monotonic()
            return self._others

    async def _read(self) -> list[Counts]:
        assert self._kv is not None
        try:
            keys = await self._kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        found: list[Counts] = []
        for key in keys:
            if key == self.key or not key.startswith("w."):
                continue
            try:
                entry = await self._kv.get(key)
            except nats.js.errors.NotFoundError:  # expired or deleted meanwhile
                continue
            if entry.value:
                found.append(decode(entry.value))
        return found


def decode(value: bytes) -> Counts:
    raw: dict[str, Any] = orjson.loads(value)
    return {
        str(k): (int(v[0]), None if v[1] is None else float(v[1]), int(v[2]))
        for k, v in raw.items()
    }
