"""The outbound log's schema version and migration steps, and how ``engine.upgrade`` reads
and migrates the log file.

The version lives in the log file's ``schema_history`` table (version, the Tidegate that
recorded it, when, what): the current version is its highest. A log file of Tidegate
0.1.0 has none; with 0.1.0's tables (``log_requests``, ``log_bodies``,
``log_customers``) it is version 1, and step 1 records that. The customer index keeps a
check of its own (``customer_index.HASH_PROBE``) and rebuilds itself when it cannot
trust its tables; it needs no steps here.

DuckDB's DDL is transactional: ``CREATE``, ``ALTER`` and ``DROP`` inside ``BEGIN`` ...
``ROLLBACK`` are undone with the rows (DuckDB 2.0; checked by
tests/test_migrations.py). Note that DuckDB 2.0 runs a string of several statements
outside an explicit transaction one statement at a time, each committed on its own, so
a step's SQL always runs inside the transaction ``apply`` opens. A step that is more than
one transaction (one that writes other files, say) is a ``Step`` with ``run`` and
``undo`` (see ``engine.schema``); ``engine.upgrade`` brackets it with the ``MIGRATING``
marker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from engine import __version__
from engine.outbound_log.customer_index import INDEX_SCHEMA
from engine.outbound_log.sql import SCHEMA, connect
from engine.schema import (
    Found,
    SchemaError,
    Step,
    check_current,
    check_steps,
    expect_before,
    not_tidegate_message,
)

LOG_FILE = "outbound-log.duckdb"
"""The outbound log's name in the data directory."""
STORE_NAME = "outbound log"
SCHEMA_VERSION = 1
"""The version of the log's schema (``sql.SCHEMA`` and ``customer_index.INDEX_SCHEMA``,
plus ``schema_history``). A change to them bumps it and adds its step to ``STEPS``."""
V1_TABLES = frozenset({"log_requests", "log_bodies", "log_customers"})
"""The log tables of Tidegate 0.1.0, which recorded no version: version 1."""
HISTORY_TABLE = """
CREATE TABLE IF NOT EXISTS schema_history (
    version INTEGER NOT NULL, tidegate VARCHAR NOT NULL, applied_time TIMESTAMPTZ NOT NULL,
    what VARCHAR NOT NULL);
"""


def record_first_version(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(
        "CREATE TABLE schema_history (version INTEGER NOT NULL, tidegate VARCHAR NOT NULL,"
        " applied_time TIMESTAMPTZ NOT NULL, what VARCHAR NOT NULL)"
    )


STEPS: tuple[Step, ...] = (
    Step(1, "record the schema version (Tidegate 0.1.0 recorded none)", record_first_version),
)
check_steps(STEPS, SCHEMA_VERSION)


def _tables(conn: duckdb.DuckDBPyConnection) -> set[str]:
    return {
        name
        for (name,) in conn.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()"
            " AND schema_name = current_schema()"
        ).fetchall()
    }


def stored_schema(conn: duckdb.DuckDBPyConnection, path: Path) -> Found:
    """The schema version of the log ``conn`` has open (see ``engine.schema``)."""
    tables = _tables(conn)
    if "schema_history" in tables:
        row = conn.execute(
            "SELECT version, tidegate FROM schema_history ORDER BY version DESC LIMIT 1"
        ).fetchone()
        if row is not None:
            return Found(int(row[0]), True, str(row[1]))
    if not tables:
        return Found(0)
    if V1_TABLES <= tables:
        return Found(1, recorded=False)
    raise SchemaError(not_tidegate_message(path.parent, STORE_NAME, path.name, sorted(tables)))


def record_version(conn: duckdb.DuckDBPyConnection, version: int, what: str) -> None:
    """Stamps ``version`` inside the caller's transaction."""
    conn.execute(
        "INSERT INTO schema_history VALUES (?, ?, ?, ?)",
        [version, __version__, datetime.now(UTC), what],
    )


def open_schema(conn: duckdb.DuckDBPyConnection, path: Path) -> None:
    """Creates the log's tables in a file without any (at ``SCHEMA_VERSION``), or checks
    that the file is at that version (``SchemaError`` otherwise; nothing is written)."""
    conn.begin()
    try:
        found = stored_schema(conn, path)
        if found.version == 0:
            conn.execute(SCHEMA)
            conn.execute(INDEX_SCHEMA)
            conn.execute(HISTORY_TABLE)
            record_version(conn, SCHEMA_VERSION, "created")
        else:
            check_current(path.parent, STORE_NAME, path.name, found, SCHEMA_VERSION)
        conn.commit()
    except BaseException:
        with contextlib.suppress(duckdb.Error):  # keep the original error
            conn.rollback()
        raise


class LogSchema:
    """The outbound log (``outbound-log.duckdb``) as ``engine.upgrade`` migrates it."""

    name = STORE_NAME
    file = LOG_FILE
    current = SCHEMA_VERSION
    steps: Sequence[Step] = STEPS

    def inspect(self, path: Path) -> Found:
        if not path.exists():
            return Found(0)
        conn = self._connect(path, read_only=True)
        try:
            return stored_schema(conn, path)
        finally:
            conn.close()

    def apply(self, path: Path, step: Step) -> None:
        assert step.apply is not None
        conn = self._connect(path)
        try:
            conn.begin()
            try:
                expect_before(stored_schema(conn, path), step, path)
                step.apply(conn)
                record_version(conn, step.to, step.what)
                conn.commit()
            except BaseException:
                with contextlib.suppress(duckdb.Error):  # keep the step's own error
                    conn.rollback()
                raise
        finally:
            conn.close()

    def stamp(self, path: Path, step: Step) -> None:
        conn = self._connect(path)
        try:
            conn.begin()
            try:
                expect_before(stored_schema(conn, path), step, path)
                record_version(conn, step.to, step.what)
                conn.commit()
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    conn.rollback()
                raise
        finally:
            conn.close()

    @staticmethod
    def _connect(path: Path, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        try:
            return connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:  # most often: a running engine holds the file
            raise SchemaError(
                f"cannot open the outbound log {path}: another process has it open (stop"
                f" the Tidegate that uses this data folder first): {exc}"
            ) from exc
