"""The outbound log: one row per outbound HTTP request, stored in DuckDB.

Layout, and why:

- ``log_requests`` holds the metadata that every list and filter scans. Bodies live in
  ``log_bodies`` so those scans stay small, and ``log_customers`` holds one slim row per
  customer per request. One full row per customer in a 1,000-customer batch would make
  DuckDB the bottleneck.
- There is no PRIMARY KEY or UNIQUE constraint. Rows arrive in time order, so the zone maps
  DuckDB keeps on ``time`` for each row group do the pruning. Request ids are UUIDv7, so a
  lookup by id gets a time window from the id itself and prunes the same way.
- One writer thread owns the write connection and inserts Arrow batches, one transaction
  per batch. A checkpoint can stall it for seconds, so ``append`` only adds the row to a
  bounded buffer and never waits on DuckDB. Readers run in worker threads on their own
  cursors.
- Subscribers receive rows only after they are committed, through bounded queues, one per
  subscriber.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import secrets
import threading
import time as monotime
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self, TypeVar

import duckdb
import orjson
import pyarrow as pa
import structlog

from engine.errors import InvalidInputError, TidegateError

log = structlog.get_logger(__name__)
T = TypeVar("T")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
LIST_CUSTOMERS = 100  # customers shown per row in lists and streams
STREAM_MAX_PENDING = 10_000  # rows a subscriber may leave unread before it falls behind
# A row's time must lie this close to the time embedded in its id, so that an id lookup
# scanning only this window around the id cannot miss the row.
ID_TIME_SLACK = timedelta(minutes=10)
WRITE_RETRY_MAX_DELAY = 5.0
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

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


@dataclass(frozen=True)
class LogCustomer:
    customer_id: str
    name: str = ""
    outcome: str = "delivered"  # "delivered" | "failed" | "retry" | "paused"
    error: str = ""


@dataclass(frozen=True)
class LogRow:
    """One outbound request. ``time`` is tz-aware and close to the time in ``id``."""

    id: str
    time: datetime
    connection_id: str
    method: str
    url: str
    status_code: int  # 0 when no response arrived
    response_time: float  # seconds
    error: str  # "" when fully successful
    customers: tuple[LogCustomer, ...]
    mapping_version: int
    attempt: int = 1
    ambiguous: bool = False
    request_body: str = ""
    response_body: str = ""
    customer_count: int = -1  # len(customers) unless given (lists cap customers)
    tags: str = ""  # comma-separated labels, e.g. "backfill" or "replay"

    def __post_init__(self) -> None:
        if self.customer_count == -1:
            object.__setattr__(self, "customer_count", len(self.customers))


@dataclass(frozen=True)
class LogQuery:
    """A row matches when it satisfies every field that is set."""

    identifier: str = ""
    customer_id: str = ""
    error_contains: str = ""  # case-insensitive, in the row's or a carried customer's error
    status_codes: tuple[int, ...] = ()
    start_time: datetime | None = None  # inclusive
    end_time: datetime | None = None  # exclusive
    connection_id: str = ""
    errors_only: bool = False

    def matches(self, row: LogRow) -> bool:
        """The same test ``LogStore.list`` applies in SQL. Use it on full rows."""
        needle = self.error_contains.lower()
        return (
            (not self.identifier or row.id == self.identifier)
            and (
                not self.customer_id
                or any(c.customer_id == self.customer_id for c in row.customers)
            )
            and (
                not needle
                or needle in row.error.lower()
                or any(needle in c.error.lower() for c in row.customers)
            )
            and (not self.status_codes or row.status_code in self.status_codes)
            and (self.start_time is None or row.time >= self.start_time)
            and (self.end_time is None or row.time < self.end_time)
            and (not self.connection_id or row.connection_id == self.connection_id)
            and (not self.errors_only or row.error != "")
        )


_id_lock = threading.Lock()
_id_last_ms = 0
_id_counter = 0


def new_request_id(at: datetime | None = None) -> str:
    """A UUIDv7. Ids made without ``at`` sort lexically in the order they were made.

    ``at`` stamps the id with that time instead of now (to the millisecond).
    """
    global _id_last_ms, _id_counter
    if at is not None:
        ms, counter = _micros(at) // 1000, secrets.randbits(12)
    else:
        with _id_lock:
            now_ms = monotime.time_ns() // 1_000_000
            if now_ms > _id_last_ms:
                # Seeding at most 2**11 leaves room for 2,048 more ids in the same millisecond.
                _id_last_ms, _id_counter = now_ms, secrets.randbits(11)
            elif _id_counter < 0xFFF:
                _id_counter += 1
            else:  # counter spent: borrow the next millisecond rather than break the order
                _id_last_ms, _id_counter = _id_last_ms + 1, secrets.randbits(11)
            ms, counter = _id_last_ms, _id_counter
    value = ms << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | secrets.randbits(62)
    return str(uuid.UUID(int=value))


class LogSubscription:
    """Async iterator of non-empty batches of matching rows, without bodies.

    It raises ``TidegateError`` if it falls behind: a batch arrives while more than
    ``max_pending`` rows already wait unread. It ends when ``close()`` is called or the
    store closes.
    """

    def __init__(self, store: LogStore, query: LogQuery, max_pending: int) -> None:
        self.query = query
        self._store = store
        self._max_pending = max_pending
        self._pending: deque[builtins.list[LogRow]] = deque()
        self._pending_rows = 0
        self._state = "open"  # "open" | "behind" | "ended"
        self._wakeup = asyncio.Event()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> builtins.list[LogRow]:
        while True:
            if self._pending:
                rows = self._pending.popleft()
                self._pending_rows -= len(rows)
                return rows
            if self._state == "behind":
                raise TidegateError("log stream fell behind; reconnect")
            if self._state == "ended":
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    def close(self) -> None:
        self._state = "ended"
        self._pending.clear()
        self._store._unsubscribe(self)
        self._wakeup.set()

    def _offer(self, rows: builtins.list[LogRow]) -> None:
        if self._state != "open":
            return
        if self._pending_rows and self._pending_rows + len(rows) > self._max_pending:
            # Dropping rows silently would leave a gap in a live tail; the client reconnects.
            self._state = "behind"
            self._pending.clear()
            self._store._unsubscribe(self)
        else:
            self._pending.append(rows)
            self._pending_rows += len(rows)
        self._wakeup.set()

    def _end(self) -> None:
        if self._state == "open":
            self._state = "ended"
            self._wakeup.set()


class LogStore:
    """The outbound log. Call ``start()`` before use and ``close()`` at the end.

    Only this process may open the file. Rows that cannot be stored (DuckDB still failing
    when the store closes) are dropped and logged; until then the writer retries.
    """

    def __init__(
        self,
        path: Path,
        *,
        flush_interval: float = 0.1,
        flush_rows: int = 5_000,
        max_buffer: int = 200_000,
        on_committed: Callable[[builtins.list[str]], None] | None = None,
    ) -> None:
        self._path = path
        # Called on the event loop with the ids of every batch DuckDB committed.
        self._on_committed = on_committed
        self._flush_interval = flush_interval
        self._flush_rows = flush_rows
        self._max_buffer = max_buffer
        # _cond guards everything shared with the writer; it is never held around DuckDB calls,
        # so the event loop only ever waits on it for a few list operations.
        self._cond = threading.Condition()
        self._buffer: builtins.list[LogRow] = []
        self._buffered_since = 0.0
        self._unsettled = 0  # appended, not yet committed: what max_buffer bounds
        self._appended = 0  # sequence number of the last appended row
        self._committed = 0
        self._flush_waiters: builtins.list[tuple[int, asyncio.Future[None]]] = []
        self._subscribers: set[LogSubscription] = set()
        self._closing = False
        self._room = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: duckdb.DuckDBPyConnection | None = None
        self._read_root: duckdb.DuckDBPyConnection | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._conn, self._read_root = await asyncio.to_thread(self._open)
        self._thread = threading.Thread(target=self._run, name="tidegate-logstore", daemon=True)
        self._thread.start()

    async def append(self, row: LogRow) -> None:
        """Buffers ``row``; waits only while ``max_buffer`` rows are not yet committed."""
        _check_row(row)
        while True:
            with self._cond:
                if self._thread is None or self._closing:
                    raise TidegateError("log store is not running")
                if self._unsettled < self._max_buffer:
                    if not self._buffer:
                        self._buffered_since = monotime.monotonic()
                    self._buffer.append(row)
                    self._unsettled += 1
                    self._appended += 1
                    if len(self._buffer) == 1 or len(self._buffer) >= self._flush_rows:
                        self._cond.notify()
                    return
                self._room.clear()
            await self._room.wait()

    async def flush(self) -> None:
        """Returns once every row appended before the call is committed and published."""
        with self._cond:
            if self._committed >= self._appended:
                return
            assert self._loop is not None  # rows were appended, so start() ran
            done = self._loop.create_future()
            self._flush_waiters.append((self._appended, done))
            self._cond.notify()
        await done

    async def list(
        self, query: LogQuery, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> tuple[builtins.list[LogRow], str]:
        """Newest first, without bodies, at most ``LIST_CUSTOMERS`` customers per row (the
        filtered customer first). Returns the rows and the next page token, "" at the end."""
        _check_query(query)
        size = DEFAULT_PAGE_SIZE if page_size == 0 else min(max(page_size, 1), MAX_PAGE_SIZE)
        after = _decode_token(page_token) if page_token else None
        return await self._read(self._list, query, size, after)

    async def get(self, request_id: str) -> LogRow | None:
        """The row with bodies and every customer, or None."""
        return await self._read(self._get, request_id)

    async def count(self) -> int:
        def count(cur: duckdb.DuckDBPyConnection) -> int:
            (total,) = cur.execute("SELECT count(*) FROM log_requests").fetchall()[0]
            return int(total)

        return await self._read(count)

    def subscribe(
        self, query: LogQuery, *, max_pending: int = STREAM_MAX_PENDING
    ) -> LogSubscription:
        """Streams rows matching ``query`` that are committed after this returns."""
        _check_query(query)
        subscription = LogSubscription(self, query, max_pending)
        with self._cond:
            if self._thread is None or self._closing:
                raise TidegateError("log store is not running")
            self._subscribers.add(subscription)
        return subscription

    async def close(self) -> None:
        """Commits what is buffered, stops the writer, ends subscriptions, closes the file."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._room.set()  # appenders waiting for room see the store is closing
        await asyncio.to_thread(thread.join)
        self._thread = None
        with self._cond:
            subscribers, self._subscribers = self._subscribers, set()
        for subscription in subscribers:
            subscription._end()
        read_root, conn, self._read_root, self._conn = self._read_root, self._conn, None, None
        for connection in (read_root, conn):
            if connection is not None:
                await asyncio.to_thread(connection.close)

    def _unsubscribe(self, subscription: LogSubscription) -> None:
        with self._cond:
            self._subscribers.discard(subscription)

    # --- writer thread -------------------------------------------------------------------

    def _open(self) -> tuple[duckdb.DuckDBPyConnection, duckdb.DuckDBPyConnection]:
        try:
            conn = duckdb.connect(str(self._path))
        except duckdb.IOException as exc:  # most often: another process holds the file
            raise TidegateError(f"cannot open the log database {self._path}: {exc}") from exc
        conn.execute(SCHEMA)
        # A separate root for reader cursors, so creating one never waits on the writer.
        return conn, conn.cursor()

    def _run(self) -> None:
        while True:
            batch, last_seq = self._take()
            if not batch:
                return
            stored = self._write(batch)
            with self._cond:
                self._unsettled -= len(batch)
                self._committed = last_seq
                done = [f for seq, f in self._flush_waiters if seq <= last_seq]
                self._flush_waiters = [(s, f) for s, f in self._flush_waiters if s > last_seq]
                subscribers = builtins.list(self._subscribers)
            if stored:
                self._publish(batch, subscribers)
                if self._on_committed is not None:
                    self._call_soon(self._on_committed, [row.id for row in batch])
            # Queued after the publish callbacks, so flush() returns after subscribers have rows.
            self._call_soon(self._settled, done)

    def _take(self) -> tuple[builtins.list[LogRow], int]:
        with self._cond:
            while True:
                if self._buffer:
                    wait = self._buffered_since + self._flush_interval - monotime.monotonic()
                    urgent = self._closing or bool(self._flush_waiters)
                    if urgent or wait <= 0 or len(self._buffer) >= self._flush_rows:
                        break
                    self._cond.wait(wait)
                elif self._closing:
                    return [], self._appended
                else:
                    self._cond.wait()
            batch = self._buffer[: self._flush_rows]
            del self._buffer[: self._flush_rows]
            return batch, self._appended - len(self._buffer)

    def _write(self, batch: builtins.list[LogRow]) -> bool:
        # Sorting keeps each table in time order even when lanes append slightly out of order.
        batch.sort(key=lambda row: (row.time, row.id))
        try:
            tables = _arrow_tables(batch)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            log.exception("log_rows_dropped", rows=len(batch), reason="cannot encode")
            return False
        delay = 0.1
        while True:
            try:
                self._insert(tables)
                return True
            except duckdb.Error as exc:
                log.error("log_write_failed", rows=len(batch), error=str(exc))
                with self._cond:
                    if self._closing:
                        log.error("log_rows_dropped", rows=len(batch), reason="closing")
                        return False
                    self._cond.wait(delay)
                delay = min(delay * 2, WRITE_RETRY_MAX_DELAY)

    def _insert(self, tables: dict[str, pa.Table]) -> None:
        conn = self._conn
        assert conn is not None
        conn.begin()
        try:
            for name, table in tables.items():
                if table.num_rows:
                    conn.register("log_batch", table)
                    try:
                        conn.execute(f"INSERT INTO {name} BY NAME SELECT * FROM log_batch")
                    finally:
                        conn.unregister("log_batch")
            conn.commit()
        except BaseException:
            with contextlib.suppress(duckdb.Error):  # keep the original error, not the rollback's
                conn.rollback()
            raise

    def _publish(
        self, batch: builtins.list[LogRow], subscribers: builtins.list[LogSubscription]
    ) -> None:
        for subscription in subscribers:
            query = subscription.query
            rows = [_listed(row, query.customer_id) for row in batch if query.matches(row)]
            if rows:
                self._call_soon(subscription._offer, rows)

    def _call_soon(self, callback: Callable[[Any], None], arg: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, arg)
        except RuntimeError:  # the loop is gone: nobody is left to tell
            pass

    def _settled(self, done: builtins.list[asyncio.Future[None]]) -> None:
        self._room.set()
        for future in done:
            if not future.done():
                future.set_result(None)

    # --- readers (worker threads, own cursors) -------------------------------------------

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        root = self._read_root
        if root is None:
            raise TidegateError("log store is not running")

        def run() -> T:
            cursor = root.cursor()
            try:
                return fn(cursor, *args)
            finally:
                cursor.close()

        return await asyncio.to_thread(run)

    def _list(
        self,
        cur: duckdb.DuckDBPyConnection,
        query: LogQuery,
        size: int,
        after: tuple[datetime, str] | None,
    ) -> tuple[builtins.list[LogRow], str]:
        where, params = _where(query, after)
        recs = cur.execute(
            f"SELECT {REQUEST_COLUMNS} FROM log_requests r WHERE {where}"
            " ORDER BY r.time DESC, r.id DESC LIMIT ?",
            [*params, size + 1],
        ).fetchall()
        more, recs = len(recs) > size, recs[:size]
        customers = _page_customers(cur, recs, query.customer_id)
        rows = [_row(rec, customers.get(rec[1], ())) for rec in recs]
        return rows, _encode_token(recs[-1][0], recs[-1][1]) if more else ""

    def _get(self, cur: duckdb.DuckDBPyConnection, request_id: str) -> LogRow | None:
        window = _id_window(request_id)
        if window is None:
            return None
        rec = cur.execute(
            f"SELECT {REQUEST_COLUMNS} FROM log_requests r"
            " WHERE r.id = ? AND r.time BETWEEN ? AND ?",
            [request_id, *window],
        ).fetchone()
        if rec is None:
            return None
        at = [request_id, _from_micros(rec[0])]
        bodies = cur.execute(
            "SELECT request_body, response_body FROM log_bodies WHERE id = ? AND time = ?", at
        ).fetchone()
        customers = cur.execute(
            "SELECT customer_id, name, outcome, error FROM log_customers"
            " WHERE request_id = ? AND time = ? ORDER BY position",
            at,
        ).fetchall()
        return _row(rec, tuple(LogCustomer(*c) for c in customers), bodies or ("", ""))


