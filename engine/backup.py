"""Backups of a data folder: a copy that ``tidegate serve`` starts from, taken while the
engine serves (``BackupService/CreateBackup``, which ``tidegate backup`` calls) or while
nothing runs on the folder (``tidegate backup`` copies it itself).

The state database is copied first, with SQLite's online backup (one snapshot, while
ingest and delivery go on), then the outbound log, a partition at a time, each
checkpointed and copied while its writes wait (``LogStore.copy_to``). So everything
acknowledged before the backup began is in the copy. A log row written after the state
snapshot may be in the log copy while its items are still queued in the state copy:
delivered again after a restore, at least once, as after a crash; a row still in the
state copy's log outbox is written to the log when the engine starts from the copy,
unless the log copy already holds it. The secret key file goes too when it lives in the
folder; a key given in ``TIDEGATE_SECRET_KEY`` stays with the operator.

The copy is written to ``<destination>.partial`` and renamed into place when complete:
a destination that exists is a whole backup.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb

from engine.errors import InvalidInputError, TidegateError
from engine.outbound_log.partitions import LOG_DIR
from engine.outbound_log.store import LogStore
from engine.state.database import STATE_FILE
from engine.state.secrets import NEW_KEY_FILE, SECRET_KEY_FILE
from engine.state.tokens import ADMIN_TOKEN_FILE

PARTIAL = ".partial"


@dataclass(frozen=True)
class BackupResult:
    destination: Path
    state_bytes: int
    log_partitions: int
    log_bytes: int
    secret_key_copied: bool
    seconds: float


def check_destination(destination: Path) -> None:
    """Refuses a destination a backup cannot be written to, before anything is."""
    if not destination.is_absolute():
        raise InvalidInputError("destination", f"{destination} is not an absolute path")
    if not destination.parent.is_dir():
        raise InvalidInputError("destination", f"{destination.parent} is not a folder")
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise InvalidInputError("destination", f"{destination} exists and is not empty")


async def back_up_running(data_dir: Path, logs: LogStore, destination: Path) -> BackupResult:
    """The backup of the folder a running engine serves (``logs`` is its log store)."""
    check_destination(destination)
    started = time.monotonic()
    with _writing(destination) as partial:
        state_bytes = copy_state(data_dir / STATE_FILE, partial / STATE_FILE)
        (partial / LOG_DIR).mkdir()
        partitions, log_bytes = await logs.copy_to(partial / LOG_DIR)
        key = _copy_key(data_dir, partial)
    return BackupResult(
        destination, state_bytes, partitions, log_bytes, key, time.monotonic() - started
    )


def back_up_stopped(data_dir: Path, destination: Path) -> BackupResult:
    """The backup of a folder no engine runs on: its files as they are (any release's)."""
    check_destination(destination)
    if not (data_dir / STATE_FILE).exists():
        raise TidegateError(f"{data_dir} holds no {STATE_FILE}: is it a Tidegate data folder?")
    started = time.monotonic()
    with _writing(destination) as partial:
        state_bytes = copy_state(data_dir / STATE_FILE, partial / STATE_FILE)
        partitions = log_bytes = 0
        logs = list((data_dir / LOG_DIR).glob("*.duckdb")) if (data_dir / LOG_DIR).is_dir() else []
        single = data_dir / "outbound-log.duckdb"  # a log from before partitions
        for path in [*logs, *([single] if single.exists() else [])]:
            _check_not_open(path)
            target = partial / path.relative_to(data_dir)
            target.parent.mkdir(exist_ok=True)
            for suffix in ("", ".wal"):  # DuckDB replays its WAL when the copy opens
                source = path.with_name(path.name + suffix)
                if source.exists():
                    shutil.copyfile(source, target.with_name(target.name + suffix))
                    log_bytes += source.stat().st_size
            partitions += 1
        key = _copy_key(data_dir, partial)
    return BackupResult(
        destination, state_bytes, partitions, log_bytes, key, time.monotonic() - started
    )


def copy_state(source: Path, target: Path) -> int:
    """SQLite's online backup of the state database: one consistent snapshot, taken
    while other connections (the engine's, the ingest worker's) go on writing."""
    src = sqlite3.connect(f"{source.as_uri()}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)  # all pages in one step: one read transaction, one snapshot
        finally:
            dst.close()
    finally:
        src.close()
    return target.stat().st_size


def _check_not_open(path: Path) -> None:
    """DuckDB lets one process open a file: if an engine has it, this fails."""
    try:
        duckdb.connect(str(path), read_only=True).close()
    except duckdb.IOException as exc:
        raise TidegateError(
            f"{path} is open in another process: a Tidegate serves this folder; back it up"
            " through that engine (`tidegate backup` does when it finds engine.json)"
        ) from exc


def _copy_key(data_dir: Path, partial: Path) -> bool:
    """Copies the secret key file, and the admin token file the first start wrote (the
    copy's state database holds that token's hash, so it works on the copy too)."""
    token = data_dir / ADMIN_TOKEN_FILE
    if token.exists():
        shutil.copyfile(token, partial / ADMIN_TOKEN_FILE)
        (partial / ADMIN_TOKEN_FILE).chmod(0o600)
    key = data_dir / SECRET_KEY_FILE
    if not key.exists():
        return False
    for name in (SECRET_KEY_FILE, NEW_KEY_FILE):  # and the key of an unfinished rotation
        if (data_dir / name).exists():
            target = partial / name
            shutil.copyfile(data_dir / name, target)
            target.chmod(0o600)
    return True


@contextlib.contextmanager
def _writing(destination: Path) -> Iterator[Path]:
    """A sibling ``<destination>.partial`` folder to write into, renamed to
    ``destination`` only when everything is in it and removed if anything fails."""
    partial = destination.with_name(destination.name + PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted backup left
    partial.mkdir(mode=0o700)
    try:
        yield partial
        with contextlib.suppress(FileNotFoundError):
            destination.rmdir()  # an empty folder the operator made for it
        partial.rename(destination)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
