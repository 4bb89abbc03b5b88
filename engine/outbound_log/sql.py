"""How outbound-log rows are stored and searched in DuckDB: the schema, the Arrow
tables a batch is written as, the SQL a query becomes, and the customer
index (its tables, how runs are sealed and merged, and how a search reads it).

Two costs shape the SQL. A filter on ``time`` prunes row groups by their zone maps, but
DuckDB then scans the ``time`` column of each row group it keeps. Rows whose rowids are
known are fetched without that scan (``rowid IN (...)``), which is what a customer search
does: its index stores the rowids of the rows it points at. Pages of adjacent rows (no
filter, a status, a day) are read by time.

Log files are created in DuckDB's v1.2.0 storage format (``CONFIG``): from v1.3.0 on,
DuckDB stores strings as DICT_FSST, whose reader decodes the whole dictionary of a
segment (about 30,000 strings) to return any one row of it. Fetching 75 scattered
``log_customers`` rows measured 29.4 ms that way and 5.6 ms in the v1.2.0 format, whose
dictionary and FSST encodings read single rows; the file is 9% larger and full scans
(an error search) ran at the same speed. A file keeps the format it was created in.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from itertools import chain, repeat
from typing import Any

import duckdb
import pyarrow as pa

from engine.errors import InvalidInputError
from engine.outbound_log.rows import (
    ID_TIME_SLACK,
    LIST_CUSTOMERS,
    LogCustomer,
    LogQuery,
    LogRow,
    from_micros,
)

CONFIG: dict[str, str | bool | int | float | list[str]] = {
    "storage_compatibility_version": "v1.2.0",  # the format of new files (see above)
    # DuckDB keeps the blocks it reads in its buffer pool, by default up to 80% of RAM:
    # indexing a 10M-row log peaked at 1.5 GB RSS. With 1 GB it peaked at 1.1 GB, and
    # customer searches ran as fast; 512 MB made them 25% slower (blocks read again).
    "memory_limit": "1GB",
}


def connect(path: str, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """A connection to the log file at ``path`` (created in the v1.2.0 format if new)."""
    return duckdb.connect(path, read_only=read_only, config=CONFIG)


SCHEMA = """
CREATE TABLE IF NOT EXISTS log_requests (
    time TIMESTAMPTZ NOT NULL, id VARCHAR NOT NULL, connection_id VARCHAR NOT NULL,
    method VARCHAR NOT NULL, url VARCHAR NOT NULL, status_code INTEGER NOT NULL,
    response_time DOUBLE NOT NULL, error VARCHAR NOT NULL, customer_count INTEGER NOT NULL,
    mapping_version BIGINT NOT NULL, attempt INTEGER NOT NULL, ambiguous BOOLEAN NOT NULL,
    tags VARCHAR NOT NULL, error_text VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS log_bodies (
    id VARCHAR NOT NULL, time TIMESTAMPTZ NOT NULL,
    request_body VARCHAR NOT NULL, response_body VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS log_customers (
    time TIMESTAMPTZ NOT NULL, request_id VARCHAR NOT NULL, position INTEGER NOT NULL,
    customer_id VARCHAR NOT NULL, name VARCHAR NOT NULL, outcome VARCHAR NOT NULL,
    error VARCHAR NOT NULL);
"""
TIME_TYPE = pa.timestamp("us", tz="UTC")
# log_requests columns, named as LogRow fields, with their Arrow types.
REQUEST_FIELDS = {
    "time": TIME_TYPE, "id": pa.string(), "connection_id": pa.string(), "method": pa.string(),
    "url": pa.string(), "status_code": pa.int32(), "response_time": pa.float64(),
    "error": pa.string(), "customer_count": pa.int32(), "mapping_version": pa.int64(),
    "attempt": pa.int32(), "ambiguous": pa.bool_(), "tags": pa.string(),
}  # fmt: skip
CUSTOMER_FIELDS = {
    "time": TIME_TYPE, "request_id": pa.string(), "position": pa.int32(),
    "customer_id": pa.string(), "name": pa.string(), "outcome": pa.string(), "error": pa.string(),
}  # fmt: skip
BODY_FIELDS = {
    "id": pa.string(),
    "time": TIME_TYPE,
    "request_body": pa.string(),
    "response_body": pa.string(),
}
# epoch_us: fetching TIMESTAMPTZ as datetime would need pytz, and integers round-trip exactly.
REQUEST_COLUMNS = ", ".join(
    "epoch_us(r.time)" if name == "time" else f"r.{name}" for name in REQUEST_FIELDS
)
REQUEST_FIELD_INDEX = {name: i for i, name in enumerate(REQUEST_FIELDS)}  # in a record


def time_bounds(query: LogQuery, after: tuple[datetime, str] | None) -> list[tuple[str, datetime]]:
    """(operator, time) pairs every matching row's time satisfies: they let zone maps prune."""
    bounds: list[tuple[str, datetime]] = []
    if query.start_time is not None:
        bounds.append((">=", query.start_time))
    if query.end_time is not None:
        bounds.append(("<", query.end_time))
    if after is not None:
        bounds.append(("<=", after[0]))  # the (time, id) tuple test decides
    return bounds


def where_clause(query: LogQuery, after: tuple[datetime, str] | None) -> tuple[str, list[Any]]:
    """SQL conditions on ``log_requests r`` equivalent to ``query.matches``.

    A customer filter here is a subquery that scans ``log_customers``; ``LogStore`` uses
    it only together with an identifier, whose id window makes that scan small. Other
    customer searches go through the customer index (``customer_entries``)."""
    bounds = time_bounds(query, after)
    conds: list[str] = []
    params: list[Any] = []
    if query.identifier:
        window = id_window(query.identifier)
        if window is None:
            return "FALSE", []
        bounds += [(">=", window[0]), ("<=", window[1])]
        conds.append("r.id = ?")
        params.append(query.identifier)

    # Customer subqueries get the same time bounds, so they prune log_customers too.
    def within(alias: str) -> tuple[list[str], list[Any]]:
        return [f"{alias}.time {op} ?" for op, _ in bounds], [value for _, value in bounds]

    time_conds, time_params = within("r")
    conds += time_conds
    params += time_params
    if after is not None:
        conds.append("(r.time, r.id) < (?, ?)")
        params += after
    if query.connection_id:
        conds.append("r.connection_id = ?")
        params.append(query.connection_id)
    if query.status_codes:
        conds.append("list_contains(?::INTEGER[], r.status_code)")
        params.append(list(query.status_codes))
    if query.errors_only:
        conds.append("r.error <> ''")
    if query.customer_id:
        time_conds, time_params = within("c")
        subquery = " AND ".join(["c.customer_id = ?", *time_conds])
        conds.append(f"r.id IN (SELECT c.request_id FROM log_customers c WHERE {subquery})")
        params += [query.customer_id, *time_params]
    if query.error_contains:
        conds.append("r.error_text <> '' AND contains(r.error_text, ?)")
        params.append(query.error_contains.lower())
    return " AND ".join(conds) or "TRUE", params


def page_customers(
    cur: duckdb.DuckDBPyConnection, recs: list[tuple[Any, ...]], customer_id: str
) -> dict[str, tuple[LogCustomer, ...]]:
    if not recs:
        return {}
    # An IN list of constant times prunes row groups even when the page spans months.
    times = sorted({from_micros(rec[0]) for rec in recs})
    found = cur.execute(
        "SELECT request_id, customer_id, name, outcome, error, row_number() OVER"
        " (PARTITION BY request_id ORDER BY customer_id = ? DESC, position) AS rank"
        f" FROM log_customers WHERE time IN ({', '.join('?' * len(times))})"
        " AND request_id IN (SELECT unnest(?::VARCHAR[]))"
        " QUALIFY rank <= ? ORDER BY request_id, rank",
        [customer_id, *times, [rec[1] for rec in recs], LIST_CUSTOMERS],
    ).fetchall()
    return _grouped(found)


def listed(row: LogRow, customer_id: str) -> LogRow:
    """``row`` as lists and streams show it: no bodies, the filtered customer first."""
    customers = row.customers
    if customer_id:
        customers = tuple(c for c in customers if c.customer_id == customer_id) + tuple(
            c for c in customers if c.customer_id != customer_id
        )
    return replace(
        row,
        request_body="",
        response_body="",
        customers=customers[:LIST_CUSTOMERS],
        customer_count=row.customer_count,
    )


def row_from_record(
    rec: tuple[Any, ...], customers: tuple[LogCustomer, ...], bodies: tuple[str, str] = ("", "")
) -> LogRow:
    fields = dict(zip(REQUEST_FIELDS, rec, strict=True))
    fields["time"] = from_micros(fields["time"])
    request_body, response_body = bodies
    return LogRow(
        **fields, customers=customers, request_body=request_body, response_body=response_body
    )


def arrow_tables(rows: list[LogRow]) -> dict[str, pa.Table]:
    """One Arrow table per log table; pyarrow converts any tz-aware time to UTC."""
    bodies = [
        (r.id, r.time, r.request_body, r.response_body)
        for r in rows
        if r.request_body or r.response_body  # most successful requests need no body row
    ]
    requests = [tuple(getattr(r, name) for name in REQUEST_FIELDS) for r in rows]
    return {
        # error_text: the request's and its customers' errors, lowercased, in one column,
        # so an error search is one scan of log_requests, not a join with log_customers.
        "log_requests": arrow_table(REQUEST_FIELDS, requests).append_column(
            "error_text", pa.array([error_text(r) for r in rows], pa.string())
        ),
        "log_bodies": arrow_table(BODY_FIELDS, bodies),
        "log_customers": customer_table(rows),
    }


def customer_table(rows: Sequence[LogRow]) -> pa.Table:
    """``log_customers`` rows, built column by column: a request's time and id are
    converted once and repeated by Arrow, not once per customer in Python (a request
    carries up to 1,000 customers; per-customer tuples cost about 4 us each)."""
    counts = [len(r.customers) for r in rows]
    owner = pa.array(
        list(chain.from_iterable(repeat(i, n) for i, n in enumerate(counts))),
        pa.int32(),
    )
    customers = [c for r in rows for c in r.customers]
    columns = [
        pa.array([r.time for r in rows], TIME_TYPE).take(owner),
        pa.array([r.id for r in rows], pa.string()).take(owner),
        pa.array(list(chain.from_iterable(range(n) for n in counts)), pa.int32()),
        pa.array([c.customer_id for c in customers], pa.string()),
        pa.array([c.name for c in customers], pa.string()),
        pa.array([c.outcome for c in customers], pa.string()),
        pa.array([c.error for c in customers], pa.string()),
    ]
    return pa.table(columns, names=list(CUSTOMER_FIELDS))


def error_text(row: LogRow) -> str:
    errors = dict.fromkeys([row.error, *(c.error for c in row.customers)])
    return "\n".join(e for e in errors if e).lower()


def arrow_table(fields: dict[str, pa.DataType], records: Sequence[tuple[Any, ...]]) -> pa.Table:
    columns = zip(*records, strict=True) if records else [()] * len(fields)
    arrays = [pa.array(col, kind) for kind, col in zip(fields.values(), columns, strict=True)]
    return pa.table(arrays, names=list(fields))


def check_row(row: LogRow) -> None:
    if row.time.utcoffset() is None:
        raise InvalidInputError("time", "must be timezone-aware")
    window = id_window(row.id)
    if window is None or not window[0] <= row.time <= window[1]:
        raise InvalidInputError(
            "id", f"{row.id!r} is not a new_request_id() within {ID_TIME_SLACK} of the row's time"
        )


def check_query(query: LogQuery) -> None:
    for field in ("start_time", "end_time"):
        value = getattr(query, field)
        if value is not None and value.utcoffset() is None:
            raise InvalidInputError(field, "must be timezone-aware")


def id_window(request_id: str) -> tuple[datetime, datetime] | None:
    """The times a row with this id may have, or None if it is not a canonical UUIDv7."""
    try:
        parsed = uuid.UUID(request_id)
    except ValueError:
        return None
    if parsed.version != 7 or str(parsed) != request_id:
        return None
    stamped = from_micros((parsed.int >> 80) * 1000)
    return stamped - ID_TIME_SLACK, stamped + ID_TIME_SLACK + timedelta(milliseconds=1)


# --- the customer index -------------------------------------------------------------------
#
# ``log_customers`` is in time order, so a search by customer ID would scan all of it.
# The index maps ``hash(customer_id)`` to where the customer's rows are, in sorted runs:
# each run is a table of (customer_hash, time, customer_row, position, request_row)
# inserted ORDER BY customer_hash, so the zone maps of its row groups cover narrow hash
# ranges and a lookup reads one row group per run. ``customer_row`` is the rowid of the
# ``log_customers`` row, ``position`` its place in the request, and ``request_row`` the
# rowid of the request in ``log_requests``: a search fetches both by rowid. A request's
# customers are contiguous in ``log_customers`` (one writer appends each batch in one
# insert), so its first customers are at ``customer_row - position`` onwards.
# ``log_index_state.sealed_rows`` is the watermark: every ``log_customers`` row whose
# rowid is below it is in exactly one run, and the rows at or above it (the unsealed
# tail, small) are scanned. Rowids are the insertion order, not the time order, so rows
# that arrive late (a restart writing the log outbox) are indexed like any other. That
# holds, and the rowids in the runs stay valid, because ``log_customers`` and
# ``log_requests`` are append-only and only the store's writer appends: deleting rows
# (a retention policy, say) would have to rebuild the index.
#
# The hash only narrows the search: a colliding customer's entries are candidates too, and
# a request counts only once its ``log_customers`` row shows the customer (the rows the
# list shows anyway).

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
    """The store is closing; the run being written is rolled back."""


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


def customer_entries(
    cur: duckdb.DuckDBPyConnection,
    state: IndexState,
    customer_id: str,
    bounds: list[tuple[str, datetime]],
    before: int | None,
    limit: int,
) -> list[tuple[int, int, int, int]]:
    """The index entries (time in epoch microseconds, customer_row, position, request_row)
    at up to ``limit`` distinct times, newest first and before ``before`` when given, that
    may be the customer's: every request carrying it has an entry. Entries of one time are
    ordered by request, then position. Run it in the transaction that read ``state``."""
    branches = [
        f"SELECT {RUN_FIELDS} FROM {run_table(run)} WHERE customer_hash = hash(?::VARCHAR)"
        for run, _ in state.runs
    ]
    params: list[Any] = [customer_id] * len(branches)
    branches.append(
        "SELECT 0::UBIGINT AS customer_hash, c.time AS time, c.rowid AS customer_row,"
        " c.position AS position, r.rowid AS request_row FROM log_customers c"
        " JOIN log_requests r ON r.time = c.time AND r.id = c.request_id"
        " WHERE c.rowid >= ? AND c.customer_id = ?"
    )
    params += [state.sealed, customer_id]
    conds = [f"time {op} ?" for op, _ in bounds]
    params += [value for _, value in bounds]
    if before is not None:
        conds.append("time < ?")
        params.append(from_micros(before))
    found = cur.execute(
        "SELECT epoch_us(time) AS t, customer_row, position, request_row"
        f" FROM ({' UNION ALL '.join(branches)}) WHERE {' AND '.join(conds) or 'TRUE'}"
        " QUALIFY dense_rank() OVER (ORDER BY t DESC) <= ?"
        " ORDER BY t DESC, request_row, position",
        [*params, limit],
    ).fetchall()
    return found


def requests_at_rows(
    cur: duckdb.DuckDBPyConnection,
    rows: list[int],
    where: str,
    params: list[Any],
) -> list[tuple[int, tuple[Any, ...]]]:
    """(rowid, record) of the ``log_requests`` rows with these rowids that satisfy
    ``where``, newest first."""
    if not rows:
        return []
    found = cur.execute(
        f"SELECT r.rowid, {REQUEST_COLUMNS} FROM log_requests r"
        f" WHERE r.rowid IN (SELECT unnest(?::BIGINT[])) AND {where}"
        " ORDER BY r.time DESC, r.id DESC",
        [rows, *params],
    ).fetchall()
    return [(rec[0], rec[1:]) for rec in found]


def carried_customers(
    cur: duckdb.DuckDBPyConnection,
    requests: list[tuple[int, tuple[Any, ...]]],
    entries: dict[int, list[tuple[int, int]]],
    customer_id: str,
) -> list[tuple[tuple[Any, ...], tuple[LogCustomer, ...]]]:
    """The ``requests`` (rowid, record) that carry the customer, each with its customers as
    a list shows them: the customer's own rows first, then the others in request order,
    ``LIST_CUSTOMERS`` at most. ``entries`` maps a request's rowid to its index entries
    (customer_row, position), by position: an entry whose row names another customer (a
    hash collision) is not the customer's."""
    count = REQUEST_FIELD_INDEX["customer_count"]
    wanted: set[int] = set()
    for request_row, rec in requests:
        own = entries[request_row]
        first = own[0][0] - own[0][1]
        wanted.update(range(first, first + min(rec[count], LIST_CUSTOMERS)))
        wanted.update(row for row, _ in own)
    fetched = cur.execute(
        "SELECT rowid, customer_id, name, outcome, error, position FROM log_customers"
        " WHERE rowid IN (SELECT unnest(?::BIGINT[]))",
        [sorted(wanted)],
    ).fetchall()
    rows = {rec[0]: (LogCustomer(*rec[1:5]), rec[5]) for rec in fetched}
    found: list[tuple[tuple[Any, ...], tuple[LogCustomer, ...]]] = []
    for request_row, rec in requests:
        own = entries[request_row]
        mine = [
            row
            for row, position in own
            if row in rows and rows[row][1] == position and rows[row][0].customer_id == customer_id
        ]
        if not mine:
            continue
        first = mine[0] - rows[mine[0]][1]
        others = []
        for k in range(min(rec[count], LIST_CUSTOMERS)):
            customer, position = rows.get(first + k, (None, -1))
            if customer is None or position != k:  # past the request's stored customers
                break
            if first + k not in mine:
                others.append(customer)
        shown = [rows[row][0] for row in mine] + others
        found.append((rec, tuple(shown[:LIST_CUSTOMERS])))
    return found


def _grouped(found: list[tuple[Any, ...]]) -> dict[str, tuple[LogCustomer, ...]]:
    customers: dict[str, list[LogCustomer]] = {}
    for request_id, *fields, _rank in found:
        customers.setdefault(request_id, []).append(LogCustomer(*fields))
    return {request_id: tuple(carried) for request_id, carried in customers.items()}


def _one(
    cur: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None
) -> tuple[Any, ...]:
    row = cur.execute(sql, params or []).fetchone()
    assert row is not None, sql
    return row


def _rollback(conn: duckdb.DuckDBPyConnection) -> None:
    with contextlib.suppress(duckdb.Error):  # keep the original error, not the rollback's
        conn.rollback()
