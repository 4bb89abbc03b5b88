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
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from engine import __version__
from engine.schema import Found, SchemaError, check_current, not_tidegate_message

T = TypeVar("T")
STATE_FILE = "state.sqlite3"
"""The state database's name in the data directory."""
STORE_NAME = "state database"
_STOP: Any = object()

SCHEMA_VERSION = 3
"""The version of ``SCHEMA``, kept in ``PRAGMA user_version``. A change to ``SCHEMA``
bumps it and adds the step that makes the change to ``engine.state.migrations``
(tests/test_migrations.py checks that the steps lead to exactly this schema)."""
V1_TABLES = frozenset(
    {
        "connections", "profile_mappings", "event_mappings", "profiles", "external_ids",
        "log_outbox", "source_catalog", "seen_events", "queue", "dead_letters",
    }
)  # fmt: skip
"""The tables of Tidegate 0.1.0, which recorded no version: version 1."""

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
-- Retention deletes by fail_time (engine.queue.retention), oldest first.
CREATE INDEX IF NOT EXISTS dead_letters_by_fail_time ON dead_letters (fail_time);
-- One row: what dead-letter retention has deleted, so that a replay of an id it deleted
-- is told so. expired_through is the highest id it deleted.
CREATE TABLE IF NOT EXISTS dead_letter_expiry (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    expired_through INTEGER NOT NULL,
    expired_count INTEGER NOT NULL,
    retention_seconds REAL NOT NULL,
    last_time REAL NOT NULL
);
-- Admin API tokens (engine.state.tokens): only the SHA-256 of each token is kept. A
-- name is unique among the tokens not revoked.
CREATE TABLE IF NOT EXISTS admin_tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    token_hash BLOB NOT NULL,
    create_time REAL NOT NULL,
    expire_time REAL,
    last_used_time REAL,
    revoke_time REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS admin_tokens_active_name ON admin_tokens (name)
    WHERE revoke_time IS NULL;
-- The audit trail of admin changes (engine.state.audit), deleted after its retention.
CREATE TABLE IF NOT EXISTS audit_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    token_name TEXT NOT NULL,
    method TEXT NOT NULL,
    target TEXT NOT NULL,
    fields TEXT NOT NULL,
    outcome TEXT NOT NULL,
    peer TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_events_by_time ON audit_events (time);
CREATE TABLE IF NOT EXISTS schema_history (
    version INTEGER PRIMARY KEY,
    tidegate TEXT NOT NULL,
    applied_time REAL NOT NULL,
    what TEXT NOT NULL
);
"""


def statements(script: str) -> Iterator[str]:
    """The statements of an SQL script, one at a time (``executescript`` would commit
    the caller's transaction first)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    if pending.strip():
        yield pending.strip()


def execute_script(conn: sqlite3.Connection, script: str) -> None:
    """Runs ``script`` statement by statement, inside the caller's transaction."""
    for statement in statements(script):
        conn.execute(statement)


def stored_schema(conn: sqlite3.Connection, path: Path) -> Found:
    """The schema version of the database ``conn`` has open (see ``engine.schema``)."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    tables = {
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    }
    if version:
        written_by = ""
        try:  # a newer release may keep its history otherwise: then it is not named
            row = conn.execute(
                "SELECT tidegate FROM schema_history ORDER BY version DESC LIMIT 1"
            ).fetchone()
            written_by = str(row[0]) if row else ""
        except sqlite3.Error:
            pass
        return Found(int(version), True, written_by)
    if not tables:
        return Found(0)
    if V1_TABLES <= tables:
        return Found(1, recorded=False)
    raise SchemaError(not_tidegate_message(path.parent, STORE_NAME, path.name, sorted(tables)))


def record_version(conn: sqlite3.Connection, version: int, what: str) -> None:
    """Stamps ``version`` inside the caller's transaction (``PRAGMA user_version`` is
    part of the transaction: a rollback undoes it)."""
    conn.execute(f"PRAGMA user_version = {int(version)}")
    conn.execute(
        "INSERT OR REPLACE INTO schema_history (version, tidegate, applied_time, what)"
        " VALUES (?, ?, ?, ?)",
        (version, __version__, time.time(), what),
    )


def open_schema(conn: sqlite3.Connection, path: Path, *, create: bool = True) -> None:
    """Creates the schema in a database without tables (at ``SCHEMA_VERSION``), or checks
    that the database is at that version: an older one needs ``tidegate migrate``, a
    newer one a newer Tidegate (``SchemaError`` either way; nothing is written)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = stored_schema(conn, path)
        if found.version == 0 and create:
            execute_script(conn, SCHEMA)
            record_version(conn, SCHEMA_VERSION, "created")
            conn.execute("COMMIT")
            return
        if found.version == 0:
            raise SchemaError(f"{path} holds no Tidegate state: start `tidegate serve` first")
        check_current(path.parent, STORE_NAME, path.name, found, SCHEMA_VERSION)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class Database:
    """The state database. ``read`` runs a function on the database thread; ``write``
    runs it inside a grouped transaction and returns once that transaction is committed."""

    def __init__(self, path: Path, *, synchronous: str = "FULL", create: bool = True) -> None:
        """``create``: give a new file the current schema. The ingest worker passes False:
        the engine has made the database before it starts the worker."""
        self.path = path
        self._synchronous = synchronous
        self._create = create
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
        if self._create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        else:
            try:
                conn = sqlite3.connect(
                    f"{self.path.absolute().as_uri()}?mode=rw",
                    isolation_level=None,
                    check_same_thread=False,
                    uri=True,
                )
            except sqlite3.OperationalError as exc:
                raise SchemaError(f"cannot open the state database {self.path}: {exc}") from exc
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            self._lock_fd = writer_lock(self.path)
            # Checked before anything else is written: a database of another version is
            # left as it was (its journal mode too).
            with self._turn():
                open_schema(conn, self.path, create=self._create)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: an acknowledged ingest survives power loss, not only a process crash.
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            conn.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1
            raise
        self._conn = conn

    def _turn(self) -> WriterTurn:
        return WriterTurn(self._lock_fd)

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

    async def write_in_chunks(self, step: Callable[[sqlite3.Connection], int], chunk: int) -> int:
        """Runs ``step`` (which handles at most ``chunk`` rows and returns how many), one
        transaction each, until a step handles fewer; returns the total. Long deletions
        go this way so that other writers get their turn between chunks."""
        total = 0
        while True:
            done = await self.write(step)
            total += done
            if done < chunk:
                return total

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


def writer_lock(path: Path) -> int:
    """The file descriptor of the database's cross-process writer lock (see
    ``WriterTurn``); the caller closes it."""
    return os.open(f"{path}-writer.lock", os.O_RDWR | os.O_CREAT, 0o600)


class WriterTurn:
    """Holds the cross-process writer lock for one transaction (a blocking ``flock``; the
    writer thread waits in the kernel with the GIL released)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc_info: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
