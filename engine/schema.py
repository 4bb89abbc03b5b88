"""Schema versions and migration steps: what each store's ``migrations`` module declares
and ``engine.upgrade`` runs.

Each store of a data folder records the version of its schema: the SQLite state in
``PRAGMA user_version``, the DuckDB outbound log in a table of its own. Both keep a
``schema_history`` (version, the Tidegate that recorded it, when, what), so a Tidegate
that finds a newer schema can say which release wrote it. Tidegate 0.1.0 recorded no
version: a store without one that has 0.1.0's tables is version 1, *unrecorded*, and
its first step records it.

A store's ``migrations`` module lists its ``Step``\\ s in order, step *n* bringing
version *n - 1* to *n*. A step is one transaction (``apply``), committed together with
the stamp of its version, or more than one (``run``, stamped afterwards), which must
come with an ``undo`` that puts the store back as it was before the step, so that an
interrupted run can be finished: ``engine.upgrade`` brackets every step with the
``MIGRATING`` marker and, after an interruption, undoes the step and runs it again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from engine.errors import TidegateError

UNRECORDED_RELEASE = "0.1.0"
"""The release whose data folders carry no schema version (their schema is version 1)."""


class SchemaError(TidegateError):
    """A data folder this Tidegate cannot use as it is: a schema from a newer release, a
    migration that is pending or was interrupted, or files that are not Tidegate's. The
    message names the versions and what to do; the folder was not changed."""


@dataclass(frozen=True)
class Found:
    """What a store's file holds: ``version`` 0 means no store yet (no file, or no
    tables); ``recorded`` is False for Tidegate 0.1.0's schema, which recorded no
    version; ``written_by`` is the Tidegate that recorded the newest version, if known."""

    version: int
    recorded: bool = True
    written_by: str = ""

    @property
    def label(self) -> str:
        if not self.recorded:
            return f"{self.version} (Tidegate {UNRECORDED_RELEASE}, not recorded)"
        return str(self.version)


@dataclass(frozen=True)
class StepContext:
    """What a step of several transactions works on."""

    data_dir: Path
    path: Path
    """The store's file."""


@dataclass(frozen=True)
class Step:
    """Brings a store from version ``to - 1`` (for ``to`` 1: the unrecorded 0.1.0
    schema) to ``to``. ``what`` says what it changes, in one line (logs, dry runs).

    Exactly one of ``apply`` (given the store's connection, inside the transaction that
    also stamps ``to``) and ``run`` (more than one transaction; the stamp follows in a
    transaction of its own, and ``undo`` must be able to put back the store as it was
    before ``run`` started, from any point ``run`` reached)."""

    to: int
    what: str
    apply: Callable[[Any], None] | None = None
    run: Callable[[StepContext], None] | None = None
    undo: Callable[[StepContext], None] | None = None

    def __post_init__(self) -> None:
        if (self.apply is None) == (self.run is None):
            raise ValueError(f"step {self.to}: give exactly one of apply and run")
        if self.run is not None and self.undo is None:
            raise ValueError(f"step {self.to}: a step of several transactions needs undo")

    @property
    def transactional(self) -> bool:
        """One transaction: an interruption leaves the store as it was before the step."""
        return self.apply is not None


class SchemaStore(Protocol):
    """One store of a data folder, as ``engine.upgrade`` migrates it."""

    @property
    def name(self) -> str:
        """What a person calls it: "state database", "outbound log"."""

    @property
    def file(self) -> str:
        """Its file's name in the data folder."""

    @property
    def current(self) -> int:
        """The version this Tidegate's code reads and writes."""

    @property
    def steps(self) -> Sequence[Step]:
        """Every step, in order: ``steps[i].to == i + 1``."""

    def inspect(self, path: Path) -> Found:
        """The store's version, read without writing anything (no file: version 0).
        Raises ``SchemaError`` for a file that is not this store's."""

    def apply(self, path: Path, step: Step) -> None:
        """Runs a transactional step and stamps its version, in one transaction."""

    def stamp(self, path: Path, step: Step) -> None:
        """Records ``step.to`` after a step of several transactions has run."""


def pending_steps(steps: Sequence[Step], found: Found) -> list[Step]:
    """The steps that bring a store at ``found`` to the last version (none for a new
    store, which is created at the current version)."""
    if found.version == 0:
        return []
    done = found.version if found.recorded else found.version - 1
    return [step for step in steps if step.to > done]


def check_steps(steps: Sequence[Step], current: int) -> None:
    """Fails at import time when a store's steps do not run 1, 2, ... ``current``."""
    numbers = [step.to for step in steps]
    if numbers != list(range(1, current + 1)):
        raise AssertionError(f"steps {numbers} do not lead from 1 to {current}")


def newer_message(data_dir: Path, name: str, file: str, found: Found, current: int) -> str:
    release = f">= {found.written_by}" if found.written_by else "of the release that wrote it"
    return (
        f"data folder {data_dir}: the {name} ({file}) has schema {found.version}, newer"
        f" than this Tidegate's {current}: use Tidegate {release}, or restore a backup of"
        " the folder made before it was upgraded"
    )


def migrate_command(data_dir: Path) -> str:
    return f"tidegate migrate --data-dir {data_dir}"


def older_message(data_dir: Path, name: str, file: str, found: Found, current: int) -> str:
    has = f"has schema {found.version}"
    if not found.recorded:
        has = f"is Tidegate {UNRECORDED_RELEASE}'s (schema {found.version}, not recorded yet)"
    return (
        f"data folder {data_dir}: the {name} ({file}) {has} and this Tidegate needs schema"
        f" {current}: run `{migrate_command(data_dir)}` first"
    )


def check_current(data_dir: Path, name: str, file: str, found: Found, current: int) -> None:
    """Raises ``SchemaError`` unless ``found`` is the recorded ``current`` version."""
    if found.version > current:
        raise SchemaError(newer_message(data_dir, name, file, found, current))
    if found.version != current or not found.recorded:
        raise SchemaError(older_message(data_dir, name, file, found, current))


def not_tidegate_message(data_dir: Path, name: str, file: str, tables: Sequence[str]) -> str:
    shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
    return (
        f"data folder {data_dir}: {file} has tables ({shown}) but no schema version, and"
        f" not those of Tidegate {UNRECORDED_RELEASE}'s {name}: is {data_dir} a Tidegate"
        " data folder?"
    )


def expect_before(found: Found, step: Step, path: Path) -> None:
    """Raises ``SchemaError`` unless the store is where ``step`` starts (the upgrade holds
    the folder lock, so anything else means the folder changed under it)."""
    before = Found(1, recorded=False) if step.to == 1 else Found(step.to - 1)
    if (found.version, found.recorded) != (before.version, before.recorded):
        raise SchemaError(
            f"{path}: expected schema {before.label} before step {step.to}, found"
            f" {found.label}: another process changed the data folder during the migration"
        )
