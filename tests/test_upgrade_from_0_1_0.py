"""A data folder written by Tidegate 0.1.0 (``tests/fixtures/release-0.1.0.tar.gz``, made
by ``tests/fixtures/make_data_folder.py`` from tag v0.1.0) under a real ``tidegate
serve`` of this code: serve migrates it, and everything in it is still there and usable.

What the folder holds, and what the 0.1.0 admin API answered about it, is in the
fixture's ``manifest.json``; expected values come from there (0.1.0's answers and the
events the script sent), never from the code under test."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from google.protobuf import field_mask_pb2, json_format
from google.protobuf.timestamp_pb2 import Timestamp

from clients.client import TidegateClient
from engine.pb import (
    audit_pb2,
    audit_pb2_grpc,
    catalog_pb2,
    catalog_pb2_grpc,
    connections_pb2,
    dead_letters_pb2,
    dead_letters_pb2_grpc,
    tokens_pb2,
    tokens_pb2_grpc,
)
from plugins.insider.sandbox import RunningSandbox, SandboxConfig, start_sandbox
from tests.conftest import eventually
from tests.faultload import EngineProcess, admin_client
from tests.upgrade_fixture import RELEASE_0_1_0, refresh_resend_marks, unpack

LONG_RETENTION = "36500"
"""Days: the fixture's dead letters are older than the default 30 days on later runs."""


def as_dict(message: Any) -> dict[str, Any]:
    found: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return found


def same_fields(new: dict[str, Any], old: dict[str, Any], skip: Iterable[str] = ()) -> None:
    """``new`` answers every field 0.1.0 answered (``old``) the same (newer releases may
    answer more)."""
    ignored = set(skip)
    assert {k: new.get(k) for k in old if k not in ignored} == {
        k: v for k, v in old.items() if k not in ignored
    }


def at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_serve_migrates_a_0_1_0_folder_and_keeps_everything_usable(tmp_path: Path) -> None:
    data_dir, manifest = unpack(RELEASE_0_1_0, tmp_path / "fixture")
    refresh_resend_marks(data_dir)
    config = SandboxConfig(partner_name=manifest["partner_name"], api_key=manifest["api_key"])
    sandbox = await start_sandbox(config=config)
    engine = EngineProcess(tmp_path / "engine.log", data_dir)
    engine.extra_args = ["--dead-letter-retention-days", LONG_RETENTION]
    try:
        await asyncio.to_thread(engine.start)
        async with admin_client(engine.target) as client, aiohttp.ClientSession() as http:
            await check_migrated(engine)
            await check_read_back(client, manifest)
            await check_logs(client, manifest)
            await check_resends_are_dropped(http, engine, manifest)
            await check_queued_items_are_delivered(client, sandbox, manifest)
            await check_profiles_drive_identity(client, http, engine, sandbox, manifest)
            await check_dead_letters_replay(client, http, engine, sandbox, manifest)
            await check_tokens_and_audit(client, engine)
    finally:
        await asyncio.to_thread(engine.close)
        await sandbox.close()


async def check_tokens_and_audit(client: TidegateClient, engine: EngineProcess) -> None:
    """0.1.0 had no tokens: the first start of this release on its folder made the admin
    token (the calls above used it), and recorded each change in the audit trail."""
    assert (engine.data_dir / "admin-token").stat().st_mode & 0o777 == 0o600
    listed = await tokens_pb2_grpc.TokenServiceStub(client.channel).ListTokens(
        tokens_pb2.ListTokensRequest()
    )
    assert [(t.name, t.role) for t in listed.tokens] == [
        ("bootstrap-admin", tokens_pb2.TOKEN_ROLE_ADMIN)
    ]
    events = await audit_pb2_grpc.AuditServiceStub(client.channel).ListAuditEvents(
        audit_pb2.ListAuditEventsRequest(method="ReplayDeadLetters")
    )
    assert events.events and all(e.token_name == "bootstrap-admin" for e in events.events)
    assert all(e.outcome == "OK" for e in events.events)


async def check_migrated(engine: EngineProcess) -> None:
    lines = [json.loads(line) for line in engine.tail(200_000).splitlines() if line[:1] == "{"]
    steps = [
        (line["store"], line["from"], line["to"])
        for line in lines
        if line["event"] == "schema_migrated"
    ]
    assert steps == [
        ("state database", 0, 1),
        ("state database", 1, 2),
        ("state database", 2, 3),
        ("outbound log", 0, 1),
        ("outbound log", 1, 2),
    ]


