"""Ingest: validation, all-or-nothing storage, duplicates, auth, profile changes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest

from clients.client import TidegateClient
from engine.app import Engine, EngineConfig
from engine.errors import InvalidInputError
from engine.ingest.parse import parse_event, parse_request
from engine.queue.lanes import DurableQueue
from engine.state.database import Database
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import (
    FAST_DELIVERY,
    TEST_DESTINATIONS,
    eventually,
    insider_connection,
    post_events,
)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ([], "body"),
        ({"events": []}, "events"),
        ({"events": "x"}, "events"),
        ({"action": "opt_in"}, "event.customer"),
        ({"customer": "", "action": "opt_in"}, "event.customer"),
        ({"customer": 12, "action": "opt_in"}, "event.customer"),
        ({"customer": "c"}, "event.action"),
        ({"customer": "c", "action": "opt_in", "data": [1]}, "event.data"),
        ({"customer": "c", "action": "x", "timestamp": "yesterday"}, "event.timestamp"),
        ({"customer": "c", "action": "x", "timestamp": "2026-01-01T10:00:00"}, "event.timestamp"),
        ({"customer": "c", "action": "x", "id": 5}, "event.id"),
        ({"events": [{"customer": "c", "action": "x"}, {"customer": "c"}]}, "events[1].action"),
        ({"customer": "  ", "action": "x"}, "event.customer"),
        ({"customer": "c" * 257, "action": "x"}, "event.customer"),
        ({"customer": "c", "action": "x", "external_id": 5}, "event.external_id"),
        ({"customer": "c", "action": "x", "account": "a" * 257}, "event.account"),
        (
            {
                "events": [
                    {"customer": "c", "action": "x", "timestamp": "2026-01-01T10:00:00Z"},
                    {"customer": "c", "action": "x", "timestamp": "soon"},
                ]
            },
            "events[1].timestamp",
        ),
    ],
)
def test_invalid_records_are_rejected_naming_the_field(payload: object, field: str) -> None:
    with pytest.raises(InvalidInputError) as failure:
        parse_request(payload)
    assert failure.value.field == field


def test_timestamp_accepts_rfc3339_with_offset_and_unix_seconds() -> None:
    with_offset = parse_event(
        {"customer": "c", "action": "x", "timestamp": "2026-03-01T12:00:00+02:00"}, "e"
    )
    assert with_offset.timestamp == datetime(2026, 3, 1, 10, 0, tzinfo=UTC)
    unix = parse_event({"customer": "c", "action": "x", "timestamp": 1772359200}, "e")
    assert unix.timestamp == datetime(2026, 3, 1, 10, 0, tzinfo=UTC)


def test_valid_fields_pass_as_given() -> None:
    class Text(str):
        pass

    [event] = parse_request(
        {
            "customer": Text("c"),
            "action": "x",
            "id": "e" * 256,
            "account": "",
            "timestamp": "2026-03-01T10:00:00.5Z",
        }
    )
    assert (event.customer, event.id, event.account, event.external_id) == ("c", "e" * 256, "", "")
    assert type(event.customer) is Text
    assert event.timestamp == datetime(2026, 3, 1, 10, 0, 0, 500000, tzinfo=UTC)
    assert event.timestamp.tzinfo is UTC


def test_records_without_id_get_the_same_id_for_the_same_content() -> None:
    a = parse_event({"customer": "c", "action": "point_add", "data": {"points": 5, "r": 1}}, "e")
    b = parse_event({"customer": "c", "action": "point_add", "data": {"r": 1, "points": 5}}, "e")
    c = parse_event({"customer": "c", "action": "point_add", "data": {"points": 6, "r": 1}}, "e")
    assert a.id == b.id != c.id


async def test_a_bad_record_leaves_nothing_of_its_request_stored(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    good = {"customer": "c1", "action": "point_add", "id": "e1", "data": {"points": 1}}
    status, body = await post_events(http, engine, {"events": [good, {"customer": "c2"}]})
    assert status == 400
    assert body["error"]["field"] == "events[1].action"
    assert "events[1].action" in body["error"]["message"]
    assert (await client.get_connection("insider-main")).queue_depth == 0
    # Had the first record been stored, re-sending it would count as a duplicate.
    status, body = await post_events(http, engine, good)
    assert (status, body["accepted"], body["duplicates"]) == (202, 1, 0)


async def test_invalid_json_gets_a_400_json_error(
    engine: Engine, http: aiohttp.ClientSession
) -> None:
    url = f"http://127.0.0.1:{engine.http_port}/v1/events"
    async with http.post(url, data=b"{not json", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        body = await r.json()
    assert body["error"]["code"] == "invalid_json"


async def test_wrong_content_type_gets_415(engine: Engine, http: aiohttp.ClientSession) -> None:
    url = f"http://127.0.0.1:{engine.http_port}/v1/events"
    async with http.post(url, data="customer=c", headers={"Content-Type": "text/plain"}) as r:
        assert r.status == 415
        assert (await r.json())["error"]["code"] == "unsupported_media_type"


async def test_resent_event_is_queued_once(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    event = {"customer": "c1", "action": "point_add", "id": "antavo-77", "data": {"points": 9}}
    answers = [await post_events(http, engine, event) for _ in range(5)]
    assert [a[1]["accepted"] for a in answers] == [1, 0, 0, 0, 0]
    assert [a[1]["duplicates"] for a in answers] == [0, 1, 1, 1, 1]

    async def delivered() -> bool:
        user = sandbox.state.lookup("uuid", "c1")
        return user is not None and len(user.events) == 1

    await eventually(delivered)


async def test_unchanged_profile_attributes_are_not_synced_again(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    first = {"customer": "c1", "action": "profile", "data": {"first_name": "Ana", "tier": "gold"}}
    second = {
        "customer": "c1",
        "action": "profile",
        "data": {"first_name": "Ana", "tier": "silver"},
    }
    assert (await post_events(http, engine, first))[1]["deliveries_queued"] == 1

    async def first_sent() -> bool:
        return len(sandbox.state.requests) == 1

    await eventually(first_sent)
    assert (await post_events(http, engine, second))[1]["deliveries_queued"] == 1

    async def second_sent() -> bool:
        return len(sandbox.state.requests) == 2

    await eventually(second_sent)
    sent = [u["attributes"] for r in sandbox.state.requests for u in r["body"]["users"]]
    assert sent[-1] == {"custom": {"loyalty_tier": "silver"}}  # name did not change: not resent


async def test_unmapped_events_are_accepted_but_not_queued(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    status, body = await post_events(http, engine, {"customer": "c1", "action": "review_submit"})
    assert (status, body) == (202, {"accepted": 1, "duplicates": 0, "deliveries_queued": 0})


async def test_ingest_token_is_required_when_configured(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    engine = Engine(
        EngineConfig(
            data_dir=tmp_path,
            grpc_port=0,
            http_port=0,
            ingest_token="s3cret",
            delivery=FAST_DELIVERY,
            allowed_destinations=TEST_DESTINATIONS,
        )
    )
    await engine.start()
    try:
        event = {"customer": "c", "action": "x"}
        status, body = await post_events(http, engine, event)
        assert status == 401
        assert body["error"]["code"] == "unauthenticated"
        status, _ = await post_events(http, engine, event, headers={"Authorization": "Bearer nope"})
        assert status == 401
        status, _ = await post_events(
            http, engine, event, headers={"Authorization": "Bearer s3cret"}
        )
        assert status == 202
    finally:
        await engine.stop()


async def test_external_id_records_resolve_to_the_customer_holding_that_value(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(
        client,
        sandbox,
        source_attribute="loyalty_barcode",
        target_identifier="loyalty_id",
        custom_identifier=True,
    )
    await post_events(
        http,
        engine,
        {
            "customer": "cust-5",
            "action": "opt_in",
            "data": {"loyalty_barcode": "B-55", "email": "e@x.io"},
        },
    )
    await post_events(
        http,
        engine,
        {
            "customer": "B-55",
            "external_id": "loyalty_barcode",
            "action": "point_add",
            "data": {"points": 3},
        },
    )

    async def delivered() -> bool:
        user = sandbox.state.lookup("custom.loyalty_id", "B-55")
        return user is not None and len(user.events) == 1

    await eventually(delivered)

    async def logged_under_antavo_id() -> bool:
        return bool((await client.list_logs(customer_id="cust-5")).logs)

    await eventually(logged_under_antavo_id)


async def queued_payloads(engine: Engine) -> list[dict[str, object]]:
    import orjson

    rows = await engine.db.read(
        lambda c: c.execute("SELECT payload FROM queue ORDER BY seq").fetchall()
    )
    return [orjson.loads(r[0]) for r in rows]


async def test_cleared_attribute_is_queued_as_none_with_its_previous_value(
    engine: Engine, client: TidegateClient, http: aiohttp.ClientSession
) -> None:
    await client.create_connection(
        "paused",
        api_key="k" * 12,
        settings={"partner_name": "acme", "base_url": "http://127.0.0.1:9"},
    )
    await client.create_profile_mapping("paused", "tier", "loyalty_tier", custom=True)
    await engine.registry.set_state("paused", "paused", "held for this test")
    await post_events(
        http, engine, {"customer": "c", "action": "profile", "data": {"tier": "gold"}}
    )
    await post_events(http, engine, {"customer": "c", "action": "profile", "data": {"tier": None}})
    status, body = await post_events(
        http, engine, {"customer": "c", "action": "profile", "data": {"tier": None}}
    )
    assert body["deliveries_queued"] == 0  # already cleared: nothing changed
    payloads = await queued_payloads(engine)
    assert [p["changes"] for p in payloads] == [{"tier": "gold"}, {"tier": None}]
    assert [p["previous"] for p in payloads] == [{}, {"tier": "gold"}]


async def test_change_of_the_identifying_attribute_is_queued(
    engine: Engine, client: TidegateClient, http: aiohttp.ClientSession
) -> None:
    await client.create_connection(
        "by-email",
        api_key="k" * 12,
        settings={"partner_name": "acme", "base_url": "http://127.0.0.1:9"},
        source_attribute="email",
        target_identifier="email",
    )
    await engine.registry.set_state("by-email", "paused", "held for this test")
    await post_events(
        http, engine, {"customer": "c", "action": "opt_in", "data": {"email": "a@x.io"}}
    )
    await post_events(
        http, engine, {"customer": "c", "action": "profile", "data": {"email": "b@x.io"}}
    )
    payloads = await queued_payloads(engine)
    assert [(p["changes"], p["previous"]) for p in payloads] == [
        ({"email": "a@x.io"}, {}),
        ({"email": "b@x.io"}, {"email": "a@x.io"}),
    ]


async def test_names_seen_in_traffic_are_recorded_once(
    engine: Engine, http: aiohttp.ClientSession
) -> None:
    await post_events(
        http,
        engine,
        {
            "events": [
                {"customer": "c", "action": "opt_in", "data": {"email": "a@x.io", "shoe_size": 42}},
                {"customer": "c", "action": "checkout", "data": {"transaction_id": "T1"}},
                {"customer": "d", "action": "checkout", "data": {"transaction_id": "T2"}},
            ]
        },
    )
    seen = {(n.kind, n.parent, n.name) for n in await engine.ingestor.seen_names()}
    assert seen == {
        ("event", "", "opt_in"),
        ("event", "", "checkout"),
        ("attribute", "", "email"),
        ("attribute", "", "shoe_size"),
        ("parameter", "checkout", "transaction_id"),
    }


async def test_items_queued_while_a_settle_commits_stay_counted(tmp_path: Path) -> None:
    """The backlog count is kept in memory: an ingest that lands while delivery's settle
    transaction runs must not be undone when the settle finishes."""
    db = Database(tmp_path / "state.sqlite3")
    await db.start()
    try:
        queue = DurableQueue(db)
        queue.added(10)
        settling = asyncio.create_task(queue.settle(delivered=[]))
        await asyncio.sleep(0)  # the settle is now waiting for its commit
        queue.added(5)
        await settling
        assert queue.depth == 15
    finally:
        await db.close()
