"""How outbound-log rows are stored and searched in DuckDB: the schema, the Arrow
tables a batch is written as, the SQL a query becomes, and page tokens."""

from __future__ import annotations

import base64
import builtins
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from engine.errors import InvalidInputError
from engine.logrows import (
    ID_TIME_SLACK,
    LIST_CUSTOMERS,
    LogCustomer,
    LogQuery,
    LogRow,
    from_micros,
)

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


def where_clause(
    query: LogQuery, after: tuple[datetime, str] | None
) -> tuple[str, builtins.list[Any]]:
    """SQL conditions on ``log_requests r`` equivalent to ``query.matches``."""
    bounds: builtins.list[tuple[str, datetime]] = []
    if query.start_time is not None:
        bounds.append((">=", query.start_time))
    if query.end_time is not None:
        bounds.append(("<", query.end_time))
    if after is not None:
        bounds.append(("<=", after[0]))  # lets zone maps prune; the tuple test below decides
    conds: builtins.list[str] = []
    params: builtins.list[Any] = []
    if query.identifier:
        window = id_window(query.identifier)
        if window is None:
            return "FALSE", []
        bounds += [(">=", window[0]), ("<=", window[1])]
        conds.append("r.id = ?")
        params.append(query.identifier)

    # Customer subqueries get the same time bounds, so they prune log_customers too.
    def within(alias: str) -> tuple[builtins.list[str], builtins.list[Any]]:
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
        params.append(builtins.list(query.status_codes))
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
    cur: duckdb.DuckDBPyConnection, recs: builtins.list[tuple[Any, ...]], customer_id: str
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
    customers: dict[str, builtins.list[LogCustomer]] = {}
    for request_id, *fields, _rank in found:
        customers.setdefault(request_id, []).append(LogCustomer(*fields))
    return {request_id: tuple(carried) for request_id, carried in customers.items()}


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


def arrow_tables(rows: builtins.list[LogRow]) -> dict[str, pa.Table]:
    """One Arrow table per log table; pyarrow converts any tz-aware time to UTC."""
    bodies = [
        (r.id, r.time, r.request_body, r.response_body)
        for r in rows
        if r.request_body or r.response_body  # most successful requests need no body row
    ]
    customers = [
        (r.time, r.id, i, c.customer_id, c.name, c.outcome, c.error)
        for r in rows
        for i, c in enumerate(r.customers)
    ]
    requests = [tuple(getattr(r, name) for name in REQUEST_FIELDS) for r in rows]
    return {
        # error_text: the request's and its customers' errors, lowercased, in one column,
        # so an error search is one scan of log_requests, not a join with log_customers.
        "log_requests": arrow_table(REQUEST_FIELDS, requests).append_column(
            "error_text", pa.array([error_text(r) for r in rows], pa.string())
        ),
        "log_bodies": arrow_table(BODY_FIELDS, bodies),
        "log_customers": arrow_table(CUSTOMER_FIELDS, customers),
    }


def error_text(row: LogRow) -> str:
    errors = dict.fromkeys([row.error, *(c.error for c in row.customers)])
    return "\n".join(e for e in errors if e).lower()


def arrow_table(fields: dict[str, pa.DataType], records: Sequence[tuple[Any, ...]]) -> pa.Table:
    columns = zip(*records, strict=True) if records else [()] * len(fields)
    arrays = [pa.array(col, kind) for kind, col in zip(fields.values(), columns, strict=True)]
    return pa.table(arrays, names=builtins.list(fields))


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


def encode_token(micros: int, request_id: str) -> str:
    raw = orjson.dumps({"time": micros, "id": request_id})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> tuple[datetime, str]:
    try:
        data = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        micros, request_id = data["time"], data["id"]
        if type(micros) is not int or type(request_id) is not str:
            raise TypeError("malformed token")
        return from_micros(micros), request_id
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise InvalidInputError(
            "page_token", "is not a next_page_token from a previous ListLogs response"
        ) from exc
