"""Antavo record in -> Insider request out -> log row visible, over real loopback."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import pytest

from clients.client import TidegateClient
from engine.app import Engine, EngineConfig
from engine.pb import connections_pb2, logs_pb2
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import (
    API_KEY,
    PARTNER,
    engine_client,
    eventually,
    insider_connection,
    post_events,
)

OPT_IN = {
    "customer": "cust-1",
    "action": "opt_in",
    "id": "evt-1",
    "data": {
        "email": "ana@example.com",
        "first_name": "Ana",
        "last_name": "Kovacs",
        "tier": "gold",
    },
}
CHECKOUT = {
    "customer": "cust-1",
    "action": "checkout",
    "id": "evt-2",
    "timestamp": "2026-11-27T10:15:00Z",
    "data": {"transaction_id": "ORD-1", "total": 129.9, "currency": "EUR", "channel": "web"},
}


async def test_opt_in_and_checkout_become_an_insider_profile_with_a_purchase(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    status, body = await post_events(http, engine, {"events": [OPT_IN, CHECKOUT]})
    assert status == 202
    assert body == {"accepted": 2, "duplicates": 0, "deliveries_queued": 2}

    async def stored() -> bool:
        user = sandbox.state.lookup("uuid", "cust-1")
        return user is not None and len(user.events) == 1

    await eventually(stored)
    user = sandbox.state.lookup("uuid", "cust-1")
    assert user is not None
    assert user.identifiers == {"uuid": "cust-1"}
    assert user.attributes == {
        "email": "ana@example.com",
        "name": "Ana",
        "surname": "Kovacs",
        "custom": {"loyalty_tier": "gold"},
    }
    event = user.events[0]
    assert event["event_name"] == "purchase"
    assert event["timestamp"] == "2026-11-27T10:15:00Z"
    assert event["event_params"] == {
        "event_group_id": "ORD-1",
        "unit_sale_price": 129.9,
        "currency": "EUR",
        "custom": {"sales_channel": "web"},
    }
    request = sandbox.state.requests[-1]
    assert request["headers"]["X-PARTNER-NAME"] == PARTNER
    assert request["headers"]["X-REQUEST-TOKEN"] == "***"  # the sandbox redacts what it records


async def test_log_row_is_listed_and_streamed_to_an_open_stream(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    call = client.logs.StreamLogs(
        logs_pb2.StreamLogsRequest(filter=logs_pb2.LogFilter(customer_id="cust-1"))
    )
    await call.initial_metadata()
    await post_events(http, engine, {"events": [OPT_IN, CHECKOUT]})
    streamed = await asyncio.wait_for(call.read(), 10)
    call.cancel()
    entry = streamed.logs[0]
    assert entry.status_code == 200
    assert entry.connection_id == "insider-main"
    assert [c.customer_id for c in entry.customers] == ["cust-1"]
    assert entry.customers[0].name == "Ana Kovacs"
    assert entry.customers[0].outcome == "delivered"
    listed = await client.list_logs(customer_id="cust-1")
    assert [e.id for e in listed.logs] == [entry.id]
    full = await client.get_log(entry.id)
    assert '"event_group_id":"ORD-1"' in full.request_body
    assert API_KEY not in full.request_body
    assert full.response_body.startswith('{"data"')
    assert full.mapping_version == (await client.get_connection("insider-main")).mapping_version


async def test_events_over_grpc_are_delivered_like_http_ones(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox
) -> None:
    await insider_connection(client, sandbox)
    answer = await client.send_events(
        [
            {"customer": "cust-9", "action": "opt_in", "data": {"email": "z@example.com"}},
            {"customer": "cust-9", "action": "point_add", "data": {"points": 250}},
        ]
    )
    assert (answer.accepted, answer.deliveries_queued) == (2, 2)

    async def stored() -> bool:
        user = sandbox.state.lookup("uuid", "cust-9")
        return user is not None and len(user.events) == 1

    await eventually(stored)
    user = sandbox.state.lookup("uuid", "cust-9")
    assert user is not None
    # Struct numbers are doubles on the wire; whole numbers reach Insider as integers.
    assert user.events[0]["event_params"] == {"custom": {"points": 250}}
    assert isinstance(user.events[0]["event_params"]["custom"]["points"], int)


async def test_per_user_rejection_fails_only_that_customer(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    events = [
        {"customer": "good", "action": "opt_in", "data": {"email": "good@example.com"}},
        {"customer": "bad", "action": "opt_in", "data": {"email": "not-an-email"}},
    ]
    await post_events(http, engine, {"events": events})

    async def logged() -> bool:
        return len((await client.list_logs(customer_id="bad")).logs) == 1

    await eventually(logged)
    connection = await client.get_connection("insider-main")
    assert connection.queue_depth == 0
    assert connection.dead_letter_count == 1
    assert sandbox.state.lookup("uuid", "good") is not None
    assert sandbox.state.lookup("uuid", "bad") is None
    rows = (await client.list_logs(customer_id="bad")).logs
    assert len(rows) == 1
    outcomes = {c.customer_id: (c.outcome, c.error) for c in rows[0].customers}
    assert outcomes["good"] == ("delivered", "")
    assert outcomes["bad"][0] == "failed"
    assert "not a valid email address: not-an-email" in outcomes["bad"][1]
    assert (await client.list_logs(error_contains="NOT A VALID EMAIL")).logs[0].id == rows[0].id


async def test_events_of_one_customer_arrive_in_order(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    await post_events(
        http, engine, {"customer": "c", "action": "opt_in", "data": {"email": "c@example.com"}}
    )
    for n in range(30):
        await post_events(
            http, engine, {"customer": "c", "action": "point_add", "data": {"points": n}}
        )

    async def all_there() -> bool:
        user = sandbox.state.lookup("uuid", "c")
        return user is not None and len(user.events) == 30

    await eventually(all_there)
    user = sandbox.state.lookup("uuid", "c")
    assert user is not None
    assert [e["event_params"]["custom"]["points"] for e in user.events] == list(range(30))


async def test_batches_stay_within_insiders_user_limit(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    events = [
        {"customer": f"c{n}", "action": "point_add", "data": {"points": n}} for n in range(2500)
    ]
    status, body = await post_events(http, engine, {"events": events})
    assert (status, body["deliveries_queued"]) == (202, 2500)

    async def delivered() -> bool:
        return len(sandbox.state.users) == 2500

    await eventually(delivered, within=30)
    sizes = [len(r["body"]["users"]) for r in sandbox.state.requests]
    assert max(sizes) <= 1000
    assert sum(sizes) == 2500


async def test_refused_credentials_pause_the_connection_until_the_key_changes(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox, api_key="wrong-key-123456789")
    await post_events(http, engine, OPT_IN)

    async def paused() -> bool:
        c = await client.get_connection("insider-main")
        return c.state == connections_pb2.CONNECTION_STATE_PAUSED

    await eventually(paused)
    connection = await client.get_connection("insider-main")
    assert "403" in connection.state_reason
    assert connection.queue_depth == 1  # the backlog is kept
    assert sandbox.state.lookup("uuid", "cust-1") is None
    await client.connections.UpdateConnection(
        connections_pb2.UpdateConnectionRequest(
            connection=connections_pb2.Connection(id="insider-main", api_key=API_KEY)
        )
    )

    async def delivered() -> bool:
        return sandbox.state.lookup("uuid", "cust-1") is not None

    await eventually(delivered)

    async def drained() -> bool:  # the settle commits just after Insider's answer
        return (await client.get_connection("insider-main")).queue_depth == 0

    await eventually(drained)
    connection = await client.get_connection("insider-main")
    assert connection.state == connections_pb2.CONNECTION_STATE_ACTIVE
    assert connection.queue_depth == 0


async def test_server_errors_are_retried_until_insider_recovers(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    async with http.post(f"{sandbox.url}/sandbox/faults", json={"status": 503, "count": 3}) as r:
        assert r.status == 200
    await post_events(http, engine, OPT_IN)

    async def delivered() -> bool:
        return sandbox.state.lookup("uuid", "cust-1") is not None

    async def logged() -> bool:
        return len((await client.list_logs()).logs) == 4

    await eventually(logged)
    statuses = [e.status_code for e in reversed((await client.list_logs()).logs)]
    assert statuses == [503, 503, 503, 200]
    retried = (await client.list_logs(status_codes=[503])).logs
    assert all(c.outcome == "retry" for e in retried for c in e.customers)
    assert sorted(e.attempt for e in retried) == [1, 2, 3]


async def test_queued_items_survive_a_restart(
    engine_config: EngineConfig, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    first = Engine(engine_config)
    await first.start()
    async with engine_client(first) as c:
        await insider_connection(c, sandbox, api_key="wrong-key-123456789")
    await post_events(http, first, {"events": [OPT_IN, CHECKOUT]})
    await first.stop(grace=1.0)
    assert sandbox.state.lookup("uuid", "cust-1") is None

    engine_config.grpc_port = engine_config.http_port = 0
    second = Engine(engine_config)
    await second.start()
    try:
        async with engine_client(second) as c:
            before = await c.get_connection("insider-main")
            assert before.queue_depth == 2
            assert before.api_key_hint.endswith("6789")
            await c.connections.UpdateConnection(
                connections_pb2.UpdateConnectionRequest(
                    connection=connections_pb2.Connection(id="insider-main", api_key=API_KEY)
                )
            )

            async def delivered() -> bool:
                user = sandbox.state.lookup("uuid", "cust-1")
                return user is not None and len(user.events) == 1

            await eventually(delivered)
    finally:
        await second.stop(grace=1.0)


async def test_a_stream_with_a_bad_filter_is_refused(
    engine: Engine, client: TidegateClient
) -> None:
    call = client.logs.StreamLogs(
        logs_pb2.StreamLogsRequest(filter=logs_pb2.LogFilter(status_codes=[999]))
    )
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call.read()
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "filter.status_codes[0]" in (failure.value.details() or "")
