"""The customer index of the outbound log: customer searches must return exactly what a
brute-force filter over every appended row returns, whatever state the index is in
(unsealed tail, many runs, runs being merged, rebuilt after a restart or a DuckDB change).

The stores here use tiny runs (a few rows each, sorted in several passes) so that a few
hundred rows go through every stage."""

from __future__ import annotations

import asyncio
import random
import time as clock
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest
import structlog

from engine.outbound_log.partitions import LOG_DIR, SINGLE_FILE
from engine.outbound_log.rows import LogCustomer, LogQuery, LogRow, new_request_id
from engine.outbound_log.sql import SCHEMA, arrow_tables
from engine.outbound_log.store import LogStore
from engine.upgrade import migrate

BASE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
POOL = [f"customer-{n:06d}" for n in range(12)]  # a shared prefix, as real ids have
STATUSES = (200, 200, 200, 429, 500, 0)
# Runs below 2 * 40 entries are all of level 0, so every second one of them is merged.
SMALL_INDEX: dict[str, Any] = {"index_seal_rows": 40, "index_fanout": 2, "index_pass_rows": 7}


def random_row(rng: random.Random, seconds: float) -> LogRow:
    at = BASE + timedelta(seconds=seconds)
    status = rng.choice(STATUSES)
    count = rng.choice((0, 1, 1, 2, 3, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 120))
    ids = [rng.choice(POOL) for _ in range(count)] if count < 100 else list(POOL) * 10
    customers = tuple(
        LogCustomer(
            cid, f"Name of {cid}", "failed" if i == 1 else "delivered", "bad email" * (i == 1)
        )
        for i, cid in enumerate(ids)
    )
    return LogRow(
        id=new_request_id(at=at),
        time=at,
        connection_id=rng.choice(("conn-a", "conn-b")),
        method="POST",
        url="https://unification.useinsider.com/api/user/v1/upsert",
        status_code=status,
        response_time=0.1,
        error="" if status == 200 else f"HTTP {status}",
        customers=customers,
        mapping_version=1,
    )


def rows_at(rng: random.Random, count: int, low: float, high: float) -> list[LogRow]:
    """Rows at random times in [low, high) seconds after BASE, some sharing a time."""
    rows = []
    for _ in range(count):
        seconds = round(rng.uniform(low, high), 1)  # 0.1 s steps: collisions happen
        rows.append(random_row(rng, seconds))
    return rows


def carries(row: LogRow, customer_id: str) -> bool:
    return any(c.customer_id == customer_id for c in row.customers)


def shown(row: LogRow, customer_id: str) -> LogRow:
    """A row as a customer search shows it: no bodies, that customer first, 100 at most."""
    first = [c for c in row.customers if c.customer_id == customer_id]
    rest = [c for c in row.customers if c.customer_id != customer_id]
    return replace(row, request_body="", response_body="", customers=tuple(first + rest)[:100])


QUERIES = [
    {},
    {"status_codes": (200,)},
    {"status_codes": (0, 429)},
    {"start_time": BASE + timedelta(seconds=30), "end_time": BASE + timedelta(seconds=70)},
    {"errors_only": True},
    {"connection_id": "conn-b"},
    {"error_contains": "EMAIL"},
]


def brute_force(rows: list[LogRow], customer_id: str, extra: dict[str, Any]) -> list[LogRow]:
    def keep(r: LogRow) -> bool:
        start, end = extra.get("start_time"), extra.get("end_time")
        return (
            carries(r, customer_id)
            and ("status_codes" not in extra or r.status_code in extra["status_codes"])
            and (start is None or r.time >= start)
            and (end is None or r.time < end)
            and (not extra.get("errors_only") or r.error != "")
            and ("connection_id" not in extra or r.connection_id == extra["connection_id"])
            and (
                "error_contains" not in extra
                or any("email" in c.error for c in r.customers)
                or "email" in r.error.lower()
            )
        )

    found = sorted((r for r in rows if keep(r)), key=lambda r: (r.time, r.id), reverse=True)
    return [shown(r, customer_id) for r in found]