async def check_read_back(client: TidegateClient, manifest: dict[str, Any]) -> None:
    connection_id = manifest["connection_id"]
    connection = as_dict(await client.get_connection(connection_id))
    # The age of the oldest item grows while the folder waits; all else is as 0.1.0 left it.
    same_fields(connection, manifest["connection"], skip=["oldest_pending_age_seconds"])
    assert connection["state"] == "CONNECTION_STATE_PAUSED"
    profile = await client.list_profile_mappings(connection_id, 1000)
    event = await client.list_event_mappings(connection_id, 1000)
    assert len(profile.mappings) == len(manifest["profile_mappings"]) == 4
    for new, old in zip(profile.mappings, manifest["profile_mappings"], strict=True):
        same_fields(as_dict(new), old)
    assert {m["array_mode"] for m in manifest["profile_mappings"] if "array_mode" in m} == {
        "ARRAY_MODE_REPLACE"
    }
    assert len(event.mappings) == len(manifest["event_mappings"]) == 2
    for new, old in zip(event.mappings, manifest["event_mappings"], strict=True):
        same_fields(as_dict(new), old)
    dead = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)
    listed = (await dead.ListDeadLetters(dead_letters_pb2.ListDeadLettersRequest())).dead_letters
    assert [d["stage"] for d in manifest["dead_letters"]] == ["destination", "identify"]
    assert len(listed) == 2
    for new_letter, old_letter in zip(listed, manifest["dead_letters"], strict=True):
        same_fields(as_dict(new_letter), old_letter)
    catalog = catalog_pb2_grpc.CatalogServiceStub(client.channel)
    entries = await catalog.ListSourceCatalog(catalog_pb2.ListSourceCatalogRequest(page_size=1000))
    seen = [as_dict(e) for e in entries.entries if e.seen]
    assert seen == manifest["seen_catalog"]
    assert any(e["name"] == "member_id" for e in seen)


async def check_logs(client: TidegateClient, manifest: dict[str, Any]) -> None:
    """Every ListLogs filter finds the 0.1.0 rows it should, and GetLog their bodies."""
    rows = manifest["logs"]  # GetLog answers, newest first
    assert len(rows) == 4 and {r.get("status_code") for r in rows} == {200, 403}

    async def ids(**filters: Any) -> list[str]:
        return [entry.id for entry in (await client.list_logs(page_size=1000, **filters)).logs]

    def expected(keep: Callable[[dict[str, Any]], bool]) -> list[str]:
        return [row["id"] for row in rows if keep(row)]

    listed = (await client.list_logs(page_size=1000)).logs
    assert [entry.id for entry in listed] == expected(lambda r: True)
    for entry, row in zip(listed, rows, strict=True):
        same_fields(as_dict(entry), row, skip=["request_body", "response_body"])
    for row in rows:
        assert await ids(identifier=row["id"]) == [row["id"]]
        found = as_dict(await client.get_log(row["id"]))
        assert found == row  # bodies included
        assert row.get("request_body")
    customers = {c["customer_id"] for row in rows for c in row.get("customers", [])}
    assert customers == {"cust-1", "cust-2", "cust-3", "cust-4", "cust-5"}
    for customer in customers:
        assert await ids(customer_id=customer) == expected(
            lambda r, c=customer: any(x["customer_id"] == c for x in r.get("customers", []))
        )
    assert await ids(errors_only=True) == expected(lambda r: bool(r.get("error")))
    email = expected(lambda r: "email" in json.dumps(r.get("customers", [])) + r.get("error", ""))
    assert len(email) == 1
    assert await ids(error_contains="email") == email
    for status in (200, 403):
        assert await ids(status_codes=[status]) == expected(
            lambda r, s=status: r["status_code"] == s
        )
    assert await ids(connection_id=manifest["connection_id"]) == expected(lambda r: True)
    assert await ids(connection_id="another-connection") == []
    times = sorted(at(r["time"]) for r in rows)
    start, end = times[1], times[-1]  # end is exclusive: the middle two rows
    window = await ids(start_time=timestamp(start), end_time=timestamp(end))
    assert window == expected(lambda r: start <= at(r["time"]) < end)
    assert len(window) == 2


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def post(
    http: aiohttp.ClientSession, engine: EngineProcess, *events: dict[str, Any]
) -> dict[str, Any]:
    async with http.post(engine.ingest_url, json={"events": list(events)}) as response:
        assert response.status == 202, await response.text()
        answer: dict[str, Any] = await response.json()
        return answer


async def check_resends_are_dropped(
    http: aiohttp.ClientSession, engine: EngineProcess, manifest: dict[str, Any]
) -> None:
    delivered = manifest["events"]["delivered"]
    answer = await post(http, engine, delivered[0], delivered[-1])
    assert (answer["accepted"], answer["duplicates"]) == (0, 2)


def insider_events(sandbox: RunningSandbox, uuid: str) -> list[tuple[str, Any]]:
    """(event name, its distinguishing parameter) of what the sandbox stored for ``uuid``,
    in the order it stored them."""
    user = sandbox.state.lookup("uuid", uuid)
    if user is None:
        return []
    found = []
    for event in user.events:
        params = event.get("event_params", {})
        custom = params.get("custom", {})
        key = custom.get("points") if "points" in custom else params.get("event_group_id")
        found.append((event["event_name"], key))
    return found


