"""How outbound-log rows are stored and searched in DuckDB: the schema, the Arrow
tables a batch is written as, the SQL a query becomes, and the customer
rows a page shows. A search by customer goes through the customer index, which
``customer_index`` holds.

The tables, and why:

- ``log_requests`` holds the metadata that every list and filter scans. Bodies live in
  ``log_bodies`` so those scans stay small, and ``log_customers`` holds one slim row per
  customer per request. One full row per customer in a 1,000-customer batch would make
  DuckDB the bottleneck.
- There is no PRIMARY KEY or UNIQUE constraint. Rows arrive in time order, so the zone maps
  DuckDB keeps on ``time`` for each row group do the pruning. Request ids are UUIDv7, so a
  lookup by id gets a time window from the id itself and prunes the same way.

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

import uuid
from collections.abc import Sequence
from dataclasses import replace
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
    customer searches go through the customer index (``customer_index.customer_entries``)."""
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
    if query.tags:
        conds.append("r.tags <> '' AND list_has_any(string_split(r.tags, ','), ?::VARCHAR[])")
        params.append(list(query.tags))
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
    return joined_errors(row.error, [c.error for c in row.customers])


def joined_errors(error: str, customer_errors: Sequence[str]) -> str:
    """The ``error_text`` column: a request's and its customers' errors, lowercased."""
    errors = dict.fromkeys([error, *customer_errors])
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


def _grouped(found: list[tuple[Any, ...]]) -> dict[str, tuple[LogCustomer, ...]]:
    customers: dict[str, list[LogCustomer]] = {}
    for request_id, *fields, _rank in found:
        customers.setdefault(request_id, []).append(LogCustomer(*fields))
    return {request_id: tuple(carried) for request_id, carried in customers.items()}