async def search(
    store: LogStore, customer_id: str, extra: dict[str, Any], size: int
) -> list[LogRow]:
    """Every page of a customer search, followed by cursor."""
    found: list[LogRow] = []
    after = None
    for _ in range(1000):
        page, after = await store.page(LogQuery(customer_id=customer_id, **extra), size, after)
        assert len(page) <= size
        found += page
        if after is None:
            return found
    raise AssertionError("paging did not end")


async def assert_exact(store: LogStore, rows: list[LogRow], sizes: tuple[int, ...] = (50,)) -> None:
    for n, customer_id in enumerate([*POOL, "customer-00000", "nobody"]):
        for extra in QUERIES[n % 3 :: 3]:  # each query with some of the customers
            expected = brute_force(rows, customer_id, extra)
            for size in sizes:
                got = await search(store, customer_id, extra, size)
                assert got == expected, (customer_id, extra, size)


async def append_all(store: LogStore, rows: list[LogRow]) -> None:
    for row in rows:
        await store.append(row)
    await store.flush()


# Every customer row as the index should point at it: (hash of the customer ID, time,
# its rowid, its position, the rowid of its request).
POINTERS = (
    "SELECT hash(c.customer_id), c.time, c.rowid, c.position, r.rowid"
    " FROM log_customers c JOIN log_requests r ON r.id = c.request_id"
)


def partition_file(folder: Path) -> Path:
    """The one partition file of a closed log whose rows all fall in one week."""
    [path] = folder.glob("*.duckdb")
    return path


def index_layout(folder: Path) -> tuple[int, int, int]:
    """(runs, sealed rows, log_customers rows) of a closed one-partition log, after
    checking that the runs plus the unsealed tail hold exactly one entry per customer
    row, pointing at that row and at its request."""
    with duckdb.connect(str(partition_file(folder))) as conn:
        sealed, _probe, _next = conn.execute("SELECT * FROM log_index_state").fetchone() or ()
        runs = [r for (r,) in conn.execute("SELECT run FROM log_index_runs").fetchall()]
        union = " UNION ALL ".join(
            [
                f"SELECT customer_hash, time, customer_row, position, request_row FROM log_cidx_{r}"
                for r in runs
            ]
            + [f"{POINTERS} WHERE c.rowid >= {sealed}"]
        )
        everything = POINTERS
        (joined,) = conn.execute(f"SELECT count(*) FROM ({POINTERS})").fetchone() or ()
        (customer_rows,) = conn.execute("SELECT count(*) FROM log_customers").fetchone() or ()
        assert joined == customer_rows  # each customer row has its request
        for a, b in ((union, everything), (everything, union)):
            difference = f"SELECT * FROM ({a}) EXCEPT ALL SELECT * FROM ({b})"
            (missing,) = conn.execute(f"SELECT count(*) FROM ({difference})").fetchone() or ()
            assert missing == 0
        (total,) = conn.execute("SELECT count(*) FROM log_customers").fetchone() or ()
        return len(runs), sealed, total


async def test_customer_search_is_exact_through_seals_merges_late_rows_and_restarts(
    tmp_path: Path,
) -> None:
    rng = random.Random(11)
    path = tmp_path / "log.duckdb"
    rows: list[LogRow] = []
    store = LogStore(path, flush_interval=0.01, **SMALL_INDEX)
    with structlog.testing.capture_logs() as logs:
        await store.start()
    try:
        await assert_exact(store, rows)  # empty log
        for _ in range(5):
            batch = rows_at(rng, 8, 0, 100)
            await append_all(store, batch)
            rows += batch
            with structlog.testing.capture_logs() as more:
                await store.indexed()
            logs += more
        batch = rows_at(rng, 60, 0, 100)
        await append_all(store, batch)
        rows += batch
        await assert_exact(store, rows, sizes=(1, 3, 50))  # whatever the indexer got to
        await store.indexed()
        await assert_exact(store, rows, sizes=(2, 50))
        # Late rows: older than everything sealed so far.
        batch = rows_at(rng, 25, -50, 10)
        await append_all(store, batch)
        rows += batch
        await assert_exact(store, rows, sizes=(4, 1000))
    finally:
        await store.close()
    assert any(e.get("merged_runs") for e in logs)
    runs, sealed, total = index_layout(path)
    assert total == sum(len(r.customers) for r in rows)

    # A restart: the unsealed tail and rows written now (late ones too) are searched.
    store = LogStore(path, flush_interval=0.01, **SMALL_INDEX)
    await store.start()
    try:
        batch = rows_at(rng, 30, -80, 120)
        await append_all(store, batch)
        rows += batch
        await assert_exact(store, rows, sizes=(3, 50))
        await store.indexed()
        await assert_exact(store, rows, sizes=(50,))
    finally:
        await store.close()
    runs, sealed, total = index_layout(path)
    assert sealed == total  # indexed() sealed everything ...
    assert 1 <= runs < 12  # ... into runs that were merged (fanout 2: about log2 of the rows)


