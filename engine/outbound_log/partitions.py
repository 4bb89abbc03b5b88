"""Time partitions of the outbound log: one DuckDB file per week, all attached to one
DuckDB instance, so that retention drops old rows by deleting whole files.

A row goes to the partition of the week (Monday 00:00 UTC onwards) its time falls in:
``outbound-log/2026-11-30.duckdb``, attached as ``log_20261130``. Each partition holds
the log tables and a customer index of its own, so dropping one leaves nothing to fix in
the others. A log written before partitions (one ``outbound-log.duckdb``) is adopted
whole as ``outbound-log/adopted.duckdb``; its time range is read from its rows, new rows
never go into it, and retention drops it once its newest row has passed the period.

Deleting a file must never pull it from under a reader: readers, the indexer and the
writer take partitions with ``using``/``taking``, which count their users, and ``drop``
hides a partition from new users, waits for the current ones, then detaches it, renames
the file to ``*.dropping`` and deletes it. A kill at any point of a drop leaves either
the partition whole or a ``*.dropping`` file that the next ``open`` deletes.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import structlog

from engine.outbound_log.rows import from_micros
from engine.outbound_log.sql import SCHEMA

log = structlog.get_logger(__name__)

LOG_DIR = "outbound-log"
"""The partitions' folder in the data directory."""
SINGLE_FILE = "outbound-log.duckdb"
"""The whole log as releases before partitions kept it, in the data directory."""
ADOPTED_STEM = "adopted"
PARTITION_SPAN = timedelta(days=7)
FIRST_MONDAY = datetime(1970, 1, 5, tzinfo=UTC)
DROPPING = ".dropping"
_WEEK_FILE = re.compile(r"(\d{4})-(\d{2})-(\d{2})\.duckdb")


def week_of(moment: datetime) -> datetime:
    """The start of the partition ``moment`` falls in (a Monday, 00:00 UTC)."""
    weeks = (moment - FIRST_MONDAY) // PARTITION_SPAN
    return FIRST_MONDAY + weeks * PARTITION_SPAN


@dataclass
class Partition:
    """One attached partition. Rows in it have ``start <= time < end``."""

    name: str
    """The DuckDB alias (``USE`` it, or qualify tables with it)."""
    path: Path
    start: datetime
    end: datetime
    users: int = 0
    dropping: bool = False
    writers: int = 0
    """Write transactions in progress (the store's writer, the indexer)."""
    frozen: bool = False
    """A backup is copying the file: writes wait."""

    def size(self) -> int:
        """Bytes on disk: the file and its write-ahead log."""
        total = 0
        for path in (self.path, self.path.with_name(self.path.name + ".wal")):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total


Prepare = Callable[[duckdb.DuckDBPyConnection, "Partition"], None]
"""Creates or checks a partition's tables, on a cursor that ``USE``s it."""