def expected_events(events: list[dict[str, Any]], customer: str) -> list[tuple[str, Any]]:
    """What the fixture's mappings make of ``events`` for ``customer``, in order: a
    point_add is a loyalty_points_earned with its points, a checkout one purchase per line."""
    found: list[tuple[str, Any]] = []
    for event in events:
        if event["customer"] != customer:
            continue
        if event["action"] == "point_add":
            found.append(("loyalty_points_earned", event["data"]["points"]))
        elif event["action"] == "checkout":
            data = event["data"]
            found += [("purchase", data["transaction_id"])] * len(data["items"])
    return found


async def check_queued_items_are_delivered(
    client: TidegateClient, sandbox: RunningSandbox, manifest: dict[str, Any]
) -> None:
    """Resumed against a working sandbox, the items 0.1.0 queued behind its pause go out,
    in order per customer, with the API key it encrypted (the sandbox checks it)."""
    connection_id = manifest["connection_id"]
    queued = manifest["events"]["blocked"] + manifest["events"]["while_paused"]
    # The key 0.1.0 encrypted is the key: applying the export with it changes nothing.
    key_env = f"TIDEGATE_API_KEY_{connection_id.upper().replace('-', '_')}"
    document = await client.export_config()
    same_key = await client.apply_config(
        document, api_keys={key_env: manifest["api_key"]}, dry_run=True
    )
    assert key_env in document and list(same_key.changes) == []
    # A new base_url needs the key in the same request (it decides where the key goes).
    settings = {**manifest["connection"]["settings"], "base_url": sandbox.url}
    await client.connections.UpdateConnection(
        connections_pb2.UpdateConnectionRequest(
            connection=connections_pb2.Connection(
                id=connection_id, settings=settings, api_key=manifest["api_key"]
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["settings", "api_key"]),
        )
    )
    connection = await client.get_connection(connection_id)
    if connection.state == connections_pb2.CONNECTION_STATE_PAUSED:
        await client.connections.ResumeConnection(
            connections_pb2.ResumeConnectionRequest(id=connection_id)
        )

    async def all_delivered() -> bool:
        return (await client.get_connection(connection_id)).queue_depth == 0

    await eventually(all_delivered, within=30)
    members = manifest["members"]
    for customer, member in members.items():
        assert insider_events(sandbox, member) == expected_events(queued, customer), customer
    assert insider_events(sandbox, members["cust-1"]) == [
        ("loyalty_points_earned", 201),
        ("loyalty_points_earned", 202),
        ("loyalty_points_earned", 203),
    ]
    cust4 = sandbox.state.lookup("uuid", members["cust-4"])
    assert cust4 is not None and cust4.attributes["custom"]["loyalty_tier"] == "gold"
    statuses = {request["status"] for request in sandbox.state.requests}
    assert statuses == {200}  # a wrong key would have been answered 401 or 403
    assert all(r["headers"]["X-REQUEST-TOKEN"] == "***" for r in sandbox.state.requests)


async def check_profiles_drive_identity(
    client: TidegateClient,
    http: aiohttp.ClientSession,
    engine: EngineProcess,
    sandbox: RunningSandbox,
    manifest: dict[str, Any],
) -> None:
    """0.1.0's stored profiles and external ids still identify customers: cust-3 by its
    stored member_id, and a member_id given as the external id resolves to cust-2."""
    members = manifest["members"]
    await post(
        http,
        engine,
        {"customer": "cust-3", "action": "point_add", "id": "evt-new-1", "data": {"points": 7}},
        {
            "customer": members["cust-2"],
            "external_id": "member_id",
            "action": "point_add",
            "id": "evt-new-2",
            "data": {"points": 8},
        },
    )

    async def arrived() -> bool:
        return ("loyalty_points_earned", 8) in insider_events(sandbox, members["cust-2"]) and (
            "loyalty_points_earned",
            7,
        ) in insider_events(sandbox, members["cust-3"])

    await eventually(arrived, within=30)


async def check_dead_letters_replay(
    client: TidegateClient,
    http: aiohttp.ClientSession,
    engine: EngineProcess,
    sandbox: RunningSandbox,
    manifest: dict[str, Any],
) -> None:
    """The unidentifiable dead letter, replayed once its customer has a member_id, is
    delivered; the refused one still counts for a replay."""
    dead = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)
    refused, unidentified = manifest["dead_letters"]
    dry = await dead.ReplayDeadLetters(
        dead_letters_pb2.ReplayDeadLettersRequest(ids=[int(refused["id"])], dry_run=True)
    )
    assert (dry.matched, dry.replayed) == (1, 1)
    customer = unidentified["customer_id"]
    await post(
        http,
        engine,
        {
            "customer": customer,
            "action": "opt_in",
            "id": "evt-new-3",
            "data": {"member_id": "M-1009"},
        },
    )
    replayed = await dead.ReplayDeadLetters(
        dead_letters_pb2.ReplayDeadLettersRequest(ids=[int(unidentified["id"])])
    )
    assert (replayed.matched, replayed.replayed) == (1, 1)
    points = json.loads(unidentified["record_json"])["data"]["points"]

    async def delivered() -> bool:
        return insider_events(sandbox, "M-1009") == [("loyalty_points_earned", points)]

    await eventually(delivered, within=30)
