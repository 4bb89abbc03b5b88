"""EraseCustomer: one customer forgotten everywhere the engine keeps them, over a real
gRPC server, the Insider sandbox on loopback and the real state and log files."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import grpc
import orjson
import pytest

from clients.client import TidegateClient
from engine.app import Engine, EngineConfig
from engine.outbound_log.erasure import Redactor
from engine.pb import audit_pb2 as apb
from engine.pb import audit_pb2_grpc, dead_letters_pb2_grpc
from engine.pb import connections_pb2 as cpb
from engine.pb import dead_letters_pb2 as dpb
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import (
    TEST_DESTINATIONS,
    engine_client,
    eventually,
    insider_connection,
    post_events,
)

GONE = "gone-7"
GONE_EMAIL = "gwendolyn.gone@example.com"
KEEP = "keep-1"
KEEP_EMAIL = "kept.person@example.com"


def opt_in(customer: str, email: str, first_name: str) -> dict[str, Any]:
    return {
        "customer": customer,
        "action": "opt_in",
        "data": {"email": email, "first_name": first_name},
    }


async def dead_letters(client: TidegateClient, customer_id: str) -> list[Any]:
    stub = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)
    listed = await stub.ListDeadLetters(
        dpb.ListDeadLettersRequest(
            filter=dpb.DeadLetterFilter(customer_id=customer_id), page_size=1000
        )
    )
    return list(listed.dead_letters)


async def logged(client: TidegateClient, customer_id: str, count: int) -> list[Any]:
    async def enough() -> bool:
        return len((await client.list_logs(customer_id=customer_id)).logs) >= count

    await eventually(enough)
    return list((await client.list_logs(customer_id=customer_id)).logs)


async def test_erase_forgets_the_customer_and_keeps_everyone_else(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    # A second connection with a wrong key pauses at its first request: its items stay
    # queued, which is what the erasure must delete.
    await insider_connection(client, sandbox, "insider-paused", api_key="wrong-key-0000000")
    events = [opt_in(KEEP, KEEP_EMAIL, "Kept"), opt_in(GONE, GONE_EMAIL, "Gwendolyn")]
    await post_events(http, engine, {"events": events})
    # An invalid e-mail fails only this customer at Insider: a dead letter of theirs.
    await post_events(http, engine, opt_in(GONE, "not-an-email-gwendolyn", "Gwendolyn"))
    await eventually(lambda: _has_dead_letter(client))

    async def paused() -> bool:
        view = await client.get_connection("insider-paused")
        return view.state == cpb.CONNECTION_STATE_PAUSED

    await eventually(paused)
    # Both connections' requests carried them; the paused one keeps its three items.
    rows = await logged(client, GONE, 2)
    assert (await client.get_connection("insider-paused")).queue_depth == 3
    failed = await dead_letters(client, GONE)
    await engine.logs.indexed()  # the customer's rows are in a sealed index run

    erased = await client.erase_customer(GONE)

    assert erased.profile_deleted
    assert erased.queued_items_deleted == 2  # the paused connection's two items of theirs
    assert erased.dead_letters_deleted == len(failed)
    assert erased.log_requests_redacted == len(rows)
    assert erased.log_customer_rows_erased == len(rows)
    assert erased.index_entries_deleted >= len(rows)
    assert erased.resend_marks_deleted >= 1
    assert (await client.get_connection("insider-paused")).queue_depth == 1
    assert await dead_letters(client, GONE) == []
    assert (await client.list_logs(customer_id=GONE)).logs == []
    assert (await client.list_logs(error_contains="gwendolyn")).logs == []

    for row in rows:
        entry = await client.get_log(row.id)
        text = entry.request_body + entry.response_body + entry.error
        for value in (GONE, GONE_EMAIL, "Gwendolyn", "not-an-email-gwendolyn"):
            assert value not in text, f"{value!r} is still in request {row.id}"
        assert [c.customer_id for c in entry.customers if c.customer_id] in ([], [KEEP])
        assert len(entry.customers) == row.customer_count  # the request keeps its shape
    # The other customer is untouched: their rows, their part of the shared body.
    kept = [r for r in await logged(client, KEEP, 2) if r.connection_id == "insider-main"]
    shared = await client.get_log(kept[0].id)
    users = orjson.loads(shared.request_body)["users"]
    assert KEEP_EMAIL in shared.request_body
    assert "[erased]" in users  # the erased customer's place in the array stays
    assert [c.outcome for c in shared.customers if c.customer_id == KEEP] == ["delivered"]

    # The audit trail says an admin erased a customer, not which one.
    audit = audit_pb2_grpc.AuditServiceStub(client.channel)
    events = (await audit.ListAuditEvents(apb.ListAuditEventsRequest(page_size=1000))).events
    erasures = [e for e in events if e.method.endswith("PrivacyService/EraseCustomer")]
    assert len(erasures) == 1 and erasures[0].outcome == "OK"
    assert GONE not in str(erasures[0])

    again = await client.erase_customer(GONE)
    assert (again.profile_deleted, again.queued_items_deleted, again.dead_letters_deleted) == (
        False,
        0,
        0,
    )
    assert (again.log_requests_redacted, again.log_customer_rows_erased) == (0, 0)


async def _has_dead_letter(client: TidegateClient) -> bool:
    return len(await dead_letters(client, GONE)) >= 1


async def test_erasure_holds_across_a_restart_and_in_the_files(
    tmp_path: Path, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    config = EngineConfig(
        data_dir=tmp_path / "data",
        grpc_port=0,
        http_port=0,
        allowed_destinations=TEST_DESTINATIONS,
    )
    engine = Engine(config)
    await engine.start()
    try:
        async with engine_client(engine) as client:
            await insider_connection(client, sandbox)
            events = [opt_in(KEEP, KEEP_EMAIL, "Kept"), opt_in(GONE, GONE_EMAIL, "Gwendolyn")]
            await post_events(http, engine, {"events": events})
            await logged(client, GONE, 1)
            await client.erase_customer(GONE)
    finally:
        await engine.stop(grace=1.0)

    engine = Engine(config)
    await engine.start()
    try:
        async with engine_client(engine) as client:
            assert (await client.list_logs(customer_id=GONE)).logs == []
            assert len((await client.list_logs(customer_id=KEEP)).logs) == 1
    finally:
        await engine.stop(grace=1.0)

    # Read the stopped engine's files directly: no table holds the customer's values.
    state = sqlite3.connect(tmp_path / "data" / "state.sqlite3")
    try:
        for table in ("profiles", "external_ids", "queue", "dead_letters", "log_outbox"):
            columns = [r[1] for r in state.execute(f"PRAGMA table_info({table})")]
            text = " || ".join(f"CAST({c} AS TEXT)" for c in columns)
            (hits,) = state.execute(
                f"SELECT count(*) FROM {table} WHERE instr({text}, ?) OR instr({text}, ?)",
                (GONE, GONE_EMAIL),
            ).fetchone()
            assert hits == 0, f"{table} still holds the customer"
    finally:
        state.close()
    for path in (tmp_path / "data" / "outbound-log").glob("*.duckdb"):
        conn = duckdb.connect(str(path), read_only=True)
        try:
            for table in ("log_requests", "log_bodies", "log_customers"):
                (hits,) = conn.execute(
                    f"SELECT count(*) FROM {table} t WHERE contains(CAST(t AS VARCHAR), ?)"
                    " OR contains(CAST(t AS VARCHAR), ?)",
                    [GONE, GONE_EMAIL],
                ).fetchone() or (0,)
                assert hits == 0, f"{table} in {path.name} still holds the customer"
        finally:
            conn.close()


async def test_a_batch_in_flight_during_the_erasure_is_erased_too(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    """The request is at Insider (held there 1.5 s, then refused with 400) while the
    erasure runs: its settle comes after the first pass took the items away, so it writes
    no dead letter for them (a send dead-letters only items still queued), and its log
    row, which the erasure waits for and redacts."""
    await insider_connection(client, sandbox)
    async with http.post(
        f"{sandbox.url}/sandbox/faults", json={"status": 400, "count": 1, "latency_ms": 1500}
    ) as r:
        assert r.status == 200, await r.text()
    await post_events(http, engine, opt_in(GONE, GONE_EMAIL, "Gwendolyn"))

    async def at_insider() -> bool:
        return len(sandbox.state.requests) == 1

    await eventually(at_insider)
    erased = await client.erase_customer(GONE)
    assert erased.dead_letters_deleted == 0
    assert erased.log_requests_redacted == 1
    assert await dead_letters(client, GONE) == []
    assert (await client.list_logs(customer_id=GONE)).logs == []
    [row] = (await client.list_logs(status_codes=[400])).logs
    assert GONE_EMAIL not in (await client.get_log(row.id)).request_body


@pytest.mark.parametrize("customer_id", ["", "x" * 513])
async def test_a_bad_customer_id_is_refused(client: TidegateClient, customer_id: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.erase_customer(customer_id)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "customer_id" in (raised.value.details() or "")
    assert len(raised.value.details() or "") < 200


def test_redaction_replaces_the_customers_elements_and_quoted_values() -> None:
    redactor = Redactor(["c-42", "ann@example.com"])
    body = orjson.dumps(
        {
            "users": [
                {"identifiers": {"uuid": "c-1"}, "attributes": {"email": "bob@example.com"}},
                {"identifiers": {"uuid": "c-42"}, "attributes": {"name": "Ann"}},
                {"identifiers": {"email": "ann@example.com"}, "events": [{"n": 1}]},
            ],
            "note": "rejected ann@example.com twice",
            "count": 3,
        }
    ).decode()
    assert orjson.loads(redactor.body(body)) == {
        "users": [
            {"identifiers": {"uuid": "c-1"}, "attributes": {"email": "bob@example.com"}},
            "[erased]",
            "[erased]",
        ],
        "note": "rejected [erased] twice",
        "count": 3,
    }
    # A short value is replaced only where it is a whole string, not inside others.
    short = Redactor(["7"])
    assert orjson.loads(short.body('{"a": ["7", "17", {"id": "7"}], "b": "7"}')) == {
        "a": ["[erased]", "17", "[erased]"],
        "b": "[erased]",
    }
    assert Redactor(["c-42"]).body("plain c-42 text") == "plain c-42 text"  # under 6 chars
    assert Redactor(["ann@example.com"]).body("plain ann@example.com") == "plain [erased]"
    assert redactor.body("") == ""


async def test_erasure_waits_for_no_idle_worker(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox
) -> None:
    """With connections idle (nothing claimed), the erasure does not wait on them."""
    await insider_connection(client, sandbox)
    await asyncio.wait_for(client.erase_customer("nobody-here"), timeout=10)
