"""Schema versions and migrations of a data folder: what a new folder gets, what the steps
make of Tidegate 0.1.0's folder (``tests/fixtures/release-0.1.0.tar.gz``), the
``tidegate migrate`` command, and every refusal, each of which must leave the folder
exactly as it was. Steps that fail or are killed run on real SQLite and DuckDB files,
through stores given steps of their own."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from engine.app import Engine, EngineConfig
from engine.outbound_log.migrations import STEPS as LOG_STEPS
from engine.outbound_log.migrations import LogSchema
from engine.outbound_log.rows import LogCustomer, LogRow, new_request_id
from engine.outbound_log.store import LogStore
from engine.schema import SchemaError, Step, StepContext
from engine.state.database import Database
from engine.state.migrations import STEPS as STATE_STEPS
from engine.state.migrations import StateSchema
from engine.upgrade import MARKER, migrate, plan, prepare
from tests.upgrade_fixture import RELEASE_0_1_0, digest, unpack

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
STATE = "state.sqlite3"
LOG = "outbound-log/adopted.duckdb"
"""0.1.0's one log file, once schema step 2 made it the adopted partition."""
SINGLE_LOG = "outbound-log.duckdb"
"""The log as 0.1.0 kept it, before the migration."""


def tidegate(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "tidegate"), *args], capture_output=True, text=True, timeout=timeout
    )


def serve(data_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``tidegate serve`` expected to refuse: it returns at once instead of serving."""
    return tidegate(
        "serve", "--grpc-port", "0", "--http-port", "0", "--data-dir", str(data_dir), *extra
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A copy of the data folder Tidegate 0.1.0 wrote."""
    data_dir, _ = unpack(RELEASE_0_1_0, tmp_path / "fixture")
    return data_dir


def state_version(data_dir: Path) -> tuple[int, list[tuple[int, str]]]:
    conn = sqlite3.connect(data_dir / STATE)
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        history = conn.execute("SELECT version, what FROM schema_history ORDER BY version")
        return version, [(v, w) for v, w in history]
    finally:
        conn.close()


def log_history(data_dir: Path, partition: str = "adopted.duckdb") -> list[tuple[int, str]]:
    with duckdb.connect(str(data_dir / "outbound-log" / partition), read_only=True) as conn:
        rows = conn.execute("SELECT version, what FROM schema_history ORDER BY version")
        return [(v, w) for v, w in rows.fetchall()]


# -- new folders and the steps ------------------------------------------------------------


async def fresh_partition(data_dir: Path) -> Path:
    """A new data folder's engine, and the partition its first log row creates."""
    engine = Engine(EngineConfig(data_dir=data_dir, grpc_port=0, http_port=0))
    await engine.start()
    try:
        await engine.logs.append(make_row())
        await engine.logs.flush()
    finally:
        await engine.stop(grace=0.5)
    [partition] = (data_dir / "outbound-log").glob("*.duckdb")
    return partition


def make_row() -> LogRow:
    return LogRow(
        id=new_request_id(),
        time=datetime.now(UTC),
        connection_id="c",
        method="POST",
        url="http://127.0.0.1/",
        status_code=200,
        response_time=0.01,
        error="",
        customers=(LogCustomer("cust-1"),),
        mapping_version=1,
    )


async def test_a_new_data_folder_gets_the_current_schemas_with_their_versions(
    tmp_path: Path,
) -> None:
    partition = await fresh_partition(tmp_path / "new")
    assert state_version(tmp_path / "new") == (3, [(3, "created")])
    assert log_history(tmp_path / "new", partition.name) == [(2, "created")]
    assert not (tmp_path / "new" / MARKER).exists()


def sqlite_layout(path: Path) -> dict[str, Any]:
    """Tables (columns, primary keys, defaults) and indexes (columns, uniqueness, partial
    condition) of an SQLite file, without the text they were written in."""
    conn = sqlite3.connect(path)
    try:
        layout: dict[str, Any] = {}
        names = conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master"
            " WHERE name NOT LIKE 'sqlite_%' ORDER BY name"
        ).fetchall()
        for kind, name, table, sql in names:
            if kind == "table":
                columns = conn.execute(f"PRAGMA table_xinfo('{name}')").fetchall()
                without_rowid = "WITHOUT ROWID" in " ".join(sql.upper().split())
                layout[name] = (columns, without_rowid, "AUTOINCREMENT" in sql.upper())
            elif kind == "index":
                where = " ".join(sql.split(" WHERE ", 1)[1].split()) if " WHERE " in sql else ""
                info = conn.execute(f"PRAGMA index_xinfo('{name}')").fetchall()
                layout[name] = (table, info, where)
        return layout
    finally:
        conn.close()