async def test_search_is_exact_while_runs_are_being_merged(tmp_path: Path) -> None:
    rng = random.Random(5)
    path = tmp_path / "log.duckdb"
    rows: list[LogRow] = []
    # First eight runs that are never merged (fanout 1000) ...
    store = LogStore(path, flush_interval=0.01, index_seal_rows=1000, index_fanout=1000)
    await store.start()
    for _ in range(8):
        batch = rows_at(rng, 8, 0, 100)
        await append_all(store, batch)
        rows += batch
        await store.indexed()
    await store.close()
    assert index_layout(path)[0] == 8

    # ... then a store that merges them pairwise, slowly, while it is searched.
    passes = 0

    def slow_passes() -> bool:  # the indexer calls this before each pass of a run
        nonlocal passes
        passes += 1
        clock.sleep(0.003)
        return False

    store = LogStore(
        path,
        index_seal_rows=1000,
        index_fanout=2,
        index_pass_rows=7,
        index_should_stop=slow_passes,
    )
    await store.start()
    try:
        indexing = asyncio.create_task(store.indexed())
        checked = 0
        while not indexing.done() or checked < 5:
            customer_id = rng.choice(POOL)
            extra = rng.choice(QUERIES)
            expected = brute_force(rows, customer_id, extra)
            assert await search(store, customer_id, extra, rng.choice((1, 5, 50))) == expected
            checked += 1
        await indexing
        assert passes > 20  # searches ran while runs were written
    finally:
        await store.close()
    assert index_layout(path)[0] == 1


async def test_a_log_written_before_the_index_existed_is_indexed_on_open(tmp_path: Path) -> None:
    rows = rows_at(random.Random(3), 80, 0, 100)
    # As Tidegate 0.1.0 left it: one file, no index tables, no schema version.
    with duckdb.connect(str(tmp_path / SINGLE_FILE)) as conn:
        conn.execute(SCHEMA)
        for name, table in arrow_tables(rows).items():
            conn.register("batch", table)
            conn.execute(f"INSERT INTO {name} BY NAME SELECT * FROM batch")
    migrate(tmp_path)  # the store refuses it until then; it becomes the adopted partition
    path = tmp_path / LOG_DIR
    store = LogStore(path, index_seal_rows=50, index_fanout=4, index_pass_rows=40)
    with structlog.testing.capture_logs() as logs:
        await store.start()
        try:
            await assert_exact(store, rows)  # searched before or while it is built
            await store.indexed()
            await assert_exact(store, rows)
        finally:
            await store.close()
    events = [e["event"] for e in logs]
    assert "log_customer_index_sealing" in events  # progress, run by run
    assert "log_customer_index_run_written" in events
    runs, sealed, total = index_layout(path)
    assert runs >= 1 and sealed == total > 0


