"""The outbound log store, against real DuckDB files on tmp_path."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from engine.errors import InvalidInputError, TidegateError
from engine.outbound_log.rows import LogCustomer, LogQuery, LogRow, new_request_id
from engine.outbound_log.store import LogStore

BASE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
UPSERT_URL = "https://unification.useinsider.com/api/user/v1/upsert"


def make_row(seconds: float, **fields: object) -> LogRow:
    """A delivered single-customer request sent ``seconds`` after BASE, overridden by fields."""
    time = BASE + timedelta(seconds=seconds)
    defaults: dict[str, object] = {
        "id": new_request_id(at=time),
        "time": time,
        "connection_id": "conn-a",
        "method": "POST",
        "url": UPSERT_URL,
        "status_code": 200,
        "response_time": 0.125,
        "error": "",
        "customers": (LogCustomer("cust-1", "Ada Lovelace"),),
        "mapping_version": 3,
    }
    return LogRow(**{**defaults, **fields})  # type: ignore[arg-type]


def listed(row: LogRow) -> LogRow:
    """What list() and streams must show for a row with at most 100 customers."""
    return replace(row, request_body="", response_body="")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[LogStore]:
    log_store = LogStore(tmp_path / "log.duckdb", flush_interval=0.01)
    await log_store.start()
    yield log_store
    await log_store.close()


async def append_all(store: LogStore, rows: list[LogRow]) -> None:
    for row in rows:
        await store.append(row)
    await store.flush()


async def list_all(store: LogStore, query: LogQuery) -> list[LogRow]:
    rows, after = await store.page(query, page_size=1000)
    assert after is None
    return rows


async def test_appended_rows_are_listed_newest_first(store: LogStore) -> None:
    rows = [make_row(s) for s in (5, 1, 9, 3)]
    await append_all(store, rows)

    listed_rows, after = await store.page(LogQuery(), 50)

    assert listed_rows == [listed(r) for r in sorted(rows, key=lambda r: r.time, reverse=True)]
    assert after is None
    assert await store.count() == 4


async def test_get_returns_bodies_and_list_omits_them(store: LogStore) -> None:
    row = make_row(
        0,
        request_body='{"users": [{"identifiers": {"uuid": "cust-1"}}]}',
        response_body='{"data": {"successful": {"count": 1}}}',
    )
    await append_all(store, [row])

    assert await store.get(row.id) == row
    (in_list,), _ = await store.page(LogQuery(), 50)
    assert (in_list.request_body, in_list.response_body) == ("", "")


async def test_get_of_an_unknown_or_malformed_id_returns_none(store: LogStore) -> None:
    await append_all(store, [make_row(0)])

    assert await store.get(new_request_id(at=BASE)) is None
    assert await store.get("not-a-request-id") is None


async def test_filter_by_identifier_returns_only_that_request(store: LogStore) -> None:
    rows = [make_row(s) for s in range(5)]
    await append_all(store, rows)

    assert await list_all(store, LogQuery(identifier=rows[2].id)) == [listed(rows[2])]


async def test_filter_by_customer_id_finds_a_request_carrying_the_customer_in_a_batch(
    store: LogStore,
) -> None:
    batch = tuple(LogCustomer(f"cust-{i}", f"Customer {i}") for i in range(1000))
    carrying = make_row(1, customers=batch)
    others = [make_row(0), make_row(2, customers=batch[:400]), make_row(3, customers=batch[600:])]
    await append_all(store, [carrying, *others])

    (found,) = await list_all(store, LogQuery(customer_id="cust-500"))

    assert found.id == carrying.id
    assert found.customer_count == 1000
    assert len(found.customers) == 100
    assert found.customers[0] == LogCustomer("cust-500", "Customer 500")


async def test_get_returns_every_customer_in_request_order(store: LogStore) -> None:
    batch = tuple(
        LogCustomer(f"cust-{i}", outcome="failed" if i % 7 else "delivered") for i in range(1000)
    )
    row = make_row(0, customers=batch)
    await append_all(store, [row])

    fetched = await store.get(row.id)

    assert fetched is not None and fetched.customers == batch


async def test_filter_error_contains_matches_the_request_error_case_insensitively(
    store: LogStore,
) -> None:
    timeout = make_row(0, status_code=0, error="Read TIMEOUT after 30s", ambiguous=True)
    server_error = make_row(2, status_code=500, error="Bad gateway")
    await append_all(store, [timeout, make_row(1), server_error])

    assert await list_all(store, LogQuery(error_contains="timeout")) == [listed(timeout)]


async def test_filter_error_contains_matches_a_carried_customers_error(store: LogStore) -> None:
    failing = (
        LogCustomer("cust-1", "Ada"),
        LogCustomer("cust-2", "Bob", outcome="failed", error="Invalid EMAIL format"),
    )
    partial = make_row(0, customers=failing)
    await append_all(store, [partial, make_row(1), make_row(2, error="quota exceeded")])

    assert await list_all(store, LogQuery(error_contains="invalid email")) == [listed(partial)]


async def test_filter_by_several_status_codes(store: LogStore) -> None:
    rows = [make_row(i, status_code=code) for i, code in enumerate((200, 429, 500, 503, 429, 0))]
    await append_all(store, rows)

    found = await list_all(store, LogQuery(status_codes=(429, 503)))

    assert {r.id for r in found} == {rows[1].id, rows[3].id, rows[4].id}


async def test_filter_by_time_range_includes_start_and_excludes_end(store: LogStore) -> None:
    rows = [make_row(s) for s in range(10)]
    await append_all(store, rows)

    query = LogQuery(start_time=rows[3].time, end_time=rows[7].time)
    found = await list_all(store, query)

    assert [r.id for r in found] == [rows[6].id, rows[5].id, rows[4].id, rows[3].id]


async def test_filter_by_connection_id(store: LogStore) -> None:
    rows = [make_row(i, connection_id=conn) for i, conn in enumerate(("a", "b", "a", "c"))]
    await append_all(store, rows)

    found = await list_all(store, LogQuery(connection_id="a"))

    assert [r.id for r in found] == [rows[2].id, rows[0].id]


async def test_filter_errors_only(store: LogStore) -> None:
    rows = [make_row(0), make_row(1, status_code=401, error="unauthorized"), make_row(2)]
    await append_all(store, rows)

    assert [r.id for r in await list_all(store, LogQuery(errors_only=True))] == [rows[1].id]


async def test_filters_combine_so_every_set_field_must_match(store: LogStore) -> None:
    failed = LogCustomer("cust-9", outcome="failed", error="phone number rejected")
    wanted = make_row(
        5, connection_id="a", status_code=400, error="1 user failed", customers=(failed,)
    )
    near_misses = [
        replace(wanted, id=new_request_id(at=BASE + timedelta(seconds=6)), connection_id="b"),
        make_row(7, connection_id="a", status_code=500, error="1 user failed", customers=(failed,)),
        make_row(8, connection_id="a", status_code=400, error="1 user failed"),
        make_row(30, connection_id="a", status_code=400, error="x", customers=(failed,)),
    ]
    await append_all(store, [wanted, *near_misses])

    query = LogQuery(
        customer_id="cust-9",
        error_contains="PHONE",
        status_codes=(400, 422),
        start_time=BASE,
        end_time=BASE + timedelta(seconds=20),
        connection_id="a",
        errors_only=True,
    )
    assert await list_all(store, query) == [listed(wanted)]


async def test_paging_walks_every_row_exactly_once(store: LogStore) -> None:
    # Several rows share a time, so the pages must also be ordered by id.
    rows = [make_row(i // 3) for i in range(23)]
    await append_all(store, rows)

    seen: list[str] = []
    after = None
    while True:
        page, after = await store.page(LogQuery(), page_size=5, after=after)
        assert len(page) <= 5
        seen += [r.id for r in page]
        if after is None:
            break

    expected = sorted(rows, key=lambda r: (r.time, r.id), reverse=True)
    assert seen == [r.id for r in expected]


async def test_page_returns_at_most_page_size_rows(store: LogStore) -> None:
    # The admin API's page-size rule (default, maximum) is tested in test_paging.py; the
    # store takes any size of 1 or more as it is.
    await append_all(store, [make_row(s) for s in range(60)])

    assert len((await store.page(LogQuery(), page_size=1))[0]) == 1
    assert len((await store.page(LogQuery(), page_size=5000))[0]) == 60
    for size in (0, -3):
        with pytest.raises(ValueError):
            await store.page(LogQuery(), page_size=size)


async def test_page_cursor_is_the_time_in_microseconds_and_id_of_the_last_row(
    store: LogStore,
) -> None:
    rows = [make_row(s) for s in (1.000001, 2.5, 3)]
    await append_all(store, rows)

    page, after = await store.page(LogQuery(), page_size=2)

    last = rows[1]  # newest first: 3, then 2.5
    assert page[-1].id == last.id
    micros = (last.time - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert after == (micros, last.id)
    rest, end = await store.page(LogQuery(), page_size=2, after=after)
    assert [r.id for r in rest] == [rows[0].id] and end is None


async def test_subscriber_receives_only_rows_appended_after_subscribing(store: LogStore) -> None:
    await append_all(store, [make_row(0)])
    subscription = store.subscribe(LogQuery())
    after = [make_row(1), make_row(2)]
    await append_all(store, after)
    await store.close()

    received = [row async for batch in subscription for row in batch]
    assert received == [listed(r) for r in after]


async def test_closing_a_subscription_ends_its_iteration(store: LogStore) -> None:
    subscription = store.subscribe(LogQuery())
    await append_all(store, [make_row(0)])
    subscription.close()

    assert [batch async for batch in subscription] == []


async def test_subscriber_receives_only_matching_rows(store: LogStore) -> None:
    subscription = store.subscribe(LogQuery(status_codes=(500,)))
    rows = [make_row(0), make_row(1, status_code=500, error="boom"), make_row(2)]
    await append_all(store, rows)
    await store.close()

    received = [row async for batch in subscription for row in batch]
    assert received == [listed(rows[1])]


async def test_a_subscriber_that_never_reads_falls_behind_while_another_gets_everything(
    store: LogStore,
) -> None:
    idle = store.subscribe(LogQuery(), max_pending=10)
    reader = store.subscribe(LogQuery())
    rows = [make_row(s) for s in range(30)]
    for start in range(0, 30, 6):
        await append_all(store, rows[start : start + 6])
    await store.close()

    assert [row async for batch in reader for row in batch] == [listed(r) for r in rows]
    with pytest.raises(TidegateError, match="fell behind"):
        await anext(idle)


async def test_append_waits_while_max_buffer_rows_are_uncommitted(tmp_path: Path) -> None:
    log_store = LogStore(tmp_path / "log.duckdb", flush_interval=60, max_buffer=2)
    await log_store.start()
    await log_store.append(make_row(0))
    await log_store.append(make_row(1))

    third = asyncio.create_task(log_store.append(make_row(2)))
    await asyncio.sleep(0.05)
    assert not third.done()

    await log_store.flush()
    await third
    await log_store.close()
    assert third.exception() is None


async def test_rows_survive_close_and_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "log.duckdb"
    rows = [make_row(s, request_body=f"body {s}") for s in range(3)]
    first = LogStore(path)
    await first.start()
    for row in rows:
        await first.append(row)
    await first.close()  # no flush: close() must commit what is buffered

    second = LogStore(path)
    await second.start()
    try:
        assert await second.count() == 3
        assert [await second.get(r.id) for r in rows] == rows
    finally:
        await second.close()


async def test_a_new_log_file_stores_no_string_as_dict_fsst(tmp_path: Path) -> None:
    """DICT_FSST decodes the whole dictionary of a segment to read one row of it; new log
    files use the v1.2.0 storage format, whose string encodings read single rows."""
    path = tmp_path / "log.duckdb"
    store = LogStore(path)
    await store.start()
    customers = [LogCustomer(f"cust-{i}", f"Name {i}") for i in range(3000)]
    await append_all(store, [make_row(i / 100, customers=(c,)) for i, c in enumerate(customers)])
    await store.close()
    [partition] = path.glob("*.duckdb")  # every row is in the week of BASE
    with duckdb.connect(str(partition)) as conn:
        conn.execute("CHECKPOINT")
        found = conn.execute(
            "SELECT DISTINCT compression FROM pragma_storage_info('log_customers')"
            " WHERE segment_type = 'VARCHAR'"
        ).fetchall()
    assert found and ("DICT_FSST",) not in found, found


async def test_append_rejects_an_id_whose_time_is_far_from_the_rows_time(store: LogStore) -> None:
    row = make_row(0, id=new_request_id(at=BASE - timedelta(hours=2)))

    with pytest.raises(InvalidInputError) as raised:
        await store.append(row)
    assert raised.value.field == "id"


def test_new_request_id_is_time_ordered_and_unique() -> None:
    before_ms = int(datetime.now(UTC).timestamp() * 1000)
    ids = [new_request_id() for _ in range(10_000)]
    after_ms = int(datetime.now(UTC).timestamp() * 1000)

    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    parsed = [uuid.UUID(i) for i in ids]
    assert all(p.version == 7 and str(p) == i for p, i in zip(parsed, ids, strict=True))
    # Borrowing a millisecond when one fills up may run slightly ahead of the clock.
    assert before_ms <= parsed[0].int >> 80 and parsed[-1].int >> 80 <= after_ms + 10


async def test_query_matches_agrees_with_list_filtering(store: LogStore) -> None:
    bad_phone = LogCustomer("cust-2", outcome="failed", error="Bad Phone")
    rows = [
        make_row(0),
        make_row(1, connection_id="b", status_code=429, error="Too Many Requests"),
        make_row(2, customers=(LogCustomer("cust-1"), bad_phone), error="1 user failed"),
        make_row(3, status_code=0, error="timeout", ambiguous=True, customers=()),
        make_row(4, connection_id="b", customers=(LogCustomer("cust-3"), LogCustomer("cust-2"))),
        make_row(5, status_code=500, error="Internal error"),
    ]
    await append_all(store, rows)
    expected_by_query = [
        (LogQuery(), {0, 1, 2, 3, 4, 5}),
        (LogQuery(identifier=rows[4].id), {4}),
        (LogQuery(identifier="bogus"), set()),
        (LogQuery(customer_id="cust-2"), {2, 4}),
        (LogQuery(customer_id="nobody"), set()),
        (LogQuery(error_contains="PHONE"), {2}),
        (LogQuery(error_contains="too MANY"), {1}),
        (LogQuery(error_contains="error"), {5}),
        (LogQuery(status_codes=(0, 429)), {1, 3}),
        (LogQuery(start_time=BASE + timedelta(seconds=2)), {2, 3, 4, 5}),
        (LogQuery(end_time=BASE + timedelta(seconds=2)), {0, 1}),
        (LogQuery(connection_id="b"), {1, 4}),
        (LogQuery(errors_only=True), {1, 2, 3, 5}),
        (LogQuery(connection_id="b", errors_only=True), {1}),
        (LogQuery(customer_id="cust-2", error_contains="phone", status_codes=(200,)), {2}),
    ]
    for query, expected in expected_by_query:
        expected_ids = {rows[i].id for i in expected}
        assert {r.id for r in rows if query.matches(r)} == expected_ids, query
        assert {r.id for r in await list_all(store, query)} == expected_ids, query


async def test_customer_pages_are_exact_across_weeks_of_history(store: LogStore) -> None:
    """Customer pages are the exact newest-first sequence, whatever the spacing of the
    customer's requests."""
    now = datetime.now(UTC)
    ages_in_days = [0.01, 0.5, 0.9, 2, 3, 6, 8, 20, 29, 31, 45, 90, 200]
    rows = []
    for n, age in enumerate(ages_in_days):
        at = now - timedelta(days=age)
        rows.append(
            make_row(0, id=new_request_id(at=at), time=at, customers=(LogCustomer("busy"),))
        )
        other = at - timedelta(seconds=1)
        rows.append(
            make_row(0, id=new_request_id(at=other), time=other, customers=(LogCustomer(f"x{n}"),))
        )
    await append_all(store, sorted(rows, key=lambda r: r.time))
    expected = [
        r.id
        for r in sorted(rows, key=lambda r: r.time, reverse=True)
        if r.customers[0].customer_id == "busy"
    ]
    for size in (1, 2, 3, 5):
        seen: list[str] = []
        after = None
        while True:
            page, after = await store.page(LogQuery(customer_id="busy"), size, after)
            seen += [r.id for r in page]
            if after is None:
                break
        assert seen == expected, f"page size {size}"
