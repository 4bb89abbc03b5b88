"""The state database's migration steps, and how ``engine.upgrade`` reads and migrates it.

Step *n* brings version *n - 1* to *n* (``engine.schema``). Each is one SQLite
transaction (SQLite's DDL is transactional, ``PRAGMA user_version`` too), committed
together with the version stamp, so an interruption leaves the database at the version
before the step. A step's SQL is written out here as it was on the day: it must not
follow later changes of ``engine.state.database.SCHEMA``, which describes the newest
version only. ``tests/test_migrations.py`` checks that the steps, run on Tidegate
0.1.0's schema, give exactly ``SCHEMA``.

Steps run on a connection with foreign keys off (SQLite's default), as SQLite's
procedure for rebuilding a table requires; a step that rebuilds one ends with
``PRAGMA foreign_key_check`` of its own.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from engine.schema import Found, SchemaError, Step, check_steps, expect_before
from engine.state.database import (
    SCHEMA_VERSION,
    STATE_FILE,
    STORE_NAME,
    WriterTurn,
    execute_script,
    record_version,
    stored_schema,
    writer_lock,
)


def record_first_version(c: sqlite3.Connection) -> None:
    c.execute(
        "CREATE TABLE schema_history (version INTEGER PRIMARY KEY, tidegate TEXT NOT NULL,"
        " applied_time REAL NOT NULL, what TEXT NOT NULL)"
    )


def dead_letter_retention(c: sqlite3.Connection) -> None:
    execute_script(
        c,
        """
        CREATE INDEX dead_letters_by_fail_time ON dead_letters (fail_time);
        CREATE TABLE dead_letter_expiry (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            expired_through INTEGER NOT NULL,
            expired_count INTEGER NOT NULL,
            retention_seconds REAL NOT NULL,
            last_time REAL NOT NULL
        );
        """,
    )


def tokens_and_audit(c: sqlite3.Connection) -> None:
    execute_script(
        c,
        """
        CREATE TABLE admin_tokens (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            role TEXT NOT NULL,
            token_hash BLOB NOT NULL,
            create_time REAL NOT NULL,
            expire_time REAL,
            last_used_time REAL,
            revoke_time REAL
        );
        CREATE UNIQUE INDEX admin_tokens_active_name ON admin_tokens (name)
            WHERE revoke_time IS NULL;
        CREATE TABLE audit_events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            time REAL NOT NULL,
            token_name TEXT NOT NULL,
            method TEXT NOT NULL,
            target TEXT NOT NULL,
            fields TEXT NOT NULL,
            outcome TEXT NOT NULL,
            peer TEXT NOT NULL
        );
        CREATE INDEX audit_events_by_time ON audit_events (time);
        """,
    )


STEPS = (
    Step(1, "record the schema version (Tidegate 0.1.0 recorded none)", record_first_version),
    Step(
        2,
        "dead-letter retention: index dead letters by fail time, and keep the highest id"
        " retention deleted",
        dead_letter_retention,
    ),
    Step(3, "admin API tokens and the audit trail of admin changes", tokens_and_audit),
)
check_steps(STEPS, SCHEMA_VERSION)


class StateSchema:
    """The state database (``state.sqlite3``) as ``engine.upgrade`` migrates it."""

    name = STORE_NAME
    file = STATE_FILE
    current = SCHEMA_VERSION
    steps: Sequence[Step] = STEPS

    def inspect(self, path: Path) -> Found:
        if not path.exists():
            return Found(0)
        # Read only. Without a WAL file the database file holds every commit, and
        # immutable=1 reads it without creating the -wal and -shm files a WAL database
        # otherwise gets even from a read-only connection.
        wal = Path(f"{path}-wal")
        query = "mode=ro" if wal.exists() else "mode=ro&immutable=1"
        try:
            conn = sqlite3.connect(f"{path.absolute().as_uri()}?{query}", uri=True)
        except sqlite3.Error as exc:
            raise SchemaError(f"cannot read the state database {path}: {exc}") from exc
        try:
            return stored_schema(conn, path)
        except sqlite3.Error as exc:
            raise SchemaError(f"cannot read the state database {path}: {exc}") from exc
        finally:
            conn.close()

    def apply(self, path: Path, step: Step) -> None:
        assert step.apply is not None
        conn = sqlite3.connect(path, isolation_level=None)
        lock_fd = writer_lock(path)
        try:
            conn.execute("PRAGMA busy_timeout=5000")
            with WriterTurn(lock_fd):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    expect_before(stored_schema(conn, path), step, path)
                    step.apply(conn)
                    record_version(conn, step.to, step.what)
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):  # keep the step's own error
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
        finally:
            conn.close()
            os.close(lock_fd)

    def stamp(self, path: Path, step: Step) -> None:
        raise AssertionError("the state database's steps are all one transaction each")
