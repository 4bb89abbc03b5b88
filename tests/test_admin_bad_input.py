"""Bad input to the admin API gets a clear INVALID_ARGUMENT (or NOT_FOUND) naming the
field, never INTERNAL or UNKNOWN, never Python exception text, never an unbounded echo
of what was sent. Each case was seen failing on main; all run against a real engine's
gRPC server."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from clients.client import TidegateClient
from engine.pb import backup_pb2 as bpb
from engine.pb import catalog_pb2 as cpb
from engine.pb import config_pb2 as cfgpb
from engine.pb import connections_pb2 as conpb
from engine.pb import dead_letters_pb2 as dpb
from engine.pb import ingest_pb2 as ipb
from engine.pb import logs_pb2 as lpb
from engine.pb import mappings_pb2 as mpb
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import insider_connection

YEAR_10000 = 253_402_300_800  # 10000-01-01T00:00:00Z, one second past the Timestamp range
BEFORE_YEAR_1 = -62_135_596_801


async def call(client: TidegateClient, method: str, request: Message) -> grpc.aio.AioRpcError:
    """Calls ``method`` (``Service/Method``) expecting it to fail; returns the error."""
    service, name = method.split("/")
    package = "tidegate.admin.v1"
    stub = client.channel.unary_unary(
        f"/{package}.{service}/{name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(request)
    return caught.value


def assert_clear(error: grpc.aio.AioRpcError, code: grpc.StatusCode, field: str) -> None:
    details = error.details() or ""
    assert error.code() == code, details
    assert details.startswith(field), details
    assert len(details) < 1000
    assert "Traceback" not in details and ".py" not in details


def token_of(envelope: dict[str, Any]) -> str:
    """A page token as paging.py documents its format."""
    return base64.urlsafe_b64encode(json.dumps(envelope).encode()).decode().rstrip("=")


async def test_a_catalog_page_token_of_non_ascii_digits_is_invalid_argument(
    client: TidegateClient,
) -> None:
    for token in ("²", "abc\n", "１２３", "\U0001f600"):
        error = await call(
            client,
            "CatalogService/ListSourceCatalog",
            cpb.ListSourceCatalogRequest(page_token=token),
        )
        assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT, "page_token")


async def test_a_dead_letter_page_token_past_the_integer_range_is_invalid_argument(
    client: TidegateClient,
) -> None:
    for after in (int("9" * 30), 2**63, -1):
        token = token_of({"v": 1, "list": "ListDeadLetters", "after": [after]})
        error = await call(
            client,
            "DeadLetterService/ListDeadLetters",
            dpb.ListDeadLettersRequest(page_token=token),
        )
        assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT, "page_token")


async def test_replay_caps_the_number_of_ids_and_says_the_cap(client: TidegateClient) -> None:
    request = dpb.ReplayDeadLettersRequest(ids=range(1, 250_002), dry_run=True)
    error = await call(client, "DeadLetterService/ReplayDeadLetters", request)
    assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT, "ids")
    assert "250001" in (error.details() or "")
    assert "10000" in (error.details() or "")


async def test_replay_at_the_cap_is_accepted(client: TidegateClient) -> None:
    stub = client.channel.unary_unary(
        "/tidegate.admin.v1.DeadLetterService/ReplayDeadLetters",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=dpb.ReplayDeadLettersResponse.FromString,
    )
    request = dpb.ReplayDeadLettersRequest(ids=range(10_000_000, 10_010_000), dry_run=True)
    response = await stub(request)
    assert response.matched == 0


OUT_OF_RANGE = [
    {"seconds": YEAR_10000},
    {"seconds": BEFORE_YEAR_1},
    {"seconds": 2**62},
    {"seconds": 0, "nanos": -1},
    {"seconds": 0, "nanos": 1_000_000_000},
]


@pytest.mark.parametrize("bad", OUT_OF_RANGE)
async def test_every_timestamp_out_of_range_is_invalid_argument(
    client: TidegateClient, bad: dict[str, int]
) -> None:
    cases: list[tuple[str, Message, str]] = [
        (
            "LogService/ListLogs",
            lpb.ListLogsRequest(filter=lpb.LogFilter(start_time=bad)),
            "filter.start_time",
        ),
        (
            "LogService/ListLogs",
            lpb.ListLogsRequest(filter=lpb.LogFilter(end_time=bad)),
            "filter.end_time",
        ),
        (
            "DeadLetterService/ListDeadLetters",
            dpb.ListDeadLettersRequest(filter=dpb.DeadLetterFilter(start_time=bad)),
            "filter.start_time",
        ),
        (
            "DeadLetterService/ReplayDeadLetters",
            dpb.ReplayDeadLettersRequest(filter=dpb.DeadLetterFilter(end_time=bad)),
            "filter.end_time",
        ),
        (
            "IngestService/IngestEvents",
            ipb.IngestEventsRequest(
                events=[ipb.AntavoEvent(customer="c", action="a", timestamp=bad)]
            ),
            "events[0].timestamp",
        ),
        (
            "CatalogService/PreviewDelivery",
            cpb.PreviewDeliveryRequest(
                connection_id="x", event=ipb.AntavoEvent(customer="c", action="a", timestamp=bad)
            ),
            "event.timestamp",
        ),
    ]
    for method, request, field in cases:
        assert_clear(await call(client, method, request), grpc.StatusCode.INVALID_ARGUMENT, field)


async def test_a_timestamp_out_of_range_in_stream_logs_is_invalid_argument(
    client: TidegateClient,
) -> None:
    stream = client.logs.StreamLogs(
        lpb.StreamLogsRequest(filter=lpb.LogFilter(start_time={"seconds": YEAR_10000}))
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stream:
            pass
    assert_clear(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "filter.start_time")


def nested_struct(depth: int) -> struct_pb2.Struct:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"k": value}
    message = struct_pb2.Struct()
    message.update(value)
    return message


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | 0x80 if n else low)
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, encoded by the wire format's rules."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def deep_struct_bytes(depth: int) -> bytes:
    """A ``google.protobuf.Struct`` nested ``depth`` deep, encoded by hand: Python's own
    protobuf refuses to build one this deep, grpcurl and other clients do not."""
    struct = b""
    for _ in range(depth):
        value = field(5, struct)  # Value.struct_value
        struct = field(1, field(1, b"k") + field(2, value))  # Struct.fields entry
    return struct


async def test_a_struct_nested_90_deep_is_invalid_argument(
    client: TidegateClient, sandbox: RunningSandbox
) -> None:
    await insider_connection(client, sandbox)
    event = field(1, b"c") + field(2, b"checkout") + field(3, deep_struct_bytes(90))
    request = field(1, b"insider-main") + field(2, event)
    stub = client.channel.unary_unary(
        "/tidegate.admin.v1.CatalogService/PreviewDelivery",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(request)
    assert_clear(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "request")
    assert "100 levels" in (caught.value.details() or "")
    assert "DecodeError" not in (caught.value.details() or "")


async def test_invalid_utf8_in_a_string_is_invalid_argument(client: TidegateClient) -> None:
    stub = client.channel.unary_unary(
        "/tidegate.admin.v1.ConnectionService/GetConnection",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub(field(1, b"\xff\xfe"))
    assert_clear(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "request")


async def test_a_profile_struct_past_the_depth_limit_is_invalid_argument(
    client: TidegateClient,
) -> None:
    error = await call(
        client,
        "CatalogService/PreviewDelivery",
        cpb.PreviewDeliveryRequest(
            connection_id="x",
            event=ipb.AntavoEvent(customer="c", action="checkout"),
            profile=nested_struct(32),
        ),
    )
    assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT, "profile")
    assert "32" in (error.details() or "")


async def test_a_struct_at_the_depth_limit_is_previewed(
    client: TidegateClient, sandbox: RunningSandbox
) -> None:
    await insider_connection(client, sandbox)
    event = ipb.AntavoEvent(customer="c", action="checkout", data=nested_struct(20))
    stub = client.channel.unary_unary(
        "/tidegate.admin.v1.CatalogService/PreviewDelivery",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=cpb.PreviewDeliveryResponse.FromString,
    )
    response = await stub(cpb.PreviewDeliveryRequest(connection_id="insider-main", event=event))
    assert response.mapping_version > 0


async def test_a_struct_with_too_many_values_is_invalid_argument(client: TidegateClient) -> None:
    data = struct_pb2.Struct()
    data.update({"many": list(range(100_001))})
    error = await call(
        client,
        "IngestService/IngestEvents",
        ipb.IngestEventsRequest(events=[ipb.AntavoEvent(customer="c", action="a", data=data)]),
    )
    assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT, "events[0].data")


async def test_a_100_kb_id_is_refused_and_not_echoed(
    client: TidegateClient, sandbox: RunningSandbox
) -> None:
    huge = "x" * 100_000
    await insider_connection(client, sandbox)
    cases: list[tuple[str, Message, str]] = [
        ("ConnectionService/GetConnection", conpb.GetConnectionRequest(id=huge), "id"),
        ("LogService/GetLog", lpb.GetLogRequest(id=huge), "id"),
        (
            "MappingService/CreateProfileMapping",
            mpb.CreateProfileMappingRequest(
                mapping=mpb.ProfileMapping(
                    id=huge,
                    connection_id="insider-main",
                    source_attribute="a",
                    target_attribute="b",
                    custom=True,
                )
            ),
            "mapping.id",
        ),
        (
            "MappingService/DeleteEventMapping",
            mpb.DeleteEventMappingRequest(id=huge),
            "id",
        ),
        (
            "ConnectionService/CreateConnection",
            conpb.CreateConnectionRequest(
                connection=conpb.Connection(id="ok", settings={huge: "v"}, api_key="k")
            ),
            "connection.settings",
        ),
    ]
    for method, request, field in cases:
        error = await call(client, method, request)
        assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT, field)
        assert "256" in (error.details() or "")


async def test_a_long_string_that_is_not_found_is_echoed_cut(client: TidegateClient) -> None:
    long_id = "y" * 250  # within the id limit, longer than what an error echoes
    error = await call(client, "LogService/GetLog", lpb.GetLogRequest(id=long_id))
    details = error.details() or ""
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "y" * 100 in details and "y" * 101 not in details
    assert "150 more characters" in details


async def test_a_config_document_nested_thousands_deep_is_invalid_argument(
    client: TidegateClient,
) -> None:
    document = "connections: " + "[" * 5000 + "]" * 5000
    error = await call(
        client, "ConfigService/ApplyConfig", cfgpb.ApplyConfigRequest(document=document)
    )
    assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT, "document")


async def test_a_backup_destination_with_a_nul_is_invalid_argument(
    client: TidegateClient, tmp_path: Path
) -> None:
    request = bpb.CreateBackupRequest(destination=f"{tmp_path}/a\0b")
    error = await call(client, "BackupService/CreateBackup", request)
    assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT, "destination")


async def test_a_valid_page_token_with_a_trailing_newline_is_refused(
    client: TidegateClient,
) -> None:
    token = token_of({"v": 1, "list": "ListSourceCatalog", "after": ["a", "b", "c"]})
    stub = client.channel.unary_unary(
        "/tidegate.admin.v1.CatalogService/ListSourceCatalog",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=cpb.ListSourceCatalogResponse.FromString,
    )
    await stub(cpb.ListSourceCatalogRequest(page_token=token))  # the token itself is fine
    error = await call(
        client,
        "CatalogService/ListSourceCatalog",
        cpb.ListSourceCatalogRequest(page_token=token + "\n"),
    )
    assert_clear(error, grpc.StatusCode.INVALID_ARGUMENT, "page_token")
