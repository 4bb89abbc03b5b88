"""The outbound log's schema version and migration steps, and how ``engine.upgrade`` reads
and migrates the log.

The version lives in each log file's ``schema_history`` table (version, the Tidegate that
recorded it, when, what): a file's version is its highest, the log's that of its oldest
file. A log file of Tidegate 0.1.0 has none; with 0.1.0's tables (``log_requests``,
``log_bodies``, ``log_customers``) it is version 1, and step 1 records that. Step 2 moves
that one file (``outbound-log.duckdb``) into the folder of weekly partitions as its
adopted partition (``engine.outbound_log.partitions``): a rename, undone by the rename
back. A new partition is created at the current version (``open_schema``). The customer
index keeps a check of its own (``customer_index.HASH_PROBE``) and rebuilds itself when
it cannot trust its tables; it needs no steps here.

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
from engine.outbound_log.partitions import ADOPTED_STEM, LOG_DIR, SINGLE_FILE
from engine.outbound_log.sql import SCHEMA, connect
from engine.schema import (
    Found,
    SchemaError,
    Step,
    StepContext,
    check_current,
    check_steps,
    expect_before,
    not_tidegate_message,
)

STORE_NAME = "outbound log"
SCHEMA_VERSION = 2
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


def adopt_single_file(context: StepContext) -> None:
    """Moves the one log file into the partition folder as its adopted partition."""
    folder = context.data_dir / LOG_DIR
    folder.mkdir(exist_ok=True)
    for suffix in ("", ".wal"):
        source = context.data_dir / (SINGLE_FILE + suffix)
        if source.exists():
            source.rename(folder / (f"{ADOPTED_STEM}.duckdb" + suffix))


def put_single_file_back(context: StepContext) -> None:
    """Undoes ``adopt_single_file`` from wherever it stopped."""
    folder = context.data_dir / LOG_DIR
    for suffix in ("", ".wal"):
        adopted = folder / (f"{ADOPTED_STEM}.duckdb" + suffix)
        if adopted.exists():
            adopted.rename(context.data_dir / (SINGLE_FILE + suffix))
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


STEPS: tuple[Step, ...] = (
    Step(1, "record the schema version (Tidegate 0.1.0 recorded none)", record_first_version),
    Step(
        2,
        "keep the log in weekly partition files: the one file becomes outbound-log/adopted.duckdb",
        run=adopt_single_file,
        undo=put_single_file_back,
    ),
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
    """The outbound log as ``engine.upgrade`` migrates it: up to version 1 one file
    (``outbound-log.duckdb``), from version 2 a folder of weekly partition files
    (``outbound-log/``), each recording its own version.

    The log's version is its oldest partition's. A step from version 3 on is applied to
    each partition still below it, in a transaction of its own with the partition's
    stamp, so an interrupted step resumes where it stopped.
    """

    name = STORE_NAME
    file = LOG_DIR
    current = SCHEMA_VERSION
    steps: Sequence[Step] = STEPS

    def inspect(self, path: Path) -> Found:
        single = path.parent / SINGLE_FILE
        if single.exists() and not path.exists():
            return _inspect_file(single)
        found = [_inspect_file(partition) for partition in _partition_files(path)]
        if not found:
            return Found(0)
        return min(found, key=lambda f: (f.version, f.recorded))

    def apply(self, path: Path, step: Step) -> None:
        assert step.apply is not None
        files = [path.parent / SINGLE_FILE] if step.to == 1 else _partition_files(path)
        for file in files:
            conn = _connect(file)
            try:
                conn.begin()
                try:
                    found = stored_schema(conn, file)
                    if found.version >= step.to and found.recorded:
                        conn.rollback()  # this partition took the step before an interruption
                        continue
                    expect_before(found, step, file)
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
        for file in _partition_files(path) if path.exists() else [path.parent / SINGLE_FILE]:
            conn = _connect(file)
            try:
                conn.begin()
                try:
                    expect_before(stored_schema(conn, file), step, file)
                    record_version(conn, step.to, step.what)
                    conn.commit()
                except BaseException:
                    with contextlib.suppress(duckdb.Error):
                        conn.rollback()
                    raise
            finally:
                conn.close()


def _partition_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.duckdb")) if folder.is_dir() else []


def _inspect_file(path: Path) -> Found:
    conn = _connect(path, read_only=True)
    try:
        return stored_schema(conn, path)
    finally:
        conn.close()


def _connect(path: Path, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    try:
        return connect(str(path), read_only=read_only)
    except duckdb.IOException as exc:  # most often: a running engine holds the file
        raise SchemaError(
            f"cannot open the outbound log {path}: another process has it open (stop"
            f" the Tidegate that uses this data folder first): {exc}"
        ) from exc