def _where(query: LogQuery, after: tuple[datetime, str] | None) -> tuple[str, builtins.list[Any]]:
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
        window = _id_window(query.identifier)
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


def _page_customers(
    cur: duckdb.DuckDBPyConnection, recs: builtins.list[tuple[Any, ...]], customer_id: str
) -> dict[str, tuple[LogCustomer, ...]]:
    if not recs:
        return {}
    # An IN list of constant times prunes row groups even when the page spans months.
    times = sorted({_from_micros(rec[0]) for rec in recs})
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


def _listed(row: LogRow, customer_id: str) -> LogRow:
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


def _row(
    rec: tuple[Any, ...], customers: tuple[LogCustomer, ...], bodies: tuple[str, str] = ("", "")
) -> LogRow:
    fields = dict(zip(REQUEST_FIELDS, rec, strict=True))
    fields["time"] = _from_micros(fields["time"])
    request_body, response_body = bodies
    return LogRow(
        **fields, customers=customers, request_body=request_body, response_body=response_body
    )


def _arrow_tables(rows: builtins.list[LogRow]) -> dict[str, pa.Table]:
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
        "log_requests": _arrow_table(REQUEST_FIELDS, requests).append_column(
            "error_text", pa.array([_error_text(r) for r in rows], pa.string())
        ),
        "log_bodies": _arrow_table(BODY_FIELDS, bodies),
        "log_customers": _arrow_table(CUSTOMER_FIELDS, customers),
    }


