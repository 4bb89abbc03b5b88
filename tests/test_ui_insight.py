"""The page's insight endpoints against a real engine (engine/ui/insight.py): the tag
criterion (ListLogs, StreamLogs and /ui/api/logs), one customer's ledger and the charts'
numbers, which are checked against counts computed here from the rows the test wrote."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import grpc
import pytest

from clients.client import TidegateClient
from engine.app import Engine, EngineConfig
from engine.outbound_log.partitions import week_of
from engine.outbound_log.rows import LogCustomer, LogRow, new_request_id
from engine.state import tokens
from engine.ui import insight
from tests.ui_support import base, login, make_token, row, session, write


@pytest.fixture
def engine_config(engine_config: EngineConfig) -> EngineConfig:
    engine_config.ui_port = 0
    return engine_config


@pytest.fixture
async def http(engine: Engine) -> AsyncIterator[aiohttp.ClientSession]:
    token = await make_token(engine, tokens.Role.VIEWER, "insight-viewer")
    async with session() as s:
        await login(s, engine, token)
        yield s


async def get(http: aiohttp.ClientSession, engine: Engine, path: str) -> tuple[int, Any]:
    async with http.get(base(engine) + path) as r:
        return r.status, await r.json()


def tagged(tags: str, customer: str = "c-1", at: datetime | None = None) -> LogRow:
    return replace(row(customer, at=at), tags=tags)


# -- tags --------------------------------------------------------------------------------------


async def test_the_tag_criterion_in_list_logs_and_the_page(
    engine: Engine, client: TidegateClient, http: aiohttp.ClientSession
) -> None:
    now = datetime.now(UTC)
    rows = {
        "plain": tagged("", "alice", now - timedelta(seconds=50)),
        "replay": tagged("replay", "alice", now - timedelta(seconds=40)),
        "backfill": tagged("backfill", "bob", now - timedelta(seconds=30)),
        "both": tagged("backfill,replay", "alice", now - timedelta(seconds=20)),
        "prefix": tagged("replayed", "alice", now - timedelta(seconds=10)),  # not "replay"
    }
    await write(engine, *rows.values())

    async def listed(**filters: Any) -> set[str]:
        return {e.id for e in (await client.list_logs(**filters)).logs}

    assert await listed(tags=["replay"]) == {rows["replay"].id, rows["both"].id}
    assert await listed(tags=["replay", "backfill"]) == {
        rows["replay"].id,
        rows["backfill"].id,
        rows["both"].id,
    }
    # With a customer (the customer index's path) and with other criteria.
    assert await listed(tags=["backfill"], customer_id="alice") == {rows["both"].id}
    assert await listed(tags=["replay"], customer_id="bob") == set()
    assert await listed(tags=["replay"], identifier=rows["both"].id) == {rows["both"].id}
    assert await listed(tags=["erasure"]) == set()

    # The page's `tag` parameter: one tag or several, separated by commas.
    status, body = await get(http, engine, "/ui/api/logs?tag=replay")
    assert status == 200
    assert [e["id"] for e in body["logs"]] == [rows["both"].id, rows["replay"].id]
    assert body["logs"][0]["tags"] == ["backfill", "replay"]
    status, body = await get(http, engine, "/ui/api/logs?tag=backfill,replay&customer_id=alice")
    assert [e["id"] for e in body["logs"]] == [rows["both"].id, rows["replay"].id]


async def test_a_bad_tag_is_refused_naming_the_field_without_echoing_it_whole(
    engine: Engine, client: TidegateClient, http: aiohttp.ClientSession
) -> None:
    long_tag = "Replay<script>" + "x" * 500
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.list_logs(tags=["replay", long_tag])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert "filter.tags[1]" in details and "a-z" in details
    assert "x" * 200 not in details and "more characters" in details
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.list_logs(tags=[f"t{i}" for i in range(21)])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 20 tags" in (caught.value.details() or "")

    status, body = await get(http, engine, "/ui/api/logs?tag=Not%20A%20Tag")
    assert status == 400
    assert body["field"] == "tag" and "'Not A Tag' is not a tag" in body["error"]


async def test_stream_logs_honours_the_tag_criterion(
    engine: Engine, client: TidegateClient
) -> None:
    got: list[str] = []
    ready = asyncio.Event()

    async def tail() -> None:
        stream = client.stream_logs(tags=["replay"])
        ready.set()
        async for entry in stream:
            got.append(entry.id)
            if len(got) == 2:
                return

    task = asyncio.create_task(tail())
    await ready.wait()
    await asyncio.sleep(0.3)  # the subscription is open once the headers are back
    expected: list[str] = []
    for tags in ["", "replay", "backfill", "erasure,replay"]:
        r = tagged(tags)
        if "replay" in tags.split(","):
            expected.append(r.id)
        await write(engine, r)
    await asyncio.wait_for(task, 10)
    assert got == expected


# -- the customer ledger -----------------------------------------------------------------------


def carrying(at: datetime, customers: list[tuple[str, str, str]], **fields: Any) -> LogRow:
    """A request at ``at`` carrying ``customers`` (id, outcome, message)."""
    return LogRow(
        id=new_request_id(at),
        time=at,
        connection_id=fields.get("connection", "insider-main"),
        method="POST",
        url="https://unification.useinsider.com/api/user/v1/upsert",
        status_code=fields.get("status", 200),
        response_time=0.2,
        error=next((m for _, o, m in customers if o == "failed"), ""),
        customers=tuple(LogCustomer(c, f"Name {c}", o, m) for c, o, m in customers),
        mapping_version=fields.get("version", 1),
        attempt=fields.get("attempt", 1),
        tags=fields.get("tags", ""),
    )


@pytest.mark.parametrize("via_index", [1000, 2], ids=["index", "partition-scan"])
async def test_the_ledger_shows_every_request_for_one_customer_in_either_order(
    engine: Engine, http: aiohttp.ClientSession, via_index: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Oldest first reads up to OLDEST_VIA_INDEX requests through the customer index, and
    # the partitions oldest first for a customer with more: 2 makes alice such a one.
    monkeypatch.setattr(insight, "OLDEST_VIA_INDEX", via_index)
    now = datetime.now(UTC).replace(microsecond=0)
    # Five requests for alice over three weeks (three partitions), one in a batch where she
    # is second and failed; others for bob only.
    alice = [
        carrying(now - timedelta(days=20), [("alice", "delivered", "")], version=1),
        carrying(now - timedelta(days=9), [("bob", "delivered", "")]),
        carrying(
            now - timedelta(days=8),
            [("bob", "delivered", ""), ("alice", "failed", "invalid email: 'x@'")],
            status=200,
            version=2,
        ),
        carrying(now - timedelta(hours=5), [("alice", "retry", "")], status=503, attempt=1),
        carrying(now - timedelta(hours=4), [("alice", "delivered", "")], attempt=2, tags="replay"),
        carrying(now - timedelta(hours=3), [("bob", "failed", "nope")], status=400),
        carrying(now - timedelta(minutes=1), [("alice", "delivered", "")], version=3),
    ]
    await write(engine, *alice)
    mine = [r for r in alice if any(c.customer_id == "alice" for c in r.customers)]
    assert len(mine) == 5

    async def every(order: str) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = []
        token = ""
        pages = 0
        while True:
            status, body = await get(
                http,
                engine,
                f"/ui/api/customers/alice/ledger?order={order}&page_size=2&page_token={token}",
            )
            assert status == 200, body
            assert len(body["entries"]) <= 2
            entries += body["entries"]
            pages += 1
            token = body["nextPageToken"]
            if not token:
                return entries
            assert pages < 10

    newest = await every("newest")
    assert [e["requestId"] for e in newest] == [r.id for r in reversed(mine)]
    oldest = await every("oldest")
    assert [e["requestId"] for e in oldest] == [r.id for r in mine]

    failed = next(e for e in newest if e["outcome"] == "failed")
    assert failed["requestId"] == mine[1].id
    assert failed["error"] == "invalid email: 'x@'"
    assert failed["mappingVersion"] == 2 and failed["customerCount"] == 2
    assert failed["connectionId"] == "insider-main" and failed["statusCode"] == 200
    replayed = oldest[3]
    assert replayed["attempt"] == 2 and replayed["tags"] == ["replay"]
    assert oldest[2]["statusCode"] == 503 and oldest[2]["outcome"] == "retry"
    assert oldest[0]["time"] == (now - timedelta(days=20)).isoformat().replace("+00:00", "Z")

    status, body = await get(http, engine, "/ui/api/customers/nobody/ledger")
    assert status == 200 and body["entries"] == [] and body["nextPageToken"] == ""


async def test_the_ledger_refuses_bad_parameters_by_name(
    engine: Engine, http: aiohttp.ClientSession
) -> None:
    await write(engine, row("alice"), row("alice"), row("alice"))
    status, body = await get(http, engine, "/ui/api/customers/alice/ledger?page_size=1")
    newest_token = body["nextPageToken"]
    assert status == 200 and newest_token
    for query, field in [
        ("order=sideways", "order"),
        ("page_size=lots", "page_size"),
        ("page_size=-1", "page_size"),
        ("page_token=garbage!", "page_token"),
        (f"order=oldest&page_token={newest_token}", "page_token"),  # another order's token
    ]:
        status, body = await get(http, engine, f"/ui/api/customers/alice/ledger?{query}")
        assert status == 400, query
        assert body["field"] == field, (query, body)
    status, body = await get(http, engine, "/ui/api/customers/" + "a" * 300 + "/ledger")
    assert status == 400 and body["field"] == "id" and "a" * 300 not in body["error"]
    async with session() as anonymous:
        for path in ["/ui/api/customers/alice/ledger", "/ui/api/stats"]:
            async with anonymous.get(base(engine) + path) as r:
                assert r.status == 401, path
                assert "entries" not in await r.json()


# -- the charts --------------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (what DuckDB's quantile_cont does)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def status_class(code: int) -> str:
    if code == 0:
        return "network"
    return {2: "2xx", 4: "4xx", 5: "5xx"}.get(code // 100, "other")


async def test_the_stats_match_counts_made_from_the_rows_written(
    engine: Engine, http: aiohttp.ClientSession
) -> None:
    # A window two days back, clear of anything the engine itself logs now.
    minute = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(days=2)
    end = minute + timedelta(seconds=30)  # inside the minute that starts at `minute`
    start_1h = minute + timedelta(minutes=1) - timedelta(hours=1)
    made: list[LogRow] = []
    statuses = [200, 201, 404, 500, 0, 302, 200, 429, 200, 503]
    for i in range(120):
        at = start_1h + timedelta(seconds=29 * i + 7)  # spread over the hour
        if at >= end:
            break
        code = statuses[i % len(statuses)]
        connection = "insider-a" if i % 3 else "insider-b"
        made.append(
            replace(
                row(f"c-{i}", code, "" if 200 <= code < 300 else f"failed {code}", connection),
                id=new_request_id(at),
                time=at,
                response_time=0.05 + (i % 17) / 10,
            )
        )
    # Outside the hour: must not count in it (one in an older partition).
    outside = [
        replace(row("early", 500, "x", "insider-a"), id=new_request_id(t), time=t)
        for t in (
            start_1h - timedelta(seconds=1),
            start_1h - timedelta(days=10),
            end + timedelta(minutes=5),
        )
    ]
    await write(engine, *made, *outside)
    end_z = end.isoformat().replace("+00:00", "Z")

    status, body = await get(http, engine, f"/ui/api/stats?window=1h&end={end_z}")
    assert status == 200, body
    assert body["window"] == "1h" and body["bucketSeconds"] == 60
    assert body["start"] == start_1h.isoformat().replace("+00:00", "Z")
    assert [c["connection"] for c in body["connections"]] == ["insider-a", "insider-b"]
    for shown in body["connections"]:
        mine = [r for r in made if r.connection_id == shown["connection"]]
        assert shown["total"] == len(mine)
        assert shown["errors"] == sum(1 for r in mine if r.error)
        assert shown["errorRate"] == pytest.approx(shown["errors"] / len(mine), abs=1e-6)
        times = [r.response_time for r in mine]
        assert shown["p50"] == pytest.approx(statistics.median(times), abs=1e-6)
        assert shown["p99"] == pytest.approx(quantile(times, 0.99), abs=1e-6)
        assert len(shown["buckets"]) == 60
        for i, bucket in enumerate(shown["buckets"]):
            at = start_1h + timedelta(minutes=i)
            assert bucket["start"] == at.isoformat().replace("+00:00", "Z")
            inside = [r for r in mine if at <= r.time < at + timedelta(minutes=1)]
            for kind in ("2xx", "4xx", "5xx", "network", "other"):
                expected = sum(1 for r in inside if status_class(r.status_code) == kind)
                assert bucket[kind] == expected, (i, kind)
            assert bucket["total"] == len(inside)
            if inside:
                values = [r.response_time for r in inside]
                assert bucket["p50"] == pytest.approx(statistics.median(values), abs=1e-6)
            else:
                assert bucket["p50"] is None

    # One connection only; the day's window has 96 buckets of 15 minutes.
    status, body = await get(
        http,
        engine,
        f"/ui/api/stats?window=24h&connection=insider-b&end={end_z}",
    )
    assert status == 200
    assert body["bucketSeconds"] == 900 and [c["connection"] for c in body["connections"]] == [
        "insider-b"
    ]
    (day,) = body["connections"]
    assert len(day["buckets"]) == 96
    top = minute.replace(minute=minute.minute - minute.minute % 15) + timedelta(minutes=15)
    assert day["buckets"][-1]["start"] == (top - timedelta(minutes=15)).isoformat().replace(
        "+00:00", "Z"
    )
    day_start = top - timedelta(hours=24)
    mine = [r for r in made if r.connection_id == "insider-b"]
    for i, bucket in enumerate(day["buckets"]):
        at = day_start + timedelta(minutes=15 * i)
        inside = [r for r in mine if at <= r.time < at + timedelta(minutes=15)]
        assert bucket["total"] == len(inside), i
        assert bucket["4xx"] == sum(1 for r in inside if 400 <= r.status_code < 500)
    assert day["total"] == len(mine)


async def test_the_stats_refuse_a_bad_window_and_answer_an_empty_log(
    engine: Engine, http: aiohttp.ClientSession
) -> None:
    for query, field in [("window=7d", "window"), ("window=1h&end=yesterday", "end")]:
        status, body = await get(http, engine, f"/ui/api/stats?{query}")
        assert status == 400 and body["field"] == field, body
    status, body = await get(http, engine, "/ui/api/stats?window=24h&connection=none")
    assert status == 200 and body["connections"] == []


async def test_the_insight_module_is_served_under_the_same_policy(engine: Engine) -> None:
    async with session() as anonymous:
        async with anonymous.get(base(engine) + "/ui/static/insight.js") as r:
            assert r.status == 200 and r.content_type == "text/javascript"
            assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")
            script = await r.text()
    assert "innerHTML" not in script and "eval(" not in script


async def test_a_customer_id_with_a_slash_and_accents_reaches_its_ledger(
    engine: Engine, http: aiohttp.ClientSession
) -> None:
    await write(engine, row("a/b c%d?é"), row("a"))
    status, body = await get(http, engine, "/ui/api/customers/a%2Fb%20c%25d%3F%C3%A9/ledger")
    assert status == 200
    assert body["customerId"] == "a/b c%d?é"
    assert [e["name"] for e in body["entries"]] == ["Ada Lovelace"]


async def test_the_stats_read_only_the_partitions_their_window_touches(engine: Engine) -> None:
    # The middle of a past week: an hour before it lies in that week's file alone.
    now = week_of(datetime.now(UTC) - timedelta(days=14)) + timedelta(days=3, hours=12)
    await write(engine, *(row("p", at=now + timedelta(days=d)) for d in (-7, 0, 7, 14)))

    def names(_cur: Any, chosen: list[Any]) -> list[str]:
        return [p.name for p in chosen]

    every = await engine.logs.scan(names)
    assert len(every) >= 4  # one file per week
    start, end = insight.window_bounds(insight.WINDOWS["1h"], now)
    assert end - start == timedelta(hours=1) and start <= now < end
    (chosen,) = await engine.logs.scan(names, start, end)
    assert chosen == f"log_{week_of(now):%Y%m%d}"
