"""One paging rule for every List RPC, over a real gRPC server (and the Insider sandbox
for the dead letters): page_size 0 means 50, above 1000 means 1000, a negative one is
INVALID_ARGUMENT naming page_size; page tokens walk a list to its end, each entry once,
and a token of another list, of an unknown version or a garbled one is INVALID_ARGUMENT
naming page_token, with a message a person can act on.

The token format is the one documented in ``engine/admin/paging.py`` (URL-safe base64
of a JSON envelope with "v", "list" and "after"); the tests that need a token of another
version build it from a real token by that description."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from clients.client import TidegateClient
from engine.app import Engine
from engine.outbound_log.rows import LogCustomer, LogRow, new_request_id
from engine.pb import audit_pb2 as apb
from engine.pb import (
    audit_pb2_grpc,
    catalog_pb2_grpc,
    dead_letters_pb2_grpc,
    ingest_pb2,
    tokens_pb2_grpc,
)
from engine.pb import catalog_pb2 as cpb
from engine.pb import dead_letters_pb2 as dpb
from engine.pb import tokens_pb2 as tpb
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import API_KEY, PARTNER, eventually, insider_connection

CONNECTION = "insider-main"
Lister = Callable[[TidegateClient, int, str], Awaitable[tuple[list[str], str]]]


async def list_connections(client: TidegateClient, size: int, token: str) -> tuple[list[str], str]:
    response = await client.list_connections(size, token)
    return [c.id for c in response.connections], response.next_page_token


async def list_profile_mappings(
    client: TidegateClient, size: int, token: str
) -> tuple[list[str], str]:
    response = await client.list_profile_mappings(CONNECTION, size, token)
    return [m.id for m in response.mappings], response.next_page_token


async def list_event_mappings(
    client: TidegateClient, size: int, token: str
) -> tuple[list[str], str]:
    response = await client.list_event_mappings(CONNECTION, size, token)
    return [m.id for m in response.mappings], response.next_page_token


async def list_dead_letters(client: TidegateClient, size: int, token: str) -> tuple[list[str], str]:
    stub = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)
    response = await stub.ListDeadLetters(
        dpb.ListDeadLettersRequest(page_size=size, page_token=token)
    )
    return [str(d.id) for d in response.dead_letters], response.next_page_token


async def list_source_catalog(
    client: TidegateClient, size: int, token: str
) -> tuple[list[str], str]:
    stub = catalog_pb2_grpc.CatalogServiceStub(client.channel)
    response = await stub.ListSourceCatalog(
        cpb.ListSourceCatalogRequest(page_size=size, page_token=token)
    )
    return [f"{e.kind}/{e.event}/{e.name}" for e in response.entries], response.next_page_token


async def list_destination_catalog(
    client: TidegateClient, size: int, token: str
) -> tuple[list[str], str]:
    stub = catalog_pb2_grpc.CatalogServiceStub(client.channel)
    response = await stub.ListDestinationCatalog(
        cpb.ListDestinationCatalogRequest(
            connection_id=CONNECTION, page_size=size, page_token=token
        )
    )
    return [f"{e.kind}/{e.name}" for e in response.entries], response.next_page_token


async def list_logs(client: TidegateClient, size: int, token: str) -> tuple[list[str], str]:
    response = await client.list_logs(size, token)
    return [e.id for e in response.logs], response.next_page_token


async def list_tokens(client: TidegateClient, size: int, token: str) -> tuple[list[str], str]:
    stub = tokens_pb2_grpc.TokenServiceStub(client.channel)
    response = await stub.ListTokens(tpb.ListTokensRequest(page_size=size, page_token=token))
    return [t.id for t in response.tokens], response.next_page_token


async def list_audit_events(client: TidegateClient, size: int, token: str) -> tuple[list[str], str]:
    stub = audit_pb2_grpc.AuditServiceStub(client.channel)
    response = await stub.ListAuditEvents(
        apb.ListAuditEventsRequest(page_size=size, page_token=token)
    )
    return [str(e.id) for e in response.events], response.next_page_token


LISTS: dict[str, Lister] = {
    "ListConnections": list_connections,
    "ListProfileMappings": list_profile_mappings,
    "ListEventMappings": list_event_mappings,
    "ListDeadLetters": list_dead_letters,
    "ListSourceCatalog": list_source_catalog,
    "ListDestinationCatalog": list_destination_catalog,
    "ListLogs": list_logs,
    "ListTokens": list_tokens,
    "ListAuditEvents": list_audit_events,
}


def log_row(at: datetime) -> LogRow:
    return LogRow(
        id=new_request_id(at=at),
        time=at,
        connection_id=CONNECTION,
        method="POST",
        url="https://unification.useinsider.com/api/user/v1/upsert",
        status_code=200,
        response_time=0.1,
        error="",
        customers=(LogCustomer("cust-1"),),
        mapping_version=1,
    )


async def append_log_rows(engine: Engine, count: int) -> None:
    start = datetime.now(UTC) - timedelta(hours=1)
    for n in range(count):
        await engine.logs.append(log_row(start + timedelta(milliseconds=n)))
    await engine.logs.flush()


@pytest.fixture
async def populated(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox
) -> AsyncIterator[TidegateClient]:
    """At least three entries in every list."""
    await insider_connection(client, sandbox, CONNECTION)  # 4 profile, 2 event mappings
    await client.create_event_mapping(CONNECTION, "opt_out", "email_unsubscribe")
    for name in ("other-a", "other-b"):
        await client.create_connection(
            name, api_key=API_KEY, settings={"partner_name": PARTNER, "base_url": sandbox.url}
        )
    # The sandbox refuses an invalid email for that customer: one dead letter each.
    await client.send_events(
        [
            {"customer": f"bad-{n}", "action": "opt_in", "data": {"email": "not-an-email"}}
            for n in range(3)
        ]
    )

    async def three_dead_letters() -> bool:
        return (await client.get_connection(CONNECTION)).dead_letter_count >= 3

    await eventually(three_dead_letters)
    await append_log_rows(engine, 5)
    tokens = tokens_pb2_grpc.TokenServiceStub(client.channel)
    for name in ("viewer-a", "viewer-b"):  # with the bootstrap token: three
        await tokens.CreateToken(tpb.CreateTokenRequest(name=name, role=tpb.TOKEN_ROLE_VIEWER))
    yield client


async def expect_invalid(call: Awaitable[Any], field: str, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    details = failure.value.details() or ""
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(f"{field}: "), details
    assert "Traceback" not in details
    for fragment in fragments:
        assert fragment in details, details
    return details


def envelope(token: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    return decoded


def token_of(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


async def first_token(client: TidegateClient, name: str) -> str:
    _, token = await LISTS[name](client, 1, "")
    assert token, f"{name} has a single entry: populate it"
    return token


@pytest.mark.parametrize("name", LISTS)
async def test_every_list_walks_to_its_end_each_entry_once(
    populated: TidegateClient, name: str
) -> None:
    everything, token = await LISTS[name](populated, 1000, "")
    assert token == "" and len(everything) >= 3

    walked: list[str] = []
    pages = 0
    while True:
        page, token = await LISTS[name](populated, 2, token)
        assert 1 <= len(page) <= 2
        walked += page
        pages += 1
        if not token:
            break

    assert walked == everything
    assert pages == (len(everything) + 1) // 2


async def test_every_list_refuses_a_negative_page_size_naming_it(
    client: TidegateClient, sandbox: RunningSandbox
) -> None:
    await insider_connection(client, sandbox, CONNECTION)
    for name, lister in LISTS.items():
        details = await expect_invalid(lister(client, -1, ""), "page_size")
        assert "negative" in details, name


@pytest.mark.parametrize(
    "token",
    [
        "garbage!",
        "påge",
        "bm90IGpzb24",  # "not json"
        "eyJ0aW1lIjogMX0",  # {"time": 1}: the outbound log's old token
        "W10",  # []
        "eyJ0aW1lIjoxLjUsImlkIjo3fQ",  # {"time":1.5,"id":7}
        "MTIz",  # base64 of "123": the dead letters' old token
        "b",  # the connections' old token: the last id in clear
        "500",  # the catalogs' old token: an offset in clear
    ],
)
async def test_every_list_refuses_a_garbled_token(
    client: TidegateClient, sandbox: RunningSandbox, token: str
) -> None:
    await insider_connection(client, sandbox, CONNECTION)
    for name, lister in LISTS.items():
        await expect_invalid(
            lister(client, 0, token), "page_token", f"previous {name} response", "empty"
        )


async def test_every_list_refuses_a_token_whose_cursor_does_not_fit(
    client: TidegateClient, sandbox: RunningSandbox
) -> None:
    await insider_connection(client, sandbox, CONNECTION)
    for name, lister in LISTS.items():
        for after in ([], [True], [-1], [2**64], [None], ["a", 1, "b", 2]):
            token = token_of({"v": 1, "list": name, "after": after})
            await expect_invalid(lister(client, 0, token), "page_token", name)


async def test_list_logs_refuses_a_cursor_past_the_last_representable_time(
    client: TidegateClient,
) -> None:
    # Year 9999 ends at 253402300800 s; a cursor beyond it is no time at all.
    token = token_of({"v": 1, "list": "ListLogs", "after": [2**62, "x"]})
    await expect_invalid(list_logs(client, 0, token), "page_token", "ListLogs")


async def test_every_list_refuses_a_token_of_another_list(populated: TidegateClient) -> None:
    tokens = {name: await first_token(populated, name) for name in LISTS}
    for name, lister in LISTS.items():
        for other, token in tokens.items():
            if other == name:
                continue
            await expect_invalid(
                lister(populated, 0, token),
                "page_token",
                f"page token of {other}, not of {name}",
            )


async def test_every_list_refuses_a_token_of_an_unknown_version(
    populated: TidegateClient,
) -> None:
    for name, lister in LISTS.items():
        data = envelope(await first_token(populated, name))
        assert data["v"] == 1 and data["list"] == name
        newer = token_of({**data, "v": 2})
        await expect_invalid(lister(populated, 0, newer), "page_token", "version 2", "empty")


async def test_list_logs_page_size_zero_is_50_and_above_1000_is_1000(
    engine: Engine, client: TidegateClient
) -> None:
    await append_log_rows(engine, 1003)

    default, _ = await list_logs(client, 0, "")
    clamped, token = await list_logs(client, 5000, "")
    rest, end = await list_logs(client, 5000, token)

    assert len(default) == 50
    assert len(clamped) == 1000 and token
    assert len(rest) == 3 and end == ""
    assert not set(clamped) & set(rest)


async def test_source_catalog_page_size_zero_is_50_and_above_1000_is_1000(
    client: TidegateClient,
) -> None:
    # 1,100 parameter names seen in traffic make the catalog longer than one page (two
    # actions: an event's data holds at most 1,000 keys, an action's catalog 1,000 names).
    events = []
    for action in ("big_event", "big_event_2"):
        data = struct_pb2.Struct()
        data.update({f"param_{n:04d}": n for n in range(550)})
        events.append(ingest_pb2.AntavoEvent(customer="c", action=action, data=data))
    await client.ingest.IngestEvents(ingest_pb2.IngestEventsRequest(events=events))

    default, _ = await list_source_catalog(client, 0, "")
    clamped, token = await list_source_catalog(client, 1001, "")
    rest, end = await list_source_catalog(client, 1000, token)

    assert len(default) == 50
    assert len(clamped) == 1000 and token
    assert rest and end == ""
    assert len(set(clamped) | set(rest)) == len(clamped) + len(rest) > 1100


async def test_source_catalog_pages_stay_exact_when_new_names_are_seen_between_them(
    client: TidegateClient,
) -> None:
    first, token = await list_source_catalog(client, 10, "")
    # Meanwhile an attribute is seen whose name sorts before every built-in attribute, so
    # before the whole first page: the next page must still start right after it.
    await client.send_events([{"customer": "c", "action": "profile", "data": {"aaa_new": 1}}])
    everything, _ = await list_source_catalog(client, 1000, "")
    assert everything.index(f"{cpb.CATALOG_KIND_ATTRIBUTE}//aaa_new") < everything.index(first[-1])

    rest: list[str] = []
    while token:
        page, token = await list_source_catalog(client, 1000, token)
        rest += page

    assert rest == everything[everything.index(first[-1]) + 1 :]
