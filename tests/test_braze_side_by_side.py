"""Braze beside Insider in one engine: one Antavo stream reaches both connections, each
with its own lane, batches, retries, log rows and dead letters; a Braze outage or pause
never holds Insider up; preview, catalogs, the outbound log's filters, StreamLogs, dead
letters and replay work for a Braze connection as for an Insider one.

Real parts: the in-process engine, both sandboxes over loopback HTTP, gRPC admin API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from clients.client import TidegateClient
from engine.app import Engine
from engine.pb import catalog_pb2 as cpb
from engine.pb import catalog_pb2_grpc, connections_pb2, dead_letters_pb2_grpc, ingest_pb2
from engine.pb import dead_letters_pb2 as dpb
from plugins.braze.sandbox import RunningBrazeSandbox, SandboxConfig, start_sandbox
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import eventually, insider_connection, post_events

BRAZE_KEY = "braze-rest-key-0123456789"
BRAZE_ID = "braze-main"
INSIDER_ID = "insider-main"


@pytest.fixture
async def braze_sandbox() -> AsyncIterator[RunningBrazeSandbox]:
    running = await start_sandbox(config=SandboxConfig(api_key=BRAZE_KEY))
    yield running
    await running.close()


async def braze_connection(client: TidegateClient, sandbox: RunningBrazeSandbox) -> None:
    await client.create_connection(
        BRAZE_ID,
        connector="braze",
        api_key=BRAZE_KEY,
        settings={"rest_endpoint": sandbox.url},
        target_identifier="external_id",
    )
    await client.create_profile_mapping(BRAZE_ID, "email", "email")
    await client.create_profile_mapping(BRAZE_ID, "first_name", "first_name")
    await client.create_profile_mapping(BRAZE_ID, "tier", "loyalty_tier", custom=True)
    await client.create_event_mapping(
        BRAZE_ID, "point_add", "points_earned", [("points", "points", False)]
    )
    await client.create_event_mapping(
        BRAZE_ID,
        "checkout",
        "purchase",
        [
            ("items[].sku", "product_id", False),
            ("items[].price", "price", False),
            ("currency", "currency", False),
            ("transaction_id", "order_id", False),
        ],
    )


async def both(client: TidegateClient, insider: RunningSandbox, braze: RunningBrazeSandbox) -> None:
    await insider_connection(client, insider)
    await braze_connection(client, braze)


def points(customer: str, n: int) -> dict[str, Any]:
    return {"customer": customer, "action": "point_add", "id": f"{customer}-{n}",
            "data": {"points": n}}  # fmt: skip


async def drained(client: TidegateClient, connection_id: str, within: float = 15.0) -> None:
    async def empty() -> bool:
        return (await client.get_connection(connection_id)).queue_depth == 0

    await eventually(empty, within)


def braze_points(sandbox: RunningBrazeSandbox, customer: str) -> list[int]:
    profile = sandbox.state.find({"external_id": customer})
    return [] if profile is None else [e["properties"]["points"] for e in profile.events]


def insider_points(sandbox: RunningSandbox, customer: str) -> list[int]:
    user = sandbox.state.lookup("uuid", customer)
    if user is None:
        return []
    events = user.to_json()["events"]
    return [
        e["event_params"]["custom"]["points"]
        for e in events
        if e["event_name"] == "loyalty_points_earned"
    ]


async def test_one_antavo_stream_reaches_insider_and_braze_each_with_its_own_log_rows(
    engine: Engine,
    client: TidegateClient,
    sandbox: RunningSandbox,
    braze_sandbox: RunningBrazeSandbox,
    http: aiohttp.ClientSession,
) -> None:
    await both(client, sandbox, braze_sandbox)
    body = {"events": [
        {"customer": "ana", "action": "opt_in", "id": "e1",
         "data": {"email": "ana@example.com", "first_name": "Ana", "tier": "gold"}},
        {"customer": "ana", "action": "checkout", "id": "e2",
         "data": {"transaction_id": "ORD-1", "total": 12.5, "currency": "EUR",
                  "items": [{"sku": "A", "price": 10.0}, {"sku": "B", "price": 2.5}]}},
        points("ana", 7),
    ]}  # fmt: skip
    status, _ = await post_events(http, engine, body)
    assert status == 202
    await drained(client, BRAZE_ID)
    await drained(client, INSIDER_ID)
    profile = braze_sandbox.state.find({"external_id": "ana"})
    assert profile is not None
    assert profile.attributes == {
        "email": "ana@example.com",
        "first_name": "Ana",
        "loyalty_tier": "gold",
    }
    assert [p["product_id"] for p in profile.purchases] == ["A", "B"]
    assert braze_points(braze_sandbox, "ana") == [7]
    assert insider_points(sandbox, "ana") == [7]

    async def logged() -> bool:
        braze = (await client.list_logs(connection_id=BRAZE_ID)).logs
        return len(braze) >= 1 and len((await client.list_logs(connection_id=INSIDER_ID)).logs) >= 1

    await eventually(logged)
    braze_rows = (await client.list_logs(connection_id=BRAZE_ID)).logs
    insider_rows = (await client.list_logs(connection_id=INSIDER_ID)).logs
    assert braze_rows and all(
        r.url.startswith(braze_sandbox.url + "/users/track") for r in braze_rows
    )
    assert insider_rows and all(r.url.startswith(sandbox.url) for r in insider_rows)
    assert {r.status_code for r in braze_rows} == {201}
    by_customer = (await client.list_logs(connection_id=BRAZE_ID, customer_id="ana")).logs
    assert len(by_customer) == len(braze_rows)
    detail = await client.get_log(braze_rows[0].id)
    assert BRAZE_KEY not in detail.request_body and "ana" in detail.request_body


async def test_a_braze_outage_never_slows_insider(
    engine: Engine,
    client: TidegateClient,
    sandbox: RunningSandbox,
    braze_sandbox: RunningBrazeSandbox,
    http: aiohttp.ClientSession,
) -> None:
    await both(client, sandbox, braze_sandbox)
    async with http.post(
        braze_sandbox.url + "/sandbox/faults", json={"status": 503, "count": 10_000}
    ):
        pass
    start = time.monotonic()
    await post_events(http, engine, {"events": [points(f"c{n}", n) for n in range(1, 21)]})
    await drained(client, INSIDER_ID, within=5.0)
    insider_done = time.monotonic() - start
    braze = await client.get_connection(BRAZE_ID)
    assert braze.queue_depth == 20  # held back by its own retries
    assert insider_done < 5.0

    async def logged_503() -> bool:
        rows = (await client.list_logs(connection_id=BRAZE_ID, status_codes=[503])).logs
        return bool(rows) and all("503" in r.error for r in rows)

    await eventually(logged_503)
    async with http.delete(braze_sandbox.url + "/sandbox/faults"):
        pass
    await drained(client, BRAZE_ID)
    for n in range(1, 21):
        assert braze_points(braze_sandbox, f"c{n}") == [n]  # each once: 503 applied nothing


async def test_a_paused_braze_connection_keeps_its_backlog_while_insider_delivers(
    engine: Engine,
    client: TidegateClient,
    sandbox: RunningSandbox,
    braze_sandbox: RunningBrazeSandbox,
    http: aiohttp.ClientSession,
) -> None:
    await both(client, sandbox, braze_sandbox)
    braze_sandbox.state.config.api_key = "rotated-key-0123456789"
    await post_events(http, engine, {"events": [points("p1", 1), points("p2", 2)]})
    await drained(client, INSIDER_ID)

    async def paused() -> bool:
        state = (await client.get_connection(BRAZE_ID)).state
        return state == connections_pb2.CONNECTION_STATE_PAUSED

    await eventually(paused)
    braze = await client.get_connection(BRAZE_ID)
    assert "401" in braze.state_reason and "Invalid API Key" in braze.state_reason
    assert BRAZE_KEY not in braze.state_reason
    assert braze.queue_depth == 2
    assert insider_points(sandbox, "p1") == [1]


async def test_per_object_errors_dead_letter_only_that_braze_customer_and_replay_works(
    engine: Engine,
    client: TidegateClient,
    sandbox: RunningSandbox,
    braze_sandbox: RunningBrazeSandbox,
    http: aiohttp.ClientSession,
) -> None:
    await both(client, sandbox, braze_sandbox)
    braze_sandbox.state.config.blocklist = ("bad",)
    await post_events(http, engine, {"events": [points("good", 1), points("bad", 2)]})
    await drained(client, BRAZE_ID)
    await drained(client, INSIDER_ID)
    assert braze_points(braze_sandbox, "good") == [1]
    assert insider_points(sandbox, "bad") == [2]  # Insider is not affected
    stub = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)
    listed = await stub.ListDeadLetters(
        dpb.ListDeadLettersRequest(filter=dpb.DeadLetterFilter(connection_id=BRAZE_ID))
    )
    [dead] = listed.dead_letters
    assert (dead.customer_id, dead.stage) == ("bad", "destination")
    assert "blacklisted" in dead.error

    async def logged_refusal() -> bool:
        rows = (await client.list_logs(connection_id=BRAZE_ID, errors_only=True)).logs
        return bool(rows) and "blacklisted" in rows[0].error

    await eventually(logged_refusal)
    braze_sandbox.state.config.blocklist = ()
    replay = await stub.ReplayDeadLetters(dpb.ReplayDeadLettersRequest(ids=[dead.id]))
    assert replay.replayed == 1
    await drained(client, BRAZE_ID)
    assert braze_points(braze_sandbox, "bad") == [2]


async def test_stream_logs_preview_and_catalog_for_a_braze_connection(
    engine: Engine,
    client: TidegateClient,
    sandbox: RunningSandbox,
    braze_sandbox: RunningBrazeSandbox,
    http: aiohttp.ClientSession,
) -> None:
    await both(client, sandbox, braze_sandbox)
    catalog = catalog_pb2_grpc.CatalogServiceStub(client.channel)
    listed = await catalog.ListDestinationCatalog(
        cpb.ListDestinationCatalogRequest(connection_id=BRAZE_ID, page_size=1000)
    )
    assert listed.connector == "braze"
    assert "dob" in {e.name for e in listed.entries}
    data = struct_pb2.Struct()
    data.update({"points": 5})
    stamp = timestamp_pb2.Timestamp()
    stamp.FromJsonString("2026-11-27T10:15:00Z")
    preview = await catalog.PreviewDelivery(
        cpb.PreviewDeliveryRequest(
            connection_id=BRAZE_ID,
            event=ingest_pb2.AntavoEvent(
                customer="ana", action="point_add", data=data, timestamp=stamp
            ),
        )
    )
    assert not preview.problems
    [request] = preview.requests
    assert request.url == braze_sandbox.url + "/users/track"
    assert orjson.loads(request.body) == {
        "events": [{"external_id": "ana", "name": "points_earned",
                    "time": "2026-11-27T10:15:00.000Z", "properties": {"points": 5}}]
    }  # fmt: skip
    assert braze_sandbox.state.requests == []  # a preview sends nothing

    async def first_streamed() -> Any:
        async for entry in client.stream_logs(connection_id=BRAZE_ID):
            return entry
        return None

    streamed = asyncio.create_task(first_streamed())
    await asyncio.sleep(0.3)
    await post_events(http, engine, points("ana", 5))
    entry = await asyncio.wait_for(streamed, 10)
    assert entry.url == braze_sandbox.url + "/users/track"
    assert entry.status_code == 201


async def test_an_identifier_change_renames_the_braze_profile_before_its_later_events(
    engine: Engine,
    client: TidegateClient,
    braze_sandbox: RunningBrazeSandbox,
    http: aiohttp.ClientSession,
) -> None:
    await client.create_connection(
        BRAZE_ID,
        connector="braze",
        api_key=BRAZE_KEY,
        settings={"rest_endpoint": braze_sandbox.url},
        source_attribute="card",
        target_identifier="external_id",
    )
    await client.create_event_mapping(
        BRAZE_ID, "point_add", "points_earned", [("points", "points", False)]
    )
    first = {"customer": "ana", "action": "opt_in", "id": "r1", "data": {"card": "CARD-1"}}
    await post_events(http, engine, {"events": [first, {**points("ana", 1), "id": "r2"}]})
    await drained(client, BRAZE_ID)
    moved = {"customer": "ana", "action": "profile", "id": "r3", "data": {"card": "CARD-2"}}
    await post_events(http, engine, {"events": [moved, {**points("ana", 2), "id": "r4"}]})
    await drained(client, BRAZE_ID)
    profile = braze_sandbox.state.find({"external_id": "CARD-2"})
    assert profile is not None
    assert profile.deprecated_ids == ["CARD-1"]
    assert [e["properties"]["points"] for e in profile.events] == [1, 2]  # one profile
    paths = [r["path"] for r in braze_sandbox.state.requests]
    assert paths.count("/users/external_ids/rename") == 1
    assert paths.index("/users/external_ids/rename") < len(paths) - 1
    rename = next(r for r in braze_sandbox.state.requests if "rename" in r["path"])
    assert orjson.loads(rename["body"]) == {
        "external_id_renames": [{"current_external_id": "CARD-1", "new_external_id": "CARD-2"}]
    }


async def test_erase_customer_at_destinations_deletes_the_braze_profile(
    engine: Engine,
    client: TidegateClient,
    sandbox: RunningSandbox,
    braze_sandbox: RunningBrazeSandbox,
    http: aiohttp.ClientSession,
) -> None:
    """EraseCustomer with at_destinations: Braze's profile is deleted (/users/delete),
    Insider's connector cannot delete and says so, and the delete request itself is
    erased from the log with the rest."""
    await both(client, sandbox, braze_sandbox)
    await post_events(http, engine, {"events": [points("ana", 1), points("bob", 1)]})
    await drained(client, BRAZE_ID)
    await drained(client, INSIDER_ID)
    assert braze_sandbox.state.find({"external_id": "ana"}) is not None

    erased = await client.erase_customer("ana", at_destinations=True)

    outcomes = {d.connection_id: (d.outcome, d.message) for d in erased.destinations}
    assert outcomes[BRAZE_ID] == ("deleted", "")
    assert outcomes[INSIDER_ID][0] == "unsupported"
    assert braze_sandbox.state.find({"external_id": "ana"}) is None
    assert braze_sandbox.state.find({"external_id": "bob"}) is not None
    assert (await client.list_logs(customer_id="ana")).logs == []
    deletes = [
        row for row in (await client.list_logs(connection_id=BRAZE_ID)).logs
        if row.url.endswith("/users/delete")
    ]  # fmt: skip
    assert len(deletes) == 1 and list(deletes[0].tags) == ["erasure"]
    assert "ana" not in (await client.get_log(deletes[0].id)).request_body
