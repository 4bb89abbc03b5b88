"""The outbound log's store: the threads and connections that write, read and stream
its rows, one row per outbound HTTP request, in DuckDB, one file per week
(``partitions``), all attached to one in-memory DuckDB instance.

- One writer thread owns the write connection and inserts Arrow batches, one transaction
  per batch and partition. A checkpoint can stall it for seconds, so ``append`` only adds
  the row to a bounded buffer and never waits on DuckDB.
- Readers run in worker threads on their own cursors, over the partitions a query may
  touch, newest first. A search by customer goes through the customer indexes, a chunk
  of candidates at a time, in one transaction.
- ``drop_partitions`` is retention: whole partitions go, never rows.
- The store owns a ``CustomerIndexer``, which keeps every partition's index up to date on
  a thread of its own: the writer tells it how many customer rows each commit added.
- Subscribers receive rows only after they are committed, through bounded queues, one per
  subscriber: at most ``max_subscribers`` at a time (``TooManySubscribersError`` past
  that), each holding at most ``STREAM_MAX_PENDING`` rows and ``STREAM_MAX_PENDING_BYTES``
  (estimated) unread. A subscriber past either is cut off (``StreamBehindError``), its
  rows released at once; it never gets a stream with a silent gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time as monotime
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Self, TypeVar

import duckdb
import pyarrow as pa
import structlog

from engine.errors import TidegateError
from engine.outbound_log.customer_index import (
    INDEX_FANOUT,
    INDEX_PASS_ROWS,
    INDEX_SEAL_ROWS,
    CustomerIndexer,
    customer_search,
)
from engine.outbound_log.erasure import LogErasure, Redactor, erase_in_partition
from engine.outbound_log.migrations import open_schema
from engine.outbound_log.partitions import PARTITION_SPAN, Partition, PartitionSet, week_of
from engine.outbound_log.rows import LogCustomer, LogQuery, LogRow, from_micros, new_request_id
from engine.outbound_log.sql import (
    REQUEST_COLUMNS,
    arrow_tables,
    check_query,
    check_row,
    connect,
    id_window,
    listed,
    page_customers,
    row_from_record,
    time_bounds,
    where_clause,
)

__all__ = [
    "LogCustomer",
    "LogQuery",
    "LogRow",
    "LogStore",
    "LogSubscription",
    "StreamBehindError",
    "TooManySubscribersError",
    "new_request_id",
]

log = structlog.get_logger(__name__)
T = TypeVar("T")

STREAM_MAX_PENDING = 10_000  # rows a subscriber may leave unread before it falls behind
STREAM_MAX_PENDING_BYTES = 2 * 1024 * 1024  # and their estimated size
MAX_SUBSCRIBERS = 32  # live subscriptions at a time
WRITE_RETRY_MAX_DELAY = 5.0


class StreamBehindError(TidegateError):
    """A subscriber left more rows unread than its limit; it was cut off."""


class TooManySubscribersError(TidegateError):
    """``subscribe`` refused: the store has as many subscribers as it allows."""


def row_bytes(row: LogRow) -> int:
    """A cheap estimate of the memory ``row`` (as ``listed`` made it) holds, and of its
    size as a StreamLogs message: its strings plus a fixed cost per object."""
    size = 400 + len(row.id) + len(row.connection_id) + len(row.url) + len(row.error)
    size += len(row.tags) + len(row.method)
    for c in row.customers:
        size += 120 + len(c.customer_id) + len(c.name) + len(c.outcome) + len(c.error)
    return size


class LogSubscription:
    """Async iterator of non-empty batches of matching rows, without bodies.

    It raises ``StreamBehindError`` if it falls behind: a batch arrives while more than
    ``max_pending`` rows, or rows of more than ``max_pending_bytes``, already wait unread.
    It ends when ``close()`` is called or the store closes.
    """

    def __init__(
        self, store: LogStore, query: LogQuery, max_pending: int, max_pending_bytes: int
    ) -> None:
        self.query = query
        self._store = store
        self._max_pending = max_pending
        self._max_pending_bytes = max_pending_bytes
        self._pending: deque[tuple[list[LogRow], int]] = deque()
        self._pending_rows = 0
        self._pending_bytes = 0
        self._behind = ""
        self._state = "open"  # "open" | "behind" | "ended"
        self._wakeup = asyncio.Event()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> list[LogRow]:
        while True:
            if self._pending:
                rows, size = self._pending.popleft()
                self._pending_rows -= len(rows)
                self._pending_bytes -= size
                return rows
            if self._state == "behind":
                raise StreamBehindError(self._behind)
            if self._state == "ended":
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    def close(self) -> None:
        self._state = "ended"
        self._release()
        self._store._unsubscribe(self)
        self._wakeup.set()

    def _release(self) -> None:
        self._pending.clear()
        self._pending_rows = self._pending_bytes = 0

    def _offer(self, rows: list[LogRow]) -> None:
        if self._state != "open":
            return
        size = sum(row_bytes(row) for row in rows)
        if self._pending_rows and self._pending_rows + len(rows) > self._max_pending:
            self._fall_behind(
                f"{self._pending_rows + len(rows)} rows (the limit is {self._max_pending})"
            )
        elif self._pending_rows and self._pending_bytes + size > self._max_pending_bytes:
            self._fall_behind(
                f"{(self._pending_bytes + size) // 1024} KiB of rows (the limit is "
                f"{self._max_pending_bytes // 1024} KiB)"
            )
        else:
            self._pending.append((rows, size))
            self._pending_rows += len(rows)
            self._pending_bytes += size
        self._wakeup.set()

    def _fall_behind(self, what: str) -> None:
        # Dropping rows silently would leave a gap in a live tail; the client reconnects.
        self._state = "behind"
        self._behind = (
            f"log stream cut off: it fell behind, {what} waited unread; read the stream "
            "as fast as it comes (or narrow its filter) and reconnect, then use ListLogs "
            "for the rows in between"
        )
        self._release()
        self._store._unsubscribe(self)

    def _end(self) -> None:
        if self._state == "open":
            self._state = "ended"
            self._wakeup.set()


@dataclass(frozen=True)
class Retention:
    """What one retention pass did: partitions dropped, bytes freed, bytes left."""

    dropped: int
    freed_bytes: int
    size_bytes: int


class LogStore:
    """The outbound log. Call ``start()`` before use and ``close()`` at the end.

    Only this process may open the file. Rows that cannot be stored (DuckDB still failing
    when the store closes) are dropped and logged; until then the writer retries.

    The ``index_*`` arguments configure the ``CustomerIndexer``: ``index_seal_rows``,
    ``index_fanout`` and ``index_pass_rows`` are its ``seal_rows``, ``fanout`` and
    ``pass_rows``, ``index_should_stop`` its ``should_stop``. ``max_subscribers`` bounds
    the live subscriptions.
    """

    def __init__(
        self,
        folder: Path,
        *,
        flush_interval: float = 0.1,
        flush_rows: int = 5_000,
        max_buffer: int = 200_000,
        on_committed: Callable[[list[str]], None] | None = None,
        index_seal_rows: int = INDEX_SEAL_ROWS,
        index_fanout: int = INDEX_FANOUT,
        index_pass_rows: int = INDEX_PASS_ROWS,
        index_should_stop: Callable[[], bool] | None = None,
        max_subscribers: int = MAX_SUBSCRIBERS,
    ) -> None:
        self._folder = folder
        self.max_subscribers = max_subscribers
        # Called on the event loop with the ids of every batch DuckDB committed.
        self._on_committed = on_committed
        self._flush_interval = flush_interval
        self._flush_rows = flush_rows
        self._max_buffer = max_buffer
        # _cond guards everything shared with the writer; it is never held around DuckDB calls,
        # so the event loop only ever waits on it for a few list operations.
        self._cond = threading.Condition()
        self._buffer: list[LogRow] = []
        self._buffered_since = 0.0
        self._unsettled = 0  # appended, not yet committed: what max_buffer bounds
        self._appended = 0  # sequence number of the last appended row
        self._committed = 0
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._subscribers: set[LogSubscription] = set()
        self._closing = False
        self._room = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: duckdb.DuckDBPyConnection | None = None
        self._read_root: duckdb.DuckDBPyConnection | None = None
        self._partitions: PartitionSet | None = None
        self._thread: threading.Thread | None = None
        self._indexer = CustomerIndexer(
            seal_rows=index_seal_rows,
            fanout=index_fanout,
            pass_rows=index_pass_rows,
            should_stop=index_should_stop,
        )

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._conn, self._read_root = await asyncio.to_thread(self._open)
        self._thread = threading.Thread(target=self._run, name="tidegate-logstore", daemon=True)
        self._thread.start()
        self._indexer.start()

    async def append(self, row: LogRow) -> None:
        """Buffers ``row``; waits only while ``max_buffer`` rows are not yet committed."""
        check_row(row)
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

    async def page(
        self, query: LogQuery, page_size: int, after: tuple[int, str] | None = None
    ) -> tuple[list[LogRow], tuple[int, str] | None]:
        """Newest first, without bodies, at most ``LIST_CUSTOMERS`` customers per row (the
        filtered customer first). Returns at most ``page_size`` rows (which must be 1 or
        more) and the keyset cursor of the last one, ``(time in Unix microseconds, id)``,
        which ``after`` takes to continue after it; None at the end."""
        check_query(query)
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, not {page_size}")
        bound = None if after is None else (from_micros(after[0]), after[1])
        return await self._read(self._list, query, page_size, bound)

    async def indexed(self) -> None:
        """Returns once every row appended before the call is in the customer index's
        sealed runs, with merges done (customer searches are exact at any time; this is
        for benchmarks and tests that want the index complete)."""
        await self.flush()
        await self._indexer.indexed()

    async def get(self, request_id: str) -> LogRow | None:
        """The row with bodies and every customer, or None."""
        return await self._read(self._get, request_id)

    async def scan(
        self,
        fn: Callable[[duckdb.DuckDBPyConnection, list[Partition]], T],
        low: datetime | None = None,
        high: datetime | None = None,
    ) -> T:
        """Runs ``fn(cursor, partitions)`` on a worker thread, with the partitions that may
        hold rows with ``low <= time <= high`` (newest first) held for the call: a read of
        its own (the page's charts and customer view, ``engine.ui.insight``) that prunes
        partitions by time as ``page`` does. ``fn`` names a partition's tables
        ``<partition.name>.log_requests`` and must only read."""

        def run(cur: duckdb.DuckDBPyConnection) -> T:
            partitions = self._partitions
            if partitions is None:
                raise TidegateError("log store is not running")
            with partitions.using(low, high) as chosen:
                return fn(cur, chosen)

        return await self._read(run)

    async def count(self) -> int:
        """The requests in the log, every partition."""

        def count(cur: duckdb.DuckDBPyConnection) -> int:
            assert self._partitions is not None
            total = 0
            with self._partitions.using() as chosen:
                for partition in chosen:
                    (n,) = cur.execute(
                        f"SELECT count(*) FROM {partition.name}.log_requests"
                    ).fetchall()[0]
                    total += int(n)
            return total

        return await self._read(count)

    async def copy_to(self, folder: Path) -> tuple[int, int]:
        """Copies every partition into ``folder`` (which must exist), each as it is at one
        moment: its writes wait while it is checkpointed and copied. Returns (partitions,
        bytes). The copies open as a log of their own (``LogStore(folder)``)."""

        def copy() -> tuple[int, int]:
            partitions, conn = self._partitions, self._read_root
            if partitions is None or conn is None:
                raise TidegateError("log store is not running")
            copied = size = 0
            cur = conn.cursor()
            try:
                with partitions.using() as chosen:
                    for partition in chosen:
                        with partitions.frozen(partition):
                            cur.execute(f"CHECKPOINT {partition.name}")
                            target = folder / partition.path.name
                            shutil.copyfile(partition.path, target)
                        copied += 1
                        size += target.stat().st_size
            finally:
                cur.close()
            return copied, size

        return await asyncio.to_thread(copy)

    async def drop_partitions(
        self, *, older_than: datetime | None = None, max_bytes: int | None = None
    ) -> Retention:
        """Retention: deletes every partition whose rows are all older than ``older_than``,
        then the oldest ones while the log takes more than ``max_bytes`` on disk. The
        newest partition is always kept. Runs on a worker thread; writes, reads and
        streams go on meanwhile (a drop waits for the reads of its partition)."""

        def drop() -> Retention:
            partitions = self._partitions
            if partitions is None:
                raise TidegateError("log store is not running")
            dropped = freed = 0
            chosen = partitions.all()[1:]  # newest first; the newest stays
            for partition in reversed(chosen):  # oldest first
                over_age = older_than is not None and partition.end <= older_than
                over_size = max_bytes is not None and partitions.size() > max_bytes
                if not (over_age or over_size):
                    break
                freed += partitions.drop(partition)
                dropped += 1
            return Retention(dropped, freed, partitions.size())

        return await asyncio.to_thread(drop)

    async def erase_customer(
        self, customer_id: str, identifiers: Collection[str], attributes: Collection[str]
    ) -> LogErasure:
        """Erases one customer from every partition (see ``engine.outbound_log.erasure``):
        first every row appended before the call is committed, then each partition is
        changed in one transaction while its writes wait. ``identifiers`` are the values
        that name the customer in requests besides ``customer_id``; ``attributes`` their
        attribute values, replaced where responses and messages quote them."""
        await self.flush()
        redactor = Redactor([customer_id, *identifiers])
        wide = redactor.widened(attributes)

        def erase() -> LogErasure:
            partitions, conn = self._partitions, self._read_root
            if partitions is None or conn is None:
                raise TidegateError("log store is not running")
            total = LogErasure()
            cur = conn.cursor()
            try:
                with partitions.using() as chosen:
                    for partition in chosen:
                        with partitions.frozen(partition):
                            total += erase_in_partition(
                                cur, partition.name, customer_id, redactor, wide
                            )
            finally:
                cur.close()
            return total

        return await asyncio.to_thread(erase)

    def backlog(self) -> tuple[int, float]:
        """For the metrics: rows appended and not yet committed, and the seconds the oldest
        row still in the buffer has waited (0 when the writer has taken every row)."""
        with self._cond:
            waited = monotime.monotonic() - self._buffered_since if self._buffer else 0.0
            return self._unsettled, waited

    def subscribe(
        self,
        query: LogQuery,
        *,
        max_pending: int = STREAM_MAX_PENDING,
        max_pending_bytes: int = STREAM_MAX_PENDING_BYTES,
    ) -> LogSubscription:
        """Streams rows matching ``query`` that are committed after this returns. Raises
        ``TooManySubscribersError`` when ``max_subscribers`` are open."""
        check_query(query)
        subscription = LogSubscription(self, query, max_pending, max_pending_bytes)
        with self._cond:
            if self._thread is None or self._closing:
                raise TidegateError("log store is not running")
            if len(self._subscribers) >= self.max_subscribers:
                raise TooManySubscribersError(
                    f"{len(self._subscribers)} log streams are open, the most this engine "
                    "serves at a time; close one (or page with ListLogs) and try again"
                )
            self._subscribers.add(subscription)
        return subscription

    @property
    def subscribers(self) -> int:
        """Live subscriptions."""
        with self._cond:
            return len(self._subscribers)

    async def close(self) -> None:
        """Commits what is buffered, stops the writer, ends subscriptions, closes the file."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._room.set()  # appenders waiting for room see the store is closing
        self._indexer.stop()  # an unfinished run is rolled back, not waited for
        await asyncio.to_thread(thread.join)
        self._thread = None
        await self._indexer.close()
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
        conn = connect(":memory:")
        partitions = PartitionSet(conn, self._folder, _prepare_partition)
        try:
            partitions.open()
        except duckdb.IOException as exc:  # most often: another process holds a file
            conn.close()
            raise TidegateError(f"cannot open the outbound log in {self._folder}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        self._partitions = partitions
        self._indexer.open(conn, partitions)
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
                subscribers = list(self._subscribers)
            if stored:
                self._publish(batch, subscribers)
            # Queued after the publish callbacks, so flush() returns after subscribers have rows.
            self._call_soon(self._settled, done)

    def _take(self) -> tuple[list[LogRow], int]:
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

    def _write(self, batch: list[LogRow]) -> bool:
        """Commits ``batch``, one transaction per partition its rows fall in (DuckDB writes
        one attached database per transaction); False if none of it could be stored."""
        # Sorting keeps each table in time order even when lanes append slightly out of order.
        batch.sort(key=lambda row: (row.time, row.id))
        partitions = self._partitions
        assert partitions is not None
        stored = False
        start = 0
        while start < len(batch):
            partition = partitions.for_time(batch[start].time)
            week_end = week_of(batch[start].time) + PARTITION_SPAN
            end = start + 1
            while end < len(batch) and batch[end].time < week_end:
                end += 1
            if partition is None:  # its week is being dropped: past the retention period
                log.warning("log_rows_dropped", rows=end - start, reason="past retention")
            else:
                stored = self._write_to(partition, batch[start:end]) or stored
            start = end
        return stored

    def _write_to(self, partition: Partition, rows: list[LogRow]) -> bool:
        partitions = self._partitions
        assert partitions is not None
        try:
            tables = arrow_tables(rows)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            log.exception("log_rows_dropped", rows=len(rows), reason="cannot encode")
            return False
        delay = 0.1
        while True:
            try:
                with partitions.writing(partition):
                    self._insert(partition, tables)
                break
            except duckdb.Error as exc:
                log.error("log_write_failed", rows=len(rows), error=str(exc))
                with self._cond:
                    if self._closing:
                        log.error("log_rows_dropped", rows=len(rows), reason="closing")
                        return False
                    self._cond.wait(delay)
                delay = min(delay * 2, WRITE_RETRY_MAX_DELAY)
        self._indexer.notify(partition.name, sum(len(row.customers) for row in rows))
        if self._on_committed is not None:
            self._call_soon(self._on_committed, [row.id for row in rows])
        return True

    def _insert(self, partition: Partition, tables: dict[str, pa.Table]) -> None:
        conn = self._conn
        assert conn is not None
        # One string of INSERTs, each reading its Arrow table from the local variable it
        # names (DuckDB's replacement scan of the caller's frame). DuckDB 2.0 spends about
        # 0.2 ms of CPU on any statement: registering and unregistering each table as a
        # view cost more than the inserts, at ten batches a second.
        batch_log_requests = tables["log_requests"]  # noqa: F841 (read by the SQL)
        batch_log_bodies = tables["log_bodies"]  # noqa: F841
        batch_log_customers = tables["log_customers"]  # noqa: F841
        inserts = "; ".join(
            f"INSERT INTO {partition.name}.{name} BY NAME SELECT * FROM batch_{name}"
            for name, table in tables.items()
            if table.num_rows
        )
        conn.begin()
        try:
            if inserts:
                conn.execute(inserts)
            conn.commit()
        except BaseException:
            with contextlib.suppress(duckdb.Error):  # keep the original error, not the rollback's
                conn.rollback()
            raise

    def _publish(self, batch: list[LogRow], subscribers: list[LogSubscription]) -> None:
        for subscription in subscribers:
            query = subscription.query
            rows = [listed(row, query.customer_id) for row in batch if query.matches(row)]
            if rows:
                self._call_soon(subscription._offer, rows)

    def _call_soon(self, callback: Callable[[Any], None], arg: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, arg)
        except RuntimeError:  # the loop is gone: nobody is left to tell
            pass

    def _settled(self, done: list[asyncio.Future[None]]) -> None:
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
    ) -> tuple[list[LogRow], tuple[int, str] | None]:
        """A page across partitions: each partition that may hold matching rows gives its
        newest ``size + 1``, newest partition first, merged by (time, id). Partitions older
        than the page's last row cannot change it, so the search stops before them. A
        search by customer reads every partition's customer index in the same statements
        (``customer_index.customer_search``)."""
        partitions = self._partitions
        assert partitions is not None
        low, high = _time_range(query, after)
        by_customer = bool(query.customer_id and not query.identifier)
        found: list[tuple[tuple[Any, ...], tuple[LogCustomer, ...]]] = []
        with partitions.using(low, high) as chosen:
            if by_customer:  # through the customer index of every partition at once
                where, params = where_clause(replace(query, customer_id=""), after)
                catalogs = [partition.name for partition in chosen]
                bounds = time_bounds(query, after)
                found = customer_search(
                    cur, catalogs, query.customer_id, where, params, bounds, size
                )
            else:
                for partition in chosen:
                    if len(found) > size and from_micros(found[size][0][0]) >= partition.end:
                        break
                    cur.execute(f"USE {partition.name}")
                    found += self._page(cur, query, size, after)
                    found.sort(key=lambda f: (f[0][0], f[0][1]), reverse=True)
                    del found[size + 1 :]
        more, found = len(found) > size, found[:size]
        rows = [row_from_record(rec, carried) for rec, carried in found]
        return rows, (found[-1][0][0], found[-1][0][1]) if more else None

    def _page(
        self,
        cur: duckdb.DuckDBPyConnection,
        query: LogQuery,
        size: int,
        after: tuple[datetime, str] | None,
    ) -> list[tuple[tuple[Any, ...], tuple[LogCustomer, ...]]]:
        """The newest ``size + 1`` matching requests of the partition in use, with the
        customers a list shows."""
        where, params = where_clause(query, after)
        recs = cur.execute(
            f"SELECT {REQUEST_COLUMNS} FROM log_requests r WHERE {where}"
            " ORDER BY r.time DESC, r.id DESC LIMIT ?",
            [*params, size + 1],
        ).fetchall()
        customers = page_customers(cur, recs, query.customer_id)
        return [(rec, customers.get(rec[1], ())) for rec in recs]

    def _get(self, cur: duckdb.DuckDBPyConnection, request_id: str) -> LogRow | None:
        window = id_window(request_id)
        partitions = self._partitions
        if window is None or partitions is None:
            return None
        with partitions.using(*window) as chosen:
            for partition in chosen:
                cur.execute(f"USE {partition.name}")
                row = self._get_in(cur, request_id, window)
                if row is not None:
                    return row
        return None

    def _get_in(
        self, cur: duckdb.DuckDBPyConnection, request_id: str, window: tuple[datetime, datetime]
    ) -> LogRow | None:
        rec = cur.execute(
            f"SELECT {REQUEST_COLUMNS} FROM log_requests r"
            " WHERE r.id = ? AND r.time BETWEEN ? AND ?",
            [request_id, *window],
        ).fetchone()
        if rec is None:
            return None
        at = [request_id, from_micros(rec[0])]
        bodies = cur.execute(
            "SELECT request_body, response_body FROM log_bodies WHERE id = ? AND time = ?", at
        ).fetchone()
        customers = cur.execute(
            "SELECT customer_id, name, outcome, error FROM log_customers"
            " WHERE request_id = ? AND time = ? ORDER BY position",
            at,
        ).fetchall()
        return row_from_record(rec, tuple(LogCustomer(*c) for c in customers), bodies or ("", ""))


def _prepare_partition(cur: duckdb.DuckDBPyConnection, partition: Partition) -> None:
    """A partition's log tables (created at the current schema version, or checked to be
    at it) and customer index, on a cursor that uses it."""
    open_schema(cur, partition.path)
    CustomerIndexer.prepare(cur, partition)


def _time_range(
    query: LogQuery, after: tuple[datetime, str] | None
) -> tuple[datetime | None, datetime | None]:
    """The times a matching row may have, as an inclusive range (None: unbounded)."""
    low, high = query.start_time, query.end_time
    if after is not None:
        high = after[0] if high is None else min(high, after[0])
    if query.identifier:
        window = id_window(query.identifier)
        if window is not None:
            low = window[0] if low is None else max(low, window[0])
            high = window[1] if high is None else min(high, window[1])
    return low, high