async def test_an_index_from_a_different_hash_function_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "log.duckdb"
    rows = rows_at(random.Random(8), 40, 0, 100)
    store = LogStore(path, **SMALL_INDEX)
    await store.start()
    await append_all(store, rows)
    await store.indexed()
    await store.close()
    with duckdb.connect(str(partition_file(path))) as conn:  # another DuckDB hashing differently
        conn.execute("UPDATE log_index_state SET hash_probe = hash_probe + 1")
        (run,) = conn.execute("SELECT min(run) FROM log_index_runs").fetchone() or ()
        conn.execute(f"UPDATE log_cidx_{run} SET customer_hash = customer_hash + 1")

    store = LogStore(path, **SMALL_INDEX)
    with structlog.testing.capture_logs() as logs:
        await store.start()
    try:
        assert any(e["event"] == "log_customer_index_dropped" for e in logs)
        await assert_exact(store, rows)
        await store.indexed()
        await assert_exact(store, rows)
    finally:
        await store.close()
    index_layout(path)


async def test_an_index_entry_pointing_at_the_wrong_request_is_not_a_match(tmp_path: Path) -> None:
    """What a hash collision looks like: the index points at a request and a customer row
    of another customer. The search checks the customer row."""
    path = tmp_path / "log.duckdb"
    carrying = replace(random_row(random.Random(1), 5), customers=(LogCustomer("customer-000001"),))
    other = replace(random_row(random.Random(2), 9), customers=(LogCustomer("customer-000002"),))
    store = LogStore(path, **SMALL_INDEX)
    await store.start()
    await append_all(store, [carrying, other])
    await store.indexed()
    await store.close()
    with duckdb.connect(str(partition_file(path))) as conn:
        (run,) = conn.execute("SELECT max(run) FROM log_index_runs").fetchone() or ()
        conn.execute(
            f"INSERT INTO log_cidx_{run} SELECT hash('customer-000001'), c.time, c.rowid,"
            " c.position, r.rowid FROM log_customers c JOIN log_requests r ON r.id = c.request_id"
            " WHERE r.id = ?",
            [other.id],
        )

    store = LogStore(path, **SMALL_INDEX)
    await store.start()
    try:
        for size in (1, 50):
            assert await search(store, "customer-000001", {}, size) == [
                shown(carrying, "customer-000001")
            ]
    finally:
        await store.close()


async def test_closing_while_a_run_is_written_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "log.duckdb"
    rows = rows_at(random.Random(4), 120, 0, 100)
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_passes() -> bool:  # the run is stopped by close(), not by this
        loop.call_soon_threadsafe(started.set)
        clock.sleep(0.01)
        return False

    # Nothing is sealed until indexed() asks for it, and the run takes many slow passes.
    store = LogStore(
        path,
        flush_interval=0.01,
        index_seal_rows=10**9,
        index_pass_rows=5,
        index_should_stop=slow_passes,
    )
    await store.start()
    await append_all(store, rows)
    indexing = asyncio.create_task(store.indexed())
    await started.wait()
    await store.close()
    with pytest.raises(Exception, match="closed"):
        await indexing
    runs, sealed, _total = index_layout(path)
    assert (runs, sealed) == (0, 0)  # the unfinished run was rolled back

    store = LogStore(path, **SMALL_INDEX)
    await store.start()
    try:
        await assert_exact(store, rows)
        await store.indexed()
        await assert_exact(store, rows)
    finally:
        await store.close()
    index_layout(path)


async def test_a_run_abandoned_through_should_stop_is_rolled_back_and_written_again(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.duckdb"
    rows = rows_at(random.Random(6), 40, 0, 100)
    refusals = 3

    def refuse_three_passes() -> bool:
        nonlocal refusals
        refusals -= 1
        return refusals >= 0

    # Nothing is sealed until indexed() asks for it; the first three runs are abandoned.
    store = LogStore(
        path, index_seal_rows=10**9, index_pass_rows=5, index_should_stop=refuse_three_passes
    )
    with structlog.testing.capture_logs() as logs:
        await store.start()
        try:
            await append_all(store, rows)
            await store.indexed()
            await assert_exact(store, rows)
        finally:
            await store.close()
    assert refusals < 0  # asked again after the refusals
    assert [e["event"] for e in logs].count("log_customer_index_failed") == 3
    runs, sealed, total = index_layout(path)
    assert runs >= 1 and sealed == total > 0
