"""SQLite (WAL) holding Tidegate's transactional state.

In a process, one thread owns the write connection. The ingest worker, a process of its
own, has a ``Database`` of its own: the two processes take turns through an exclusive
``flock`` on ``<database>-writer.lock`` around each transaction, which the kernel hands
over the moment it is released (SQLite's own busy handler would sleep and retry, idling
both processes for milliseconds at a time). Reads run on a second thread with a
connection of their own (WAL lets them proceed while a
write commits, and sqlite3 releases the GIL while it works). Writes are *grouped*: jobs
submitted while a commit is in flight are applied together in the next transaction,
each inside its own savepoint, so one failing job does not undo the others and a burst
of ingest requests pays one fsync, not one per request.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
STATE_FILE = "state.sqlite3"
"""The state database's name in the data directory."""
_STOP: Any = object()

SCHEMA = """
CREATE TABLE IF NOT EXISTS connections (
    id TEXT PRIMARY KEY,
    display_name TEXT NOT NULL DEFAULT '',
    connector TEXT NOT NULL,
    settings TEXT NOT NULL,
    api_key_encrypted BLOB NOT NULL,
    api_key_hint TEXT NOT NULL,
    id_source_attribute TEXT NOT NULL,
    id_target_identifier TEXT NOT NULL,
    id_custom INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'active',
    state_reason TEXT NOT NULL DEFAULT '',
    retry_window_seconds REAL NOT NULL DEFAULT 0,
    credentials_version INTEGER NOT NULL DEFAULT 1,
    mapping_version INTEGER NOT NULL DEFAULT 1,
    create_time REAL NOT NULL,
    update_time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS profile_mappings (
    id TEXT PRIMARY KEY,
    connection_id TEXT NOT NULL REFERENCES connections(id) ON DELETE CASCADE,
    source_attribute TEXT NOT NULL,
    target_attribute TEXT NOT NULL,
    custom INTEGER NOT NULL,
    array_mode TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS event_mappings (
    id TEXT PRIMARY KEY,
    connection_id TEXT NOT NULL REFERENCES connections(id) ON DELETE CASCADE,
    source_event TEXT NOT NULL,
    target_event TEXT NOT NULL,
    parameters TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS profiles (
    customer_id TEXT PRIMARY KEY,
    attributes TEXT NOT NULL,
    update_time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS external_ids (
    attribute TEXT NOT NULL,
    value TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    PRIMARY KEY (attribute, value)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log_outbox (
    request_id TEXT PRIMARY KEY,
    row BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS source_catalog (
    kind TEXT NOT NULL,
    parent TEXT NOT NULL,
    name TEXT NOT NULL,
    first_seen REAL NOT NULL,
    PRIMARY KEY (kind, parent, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seen_events (
    event_id TEXT PRIMARY KEY,
    receive_time REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    connection_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    event_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    enqueue_time REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_time REAL NOT NULL,
    first_attempt_time REAL,
    last_error TEXT NOT NULL DEFAULT '',
    origin TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS queue_by_connection ON queue (connection_id, seq);
-- Only an item that failed before (attempts > 0) can hold its lane: indexing just those
-- keeps inserts and deletes of fresh items cheap.
CREATE INDEX IF NOT EXISTS queue_held_lanes ON queue (connection_id, customer_id, next_attempt_time)
    WHERE attempts > 0;
CREATE INDEX IF NOT EXISTS queue_held_due ON queue (connection_id, next_attempt_time)
    WHERE attempts > 0;
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY,
    connection_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    event_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    enqueue_time REAL NOT NULL,
    attempts INTEGER NOT NULL,
    stage TEXT NOT NULL,
    error TEXT NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    fail_time REAL NOT NULL,
    rendered BLOB,
    origin TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS dead_letters_by_connection ON dead_letters (connection_id, seq);
"""


class Database:
    """The state database. ``read`` runs a function on the database thread; ``write``
    runs it inside a grouped transaction and returns once that transaction is committed."""

    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        self.path = path
        self._synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tidegate-sqlite")
        self._read_executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tidegate-sqlite-read"
        )
        self._conn: sqlite3.Connection | None = None
        self._lock_fd = -1
        self._reader: sqlite3.Connection | None = None
        self._pending: asyncio.Queue[
            tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]
        ]
        self._writer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._pending = asyncio.Queue()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._open)
        await loop.run_in_executor(self._read_executor, self._open_reader)
        self._writer = asyncio.create_task(self._write_loop(), name="sqlite-writer")

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: an acknowledged ingest survives power loss, not only a process crash.
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        self._lock_fd = os.open(f"{self.path}-writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
        with self._turn():
            conn.executescript(SCHEMA)
        self._conn = conn

    def _turn(self) -> _WriterTurn:
        return _WriterTurn(self._lock_fd)

    def _open_reader(self) -> None:
        reader = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        reader.execute("PRAGMA busy_timeout=5000")
        reader.execute("PRAGMA query_only=ON")
        self._reader = reader

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Runs ``fn`` on the read connection; it sees every write committed before."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._read_executor, self._call, fn)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._reader is not None, "database not started"
        return fn(self._reader)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._pending.put((fn, future))
        return await future

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            batch = [await self._pending.get()]
            while not self._pending.empty() and len(batch) < 1000:
                batch.append(self._pending.get_nowait())
            if any(job is _STOP for job in batch):
                stopping = True
            jobs = [job for job in batch if job is not _STOP]
            if not jobs:
                continue
            try:
                results = await loop.run_in_executor(
                    self._executor, self._apply, [j[0] for j in jobs]
                )
            except Exception as exc:  # the commit itself failed: every job failed
                results = [(False, exc)] * len(jobs)
            for (_, future), (ok, value) in zip(jobs, results, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)

    def _apply(self, fns: list[Callable[[sqlite3.Connection], Any]]) -> list[tuple[bool, Any]]:
        conn = self._conn
        assert conn is not None, "database not started"
        with self._turn():
            return self._transaction(conn, fns)

    @staticmethod
    def _transaction(
        conn: sqlite3.Connection, fns: list[Callable[[sqlite3.Connection], Any]]
    ) -> list[tuple[bool, Any]]:
        results: list[tuple[bool, Any]] = []
        if len(fns) == 1:  # nothing to isolate it from: no savepoint
            conn.execute("BEGIN IMMEDIATE")
            try:
                results.append((True, fns[0](conn)))
            except Exception as exc:
                conn.execute("ROLLBACK")
                return [(False, exc)]
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return results
        conn.execute("BEGIN IMMEDIATE")
        try:
            for fn in fns:
                conn.execute("SAVEPOINT job")
                try:
                    results.append((True, fn(conn)))
                    conn.execute("RELEASE job")
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    results.append((False, exc))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    async def close(self) -> None:
        """Commits every job submitted before the call, then closes the database."""
        if self._writer is not None:
            await self._pending.put(_STOP)
            await self._writer
            self._writer = None
        loop = asyncio.get_running_loop()
        if self._reader is not None:
            await loop.run_in_executor(self._read_executor, self._reader.close)
            self._reader = None
        if self._conn is not None:
            await loop.run_in_executor(self._executor, self._conn.close)
            self._conn = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        self._executor.shutdown(wait=True)
        self._read_executor.shutdown(wait=True)


class _WriterTurn:
    """Holds the cross-process writer lock for one transaction (a blocking ``flock``; the
    writer thread waits in the kernel with the GIL released)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc_info: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