def duckdb_layout(path: Path) -> set[tuple[Any, ...]]:
    with duckdb.connect(str(path), read_only=True) as conn:
        columns = conn.execute(
            "SELECT table_name, column_name, data_type, is_nullable, column_default"
            " FROM duckdb_columns() WHERE database_name = current_database()"
        ).fetchall()
        indexes = conn.execute(
            "SELECT index_name, table_name, expressions FROM duckdb_indexes()"
            " WHERE database_name = current_database()"
        ).fetchall()
    return set(columns) | set(indexes)


async def test_the_steps_make_exactly_the_current_schema_of_0_1_0s(
    folder: Path, tmp_path: Path
) -> None:
    migrate(folder)
    fresh = tmp_path / "fresh"
    partition = await fresh_partition(fresh)
    assert sqlite_layout(folder / STATE) == sqlite_layout(fresh / STATE)
    assert duckdb_layout(folder / LOG) == duckdb_layout(partition)
    assert state_version(folder)[0] == state_version(fresh)[0] == 3
    assert [v for v, _ in log_history(folder)] == [1, 2]
    assert not (folder / SINGLE_LOG).exists()


def test_a_0_1_0_folder_is_version_1_with_nothing_recorded(folder: Path) -> None:
    found = plan(folder)
    versions = [(sp.store.name, sp.found.version, sp.found.recorded) for sp in found.stores]
    assert versions == [("state database", 1, False), ("outbound log", 1, False)]
    assert [[step.to for step in sp.steps] for sp in found.stores] == [[1, 2, 3], [1, 2]]


# -- tidegate migrate ---------------------------------------------------------------------


