"""The outbound log's customer index: its tables, the ``CustomerIndexer`` that seals and
merges its runs on a thread of its own, and the reads a search by customer makes. The
tables and the code that writes and reads them change together (a new run layout means
a new ``HASH_PROBE``), so they are one module.

A customer ID says nothing about time and ``log_customers`` is in time order, so a
search by customer ID would scan all of it. The index maps ``hash(customer_id)`` to
where the customer's rows are, in sorted runs: each run is a table of (customer_hash,
time, customer_row, position, request_row) inserted ORDER BY customer_hash, so the zone
maps of its row groups cover narrow hash ranges and a lookup reads one row group per
run. ``customer_row`` is the rowid of the ``log_customers`` row, ``position`` its place
in the request, and ``request_row`` the rowid of the request in ``log_requests``: a
search fetches both by rowid. A request's customers are contiguous in ``log_customers``
(one writer appends each batch in one insert), so its first customers are at
``customer_row - position`` onwards. ``log_index_state.sealed_rows`` is the watermark:
every ``log_customers`` row whose rowid is below it is in exactly one run, and the rows
at or above it (the unsealed tail, small) are scanned. Rowids are the insertion order,
not the time order, so rows that arrive late (a restart writing the log outbox) are
indexed like any other. That holds, and the rowids in the runs stay valid, because
``log_customers`` and ``log_requests`` are append-only and only the store's writer
appends: retention deletes whole partitions, each with its own index, never rows.

The hash only narrows the search: a colliding customer's entries are candidates too, and
a request counts only once its ``log_customers`` row shows the customer (the rows the
list shows anyway).

A search (``customer_search``, which ``LogStore`` runs on a reader cursor) reads the index
state and the index of every partition it covers in one transaction, each step one
statement over all of them. ``customer_entries`` gives the customer's entries newest
first, a chunk of times at a time; ``requests_at_rows`` fetches by rowid the requests
they point at that pass the other filters; ``carried_customers`` keeps a request if the
customer row an entry points at is this customer's. Only the requests a page needs are
fetched.

The ``CustomerIndexer`` works on a connection of its own, so sorting a run never holds
up the store's writer. It seals the rows the writer committed into a new run once
``seal_rows`` of them have accumulated, and merges runs (tiered: ``fanout`` runs of one
size make one of the next), each in one transaction, so a search sees the old runs or
the new one, never neither. At start it indexes whatever is unsealed: a log written
before the index existed (or with an older index layout) is indexed in the background,
a run per ``pass_rows`` rows (14-23 s and 1.1 GB peak RSS for 25M customer rows), and
searches scan the unsealed rows meanwhile, so they are slower but still exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time as monotime
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import duckdb
import structlog

from engine.errors import TidegateError
from engine.outbound_log.partitions import Partition, PartitionSet
from engine.outbound_log.rows import LIST_CUSTOMERS, LogCustomer, from_micros
from engine.outbound_log.sql import REQUEST_COLUMNS, REQUEST_FIELD_INDEX

log = structlog.get_logger(__name__)

# A run is sealed once this many log_customers rows are unsealed (one row group: the
# tail every customer search scans stays about that small) ...
INDEX_SEAL_ROWS = 122_880
INDEX_FANOUT = 4  # ... and this many runs of one level are merged into one of the next
INDEX_PASS_ROWS = 4_000_000  # rows sorted at once while writing a run (bounds its memory)
INDEX_LOG_ROWS = 1_000_000  # runs at least this large are logged at info level
PROGRESS_INTERVAL = 5.0  # seconds between progress lines while a large run is written
RETRY_MAX_DELAY = 5.0  # seconds between attempts after an indexing error, at most
CANDIDATES_MAX = 4096  # candidate times a customer search takes from the index at once

INDEX_SCHEMA = """
CREATE TABLE IF NOT EXISTS log_index_state (
    sealed_rows BIGINT NOT NULL, hash_probe UBIGINT NOT NULL, next_run BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS log_index_runs (run BIGINT NOT NULL, entries BIGINT NOT NULL);
"""
# Another DuckDB version may hash differently; a changed probe value means rebuild.
HASH_PROBE = "hash('tidegate customer index v2')"  # v2: the run layout; bump on change
RUN_PREFIX = "log_cidx_"
RUN_COLUMNS = (
    "customer_hash UBIGINT NOT NULL, time TIMESTAMPTZ NOT NULL, customer_row BIGINT NOT NULL,"
    " position INTEGER NOT NULL, request_row BIGINT NOT NULL"
)
RUN_FIELDS = "customer_hash, time, customer_row, position, request_row"
# Index entries of log_customers rows from rowid {lo} to {hi}, the rowids of their
# requests found by (time, id) among the requests of that time span: a batch commits its
# requests and customers together, so each customer row's request is there.
TAIL_ENTRIES = """
SELECT hash(c.customer_id) AS customer_hash, c.time, c.rowid AS customer_row, c.position,
       r.rowid AS request_row
FROM log_customers c JOIN log_requests r ON r.time = c.time AND r.id = c.request_id
WHERE c.rowid >= {lo:d} AND c.rowid < {hi:d} AND r.time BETWEEN ? AND ?"""
LAST_SEALED_EXISTS = "SELECT count(*) FROM log_customers WHERE rowid = ?"


class IndexInterrupted(Exception):
    """The indexer is stopping (or ``should_stop`` said so); the run being written is
    rolled back."""


@dataclass(frozen=True)
class IndexState:
    sealed: int  # log_customers rows with a rowid below this are in the runs
    runs: tuple[tuple[int, int], ...]  # (run number, entries), oldest first
    next_run: int


def run_table(run: int) -> str:
    return f"{RUN_PREFIX}{run}"


def open_index(conn: duckdb.DuckDBPyConnection) -> str:
    """Creates the index tables, or checks them. An index this DuckDB cannot trust (its
    hash function differs, or runs are missing) is dropped and built again from scratch.
    Returns why it was dropped, or ""."""
    conn.execute(INDEX_SCHEMA)
    conn.begin()
    try:
        (probe,) = _one(conn, f"SELECT {HASH_PROBE}")
        state = conn.execute("SELECT sealed_rows, hash_probe, next_run FROM log_index_state")
        row = state.fetchone()
        runs = {r for (r,) in conn.execute("SELECT run FROM log_index_runs").fetchall()}
        tables = {
            name
            for (name,) in conn.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()"
                " AND schema_name = current_schema() AND starts_with(table_name, ?)",
                [RUN_PREFIX],
            ).fetchall()
        }
        reason = ""
        if row is None:
            reason = "new" if not runs else "no state"
        elif row[1] != probe:
            reason = "hash function changed"
        elif not {run_table(r) for r in runs} <= tables:
            reason = "runs missing"
        elif row[0] and not _one(conn, LAST_SEALED_EXISTS, [row[0] - 1])[0]:
            reason = "log_customers has fewer rows than were indexed"
        keep = set() if reason else {run_table(r) for r in runs}
        for name in sorted(tables - keep):
            conn.execute(f"DROP TABLE {name}")
        if reason:
            next_run = row[2] if row is not None else 1
            conn.execute("DELETE FROM log_index_runs")
            conn.execute("DELETE FROM log_index_state")
            conn.execute("INSERT INTO log_index_state VALUES (0, ?, ?)", [probe, next_run])
        conn.commit()
    except BaseException:
        _rollback(conn)
        raise
    return "" if reason == "new" else reason


def read_index(cur: duckdb.DuckDBPyConnection) -> IndexState:
    sealed, next_run = _one(cur, "SELECT sealed_rows, next_run FROM log_index_state")
    runs = cur.execute("SELECT run, entries FROM log_index_runs ORDER BY run").fetchall()
    return IndexState(sealed, tuple((run, entries) for run, entries in runs), next_run)


def unsealed_rows(cur: duckdb.DuckDBPyConnection, state: IndexState) -> tuple[int, int]:
    """(rows in the unsealed tail, the rowid after the last row)."""
    (last,) = _one(cur, "SELECT max(rowid) FROM log_customers WHERE rowid >= ?", [state.sealed])
    end = state.sealed if last is None else last + 1
    return end - state.sealed, end


def seal_tail(
    conn: duckdb.DuckDBPyConnection,
    min_rows: int,
    pass_rows: int,
    stop: Callable[[], bool],
    progress: Callable[[int, int], None],
) -> tuple[int, int]:
    """Writes the unsealed tail, its oldest ``pass_rows`` rows at most, as a new run if it
    has at least ``min_rows`` (and one) rows, in one transaction. Returns the number of
    rows sealed and the number left unsealed."""
    conn.begin()
    try:
        state = read_index(conn)
        unsealed, end = unsealed_rows(conn, state)
        if unsealed == 0 or unsealed < min_rows:
            conn.rollback()
            return 0, unsealed
        # At most one sort pass per run: the join below is not repeated per pass, and a
        # long tail (a log indexed for the first time) becomes several runs, then merges.
        end = min(end, state.sealed + max(pass_rows, 1))
        rows = end - state.sealed
        span = _one(
            conn,
            "SELECT epoch_us(min(time)), epoch_us(max(time)) FROM log_customers"
            " WHERE rowid >= ? AND rowid < ?",
            [state.sealed, end],
        )
        source = TAIL_ENTRIES.format(lo=state.sealed, hi=end)
        table = run_table(state.next_run)
        times = [from_micros(t) for t in span]
        write_run(conn, table, source, rows, pass_rows, stop, progress, times)
        conn.execute("INSERT INTO log_index_runs VALUES (?, ?)", [state.next_run, rows])
        conn.execute("UPDATE log_index_state SET sealed_rows = ?, next_run = next_run + 1", [end])
        conn.commit()
        return rows, unsealed - rows
    except BaseException:
        _rollback(conn)
        raise


def run_level(entries: int, seal_rows: int, fanout: int) -> int:
    """0 for runs below ``seal_rows * fanout`` entries, then one more per factor ``fanout``."""
    level, bound = 0, seal_rows * fanout
    while entries >= bound:
        level, bound = level + 1, bound * fanout
    return level


def merge_candidates(state: IndexState, seal_rows: int, fanout: int) -> list[int]:
    """The ``fanout`` oldest runs of the lowest level that has that many, or []."""
    levels: dict[int, list[int]] = {}
    for run, entries in state.runs:
        levels.setdefault(run_level(entries, seal_rows, fanout), []).append(run)
    for level in sorted(levels):
        if len(levels[level]) >= fanout:
            return levels[level][:fanout]
    return []


def merge_runs(
    conn: duckdb.DuckDBPyConnection,
    seal_rows: int,
    fanout: int,
    pass_rows: int,
    stop: Callable[[], bool],
    progress: Callable[[int, int], None],
) -> tuple[int, int]:
    """Merges one group of runs (see ``merge_candidates``) into a new run, in one
    transaction: readers see either the old runs or the new one. Returns (runs merged,
    entries), (0, 0) when no level is full."""
    conn.begin()
    try:
        state = read_index(conn)
        group = merge_candidates(state, seal_rows, fanout)
        if not group:
            conn.rollback()
            return 0, 0
        entries = sum(e for run, e in state.runs if run in group)
        source = " UNION ALL ".join(f"SELECT {RUN_FIELDS} FROM {run_table(run)}" for run in group)
        write_run(conn, run_table(state.next_run), source, entries, pass_rows, stop, progress)
        listed_runs = ", ".join(f"{run:d}" for run in group)
        conn.execute(f"DELETE FROM log_index_runs WHERE run IN ({listed_runs})")
        conn.execute("INSERT INTO log_index_runs VALUES (?, ?)", [state.next_run, entries])
        for run in group:
            conn.execute(f"DROP TABLE {run_table(run)}")
        conn.execute("UPDATE log_index_state SET next_run = next_run + 1")
        conn.commit()
        return len(group), entries
    except BaseException:
        _rollback(conn)
        raise


def write_run(
    conn: duckdb.DuckDBPyConnection,
    table: str,
    source: str,
    rows: int,
    pass_rows: int,
    stop: Callable[[], bool],
    progress: Callable[[int, int], None],
    params: list[Any] | None = None,
) -> None:
    """Creates ``table`` from ``source`` (``RUN_FIELDS``, with ``params``) sorted by hash.
    Each pass sorts one slice of the hash range, so at most about ``pass_rows`` rows are
    sorted at once; the slices are inserted in hash order, so the table is sorted as a
    whole."""
    conn.execute(f"CREATE TABLE {table} ({RUN_COLUMNS})")
    passes = max(1, -(-rows // max(pass_rows, 1)))
    step = 2**64 // passes
    progress(0, passes)
    for i in range(passes):
        if stop():
            raise IndexInterrupted
        where = ""
        if passes > 1:
            low, high = i * step, 2**64 - 1 if i == passes - 1 else (i + 1) * step - 1
            where = f" WHERE customer_hash BETWEEN {low:d}::UBIGINT AND {high:d}::UBIGINT"
        conn.execute(
            f"INSERT INTO {table} SELECT {RUN_FIELDS} FROM ({source}){where}"
            " ORDER BY customer_hash, time, customer_row",
            params or [],
        )
        progress(i + 1, passes)


Entry = tuple[int, int, int, int, int]
"""An index entry of a search: (time in epoch microseconds, partition number, customer
row, position, request row); the partition number is the place of its catalog in the
search's list."""
Found = tuple[tuple[Any, ...], tuple[LogCustomer, ...]]
"""A request record and the customers a list shows with it."""


def customer_search(
    cur: duckdb.DuckDBPyConnection,
    catalogs: list[str],
    customer_id: str,
    where: str,
    params: list[Any],
    bounds: list[tuple[str, datetime]],
    size: int,
) -> list[Found]:
    """Up to ``size + 1`` requests carrying the customer that satisfy ``where`` (SQL on
    ``log_requests r``), newest first, across the partitions whose DuckDB catalogs are
    ``catalogs``. Each step is one statement over all of them (a union of their runs and
    tails), so a search costs about the same in one partition or fifteen. Reads in one
    transaction: each partition's watermark, runs and tail agree."""
    found: list[Found] = []
    cur.begin()
    try:
        states = read_indexes(cur, catalogs)
        before: int | None = None
        chunk = size + 1
        while len(found) <= size:
            candidates = customer_entries(cur, catalogs, states, customer_id, bounds, before, chunk)
            entries: dict[tuple[int, int], list[tuple[int, int]]] = {}
            for _time, part, customer_row, position, request_row in candidates:
                entries.setdefault((part, request_row), []).append((customer_row, position))
            recs = requests_at_rows(cur, catalogs, list(entries), where, params)
            while recs and len(found) <= size:
                batch, recs = recs[: size + 1 - len(found)], recs[size + 1 - len(found) :]
                found += carried_customers(cur, catalogs, batch, entries, customer_id)
            times = len({entry[0] for entry in candidates})
            if times < chunk:
                break
            before, chunk = candidates[-1][0], min(chunk * 4, CANDIDATES_MAX)
    finally:
        _rollback(cur)  # read only: nothing to commit
    return found


def read_indexes(
    cur: duckdb.DuckDBPyConnection, catalogs: list[str]
) -> list[tuple[IndexState, int]]:
    """The index state of each partition, in the order of ``catalogs``, with the number of
    its ``log_customers`` rows (two statements). A partition whose rows are all sealed
    (every partition but the one being written, once the indexer caught up) has no tail
    to search: its count, read from DuckDB's row-group metadata, says so for less than
    the join a tail branch costs even when empty."""
    if not catalogs:
        return []
    states = {
        part: (sealed, rows)
        for part, sealed, rows in cur.execute(
            " UNION ALL ".join(
                f"SELECT {part} AS part, sealed_rows,"
                f" (SELECT count(*) FROM {catalog}.log_customers)"
                f" FROM {catalog}.log_index_state"
                for part, catalog in enumerate(catalogs)
            )
        ).fetchall()
    }
    runs: dict[int, list[tuple[int, int]]] = {}
    for part, run, entries in cur.execute(
        " UNION ALL ".join(
            f"SELECT {part} AS part, run, entries FROM {catalog}.log_index_runs"
            for part, catalog in enumerate(catalogs)
        )
        + " ORDER BY part, run"
    ).fetchall():
        runs.setdefault(part, []).append((run, entries))
    return [
        (IndexState(states[part][0], tuple(runs.get(part, ())), 0), states[part][1])
        for part in range(len(catalogs))
    ]


def customer_entries(
    cur: duckdb.DuckDBPyConnection,
    catalogs: list[str],
    states: list[tuple[IndexState, int]],
    customer_id: str,
    bounds: list[tuple[str, datetime]],
    before: int | None,
    limit: int,
) -> list[Entry]:
    """The index entries at up to ``limit`` distinct times, newest first and before
    ``before`` when given, that may be the customer's: every request carrying it has an
    entry. Entries of one time are ordered by partition, request, then position."""
    branches: list[str] = []
    params: list[Any] = []
    for part, (catalog, (state, rows)) in enumerate(zip(catalogs, states, strict=True)):
        for run, _ in state.runs:
            branches.append(
                f"SELECT {part} AS part, time, customer_row, position, request_row"
                f" FROM {catalog}.{run_table(run)} WHERE customer_hash = hash(?::VARCHAR)"
            )
            params.append(customer_id)
        if rows <= state.sealed:
            continue  # no tail
        branches.append(
            f"SELECT {part} AS part, c.time AS time, c.rowid AS customer_row,"
            " c.position AS position, r.rowid AS request_row"
            f" FROM {catalog}.log_customers c JOIN {catalog}.log_requests r"
            " ON r.time = c.time AND r.id = c.request_id"
            " WHERE c.rowid >= ? AND c.customer_id = ?"
        )
        params += [state.sealed, customer_id]
    if not branches:
        return []
    conds = [f"time {op} ?" for op, _ in bounds]
    params += [value for _, value in bounds]
    if before is not None:
        conds.append("time < ?")
        params.append(from_micros(before))
    found: list[Entry] = cur.execute(
        "SELECT epoch_us(time) AS t, part, customer_row, position, request_row"
        f" FROM ({' UNION ALL '.join(branches)}) WHERE {' AND '.join(conds) or 'TRUE'}"
        " QUALIFY dense_rank() OVER (ORDER BY t DESC) <= ?"
        " ORDER BY t DESC, part, request_row, position",
        [*params, limit],
    ).fetchall()
    return found


def requests_at_rows(
    cur: duckdb.DuckDBPyConnection,
    catalogs: list[str],
    rows: list[tuple[int, int]],
    where: str,
    params: list[Any],
) -> list[tuple[tuple[int, int], tuple[Any, ...]]]:
    """((partition, rowid), record) of the ``log_requests`` rows at these places that
    satisfy ``where``, newest first."""
    by_part: dict[int, list[int]] = {}
    for part, row in rows:
        by_part.setdefault(part, []).append(row)
    if not by_part:
        return []
    branches = [
        f"SELECT {part} AS part, r.rowid AS row, {REQUEST_COLUMNS}"
        f" FROM {catalogs[part]}.log_requests r"
        f" WHERE r.rowid IN (SELECT unnest(?::BIGINT[])) AND {where}"
        for part in by_part
    ]
    values: list[Any] = []
    for part_rows in by_part.values():
        values += [part_rows, *params]
    # Columns 3 and 4 are the request's time and id (REQUEST_COLUMNS begins with them).
    found = cur.execute(
        f"SELECT * FROM ({' UNION ALL '.join(branches)}) ORDER BY 3 DESC, 4 DESC", values
    ).fetchall()
    return [((rec[0], rec[1]), rec[2:]) for rec in found]


def carried_customers(
    cur: duckdb.DuckDBPyConnection,
    catalogs: list[str],
    requests: list[tuple[tuple[int, int], tuple[Any, ...]]],
    entries: dict[tuple[int, int], list[tuple[int, int]]],
    customer_id: str,
) -> list[Found]:
    """The ``requests`` ((partition, rowid), record) that carry the customer, each with
    its customers as a list shows them: the customer's own rows first, then the others in
    request order, ``LIST_CUSTOMERS`` at most. ``entries`` maps a request's place to its
    index entries (customer_row, position), by position: an entry whose row names another
    customer (a hash collision) is not the customer's."""
    count = REQUEST_FIELD_INDEX["customer_count"]
    wanted: dict[int, set[int]] = {}
    for (part, request_row), rec in requests:
        own = entries[(part, request_row)]
        first = own[0][0] - own[0][1]
        rows = wanted.setdefault(part, set())
        rows.update(range(first, first + min(rec[count], LIST_CUSTOMERS)))
        rows.update(row for row, _ in own)
    branches = [
        f"SELECT {part} AS part, rowid AS row, customer_id, name, outcome, error, position"
        f" FROM {catalogs[part]}.log_customers WHERE rowid IN (SELECT unnest(?::BIGINT[]))"
        for part in wanted
    ]
    fetched = cur.execute(
        " UNION ALL ".join(branches), [sorted(rows) for rows in wanted.values()]
    ).fetchall()
    stored = {(rec[0], rec[1]): (LogCustomer(*rec[2:6]), rec[6]) for rec in fetched}
    found: list[Found] = []
    for (part, request_row), rec in requests:
        own = entries[(part, request_row)]
        mine = [
            row
            for row, position in own
            if (part, row) in stored
            and stored[(part, row)][1] == position
            and stored[(part, row)][0].customer_id == customer_id
        ]
        if not mine:
            continue
        first = mine[0] - stored[(part, mine[0])][1]
        others = []
        for k in range(min(rec[count], LIST_CUSTOMERS)):
            customer, position = stored.get((part, first + k), (None, -1))
            if customer is None or position != k:  # past the request's stored customers
                break
            if first + k not in mine:
                others.append(customer)
        shown = [stored[(part, row)][0] for row in mine] + others
        found.append((rec, tuple(shown[:LIST_CUSTOMERS])))
    return found


class CustomerIndexer:
    """Keeps the customer index of every partition up to date on a thread and a cursor of
    its own, so that sorting a run never holds up the store's writer.

    The store calls ``prepare`` for each partition it attaches (through its
    ``PartitionSet``), ``open`` with its connection and partitions before it starts,
    ``start`` on the event loop, ``notify`` from its writer after each commit to a
    partition, and ``close`` at the end. Between ``start`` and ``close``, ``indexed``
    waits for the index to cover every committed row.

    ``should_stop``, if given, is asked before each sort pass of a run, as well as whether
    ``close`` was called: a true answer abandons the run (rolled back; the rows are sealed
    again later). Tests pass one to pace the passes or to count them.
    """

    def __init__(
        self,
        *,
        seal_rows: int = INDEX_SEAL_ROWS,
        fanout: int = INDEX_FANOUT,
        pass_rows: int = INDEX_PASS_ROWS,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self._seal_rows = max(seal_rows, 1)
        self._fanout = max(fanout, 2)
        self._pass_rows = max(pass_rows, 1)
        self._should_stop = should_stop
        self._conn: duckdb.DuckDBPyConnection | None = None
        self._partitions: PartitionSet | None = None
        self._thread: threading.Thread | None = None
        # _cond guards the fields below it.
        self._cond = threading.Condition()
        self._new_rows: dict[str, int] = {}  # per partition: rows committed since looked at
        self._waiters: list[asyncio.Future[None]] = []
        self._stop = False

    @staticmethod
    def prepare(cur: duckdb.DuckDBPyConnection, partition: Partition) -> None:
        """Creates a partition's index tables on ``cur`` (which uses it), or checks them
        and drops an index this DuckDB cannot trust (see ``open_index``)."""
        dropped = open_index(cur)
        if dropped:
            log.warning("log_customer_index_dropped", partition=partition.name, reason=dropped)

    def open(self, conn: duckdb.DuckDBPyConnection, partitions: PartitionSet) -> None:
        """Takes a cursor of ``conn`` for the indexer thread."""
        self._conn = conn.cursor()
        self._partitions = partitions

    def start(self) -> None:
        assert self._conn is not None and self._partitions is not None, "open() first"
        # A partition's tail may hold rows written before there was an index, or before the
        # last close: the indexer looks at every partition at once.
        with self._cond:
            for partition in self._partitions.all():
                self._new_rows[partition.name] = self._seal_rows
        self._thread = threading.Thread(target=self._run, name="tidegate-logindex", daemon=True)
        self._thread.start()

    def notify(self, partition: str, customer_rows: int) -> None:
        """Called by the store's writer: ``customer_rows`` more rows are committed to
        ``partition``."""
        with self._cond:
            rows = self._new_rows.get(partition, 0) + customer_rows
            self._new_rows[partition] = rows
            if rows >= self._seal_rows:
                self._cond.notify()

    async def indexed(self) -> None:
        """Returns once every row committed before the call is in a sealed run, with
        merges done."""
        with self._cond:
            if self._thread is None or self._stop:
                raise TidegateError("log store is not running")
            done = asyncio.get_running_loop().create_future()
            self._waiters.append(done)
            self._cond.notify()
        await done

    def stop(self) -> None:
        """Tells the thread to stop without waiting for it: a run being written is
        interrupted and rolled back, and the next start seals those rows again."""
        with self._cond:
            if self._stop:
                return
            self._stop = True
            self._cond.notify()
        if self._conn is not None:
            self._conn.interrupt()

    async def close(self) -> None:
        """Stops the thread and waits for it, fails the ``indexed`` calls still waiting
        and closes the indexer's cursor."""
        self.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        with self._cond:
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(TidegateError("log store closed"))
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.to_thread(conn.close)

    def _due(self) -> list[str]:
        return [name for name, rows in self._new_rows.items() if rows >= self._seal_rows]

    def _run(self) -> None:
        delay = 0.1
        while True:
            with self._cond:
                while not self._stop and not self._waiters and not self._due():
                    self._cond.wait()
                if self._stop:
                    return
                waiters, self._waiters = self._waiters, []
                force = bool(waiters)
                names = self._due()
                for name in names:
                    self._new_rows.pop(name, None)
            if force:  # indexed() waits: every partition's tail, whatever its size
                assert self._partitions is not None
                names = [p.name for p in self._partitions.all()]
            try:
                for name in names:
                    self._work_on(name, force=force)
            except Exception as exc:  # the index is only an accelerator: keep the thread
                with self._cond:
                    self._waiters[:0] = waiters  # close() fails them if it stops us
                    if self._stop:
                        return
                if isinstance(exc, duckdb.Error):
                    log.error("log_customer_index_failed", error=str(exc))
                else:
                    log.exception("log_customer_index_failed")
                with self._cond:
                    for name in names:  # try again
                        self._new_rows[name] = max(self._new_rows.get(name, 0), self._seal_rows)
                    self._cond.wait(delay)
                delay = min(delay * 2, RETRY_MAX_DELAY)
                continue
            delay = 0.1
            for waiter in waiters:
                _resolve_soon(waiter)

    def _stopping(self) -> bool:
        """Asked before each sort pass: abandon the run being written?"""
        should_stop = self._should_stop
        return (should_stop is not None and should_stop()) or self._stop

    def _work_on(self, name: str, *, force: bool) -> None:
        """``_work`` on partition ``name``, held so a drop waits (gone: nothing to do)."""
        conn, partitions = self._conn, self._partitions
        assert conn is not None and partitions is not None
        with partitions.taking(name) as partition:
            if partition is None:
                return
            with partitions.writing(partition):  # a backup's copy waits for the runs
                conn.execute(f"USE {name}")
                try:
                    self._work(force=force)
                finally:
                    conn.execute("USE memory")

    def _work(self, *, force: bool) -> None:
        """Seals the tail of the partition in use (any size if ``force``; a run holds at
        most ``pass_rows`` rows, so a long tail takes several), then merges until no level
        is full."""
        conn = self._conn
        assert conn is not None
        sealed = 0
        while True:
            started = monotime.monotonic()
            progress = _Progress("log_customer_index_sealing")
            rows, left = seal_tail(
                conn,
                1 if force else self._seal_rows,
                self._pass_rows,
                self._stopping,
                progress,
            )
            if not rows:
                break
            sealed += rows
            progress.done(rows, started)
            if sealed > rows or left:  # a long tail, sealed run by run
                log.info("log_customer_index_sealing", rows_done=sealed, rows_left=left)
        while True:
            started = monotime.monotonic()
            progress = _Progress("log_customer_index_merging")
            runs, entries = merge_runs(
                conn,
                self._seal_rows,
                self._fanout,
                self._pass_rows,
                self._stopping,
                progress,
            )
            if not runs:
                return
            progress.done(entries, started, merged_runs=runs)


class _Progress:
    """Logs a run written in several passes (a large one) when it starts, every
    ``PROGRESS_INTERVAL`` seconds and at the end."""

    def __init__(self, event: str) -> None:
        self.event = event
        self.large = False
        self.logged = 0.0

    def __call__(self, done: int, passes: int) -> None:
        now = monotime.monotonic()
        if passes > 1 and (done in (0, passes) or now - self.logged >= PROGRESS_INTERVAL):
            self.large, self.logged = True, now
            log.info(self.event, passes_done=done, passes=passes)

    def done(self, rows: int, started: float, **fields: Any) -> None:
        large = self.large or rows >= INDEX_LOG_ROWS
        (log.info if large else log.debug)(
            "log_customer_index_run_written",
            rows=rows,
            seconds=round(monotime.monotonic() - started, 2),
            **fields,
        )


def _resolve_soon(future: asyncio.Future[None]) -> None:
    """Resolves ``future`` on its event loop (from the indexer thread)."""
    try:
        future.get_loop().call_soon_threadsafe(_resolve, future)
    except RuntimeError:  # the loop is gone: nobody is left to tell
        pass


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _one(
    cur: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None
) -> tuple[Any, ...]:
    row = cur.execute(sql, params or []).fetchone()
    assert row is not None, sql
    return row


def _rollback(conn: duckdb.DuckDBPyConnection) -> None:
    with contextlib.suppress(duckdb.Error):  # keep the original error, not the rollback's
        conn.rollback()
