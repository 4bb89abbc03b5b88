"""The page's operator endpoints (engine/ui/operate.py) against a real engine delivering to
the Insider sandbox: connections and resume, dead letters and replay, their refusals, and
the audit trail of what the page changed. The browser side is in
test_ui_browser_operate.py."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest

from clients.client import TidegateClient
from engine.app import Engine, EngineConfig
from engine.pb import dead_letters_pb2 as dpb
from engine.pb import dead_letters_pb2_grpc
from engine.queue.dead_letters import DeadLetterQuery
from engine.state import audit, tokens
from engine.state.connections import STATE_ACTIVE, STATE_PAUSED
from plugins.insider.sandbox import RunningSandbox
from plugins.insider.sandbox.server import Fault
from tests.conftest import eventually, insider_connection, post_events
from tests.ui_support import base, login, make_token, session

CONNECTION = "insider-main"
RESUME = "/tidegate.admin.v1.ConnectionService/ResumeConnection"
REPLAY = "/tidegate.admin.v1.DeadLetterService/ReplayDeadLetters"


@pytest.fixture
def engine_config(engine_config: EngineConfig) -> EngineConfig:
    engine_config.ui_port = 0
    return engine_config


def points(customer: str, n: int) -> dict[str, object]:
    return {
        "customer": customer,
        "action": "point_add",
        "data": {"points": n},
        "id": f"ev-{customer}-{n}",
    }


async def dead_letters(engine: Engine, count: int, **query: Any) -> None:
    """Waits until ``count`` dead letters match ``query``."""

    async def enough() -> bool:
        found = await engine.queue.dead_letters(DeadLetterQuery(**query), 1000)
        return len(found) >= count

    await eventually(enough, within=20)


async def make_dead_letters(engine: Engine, sandbox: RunningSandbox, customers: list[str]) -> None:
    """One dead letter per customer: the sandbox answers each request with a 400."""
    sandbox.state.faults.append(Fault(status=400, remaining=len(customers), body={"error": "bad"}))
    async with aiohttp.ClientSession() as http:
        for n, customer in enumerate(customers, 1):
            status, _ = await post_events(http, engine, points(customer, n))
            assert status == 202
            await dead_letters(engine, n)
    sandbox.state.faults.clear()


async def pause_with_401(engine: Engine, sandbox: RunningSandbox, customer: str) -> None:
    """The sandbox refuses the credentials once: the connection pauses with a reason."""
    sandbox.state.faults.append(Fault(status=401, body={"error": "unauthorized"}))
    async with aiohttp.ClientSession() as http:
        status, _ = await post_events(http, engine, points(customer, 1))
        assert status == 202

    async def paused() -> bool:
        return engine.registry.view(CONNECTION).state == STATE_PAUSED

    await eventually(paused, within=20)


async def drained(engine: Engine) -> None:
    async def empty() -> bool:
        return (await engine.queue.stats(CONNECTION)).depth == 0

    await eventually(empty, within=20)


async def audit_events(engine: Engine) -> list[audit.AuditEvent]:
    def read(c: sqlite3.Connection) -> list[audit.AuditEvent]:
        return audit.list_events(
            c,
            start_time=None,
            end_time=None,
            method="",
            token_name="",
            before_seq=None,
            limit=100,
        )

    return await engine.db.read(read)


@pytest.fixture
async def wired(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox
) -> AsyncIterator[Engine]:
    await insider_connection(client, sandbox)
    yield engine


@pytest.fixture
async def operator(wired: Engine) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    token = await make_token(wired, tokens.Role.OPERATOR, "page-operator")
    async with session() as http:
        yield http, await login(http, wired, token)


@pytest.fixture
async def viewer(wired: Engine) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    token = await make_token(wired, tokens.Role.VIEWER, "page-viewer")
    async with session() as http:
        yield http, await login(http, wired, token)


async def call(
    http: aiohttp.ClientSession,
    engine: Engine,
    method: str,
    path: str,
    csrf: str | None = None,
    **kwargs: Any,
) -> tuple[int, Any]:
    headers = kwargs.pop("headers", {})
    if csrf is not None:
        headers["X-CSRF-Token"] = csrf
    async with http.request(method, base(engine) + path, headers=headers, **kwargs) as r:
        assert r.content_type == "application/json", await r.text()
        return r.status, await r.json()


async def test_without_a_session_every_operate_endpoint_refuses_with_401(wired: Engine) -> None:
    async with session() as http:
        for method, path in [
            ("GET", "/ui/api/connections"),
            ("GET", f"/ui/api/connections/{CONNECTION}"),
            ("POST", f"/ui/api/connections/{CONNECTION}/resume"),
            ("GET", "/ui/api/dead-letters"),
            ("POST", "/ui/api/dead-letters/replay"),
        ]:
            status, body = await call(http, wired, method, path, json={"dry_run": True})
            assert status == 401, path
            assert "not logged in" in body["error"]
            assert "connections" not in body and "deadLetters" not in body


async def test_connections_show_state_backlog_and_dead_letters_and_no_api_key(
    wired: Engine, sandbox: RunningSandbox, viewer: tuple[aiohttp.ClientSession, str]
) -> None:
    http, _ = viewer
    async with aiohttp.ClientSession() as plain:
        assert (await post_events(plain, wired, points("ada", 1)))[0] == 202
    await drained(wired)
    await make_dead_letters(wired, sandbox, ["bo"])
    await pause_with_401(wired, sandbox, "cy")
    await wired.logs.flush()

    status, body = await call(http, wired, "GET", "/ui/api/connections")
    assert status == 200
    (c,) = body["connections"]
    assert c["id"] == CONNECTION and c["connector"] == "insider"
    assert c["state"] == "CONNECTION_STATE_PAUSED"
    assert "401" in c["stateReason"]
    # The proto's JSON mapping: int64 values are strings.
    assert c["queueDepth"] == "1"  # cy's item waits for the resume
    assert c["oldestPendingAgeSeconds"] >= 0
    assert c["deadLetterCount"] == "1"
    assert c["lastSuccess"]["statusCode"] == 200
    assert c["lastError"]["statusCode"] == 401  # newer than bo's 400
    assert c["apiKeyHint"] == "****6789"
    assert "ucd-secret" not in str(body) and "apiKey" not in c

    status, one = await call(http, wired, "GET", f"/ui/api/connections/{CONNECTION}")
    assert status == 200 and one["connection"]["id"] == CONNECTION
    status, missing = await call(http, wired, "GET", "/ui/api/connections/nope")
    assert status == 404 and "nope" in missing["error"]


async def test_an_operator_resumes_a_paused_connection_and_it_is_audited(
    wired: Engine, sandbox: RunningSandbox, operator: tuple[aiohttp.ClientSession, str]
) -> None:
    http, csrf = operator
    await pause_with_401(wired, sandbox, "cy")

    # Without the CSRF header, or with a wrong one, nothing changes.
    for header in [None, "guess"]:
        status, body = await call(http, wired, "POST", f"/ui/api/connections/{CONNECTION}/resume",
                                  header)  # fmt: skip
        assert status == 403 and "X-CSRF-Token" in body["error"]
    assert wired.registry.view(CONNECTION).state == STATE_PAUSED

    status, body = await call(http, wired, "POST", f"/ui/api/connections/{CONNECTION}/resume", csrf)
    assert status == 200
    assert body["connection"]["state"] == "CONNECTION_STATE_ACTIVE"
    assert wired.registry.view(CONNECTION).state == STATE_ACTIVE

    await drained(wired)  # the probe goes through: cy's item is delivered

    status, body = await call(http, wired, "POST", "/ui/api/connections/nope/resume", csrf)
    assert status == 404

    events = [e for e in await audit_events(wired) if e.method == RESUME]
    assert [(e.token_name, e.target, e.outcome) for e in events] == [
        ("page-operator", "connection nope", events[0].outcome),
        ("page-operator", f"connection {CONNECTION}", "OK"),
    ]
    assert events[0].outcome.startswith("NOT_FOUND")
    assert all(e.peer == "ui:127.0.0.1" for e in events)


async def test_a_viewer_may_not_resume_or_replay_and_the_attempt_is_audited(
    wired: Engine, sandbox: RunningSandbox, viewer: tuple[aiohttp.ClientSession, str]
) -> None:
    http, csrf = viewer
    await make_dead_letters(wired, sandbox, ["bo"])
    await pause_with_401(wired, sandbox, "cy")

    status, body = await call(http, wired, "POST", f"/ui/api/connections/{CONNECTION}/resume", csrf)
    assert status == 403 and "operator" in body["error"]
    for payload in [{"connection": CONNECTION}, {"connection": CONNECTION, "dry_run": True}, []]:
        status, body = await call(
            http, wired, "POST", "/ui/api/dead-letters/replay", csrf, json=payload
        )
        assert status == 403, payload  # whatever the body, even a malformed one
    assert wired.registry.view(CONNECTION).state == STATE_PAUSED
    assert len(await wired.queue.dead_letters(DeadLetterQuery(), 100)) == 1

    events = [e for e in await audit_events(wired) if e.method in (RESUME, REPLAY)]
    refused = [(e.method, e.outcome.split(":")[0], e.token_name, e.peer) for e in events]
    assert refused == [
        (REPLAY, "PERMISSION_DENIED", "page-viewer", "ui:127.0.0.1"),
        (REPLAY, "PERMISSION_DENIED", "page-viewer", "ui:127.0.0.1"),
        (REPLAY, "PERMISSION_DENIED", "page-viewer", "ui:127.0.0.1"),
        (RESUME, "PERMISSION_DENIED", "page-viewer", "ui:127.0.0.1"),
    ]
    assert events[2].fields["filter.connection_id"] == CONNECTION


async def test_dead_letters_list_filter_and_page(
    wired: Engine, sandbox: RunningSandbox, viewer: tuple[aiohttp.ClientSession, str]
) -> None:
    http, _ = viewer
    await make_dead_letters(wired, sandbox, ["ana", "bo", "cy"])

    status, body = await call(http, wired, "GET", "/ui/api/dead-letters?page_size=2")
    assert status == 200
    first = body["deadLetters"]
    assert [d["customerId"] for d in first] == ["ana", "bo"]  # oldest first
    assert body["nextPageToken"]
    status, body = await call(
        http, wired, "GET", f"/ui/api/dead-letters?page_size=2&page_token={body['nextPageToken']}"
    )
    assert [d["customerId"] for d in body["deadLetters"]] == ["cy"]
    assert body["nextPageToken"] == ""

    d = first[0]
    assert d["stage"] == "send" and d["connectionId"] == CONNECTION
    assert "400" in d["error"]
    assert '"id":"ev-ana-1"' in d["recordJson"].replace(" ", "")
    assert "ana" in d["renderedJson"]  # the fragment sent to Insider

    for query, customers in [
        ("customer=bo", ["bo"]),
        ("stage=send&connection=insider-main", ["ana", "bo", "cy"]),
        ("stage=identify", []),
        ("error=400", ["ana", "bo", "cy"]),
        ("error=no-such-text", []),
        ("connection=other", []),
        ("start=2000-01-01T00:00:00Z&end=2100-01-01T00:00:00Z", ["ana", "bo", "cy"]),
        ("end=2000-01-01T00:00:00Z", []),
    ]:
        status, body = await call(http, wired, "GET", f"/ui/api/dead-letters?{query}")
        assert status == 200, query
        assert [d["customerId"] for d in body["deadLetters"]] == customers, query


async def test_bad_filters_are_refused_naming_the_field(
    wired: Engine, viewer: tuple[aiohttp.ClientSession, str]
) -> None:
    http, csrf = viewer
    long_id = "x" * 300
    for query, field in [
        ("stage=bogus", "stage"),
        ("start=yesterday", "start"),
        ("start=2026-01-01T00:00:00", "start"),  # no time zone
        ("start=2026-02-01T00:00:00Z&end=2026-01-01T00:00:00Z", "end"),
        ("page_size=-1", "page_size"),
        ("page_size=many", "page_size"),
        ("page_token=garbled!", "page_token"),
        (f"connection={long_id}", "connection"),  # the gRPC id limit, 256
        (f"customer={'y' * 1001}", "customer"),  # the page's parameter limit
    ]:
        status, body = await call(http, wired, "GET", f"/ui/api/dead-letters?{query}")
        assert status == 400, query
        assert body["field"] == field, (query, body)
        assert body["error"].startswith(f"{field}: ")
        assert "Traceback" not in body["error"] and len(body["error"]) < 400
    status, body = await call(http, wired, "GET", "/ui/api/connections?page_token=nope")
    assert status == 400 and body["field"] == "page_token"
    status, body = await call(http, wired, "GET", f"/ui/api/connections/{long_id}")
    assert status == 400 and body["field"] == "id"


async def test_bad_replay_requests_are_refused_naming_the_field(
    wired: Engine, operator: tuple[aiohttp.ClientSession, str]
) -> None:
    http, csrf = operator
    path = "/ui/api/dead-letters/replay"
    for payload, field in [
        ({}, "ids"),  # replaying everything needs a filter
        ({"dry_run": True}, "ids"),
        ({"ids": ["1"]}, "ids"),
        ({"ids": [0]}, "ids"),
        ({"ids": list(range(1, 10_002))}, "ids"),  # the gRPC limit, 10,000
        ({"connection": 5}, "connection"),
        ({"stage": "nope"}, "stage"),
        ({"connection": CONNECTION, "dry_run": "yes"}, "dry_run"),
        ({"connection": CONNECTION, "mode": "again"}, "mode"),
        ({"connection": CONNECTION, "start": "soon"}, "start"),
        ([1, 2], "body"),
    ]:
        status, body = await call(http, wired, "POST", path, csrf, json=payload)
        assert status == 400, payload
        assert body["field"] == field, (payload, body)
    status, body = await call(http, wired, "POST", path, csrf, data="ids=1")
    assert status == 400 and body["field"] == "body"
    status, body = await call(
        http, wired, "POST", path, csrf, data=b"{" * 300_000,
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert status == 400 and body["field"] == "body"

    async def chunked(data: bytes) -> AsyncIterator[bytes]:  # no Content-Length
        for i in range(0, len(data), 10_000):
            yield data[i : i + 10_000]

    headers = {"Content-Type": "application/json"}
    status, body = await call(
        http, wired, "POST", path, csrf, data=chunked(b" " * 300_000), headers=headers
    )
    assert status == 400 and body["field"] == "body" and "larger than" in body["error"]
    # The largest list gRPC takes, 10,000 ids, arrives whole in pieces: ids that were
    # never dead letters match nothing.
    many = json.dumps({"ids": list(range(10**12, 10**12 + 10_000)), "dry_run": True})
    status, body = await call(
        http, wired, "POST", path, csrf, data=chunked(many.encode()), headers=headers
    )
    assert status == 200, body
    assert body["matched"] == 0 and body["dryRun"] is True


async def test_the_dry_run_count_matches_the_replay_which_is_audited(
    wired: Engine, sandbox: RunningSandbox, operator: tuple[aiohttp.ClientSession, str]
) -> None:
    http, csrf = operator
    await make_dead_letters(wired, sandbox, ["ana", "bo", "cy", "dee"])
    path = "/ui/api/dead-letters/replay"

    # A filtered set: "bo" and "cy" by ids plus the connection; "dee" alone by customer.
    listed = (await call(http, wired, "GET", "/ui/api/dead-letters"))[1]["deadLetters"]
    ids = {d["customerId"]: int(d["id"]) for d in listed}
    chosen = {"ids": [ids["bo"], ids["cy"]], "connection": CONNECTION}

    status, dry = await call(http, wired, "POST", path, csrf, json={**chosen, "dry_run": True})
    assert status == 200
    assert dry["dryRun"] is True and dry["matched"] == 2 and dry["replayed"] == 2
    assert len(await wired.queue.dead_letters(DeadLetterQuery(), 100)) == 4  # nothing moved

    status, done = await call(http, wired, "POST", path, csrf, json=chosen)
    assert status == 200
    assert done["dryRun"] is False and done["replayed"] == dry["replayed"]

    status, dry = await call(
        http, wired, "POST", path, csrf, json={"customer": "dee", "dry_run": True}
    )
    assert dry["replayed"] == 1
    status, done = await call(http, wired, "POST", path, csrf, json={"customer": "dee"})
    assert done["replayed"] == 1

    # Queued again and delivered (the sandbox accepts them now): ana's is left.
    await drained(wired)
    left = await wired.queue.dead_letters(DeadLetterQuery(), 100)
    assert sorted(d.customer_id for d in left) == ["ana"]
    users = {u.identifiers.get("uuid") for u in sandbox.state.users}
    assert {"bo", "cy", "dee"} <= users

    events = [e for e in await audit_events(wired) if e.method == REPLAY]
    assert [(e.fields.get("dry_run"), e.outcome, e.token_name) for e in events] == [
        (None, "OK", "page-operator"),  # newest first; false is not sent
        ("true", "OK", "page-operator"),
        (None, "OK", "page-operator"),
        ("true", "OK", "page-operator"),
    ]
    assert events[3].fields["filter.connection_id"] == CONNECTION
    assert events[3].fields["ids"] == f'["{ids["bo"]}","{ids["cy"]}"]'
    assert events[0].fields["filter.customer_id"] == "dee"
    assert all(e.peer == "ui:127.0.0.1" and e.target == "dead letters" for e in events)


async def test_the_views_script_is_served_under_the_page_policy(wired: Engine) -> None:
    async with session() as http:
        async with http.get(base(wired) + "/ui/static/operate.js") as r:
            assert r.status == 200
            assert r.content_type == "text/javascript"
            assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")
            script = await r.text()
        async with http.get(base(wired) + "/ui/static/app.js") as r:
            assert 'from "./operate.js"' in await r.text()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script


async def test_the_page_and_grpc_check_and_audit_a_replay_alike(
    wired: Engine,
    client: TidegateClient,
    sandbox: RunningSandbox,
    operator: tuple[aiohttp.ClientSession, str],
) -> None:
    http, csrf = operator
    await make_dead_letters(wired, sandbox, ["ana", "bo"])
    stub = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)
    path = "/ui/api/dead-letters/replay"

    # The same refusal, in the same words: replaying everything needs a filter.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.ReplayDeadLetters(dpb.ReplayDeadLettersRequest(dry_run=True))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status, body = await call(http, wired, "POST", path, csrf, json={"dry_run": True})
    assert status == 400 and body["error"] == refused.value.details()

    # The same count, and the same audit event but for who called and from where.
    by_grpc = await stub.ReplayDeadLetters(
        dpb.ReplayDeadLettersRequest(filter=dpb.DeadLetterFilter(customer_id="ana"), dry_run=True)
    )
    status, by_page = await call(
        http, wired, "POST", path, csrf, json={"customer": "ana", "dry_run": True}
    )
    assert status == 200 and by_page["replayed"] == by_grpc.replayed == 1
    page_event, grpc_event = [
        e for e in await audit_events(wired) if e.method == REPLAY and e.outcome == "OK"
    ]
    assert (page_event.target, page_event.fields) == (grpc_event.target, grpc_event.fields)
    assert page_event.fields == {"filter.customer_id": "ana", "dry_run": "true"}
    assert (page_event.token_name, page_event.peer) == ("page-operator", "ui:127.0.0.1")
    assert grpc_event.token_name == "bootstrap-admin" and grpc_event.peer.startswith("ipv")

    # The stored fragment can be resent as it was: ana's was rendered before the 400.
    status, stored = await call(
        http, wired, "POST", path, csrf, json={"customer": "ana", "dry_run": True, "mode": "stored"}
    )
    assert status == 200 and stored["replayed"] == 1 and stored["skipped"] == 0
    newest = (await audit_events(wired))[0]
    assert newest.fields["mode"] == "REPLAY_MODE_STORED_REQUEST"