def test_migrate_dry_run_lists_the_pending_steps_and_changes_nothing(folder: Path) -> None:
    before = digest(folder)
    done = tidegate("migrate", "--data-dir", str(folder), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert digest(folder) == before
    out = done.stdout
    assert "state database (state.sqlite3): schema 1 (Tidegate 0.1.0, not recorded)" in out
    assert "step 1: record the schema version" in out
    assert "step 2: dead-letter retention" in out
    assert "step 3: admin API tokens and the audit trail" in out
    assert "outbound log (outbound-log): schema 1 (Tidegate 0.1.0, not recorded)" in out
    assert "step 2: keep the log in weekly partition files" in out
    assert "5 step(s) pending" in out


def test_migrate_runs_the_steps_with_progress_and_is_then_done(folder: Path) -> None:
    done = tidegate("migrate", "--data-dir", str(folder))
    assert done.returncode == 0, done.stderr
    assert "tidegate migrate: state database: schema 1 -> 2: dead-letter retention" in done.stderr
    assert "tidegate migrate: state database: schema 2 -> 3: admin API tokens" in done.stderr
    assert "5 step(s) applied" in done.stderr
    assert "Traceback" not in done.stderr
    version, history = state_version(folder)
    assert version == 3 and [v for v, _ in history] == [1, 2, 3]
    assert [v for v, _ in log_history(folder)] == [1, 2]
    assert not (folder / MARKER).exists()
    again = tidegate("migrate", "--data-dir", str(folder), "--dry-run")
    assert again.returncode == 0 and "nothing to migrate" in again.stdout
    assert "nothing to migrate" in tidegate("migrate", "--data-dir", str(folder)).stderr


def test_migrate_refuses_a_folder_that_does_not_exist(tmp_path: Path) -> None:
    done = tidegate("migrate", "--data-dir", str(tmp_path / "typo"))
    assert done.returncode == 1
    assert "does not exist" in done.stderr
    assert not (tmp_path / "typo").exists()


# -- refusals: the folder is never changed ------------------------------------------------


def test_serve_no_migrate_refuses_a_folder_with_pending_steps(folder: Path) -> None:
    before = digest(folder)
    done = serve(folder, "--no-migrate")
    assert done.returncode == 1
    assert f"run `tidegate migrate --data-dir {folder}`" in done.stderr
    assert "is at schema 1 (Tidegate 0.1.0, not recorded), this Tidegate uses 2" in done.stderr
    assert "Traceback" not in done.stderr
    assert digest(folder) == before


def make_newer(data_dir: Path) -> None:
    """The folder as a later Tidegate 0.9.0 would leave it: state schema 5."""
    migrate(data_dir)
    conn = sqlite3.connect(data_dir / STATE)
    with conn:
        conn.execute("PRAGMA user_version = 5")
        conn.execute("INSERT INTO schema_history VALUES (5, '0.9.0', 0, 'from the future')")
    conn.close()


def test_a_state_database_from_a_newer_release_is_refused_unchanged(folder: Path) -> None:
    make_newer(folder)
    before = digest(folder)
    for done in (serve(folder), tidegate("migrate", "--data-dir", str(folder))):
        assert done.returncode == 1
        assert (
            "the state database (state.sqlite3) has schema 5, newer than this Tidegate's 3:"
            " use Tidegate >= 0.9.0, or restore a backup" in done.stderr
        )
        assert "Traceback" not in done.stderr
    assert digest(folder) == before


def test_an_outbound_log_from_a_newer_release_is_refused_unchanged(folder: Path) -> None:
    migrate(folder)
    with duckdb.connect(str(folder / LOG)) as conn:
        conn.execute("INSERT INTO schema_history VALUES (3, '0.9.0', now(), 'from the future')")
    before = digest(folder)
    done = tidegate("migrate", "--data-dir", str(folder), "--dry-run")
    assert done.returncode == 1
    assert "the outbound log (outbound-log) has schema 3, newer than this" in done.stderr
    assert "Tidegate's 2: use Tidegate >= 0.9.0" in done.stderr
    assert digest(folder) == before


def test_a_folder_that_is_not_tidegates_is_refused_unchanged(tmp_path: Path) -> None:
    data_dir = tmp_path / "other"
    data_dir.mkdir()
    conn = sqlite3.connect(data_dir / STATE)
    conn.execute("CREATE TABLE invoices (n INTEGER)")
    conn.close()
    before = digest(data_dir)
    done = serve(data_dir)
    assert done.returncode == 1
    assert f"is {data_dir} a Tidegate data folder?" in done.stderr
    assert digest(data_dir) == before


def test_two_processes_never_migrate_a_folder_at_once(folder: Path) -> None:
    before = digest(folder)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a migrating process holds it
        done = tidegate("migrate", "--data-dir", str(folder))
    finally:
        os.close(fd)
    assert done.returncode == 1
    assert "is being migrated by another Tidegate process" in done.stderr
    assert digest(folder) == before


async def test_migrate_says_when_a_running_engine_holds_the_folder(tmp_path: Path) -> None:
    engine = Engine(EngineConfig(data_dir=tmp_path / "served", grpc_port=0, http_port=0))
    await engine.start()
    try:
        await engine.logs.append(make_row())  # the log's first partition, which it holds
        await engine.logs.flush()
        done = tidegate("migrate", "--data-dir", str(tmp_path / "served"), "--dry-run")
    finally:
        await engine.stop(grace=0.5)
    assert done.returncode == 1
    assert "another process has it open (stop the Tidegate that uses this data folder" in (
        done.stderr
    )
    assert "Traceback" not in done.stderr


# -- steps that fail, and migrations that are killed --------------------------------------


class StateWithStep4(StateSchema):
    """The state database with a fourth step, made by the test."""

    def __init__(self, step: Step) -> None:
        self.steps: Sequence[Step] = (*STATE_STEPS, step)
        self.current = 4


def test_a_failing_step_leaves_its_store_as_it_was_and_names_both_versions(
    folder: Path,
) -> None:
    migrate(folder)

    def half_done(c: sqlite3.Connection) -> None:
        c.execute("CREATE TABLE added_by_step_4 (n INTEGER)")
        c.execute("ALTER TABLE dead_letters ADD COLUMN note TEXT")
        raise sqlite3.OperationalError("disk I/O error")

    stores = [StateWithStep4(Step(4, "a step that fails", half_done))]
    with pytest.raises(SchemaError) as refused:
        migrate(folder, stores=stores)
    assert "migrating the state database from schema 3 to 4 (a step that fails) failed" in str(
        refused.value
    )
    assert "disk I/O error" in str(refused.value)
    assert state_version(folder)[0] == 3
    layout = sqlite_layout(folder / STATE)
    assert "added_by_step_4" not in layout
    assert "note" not in [column[1] for column in layout["dead_letters"][0]]
    assert not (folder / MARKER).exists()  # one transaction: nothing to finish


def test_sqlite_rolls_back_a_version_stamp_with_its_transaction(tmp_path: Path) -> None:
    """What a step of the state database relies on: its stamp and DDL commit together."""
    conn = sqlite3.connect(tmp_path / STATE, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE added (n INTEGER)")
        conn.execute("PRAGMA user_version = 7")
        conn.execute("ROLLBACK")
        assert conn.execute("PRAGMA user_version").fetchone() == (0,)
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []
    finally:
        conn.close()


def test_duckdb_rolls_back_the_ddl_of_a_failing_step(folder: Path) -> None:
    migrate(folder)

    def half_done(conn: duckdb.DuckDBPyConnection) -> None:
        conn.execute("CREATE TABLE log_added (n INTEGER)")
        conn.execute("ALTER TABLE log_requests ADD COLUMN note VARCHAR")
        conn.execute("DROP TABLE log_bodies")
        raise duckdb.IOException("no space left on device")

    store = LogSchema()
    store.steps = (*LOG_STEPS, Step(3, "a step that fails", half_done))
    store.current = 3
    with pytest.raises(SchemaError, match="no space left on device"):
        migrate(folder, stores=[store])
    with duckdb.connect(str(folder / LOG), read_only=True) as conn:
        tables = {name for (name,) in conn.execute("SHOW TABLES").fetchall()}
        columns = [row[0] for row in conn.execute("DESCRIBE log_requests").fetchall()]
    assert "log_added" not in tables and "log_bodies" in tables
    assert "note" not in columns
    assert [v for v, _ in log_history(folder)] == [1, 2]


KILLED_MIGRATION = """
import sys, time
from pathlib import Path
from engine.schema import Step
from engine.state.migrations import STEPS, StateSchema
from engine.upgrade import migrate

def slow(c):
    c.execute("CREATE TABLE added_by_step_4 (n INTEGER)")
    print("in step 4", flush=True)
    time.sleep(60)

class Store(StateSchema):
    steps = (*STEPS, Step(4, "a slow step", slow))
    current = 4

migrate(Path(sys.argv[1]), stores=[Store()])
"""


def test_a_migration_killed_in_a_step_is_refused_until_migrate_finishes_it(
    folder: Path,
) -> None:
    migrate(folder)
    killed = subprocess.Popen(
        [sys.executable, "-c", KILLED_MIGRATION, str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert killed.stdout is not None
        assert killed.stdout.readline().strip() == "in step 4"
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.communicate()
    marker = json.loads((folder / MARKER).read_text())
    assert (marker["store"], marker["from"], marker["to"]) == ("state database", 3, 4)
    assert marker["transactional"] is True

    def fast(c: sqlite3.Connection) -> None:
        c.execute("CREATE TABLE added_by_step_4 (n INTEGER)")

    stores = [StateWithStep4(Step(4, "a slow step", fast))]
    assert plan(folder, stores=stores).interrupted is not None
    with pytest.raises(SchemaError) as refused:
        prepare(folder, stores=stores)
    message = str(refused.value)
    assert f"data folder {folder} is half-migrated" in message
    assert "the state database (state.sqlite3) from schema 3 to 4 (a slow step)" in message
    assert f"by process {killed.pid}" in message
    assert f"run `tidegate migrate --data-dir {folder}` to finish the migration" in message
    assert state_version(folder)[0] == 3  # the killed transaction left nothing
    assert "added_by_step_4" not in sqlite_layout(folder / STATE)
    migrate(folder, stores=stores)
    assert state_version(folder)[0] == 4
    assert not (folder / MARKER).exists()
    prepare(folder, stores=stores)  # nothing pending: starts


def test_serve_refuses_a_half_migrated_folder_unchanged(folder: Path) -> None:
    """The marker a killed ``tidegate migrate`` leaves, as it writes it (see above)."""
    marker = {
        "store": "state database",
        "file": STATE,
        "from": 1,
        "to": 2,
        "what": "dead-letter retention",
        "transactional": True,
        "pid": 4242,
        "started": "2026-12-06T10:00:00+00:00",
    }
    (folder / MARKER).write_text(json.dumps(marker))
    StateSchema().apply(folder / STATE, STATE_STEPS[0])  # step 1 done, step 2 killed
    before = digest(folder)
    done = serve(folder)
    assert done.returncode == 1
    assert "is half-migrated" in done.stderr
    assert "from schema 1 to 2 (dead-letter retention)" in done.stderr
    assert f"run `tidegate migrate --data-dir {folder}` to finish the migration" in done.stderr
    assert digest(folder) == before
    finished = tidegate("migrate", "--data-dir", str(folder))
    assert finished.returncode == 0, finished.stderr
    assert "finishing an interrupted migration" in finished.stderr
    assert state_version(folder)[0] == 3 and not (folder / MARKER).exists()


def test_a_step_of_several_transactions_is_undone_and_run_again(folder: Path) -> None:
    """The kind of step that reorganises the log into more files: all or nothing."""
    migrate(folder)
    part = folder / "outbound-log" / "split-1.duckdb.part"
    calls: list[str] = []

    def run(ctx: StepContext) -> None:
        calls.append("run")
        with duckdb.connect(str(part)) as conn:  # a transaction of its own, in another file
            conn.execute("CREATE TABLE moved AS SELECT * FROM range(3)")
        if calls.count("run") == 1:
            raise OSError("killed halfway")
        with duckdb.connect(str(ctx.path / "adopted.duckdb")) as conn:
            conn.execute("CREATE TABLE log_parts (name VARCHAR)")

    def undo(ctx: StepContext) -> None:
        calls.append("undo")
        part.unlink(missing_ok=True)

    store = LogSchema()
    store.steps = (*LOG_STEPS, Step(3, "split the log", run=run, undo=undo))
    store.current = 3
    with pytest.raises(SchemaError, match="killed halfway"):
        migrate(folder, stores=[store])
    marker = json.loads((folder / MARKER).read_text())
    assert (marker["store"], marker["from"], marker["to"]) == ("outbound log", 2, 3)
    assert marker["transactional"] is False
    with pytest.raises(SchemaError, match="more than one transaction: run `tidegate migrate"):
        prepare(folder, stores=[store])
    migrate(folder, stores=[store])
    assert calls == ["run", "undo", "run"]
    assert [v for v, _ in log_history(folder)] == [1, 2, 3]
    assert not (folder / MARKER).exists()


# -- the stores' own checks ---------------------------------------------------------------


async def test_the_state_database_refuses_a_version_it_does_not_use(folder: Path) -> None:
    before = digest(folder)
    db = Database(folder / STATE, create=False)
    with pytest.raises(SchemaError, match="run `tidegate migrate --data-dir"):
        await db.start()
    await db.close()
    assert digest(folder) == before
    missing = Database(folder / "absent.sqlite3", create=False)
    with pytest.raises(SchemaError, match="cannot open the state database"):
        await missing.start()
    await missing.close()
    assert not (folder / "absent.sqlite3").exists()


def run_worker(data_dir: Path) -> subprocess.CompletedProcess[str]:
    """``python -m engine.ingest.worker`` as the engine starts it, with a listening socket
    and a channel of its own."""
    listener = socket.create_server(("127.0.0.1", 0))
    ours, theirs = socket.socketpair()
    try:
        fds = (listener.fileno(), theirs.fileno())
        worker = subprocess.Popen(
            [
                sys.executable, "-m", "engine.ingest.worker", "--data-dir", str(data_dir),
                "--listen-fd", str(fds[0]), "--channel-fd", str(fds[1]),
                "--engine-pid", str(os.getpid()), "--max-backlog", "1000",
            ],
            pass_fds=fds, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        out, err = worker.communicate(timeout=60)
        return subprocess.CompletedProcess(worker.args, worker.returncode, out, err)
    finally:
        for sock in (listener, ours, theirs):
            sock.close()


def test_the_ingest_worker_never_migrates_and_refuses_other_versions(folder: Path) -> None:
    before = digest(folder)
    done = run_worker(folder)
    assert done.returncode == 1
    assert "tidegate ingest worker:" in done.stderr
    assert (
        "is Tidegate 0.1.0's (schema 1, not recorded yet) and this Tidegate needs schema 3"
        in done.stderr
    )
    assert f"run `tidegate migrate --data-dir {folder}`" in done.stderr
    assert digest(folder) == before
    make_newer(folder)
    newer = run_worker(folder)
    assert newer.returncode == 1
    assert "has schema 5, newer than this Tidegate's 3: use Tidegate >= 0.9.0" in newer.stderr


async def test_the_outbound_log_store_refuses_a_version_it_does_not_use(folder: Path) -> None:
    (folder / "outbound-log").mkdir()  # as if step 2 had moved the file without step 1
    (folder / SINGLE_LOG).rename(folder / LOG)
    before = digest(folder)
    store = LogStore(folder / "outbound-log")
    with pytest.raises(SchemaError, match="the outbound log .* is Tidegate 0.1.0's"):
        await store.start()
    await store.close()
    assert digest(folder) == before


def test_a_marker_is_written_before_each_step_and_removed_after(folder: Path) -> None:
    seen: list[dict[str, Any]] = []

    def watch(text: str) -> None:
        if (folder / MARKER).exists():
            seen.append(json.loads((folder / MARKER).read_text()))

    migrate(folder, watch)
    assert [(m["store"], m["from"], m["to"]) for m in seen] == [
        ("state database", 0, 1),
        ("state database", 1, 2),
        ("state database", 2, 3),
        ("outbound log", 0, 1),
        ("outbound log", 1, 2),
    ]
    assert all(m["pid"] == os.getpid() for m in seen)
    assert [m["transactional"] for m in seen] == [True, True, True, True, False]
    assert not (folder / MARKER).exists()
