"""The outbound log in weekly partitions: every search, page and lookup across partitions
returns what a brute-force filter over the stored rows returns; retention deletes whole
old partitions (by age or by a size budget) and leaves the rest exactly searchable; and
neither a search running meanwhile nor a kill in the middle of a drop breaks anything."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from engine.outbound_log.partitions import (
    LOG_DIR,
    PARTITION_SPAN,
    SINGLE_FILE,
    PartitionSet,
    read_only,
    week_of,
)
from engine.outbound_log.rows import LogCustomer, LogQuery, LogRow, new_request_id
from engine.outbound_log.sql import SCHEMA, arrow_tables
from engine.outbound_log.store import LogStore
from engine.upgrade import migrate
from tests.test_logstore import append_all

ROOT = Path(__file__).resolve().parent.parent
MONDAY = datetime(2026, 3, 2, tzinfo=UTC)  # a week's first moment
CUSTOMERS = [f"customer-{n:04d}" for n in range(9)]
STATUSES = (200, 200, 200, 429, 500, 0)
SMALL_INDEX = {"index_seal_rows": 20, "index_fanout": 2, "index_pass_rows": 9}


def row_at(rng: random.Random, at: datetime) -> LogRow:
    status = rng.choice(STATUSES)
    ids = [rng.choice(CUSTOMERS) for _ in range(rng.choice((1, 1, 2, 3)))]
    customers = tuple(
        LogCustomer(cid, f"Name {cid}", "delivered" if status == 200 else "retry") for cid in ids
    )
    return LogRow(
        id=new_request_id(at=at),
        time=at,
        connection_id=rng.choice(("conn-a", "conn-b")),
        method="POST",
        url="https://unification.useinsider.com/api/user/v1/upsert",
        status_code=status,
        response_time=0.05,
        error="" if status == 200 else f"HTTP {status} from the destination",
        customers=customers,
        mapping_version=1,
        request_body='{"users": []}',
        response_body="{}",
    )


def rows_over(rng: random.Random, start: datetime, weeks: int, count: int) -> list[LogRow]:
    """``count`` rows at random times over ``weeks`` weeks from ``start``, some of them on
    the very first and last microsecond of a week."""
    span = weeks * PARTITION_SPAN
    times = [start + rng.random() * span for _ in range(count - 2 * weeks)]
    for week in range(weeks):
        times += [
            start + week * PARTITION_SPAN,
            start + (week + 1) * PARTITION_SPAN - timedelta(microseconds=1),
        ]
    return [row_at(rng, at) for at in sorted(times)]


def shown(row: LogRow, customer_id: str = "") -> LogRow:
    """A row as a page shows it: no bodies, the searched customer first."""
    customers = row.customers
    if customer_id:
        customers = tuple(c for c in customers if c.customer_id == customer_id) + tuple(
            c for c in customers if c.customer_id != customer_id
        )
    return replace(row, request_body="", response_body="", customers=customers)


def expected(rows: list[LogRow], query: LogQuery) -> list[LogRow]:
    matching = [shown(r, query.customer_id) for r in rows if query.matches(r)]
    return sorted(matching, key=lambda r: (r.time, r.id), reverse=True)


async def every_page(store: LogStore, query: LogQuery, size: int) -> list[LogRow]:
    found: list[LogRow] = []
    after = None
    while True:
        page, after = await store.page(query, size, after)
        assert len(page) <= size
        found += page
        if after is None:
            return found


QUERIES = [
    LogQuery(),
    LogQuery(connection_id="conn-b"),
    LogQuery(status_codes=(429, 0)),
    LogQuery(errors_only=True),
    LogQuery(error_contains="http 500"),
    LogQuery(customer_id="customer-0003"),
    LogQuery(customer_id="customer-0005", status_codes=(200,)),
    LogQuery(start_time=MONDAY + timedelta(days=5), end_time=MONDAY + timedelta(days=16)),
    LogQuery(customer_id="customer-0001", start_time=MONDAY + timedelta(days=6)),
]


async def assert_searches_exact(
    store: LogStore, rows: list[LogRow], sizes: tuple[int, ...] = (1, 7, 50)
) -> None:
    for query in QUERIES:
        for size in sizes:
            assert await every_page(store, query, size) == expected(rows, query), (query, size)


def partition_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.duckdb"))


async def test_rows_go_to_the_file_of_their_week(tmp_path: Path) -> None:
    rows = rows_over(random.Random(1), MONDAY, 3, 60)
    store = LogStore(tmp_path / "log", flush_interval=0.01)
    await store.start()
    await append_all(store, rows)
    await store.close()
    assert partition_files(tmp_path / "log") == [
        "2026-03-02.duckdb",
        "2026-03-09.duckdb",
        "2026-03-16.duckdb",
    ]
    for week in range(3):
        start = MONDAY + week * PARTITION_SPAN
        with duckdb.connect(str(tmp_path / "log" / f"{start:%Y-%m-%d}.duckdb")) as conn:
            ids = {i for (i,) in conn.execute("SELECT id FROM log_requests").fetchall()}
        assert ids == {r.id for r in rows if start <= r.time < start + PARTITION_SPAN}


async def test_every_search_pages_across_partitions_as_a_brute_force_filter(tmp_path: Path) -> None:
    rows = rows_over(random.Random(2), MONDAY, 4, 160)
    store = LogStore(tmp_path / "log", flush_interval=0.01, **SMALL_INDEX)
    await store.start()
    try:
        await append_all(store, rows)
        await assert_searches_exact(store, rows)  # whatever the indexer got to
        await store.indexed()
        await assert_searches_exact(store, rows)
        for row in rng_sample(rows, 15):
            assert await store.get(row.id) == row
        assert await store.count() == len(rows)
    finally:
        await store.close()


def rng_sample(rows: list[LogRow], count: int) -> list[LogRow]:
    return random.Random(3).sample(rows, count)


async def test_retention_deletes_whole_old_partitions_and_keeps_the_rest_exact(
    tmp_path: Path,
) -> None:
    rows = rows_over(random.Random(4), MONDAY, 6, 300)
    store = LogStore(tmp_path / "log", flush_interval=0.01, **SMALL_INDEX)
    await store.start()
    try:
        await append_all(store, rows)
        await store.indexed()
        cutoff = MONDAY + timedelta(days=17)  # inside the third week
        result = await store.drop_partitions(older_than=cutoff)
        assert result.dropped == 2  # the first two weeks end before the cutoff
        kept = [r for r in rows if r.time >= MONDAY + 2 * PARTITION_SPAN]
        assert len(partition_files(tmp_path / "log")) == 4
        await assert_searches_exact(store, kept)
        for row in rows:
            assert (await store.get(row.id) is not None) == (row in kept)
        assert result.size_bytes == sum(p.stat().st_size for p in (tmp_path / "log").glob("*"))
    finally:
        await store.close()


async def test_the_newest_partition_is_kept_however_old(tmp_path: Path) -> None:
    rows = rows_over(random.Random(5), MONDAY, 1, 10)
    store = LogStore(tmp_path / "log", flush_interval=0.01)
    await store.start()
    try:
        await append_all(store, rows)
        result = await store.drop_partitions(older_than=datetime.now(UTC), max_bytes=1)
        assert result.dropped == 0
        assert await store.count() == len(rows)
    finally:
        await store.close()


async def test_a_size_budget_deletes_the_oldest_partitions_first(tmp_path: Path) -> None:
    rows = rows_over(random.Random(6), MONDAY, 4, 80)
    store = LogStore(tmp_path / "log", flush_interval=0.01)
    await store.start()
    try:
        await append_all(store, rows)
        names = partition_files(tmp_path / "log")
        on_disk = sum(p.stat().st_size for p in (tmp_path / "log").glob("*"))  # with the WALs
        result = await store.drop_partitions(max_bytes=on_disk - 1)  # one partition too many
        assert result.dropped == 1
        assert partition_files(tmp_path / "log") == names[1:]
        assert await store.count() == len([r for r in rows if r.time >= MONDAY + PARTITION_SPAN])
    finally:
        await store.close()


def test_a_drop_waits_for_the_searches_of_its_partition(tmp_path: Path) -> None:
    conn = duckdb.connect(":memory:")
    partitions = PartitionSet(conn, tmp_path, lambda cur, partition: cur.execute(SCHEMA))
    partitions.open()
    old = partitions.for_time(MONDAY)
    partitions.for_time(MONDAY + 3 * PARTITION_SPAN)
    assert old is not None
    dropped = threading.Event()
    with partitions.using() as held:
        assert old in held
        dropper = threading.Thread(target=lambda: (partitions.drop(old), dropped.set()))
        dropper.start()
        assert not dropped.wait(0.3)  # held by the search
        assert (tmp_path / "2026-03-02.duckdb").exists()
        assert old not in partitions.all()  # hidden from new searches meanwhile
    assert dropped.wait(5)
    dropper.join()
    assert partition_files(tmp_path) == ["2026-03-23.duckdb"]
    conn.close()


async def test_what_an_interrupted_drop_left_is_deleted_when_the_log_opens(tmp_path: Path) -> None:
    rows = rows_over(random.Random(7), MONDAY, 2, 40)
    folder = tmp_path / "log"
    store = LogStore(folder, flush_interval=0.01)
    await store.start()
    await append_all(store, rows)
    await store.close()
    first = folder / "2026-03-02.duckdb"
    first.rename(first.with_name(first.name + ".dropping"))  # killed right after the rename
    store = LogStore(folder, flush_interval=0.01)
    await store.start()
    try:
        assert partition_files(folder) == ["2026-03-09.duckdb"]
        assert not list(folder.glob("*.dropping"))
        kept = [r for r in rows if r.time >= MONDAY + PARTITION_SPAN]
        assert await every_page(store, LogQuery(), 50) == expected(kept, LogQuery())
    finally:
        await store.close()


async def test_a_log_from_before_partitions_is_searched_as_one_adopted_partition(
    tmp_path: Path,
) -> None:
    old = rows_over(random.Random(8), MONDAY, 3, 90)
    with duckdb.connect(str(tmp_path / SINGLE_FILE)) as conn:  # as Tidegate 0.1.0 kept it
        conn.execute(SCHEMA)
        for name, table in arrow_tables(old).items():
            conn.register("batch", table)
            conn.execute(f"INSERT INTO {name} BY NAME SELECT * FROM batch")
    migrate(tmp_path)  # schema step 2 moves it into the partition folder
    folder = tmp_path / LOG_DIR
    new = rows_over(random.Random(9), MONDAY + 2 * PARTITION_SPAN, 2, 40)  # overlaps a week
    store = LogStore(folder, flush_interval=0.01, **SMALL_INDEX)
    await store.start()
    try:
        await append_all(store, new)
        assert "adopted.duckdb" in partition_files(folder)
        await assert_searches_exact(store, old + new, sizes=(3, 50))
        await store.indexed()
        await assert_searches_exact(store, old + new, sizes=(1, 50))
        newest_old = max(r.time for r in old)
        result = await store.drop_partitions(older_than=newest_old)
        assert result.dropped == 0  # its newest row is not past the cutoff yet
        cutoff = newest_old + timedelta(microseconds=1)  # the end of the third week
        result = await store.drop_partitions(older_than=cutoff)
        # The adopted file and the third week's partition: every row of both is older.
        assert result.dropped == 2 and "adopted.duckdb" not in partition_files(folder)
        await assert_searches_exact(store, [r for r in new if r.time >= cutoff])
    finally:
        await store.close()


DROPPER = """
import asyncio, sys
from datetime import datetime, timedelta, UTC
from pathlib import Path
from engine.outbound_log.store import LogStore
from engine.upgrade import migrate

