"""Every failure has a rule: what delivery does for each kind of answer, over real
loopback against the Insider sandbox, on both queue backends (``tests.backends``)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from clients.client import TidegateClient
from engine.app import Engine, EngineConfig
from engine.delivery.pace import MAX_INTERVAL, MIN_INTERVAL, Pace
from engine.pb import connections_pb2 as cpb
from engine.pb import dead_letters_pb2 as dpb
from plugins.insider.sandbox import RunningSandbox, SandboxConfig, start_sandbox
from tests import backends
from tests.backends import engine_config, nats_cluster
from tests.conftest import (
    API_KEY,
    FAST_DELIVERY,
    PARTNER,
    TEST_DESTINATIONS,
    engine_client,
    eventually,
    insider_connection,
    post_events,
)

__all__ = ["engine_config", "nats_cluster"]

CONNECTION = "insider-main"


async def inject(http: aiohttp.ClientSession, sandbox: RunningSandbox, **fault: Any) -> None:
    async with http.post(f"{sandbox.url}/sandbox/faults", json=fault) as r:
        assert r.status == 200, await r.text()


async def configure(http: aiohttp.ClientSession, sandbox: RunningSandbox, **config: Any) -> None:
    async with http.post(f"{sandbox.url}/sandbox/config", json=config) as r:
        assert r.status == 200, await r.text()


async def logs_settled(client: TidegateClient, count: int) -> list[Any]:
    async def enough() -> bool:
        return len((await client.list_logs(page_size=1000)).logs) >= count

    await eventually(enough)
    return list(reversed((await client.list_logs(page_size=1000)).logs))


async def drained(
    engine: Engine, client: TidegateClient, connection_id: str = CONNECTION
) -> cpb.Connection:
    return await backends.drained(engine, client, connection_id)


def point(customer: str, n: int) -> dict[str, Any]:
    return {"customer": customer, "action": "point_add", "data": {"points": n}}


async def test_429_retry_after_holds_the_whole_connection(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    await inject(http, sandbox, status=429, count=1, retry_after="1")
    await post_events(http, engine, point("a", 1))
    rows = await logs_settled(client, 2)
    assert [r.status_code for r in rows] == [429, 200]
    gap = rows[1].time.ToDatetime() - rows[0].time.ToDatetime()
    assert gap.total_seconds() >= 0.95, "the retry came before Retry-After: 1 elapsed"
    assert rows[0].customers[0].outcome == "retry"


async def test_429_without_retry_after_is_retried_with_backoff(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    await inject(http, sandbox, status=429, count=2)
    await post_events(http, engine, point("a", 1))
    rows = await logs_settled(client, 3)
    assert [r.status_code for r in rows] == [429, 429, 200]
    assert [r.attempt for r in rows] == [1, 2, 3]


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_server_errors_are_retried(
    status: int,
    engine: Engine,
    client: TidegateClient,
    sandbox: RunningSandbox,
    http: aiohttp.ClientSession,
) -> None:
    await insider_connection(client, sandbox)
    await inject(http, sandbox, status=status, count=1)
    await post_events(http, engine, point("a", 1))
    rows = await logs_settled(client, 2)
    assert [r.status_code for r in rows] == [status, 200]
    assert sandbox.state.lookup("uuid", "a") is not None


@pytest.mark.parametrize("status", [501, 505, 400, 404])
async def test_permanent_statuses_dead_letter_the_batch(
    status: int,
    engine: Engine,
    client: TidegateClient,
    sandbox: RunningSandbox,
    http: aiohttp.ClientSession,
) -> None:
    await insider_connection(client, sandbox)
    # Two refusals: the customers go in one request embedded, and may go in one each on
    # JetStream (a and b can be in different partitions, pulled apart).
    await inject(http, sandbox, status=status, count=2, body={"error": "nope: bad request"})
    await post_events(http, engine, {"events": [point("a", 1), point("b", 2)]})
    connection = await drained(engine, client)
    assert connection.dead_letter_count == 2
    rows = await logs_settled(client, 1)
    assert {r.status_code for r in rows} == {status}, "a refused batch was sent again"
    assert sum(len(r.customers) for r in rows) == 2
    dead = await client_dead_letters(client)
    assert {d.customer_id for d in dead} == {"a", "b"}
    assert all(d.stage == "send" and str(status) in d.error for d in dead)


async def test_connection_reset_after_sending_is_retried_and_marked_ambiguous(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    await inject(http, sandbox, status=0, count=1, apply=True)
    await post_events(http, engine, point("a", 1))
    rows = await logs_settled(client, 2)
    assert [(r.status_code, r.ambiguous) for r in rows] == [(0, True), (200, False)]
    assert "may have been applied" in rows[0].error
    user = sandbox.state.lookup("uuid", "a")
    assert user is not None
    assert len(user.events) == 2  # the duplicate an ambiguous failure can cause


async def test_oversize_batch_is_split_and_a_lone_oversize_item_dead_lettered(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    await configure(http, sandbox, max_body_bytes=1500)
    small = [point(f"c{n}", n) for n in range(12)]
    huge = {"customer": "big", "action": "point_add", "data": {"points": 1, "note": "x" * 3000}}
    await client.create_event_mapping(CONNECTION, "bulky", "bulky_event", [("note", "note", True)])
    huge["action"] = "bulky"
    await post_events(http, engine, {"events": [*small, huge]})
    connection = await drained(engine, client)
    assert connection.dead_letter_count == 1
    assert all(sandbox.state.lookup("uuid", f"c{n}") is not None for n in range(12))
    assert sandbox.state.lookup("uuid", "big") is None
    statuses = [r["status"] for r in sandbox.state.requests]
    assert 400 in statuses and statuses.count(200) >= 2
    (dead,) = await client_dead_letters(client)
    assert dead.customer_id == "big"
    assert "too large" in dead.error


async def test_transient_failures_past_the_retry_window_become_dead_letters(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    await client.connections.UpdateConnection(
        cpb.UpdateConnectionRequest(
            connection=cpb.Connection(id=CONNECTION, retry_window_seconds=1)
        )
    )
    await inject(http, sandbox, status=503, count=1000)
    await post_events(http, engine, point("a", 1))
    connection = await drained(engine, client)
    assert connection.dead_letter_count == 1
    assert connection.retry_window_seconds == 1
    (dead,) = await client_dead_letters(client)
    assert dead.stage == "send" and "gave up after" in dead.error and "503" in dead.error
    assert dead.attempts >= 2


async def test_resume_probes_with_one_request_and_pauses_again_on_a_wrong_key(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox, api_key="wrong-key-0000000")
    await post_events(http, engine, {"events": [point(f"c{n}", n) for n in range(5)]})

    async def paused() -> bool:
        return (await client.get_connection(CONNECTION)).state == cpb.CONNECTION_STATE_PAUSED

    await eventually(paused)
    before = len(sandbox.state.requests)
    await client.connections.ResumeConnection(cpb.ResumeConnectionRequest(id=CONNECTION))
    await eventually(paused)
    probe = sandbox.state.requests[before:]
    assert len(probe) == 1 and len(probe[0]["body"]["users"]) == 1
    assert (await client.get_connection(CONNECTION)).queue_depth == 5
    await client.connections.UpdateConnection(
        cpb.UpdateConnectionRequest(connection=cpb.Connection(id=CONNECTION, api_key=API_KEY))
    )
    connection = await drained(engine, client)
    assert connection.state == cpb.CONNECTION_STATE_ACTIVE
    assert all(sandbox.state.lookup("uuid", f"c{n}") is not None for n in range(5))


async def test_a_slow_destination_does_not_stall_other_connections(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    slow = await start_sandbox(
        config=SandboxConfig(partner_name=PARTNER, api_key=API_KEY, latency_ms=3000)
    )
    try:
        await insider_connection(client, slow, connection_id="slow")
        await insider_connection(client, sandbox, connection_id="fast")
        await post_events(http, engine, point("a", 1))
        started = time.monotonic()

        async def fast_delivered() -> bool:
            return sandbox.state.lookup("uuid", "a") is not None

        await eventually(fast_delivered)
        assert time.monotonic() - started < 2.5, "the fast connection waited for the slow one"
        assert (await client.get_connection("slow")).queue_depth == 1  # still in flight there
    finally:
        await slow.close()


async def test_unidentifiable_record_is_dead_lettered_and_does_not_block_later_ones(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox, source_attribute="email", target_identifier="email")
    await post_events(http, engine, point("a", 1))  # no email known yet

    async def dead_lettered() -> bool:
        return (await client.get_connection(CONNECTION)).dead_letter_count == 1

    await eventually(dead_lettered)
    await post_events(
        http, engine, {"customer": "a", "action": "opt_in", "data": {"email": "a@x.io"}}
    )
    await post_events(http, engine, point("a", 2))

    async def delivered() -> bool:
        user = sandbox.state.lookup("email", "a@x.io")
        return user is not None and len(user.events) == 1

    await eventually(delivered)
    (dead,) = await client_dead_letters(client)
    assert dead.stage == "identify"
    assert "has no value for email" in dead.error
    assert dead.rendered_json == ""


async def test_ingest_answers_503_when_the_backlog_is_full(
    tmp_path: Path, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    engine = Engine(
        EngineConfig(
            data_dir=tmp_path,
            grpc_port=0,
            http_port=0,
            max_backlog=3,
            delivery=FAST_DELIVERY,
            allowed_destinations=TEST_DESTINATIONS,
        )
    )
    await engine.start()
    try:
        async with engine_client(engine) as client:
            await insider_connection(client, sandbox, api_key="wrong-key-0000000")
            status, _ = await post_events(
                http, engine, {"events": [point(f"c{n}", n) for n in range(3)]}
            )
            assert status == 202
            url = f"http://127.0.0.1:{engine.http_port}/v1/events"
            async with http.post(url, json=point("d", 1)) as r:
                assert r.status == 503
                assert r.headers["Retry-After"] == "30"
                assert (await r.json())["error"]["code"] == "backlog_full"
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await client.send_events([point("d", 1)])
            assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await engine.stop()


async def client_dead_letters(client: TidegateClient, **filters: Any) -> list[dpb.DeadLetter]:
    from engine.pb import dead_letters_pb2_grpc

    stub = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)
    response = await stub.ListDeadLetters(
        dpb.ListDeadLettersRequest(filter=dpb.DeadLetterFilter(**filters), page_size=1000)
    )
    return list(response.dead_letters)


async def test_dead_letters_replay_with_the_current_mapping_or_as_stored(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    from engine.pb import dead_letters_pb2_grpc

    stub = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)
    await insider_connection(client, sandbox)
    await inject(http, sandbox, status=400, count=1, body={"error": "temporary rule: bad request"})
    await post_events(http, engine, {"events": [point("a", 1), point("b", 2)]})
    await drained(engine, client)
    dead = await client_dead_letters(client)
    assert len(dead) == 2 and '"custom":{"points":1}' in dead[0].rendered_json

    dry = await stub.ReplayDeadLetters(
        dpb.ReplayDeadLettersRequest(
            filter=dpb.DeadLetterFilter(connection_id=CONNECTION), dry_run=True
        )
    )
    assert (dry.matched, dry.replayed) == (2, 2)
    assert len(await client_dead_letters(client)) == 2  # a dry run changes nothing

    # Re-render: the mapping changed meanwhile, and the replay uses the new one.
    mappings = await client.mappings.ListEventMappings(
        __import__("engine.pb.mappings_pb2", fromlist=["x"]).ListEventMappingsRequest(
            connection_id=CONNECTION
        )
    )
    points = next(m for m in mappings.mappings if m.source_event == "point_add")
    points.target_event = "points_granted"
    await client.mappings.UpdateEventMapping(
        __import__("engine.pb.mappings_pb2", fromlist=["x"]).UpdateEventMappingRequest(
            mapping=points
        )
    )
    again = await stub.ReplayDeadLetters(dpb.ReplayDeadLettersRequest(ids=[dead[0].id]))
    assert (again.matched, again.replayed) == (1, 1)
    stored = await stub.ReplayDeadLetters(
        dpb.ReplayDeadLettersRequest(ids=[dead[1].id], mode=dpb.REPLAY_MODE_STORED_REQUEST)
    )
    assert (stored.matched, stored.replayed) == (1, 1)
    await drained(engine, client)

    async def both() -> bool:
        return all(sandbox.state.lookup("uuid", c) is not None for c in ("a", "b"))

    await eventually(both)
    a, b = sandbox.state.lookup("uuid", "a"), sandbox.state.lookup("uuid", "b")
    assert a is not None and b is not None
    assert [e["event_name"] for e in a.events] == ["points_granted"]
    assert [e["event_name"] for e in b.events] == ["loyalty_points_earned"]
    assert await client_dead_letters(client) == []
    rows = await logs_settled(client, 2)
    assert list(rows[0].tags) == []
    # Both replays went out in one request, labelled with both kinds of replay.
    assert sorted(t for r in rows[1:] for t in r.tags) == ["replay", "replay-stored"]


async def test_replay_without_ids_or_filter_is_refused(client: TidegateClient) -> None:
    from engine.pb import dead_letters_pb2_grpc

    stub = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.ReplayDeadLetters(dpb.ReplayDeadLettersRequest())
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ids" in (failure.value.details() or "")


async def test_stream_keeps_delivering_while_a_lane_waits(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    """A customer whose item failed on a per-user rule is released (dead letter), and
    nothing else waits for it."""
    await insider_connection(client, sandbox)
    await post_events(
        http,
        engine,
        {
            "events": [
                {"customer": "bad", "action": "opt_in", "data": {"email": "nope"}},
                point("bad", 1),
                point("good", 1),
            ]
        },
    )
    await drained(engine, client)
    await asyncio.sleep(0)
    assert sandbox.state.lookup("uuid", "good") is not None


def test_pace_slows_on_throttling_and_recovers_with_successes() -> None:
    pace = Pace()
    pace.slow_down()
    assert pace.interval == MIN_INTERVAL
    for _ in range(20):
        pace.slow_down()
    assert pace.interval == MAX_INTERVAL
    for _ in range(200):
        pace.succeeded(10, 1000)
    assert pace.interval == 0.0


def test_pace_item_cap_doubles_back_to_unlimited() -> None:
    pace = Pace(item_cap=100, probe=True)
    pace.succeeded(100, 1000)
    assert (pace.item_cap, pace.probe) == (200, False)
    pace.succeeded(200, 1000)
    pace.succeeded(400, 1000)
    assert pace.item_cap == 800
    pace.succeeded(800, 1000)
    assert pace.item_cap is None


async def test_events_queued_before_an_identifier_change_keep_the_old_identifier(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(
        client,
        sandbox,
        api_key="wrong-key-0000000",  # held back: everything below queues up first
        source_attribute="email",
        target_identifier="email",
    )
    await post_events(
        http, engine, {"customer": "a", "action": "opt_in", "data": {"email": "old@x.io"}}
    )

    async def paused() -> bool:
        return (await client.get_connection(CONNECTION)).state == cpb.CONNECTION_STATE_PAUSED

    await eventually(paused)
    await post_events(http, engine, point("a", 1))
    await post_events(
        http, engine, {"customer": "a", "action": "profile", "data": {"email": "new@x.io"}}
    )
    await post_events(http, engine, point("a", 2))
    await client.connections.UpdateConnection(
        cpb.UpdateConnectionRequest(connection=cpb.Connection(id=CONNECTION, api_key=API_KEY))
    )
    await drained(engine, client)
    assert sandbox.state.lookup("email", "old@x.io") is None
    user = sandbox.state.lookup("email", "new@x.io")
    assert user is not None, [u.identifiers for u in sandbox.state.users]
    assert len(sandbox.state.users) == 1  # one person at Insider, moved, not duplicated
    assert [e["event_params"]["custom"]["points"] for e in user.events] == [1, 2]


async def test_a_refusal_of_the_old_key_does_not_pause_after_the_key_was_replaced(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox, api_key="wrong-key-0000000")
    await configure(http, sandbox, latency_ms=600)
    await post_events(http, engine, point("a", 1))
    await asyncio.sleep(0.3)  # the request with the old key is out, its 403 not yet back
    await client.connections.UpdateConnection(
        cpb.UpdateConnectionRequest(connection=cpb.Connection(id=CONNECTION, api_key=API_KEY))
    )
    await configure(http, sandbox, latency_ms=0)
    connection = await drained(engine, client)
    assert connection.state == cpb.CONNECTION_STATE_ACTIVE
    assert sandbox.state.lookup("uuid", "a") is not None
    assert [r["status"] for r in sandbox.state.requests] == [403, 200]


async def test_a_fully_delivered_batch_logs_each_customer_once_in_first_seen_order(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    profile = {"customer": "b", "action": "profile", "data": {"first_name": "Bea", "tier": "gold"}}
    await post_events(
        http, engine, {"events": [point("c", 1), profile, point("a", 2), point("c", 3)]}
    )
    await drained(engine, client)
    rows = await logs_settled(client, 1)
    assert len(rows) == 1 and rows[0].status_code == 200 and rows[0].error == ""
    assert [(c.customer_id, c.name, c.outcome, c.error) for c in rows[0].customers] == [
        ("c", "", "delivered", ""),
        ("b", "Bea", "delivered", ""),
        ("a", "", "delivered", ""),
    ]
    user = sandbox.state.lookup("uuid", "c")
    assert user is not None
    assert [e["event_params"]["custom"]["points"] for e in user.events] == [1, 3]


async def test_a_customer_refused_by_the_destination_is_dead_lettered_and_the_rest_delivered(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    bad = {"customer": "b", "action": "profile", "data": {"email": "not-an-email"}}
    await post_events(http, engine, {"events": [point("a", 1), point("b", 2), bad, point("c", 3)]})
    connection = await drained(engine, client)
    assert connection.dead_letter_count == 2
    rows = await logs_settled(client, 1)
    assert len(rows) == 1 and rows[0].status_code == 200
    outcomes = [(c.customer_id, c.outcome) for c in rows[0].customers]
    assert outcomes == [("a", "delivered"), ("b", "failed"), ("c", "delivered")]
    assert rows[0].error.startswith("1 of 3 customers rejected: ")
    dead = await client_dead_letters(client)
    assert sorted(d.customer_id for d in dead) == ["b", "b"]
    assert all(d.stage == "destination" and d.request_id == rows[0].id for d in dead)
    assert sandbox.state.lookup("uuid", "a") is not None
    assert sandbox.state.lookup("uuid", "c") is not None
