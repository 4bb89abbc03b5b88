"""Upgrading a data folder: plans, runs or lists the migration steps of its stores (the
SQLite state, then the DuckDB outbound log), or refuses, with the folder unchanged.

- ``plan`` reads each store's version without writing anything. It refuses (raises
  ``SchemaError``) a store newer than this Tidegate, a file that is not Tidegate's, and
  a folder another process is migrating right now.
- ``migrate`` (``tidegate migrate``) runs the pending steps in order, each in its own
  transaction together with its version stamp, and logs each (``schema_migrated``:
  store, from, to, what, duration). It holds an exclusive ``flock`` on the data folder
  meanwhile, so two processes never migrate one folder at once, and writes the
  ``MIGRATING`` marker (JSON: store, file, from, to, what, whether the step is one
  transaction, pid, start time) before each step and removes it after. A marker left
  behind means a step was interrupted: ``migrate`` finishes the job (a step of several
  transactions is first undone), while ``prepare`` refuses to start on such a folder.
- ``prepare`` is what ``Engine.start`` calls before it opens the stores: it migrates,
  or with ``migrate=False`` (``serve --no-migrate``) refuses when a step is pending.

The ingest worker never comes here: it opens the state database only, after the engine
migrated it, and refuses any version but the current one (``engine.state.database``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from engine.outbound_log.migrations import LogSchema
from engine.schema import (
    UNRECORDED_RELEASE,
    Found,
    SchemaError,
    SchemaStore,
    Step,
    StepContext,
    migrate_command,
    newer_message,
    pending_steps,
)
from engine.state.migrations import StateSchema

log = structlog.get_logger("tidegate.upgrade")

MARKER = "MIGRATING"
"""The file, in the data folder, that names the step being run (see the module doc)."""
STORES: tuple[SchemaStore, ...] = (StateSchema(), LogSchema())
"""Every store of a data folder, in the order they are migrated."""
Progress = Callable[[str], None]


@dataclass(frozen=True)
class StorePlan:
    store: SchemaStore
    path: Path
    found: Found
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class Interrupted:
    """What a ``MIGRATING`` marker left behind says was running."""

    store: str
    file: str
    before: int
    to: int
    what: str
    transactional: bool
    pid: int
    started: str

    def describe(self) -> str:
        return (
            f"the {self.store} ({self.file}) from schema {version_label(self.before)} to {self.to}"
            f" ({self.what}), started {self.started} by process {self.pid}"
        )


@dataclass(frozen=True)
class Plan:
    data_dir: Path
    stores: tuple[StorePlan, ...]
    interrupted: Interrupted | None = None

    @property
    def steps(self) -> int:
        return sum(len(store.steps) for store in self.stores)

    def lines(self) -> list[str]:
        """The plan as ``tidegate migrate --dry-run`` lists it."""
        lines = [f"data folder {self.data_dir}:"]
        if self.interrupted is not None:
            lines.append(f"  interrupted: {self.interrupted.describe()}; finished first")
        for sp in self.stores:
            store = sp.store
            head = f"  {store.name} ({store.file}):"
            if sp.found.version == 0:
                lines.append(f"{head} none yet (created at schema {store.current} on start)")
                continue
            if not sp.steps:
                lines.append(f"{head} schema {sp.found.label}, up to date")
                continue
            lines.append(f"{head} schema {sp.found.label}, this Tidegate's {store.current}")
            lines += [f"    step {step.to}: {step.what}" for step in sp.steps]
        if self.steps:
            lines.append(f"{self.steps} step(s) pending")
        elif self.interrupted is None:
            lines.append("nothing to migrate")
        else:
            lines.append("nothing to migrate once the interrupted step is finished")
        return lines


def plan(data_dir: Path, *, stores: Sequence[SchemaStore] = STORES, _locked: bool = False) -> Plan:
    """What a migration of ``data_dir`` would do; reads, never writes. (``stores``:
    tests pass stores with steps of their own.)"""
    interrupted = _read_marker(data_dir)
    if interrupted is not None and not _locked and _locked_by_another(data_dir):
        raise SchemaError(_busy_message(data_dir, interrupted))
    plans = []
    for store in stores:
        path = data_dir / store.file
        found = store.inspect(path)
        if found.version > store.current:
            raise SchemaError(newer_message(data_dir, store.name, store.file, found, store.current))
        plans.append(StorePlan(store, path, found, tuple(pending_steps(store.steps, found))))
    return Plan(data_dir, tuple(plans), interrupted)


def migrate(
    data_dir: Path, progress: Progress | None = None, *, stores: Sequence[SchemaStore] = STORES
) -> Plan:
    """Runs every pending step (finishing an interrupted migration first); returns the
    plan it ran. Raises ``SchemaError`` when it must refuse, before changing anything."""
    if not data_dir.is_dir():
        raise SchemaError(f"data folder {data_dir} does not exist: nothing to migrate")
    say = progress or (lambda _text: None)
    with _folder_lock(data_dir):
        ran = plan(data_dir, stores=stores, _locked=True)
        if ran.interrupted is not None:
            _recover(data_dir, ran.interrupted, say, stores)
            ran = plan(data_dir, stores=stores, _locked=True)
        for sp in ran.stores:
            for step in sp.steps:
                _run_step(data_dir, sp, step, say)
    return ran


def prepare(
    data_dir: Path,
    *,
    migrate_now: bool = True,
    progress: Progress | None = None,
    stores: Sequence[SchemaStore] = STORES,
) -> None:
    """Makes ``data_dir`` ready for this Tidegate before the engine opens it: migrates
    it (``migrate_now``), or raises ``SchemaError`` naming the command to run. A folder
    left half-migrated is always refused: ``tidegate migrate`` finishes it."""
    if not data_dir.exists():
        return  # a new data folder: the stores are created at the current version
    found = plan(data_dir, stores=stores)
    if found.interrupted is not None:
        raise SchemaError(_interrupted_message(data_dir, found.interrupted))
    if not found.steps:
        return
    if not migrate_now:
        behind = ", ".join(
            f"the {sp.store.name} is at schema {sp.found.label}, this Tidegate uses"
            f" {sp.store.current}"
            for sp in found.stores
            if sp.steps
        )
        raise SchemaError(
            f"data folder {data_dir} needs migrating ({behind}): run"
            f" `{migrate_command(data_dir)}`, or start without --no-migrate"
        )
    migrate(data_dir, progress, stores=stores)


# -- running steps ----------------------------------------------------------------------


def _run_step(data_dir: Path, sp: StorePlan, step: Step, say: Progress) -> None:
    store = sp.store
    before = step.to - 1
    _write_marker(
        data_dir,
        {
            "store": store.name,
            "file": store.file,
            "from": before,
            "to": step.to,
            "what": step.what,
            "transactional": step.transactional,
            "pid": os.getpid(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    say(f"{store.name}: schema {version_label(before)} -> {step.to}: {step.what} ...")
    started = time.monotonic()
    try:
        if step.apply is not None:
            store.apply(sp.path, step)
        else:
            assert step.run is not None
            step.run(StepContext(data_dir, sp.path))
            store.stamp(sp.path, step)
    except Exception as exc:
        log.error(
            "schema_migration_failed", store=store.name, to=step.to, what=step.what, error=str(exc)
        )
        if step.transactional:  # rolled back: the folder is at the version before the step
            _remove_marker(data_dir)
        raise SchemaError(
            f"data folder {data_dir}: migrating the {store.name} from schema"
            f" {version_label(before)} to"
            f" {step.to} ({step.what}) failed: {exc}"
        ) from exc
    seconds = round(time.monotonic() - started, 3)
    _remove_marker(data_dir)
    log.info(
        "schema_migrated",
        store=store.name,
        **{"from": before},
        to=step.to,
        what=step.what,
        duration=seconds,
    )
    say(f"{store.name}: schema {step.to} ({seconds:g} s)")


def _recover(
    data_dir: Path, interrupted: Interrupted, say: Progress, stores: Sequence[SchemaStore]
) -> None:
    """Puts a store whose step was interrupted back where that step started (a step of
    one transaction is there already; one of several is undone), unless the step had in
    fact finished, and removes the marker."""
    store = next((s for s in stores if s.file == interrupted.file), None)
    if store is None:
        raise SchemaError(
            f"data folder {data_dir}: the {MARKER} marker names {interrupted.file}, which"
            " this Tidegate does not know: restore the folder from a backup"
        )
    path = data_dir / store.file
    found = store.inspect(path)
    finished = found.recorded and found.version >= interrupted.to
    say(f"finishing an interrupted migration: {interrupted.describe()}")
    if not finished and not interrupted.transactional:
        step = next((s for s in store.steps if s.to == interrupted.to), None)
        if step is None or step.undo is None:
            raise SchemaError(
                f"data folder {data_dir}: this Tidegate cannot undo the interrupted step of"
                f" {interrupted.describe()}: restore the folder from a backup"
            )
        say(f"{store.name}: undoing the interrupted step {step.to} ...")
        step.undo(StepContext(data_dir, path))
    _remove_marker(data_dir)
    log.info(
        "schema_migration_recovered",
        store=store.name,
        to=interrupted.to,
        what=interrupted.what,
        step_had_finished=finished,
    )


def version_label(version: int) -> str:
    """A version a step starts from, as messages show it (0: none recorded)."""
    return f"0 (none recorded: Tidegate {UNRECORDED_RELEASE})" if version == 0 else str(version)


# -- the marker and the lock ------------------------------------------------------------


def _write_marker(data_dir: Path, fields: dict[str, Any]) -> None:
    """Writes the marker atomically and durably (a rename, then the folder synced)."""
    partial = data_dir / f"{MARKER}.partial"
    with partial.open("w") as out:
        json.dump(fields, out, indent=1)
        out.flush()
        os.fsync(out.fileno())
    partial.replace(data_dir / MARKER)
    _sync_dir(data_dir)


def _remove_marker(data_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (data_dir / MARKER).unlink()
    _sync_dir(data_dir)


def _sync_dir(data_dir: Path) -> None:
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_marker(data_dir: Path) -> Interrupted | None:
    path = data_dir / MARKER
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SchemaError(f"data folder {data_dir}: cannot read {path}: {exc}") from exc
    try:
        fields = json.loads(text)
        return Interrupted(
            store=str(fields["store"]),
            file=str(fields["file"]),
            before=int(fields["from"]),
            to=int(fields["to"]),
            what=str(fields["what"]),
            transactional=bool(fields["transactional"]),
            pid=int(fields["pid"]),
            started=str(fields["started"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise SchemaError(
            f"data folder {data_dir}: a migration was interrupted, and its {MARKER} marker"
            f" cannot be read ({exc}): restore the folder from a backup"
        ) from exc


def _interrupted_message(data_dir: Path, interrupted: Interrupted) -> str:
    if interrupted.transactional:
        how = (
            "That step is one transaction, so none of it was kept: run"
            f" `{migrate_command(data_dir)}` to finish the migration"
        )
    else:
        how = (
            "That step is more than one transaction: run"
            f" `{migrate_command(data_dir)}`, which undoes what it had done and runs it again"
        )
    return (
        f"data folder {data_dir} is half-migrated: a migration stopped before it finished"
        f" ({interrupted.describe()}). {how}."
    )


def _busy_message(data_dir: Path, interrupted: Interrupted | None) -> str:
    who = f" (process {interrupted.pid})" if interrupted is not None else ""
    return (
        f"data folder {data_dir} is being migrated by another Tidegate process{who}:"
        " wait for it to finish, then try again"
    )


def _locked_by_another(data_dir: Path) -> bool:
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the shared lock, if taken
    return False


@contextlib.contextmanager
def _folder_lock(data_dir: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the data folder itself (no lock file to leave behind)
    for as long as a migration runs."""
    fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SchemaError(_busy_message(data_dir, _read_marker(data_dir))) from None
        yield
    finally:
        os.close(fd)