class PartitionSet:
    """The partitions of one log folder, attached to ``conn``'s DuckDB instance.

    ``prepare`` runs for every partition attached (``open``) or created (``for_time``),
    on a cursor that uses it. Thread-safe; ``for_time`` is meant for the writer thread.
    """

    def __init__(self, conn: duckdb.DuckDBPyConnection, folder: Path, prepare: Prepare) -> None:
        self._conn = conn
        self.folder = folder
        self._prepare = prepare
        self._cond = threading.Condition()
        self._by_name: dict[str, Partition] = {}

    def open(self) -> None:
        """Deletes what an interrupted drop left, and attaches every partition file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in sorted(self.folder.glob(f"*{DROPPING}*")):
            log.warning("log_partition_drop_finished", file=leftover.name)
            leftover.unlink(missing_ok=True)
        for path in sorted(self.folder.glob("*.duckdb")):
            match = _WEEK_FILE.fullmatch(path.name)
            if match:
                year, month, day = map(int, match.groups())
                start = datetime(year, month, day, tzinfo=UTC)
                self._attach(path, f"log_{start:%Y%m%d}", start, start + PARTITION_SPAN)
            elif path.stem == ADOPTED_STEM:
                self._attach_adopted(path)
            else:
                log.warning("log_partition_ignored", file=path.name, reason="not a partition name")

    def all(self) -> list[Partition]:
        """Every partition not being dropped, newest first."""
        with self._cond:
            return self._ordered([p for p in self._by_name.values() if not p.dropping])

    def for_time(self, moment: datetime) -> Partition | None:
        """The partition a row of ``moment`` goes to, created and attached if new; None
        while that partition is being dropped (the row is past the retention period)."""
        start = week_of(moment)
        name = f"log_{start:%Y%m%d}"
        with self._cond:
            found = self._by_name.get(name)
            if found is not None:
                return None if found.dropping else found
        path = self.folder / f"{start:%Y-%m-%d}.duckdb"
        return self._attach(path, name, start, start + PARTITION_SPAN)

    @contextlib.contextmanager
    def using(
        self, low: datetime | None = None, high: datetime | None = None
    ) -> Iterator[list[Partition]]:
        """The partitions that may hold rows with ``low <= time <= high``, newest first,
        held for the ``with`` block (a drop waits for it)."""
        with self._cond:
            chosen = [
                p
                for p in self._by_name.values()
                if not p.dropping
                and (low is None or p.end > low)
                and (high is None or p.start <= high)
            ]
            for partition in chosen:
                partition.users += 1
        try:
            yield self._ordered(chosen)
        finally:
            self._release(chosen)

    @contextlib.contextmanager
    def taking(self, name: str) -> Iterator[Partition | None]:
        """The partition called ``name`` held for the block, or None if it is gone."""
        with self._cond:
            partition = self._by_name.get(name)
            if partition is None or partition.dropping:
                partition = None
            else:
                partition.users += 1
        try:
            yield partition
        finally:
            if partition is not None:
                self._release([partition])

    @contextlib.contextmanager
    def writing(self, partition: Partition) -> Iterator[None]:
        """Held around a write to ``partition``: waits while a backup copies it."""
        with self._cond:
            while partition.frozen:
                self._cond.wait()
            partition.writers += 1
        try:
            yield
        finally:
            with self._cond:
                partition.writers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def frozen(self, partition: Partition) -> Iterator[None]:
        """Held while a backup copies ``partition``: no write starts, and the writes in
        progress have finished."""
        with self._cond:
            while partition.frozen:
                self._cond.wait()
            partition.frozen = True
            while partition.writers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                partition.frozen = False
                self._cond.notify_all()

    def drop(self, partition: Partition) -> int:
        """Deletes ``partition`` once nobody uses it; returns the bytes freed."""
        with self._cond:
            if partition.dropping or self._by_name.get(partition.name) is not partition:
                return 0
            partition.dropping = True
            while partition.users:
                self._cond.wait()
        size = partition.size()
        self._conn.execute(f"DETACH {partition.name}")
        # A rename is atomic: a kill after it leaves a file the next open deletes.
        doomed = partition.path.with_name(partition.path.name + DROPPING)
        partition.path.rename(doomed)
        wal = partition.path.with_name(partition.path.name + ".wal")
        with contextlib.suppress(FileNotFoundError):
            wal.rename(wal.with_name(wal.name + DROPPING))
        for path in (wal.with_name(wal.name + DROPPING), doomed):
            path.unlink(missing_ok=True)
        with self._cond:
            del self._by_name[partition.name]
        log.info(
            "log_partition_dropped",
            partition=partition.name,
            start=partition.start.isoformat(),
            end=partition.end.isoformat(),
            bytes=size,
        )
        return size

    def size(self) -> int:
        """Bytes on disk of every partition."""
        return sum(p.size() for p in self.all())

    def _attach(self, path: Path, name: str, start: datetime, end: datetime) -> Partition:
        partition = Partition(name, path, start, end)
        self._conn.execute(f"ATTACH '{_quoted(path)}' AS {name}")
        try:
            with _using(self._conn, name) as cur:
                self._prepare(cur, partition)
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                self._conn.execute(f"DETACH {name}")
            raise
        with self._cond:
            self._by_name[name] = partition
        return partition

    def _attach_adopted(self, path: Path) -> None:
        name = f"log_{ADOPTED_STEM}"
        partition = self._attach(path, name, FIRST_MONDAY, FIRST_MONDAY)
        with _using(self._conn, name) as cur:
            low, high = cur.execute(
                "SELECT epoch_us(min(time)), epoch_us(max(time)) FROM log_requests"
            ).fetchone() or (None, None)
        if low is not None and high is not None:
            partition.start = from_micros(low)
            partition.end = from_micros(high) + timedelta(microseconds=1)

    def _release(self, partitions: list[Partition]) -> None:
        with self._cond:
            for partition in partitions:
                partition.users -= 1
            self._cond.notify_all()

    @staticmethod
    def _ordered(partitions: list[Partition]) -> list[Partition]:
        return sorted(partitions, key=lambda p: (p.end, p.start), reverse=True)


@contextlib.contextmanager
def _using(conn: duckdb.DuckDBPyConnection, name: str) -> Iterator[duckdb.DuckDBPyConnection]:
    cur = conn.cursor()
    try:
        cur.execute(f"USE {name}")
        yield cur
    finally:
        cur.close()


def _quoted(path: Path) -> str:
    return str(path).replace("'", "''")


def read_only(folder: Path) -> duckdb.DuckDBPyConnection:
    """A connection that sees every partition in ``folder`` as one log, read only: views
    ``log_requests``, ``log_customers`` and ``log_bodies`` over all of them. For tools and
    tests that read a log no engine has open (DuckDB lets one process open a file)."""
    conn = duckdb.connect(":memory:")
    names: list[str] = []
    for number, path in enumerate(sorted(folder.glob("*.duckdb"))):
        name = f"part_{number}"
        conn.execute(f"ATTACH '{_quoted(path)}' AS {name} (READ_ONLY)")
        names.append(name)
    if not names:
        conn.execute(SCHEMA)  # an empty log reads as empty tables
        return conn
    for table in ("log_requests", "log_customers", "log_bodies"):
        union = " UNION ALL ".join(f"SELECT * FROM {name}.{table}" for name in names)
        conn.execute(f"CREATE TEMP VIEW {table} AS {union}")
    return conn