async def main():
    store = LogStore(Path(sys.argv[1]))
    await store.start()
    print("dropping", flush=True)
    await store.drop_partitions(older_than=datetime.now(UTC) + timedelta(days=3650))
    print("dropped", flush=True)
    await store.close()

asyncio.run(main())
"""


@pytest.mark.parametrize("kill_after", [0.0, 0.005, 0.02])
async def test_a_kill_in_the_middle_of_a_drop_leaves_a_log_that_opens_whole(
    tmp_path: Path, kill_after: float
) -> None:
    folder = tmp_path / "log"
    start = week_of(datetime.now(UTC)) - 40 * PARTITION_SPAN
    rows = rows_over(random.Random(10), start, 40, 100)
    store = LogStore(folder, flush_interval=0.01)
    await store.start()
    await append_all(store, rows)
    await store.close()

    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DROPPER, str(folder), cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        assert (await process.stdout.readline()).strip() == b"dropping"
        await asyncio.sleep(kill_after)
        with contextlib.suppress(ProcessLookupError):  # it may have finished: fine too
            process.send_signal(signal.SIGKILL)
    finally:
        await asyncio.wait_for(process.wait(), 30)

    store = LogStore(folder, flush_interval=0.01)
    await store.start()
    try:
        assert not list(folder.glob("*.dropping"))
        left = {p.name for p in folder.glob("*.duckdb")}
        assert left, "the newest partition always stays"
        kept = [r for r in rows if f"{week_of(r.time):%Y-%m-%d}.duckdb" in left]
        await assert_searches_exact(store, kept, sizes=(50,))
        await append_all(store, rows_over(random.Random(11), week_of(datetime.now(UTC)), 1, 5))
    finally:
        await store.close()
    with read_only(folder) as conn:
        (count,) = conn.execute("SELECT count(*) FROM log_requests").fetchone() or (0,)
    assert count == len(kept) + 5


async def test_the_engine_deletes_old_partitions_in_the_background(tmp_path: Path) -> None:
    """``tidegate serve``'s retention job, with its delay and interval shortened."""
    from engine.app import Engine, EngineConfig

    folder = tmp_path / "data" / "outbound-log"
    old_week = week_of(datetime.now(UTC)) - 20 * PARTITION_SPAN
    rows = rows_over(random.Random(12), old_week, 2, 20)
    store = LogStore(folder, flush_interval=0.01)
    await store.start()
    await append_all(store, rows + rows_over(random.Random(13), week_of(datetime.now(UTC)), 1, 3))
    await store.close()
    engine = Engine(
        EngineConfig(
            data_dir=tmp_path / "data",
            grpc_port=0,
            http_port=0,
            log_retention_days=90,
            log_retention_delay=0.0,
            log_retention_interval=0.05,
        )
    )
    await engine.start()
    try:
        deadline = time.monotonic() + 10
        while len(partition_files(folder)) > 1:
            assert time.monotonic() < deadline, partition_files(folder)
            await asyncio.sleep(0.05)
        assert await engine.logs.count() == 3
    finally:
        await engine.stop(grace=1.0)