def _error_text(row: LogRow) -> str:
    errors = dict.fromkeys([row.error, *(c.error for c in row.customers)])
    return "\n".join(e for e in errors if e).lower()


def _arrow_table(fields: dict[str, pa.DataType], records: Sequence[tuple[Any, ...]]) -> pa.Table:
    columns = zip(*records, strict=True) if records else [()] * len(fields)
    arrays = [pa.array(col, kind) for kind, col in zip(fields.values(), columns, strict=True)]
    return pa.table(arrays, names=builtins.list(fields))


def _check_row(row: LogRow) -> None:
    if row.time.utcoffset() is None:
        raise InvalidInputError("time", "must be timezone-aware")
    window = _id_window(row.id)
    if window is None or not window[0] <= row.time <= window[1]:
        raise InvalidInputError(
            "id", f"{row.id!r} is not a new_request_id() within {ID_TIME_SLACK} of the row's time"
        )


def _check_query(query: LogQuery) -> None:
    for field in ("start_time", "end_time"):
        value = getattr(query, field)
        if value is not None and value.utcoffset() is None:
            raise InvalidInputError(field, "must be timezone-aware")


def _id_window(request_id: str) -> tuple[datetime, datetime] | None:
    """The times a row with this id may have, or None if it is not a canonical UUIDv7."""
    try:
        parsed = uuid.UUID(request_id)
    except ValueError:
        return None
    if parsed.version != 7 or str(parsed) != request_id:
        return None
    stamped = _from_micros((parsed.int >> 80) * 1000)
    return stamped - ID_TIME_SLACK, stamped + ID_TIME_SLACK + timedelta(milliseconds=1)


def _encode_token(micros: int, request_id: str) -> str:
    raw = orjson.dumps({"time": micros, "id": request_id})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str) -> tuple[datetime, str]:
    try:
        data = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        micros, request_id = data["time"], data["id"]
        if type(micros) is not int or type(request_id) is not str:
            raise TypeError("malformed token")
        return _from_micros(micros), request_id
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise InvalidInputError(
            "page_token", "is not a next_page_token from a previous ListLogs response"
        ) from exc


def _micros(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


def _from_micros(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)
