"""The gRPC admin API: connections and mappings, validated on write."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from clients.client import TidegateClient
from engine.app import Engine
from engine.pb import connections_pb2 as cpb
from engine.pb import mappings_pb2 as mpb
from tests.conftest import API_KEY, PARTNER

SETTINGS = {"partner_name": PARTNER, "base_url": "http://127.0.0.1:9"}


async def expect_error(call: object, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call  # type: ignore[misc]
    assert failure.value.code() == code, failure.value.details()
    details = failure.value.details() or ""
    for fragment in fragments:
        assert fragment in details
    return details


async def test_created_connection_never_returns_the_api_key(client: TidegateClient) -> None:
    created = await client.create_connection("shop-eu", api_key=API_KEY, settings=SETTINGS)
    assert created.api_key == ""
    assert created.api_key_hint == "****" + API_KEY[-4:]
    fetched = await client.get_connection("shop-eu")
    listed = (await client.connections.ListConnections(cpb.ListConnectionsRequest())).connections
    for message in (created, fetched, *listed):
        assert API_KEY not in str(message)
    assert fetched.connector == "insider"
    assert fetched.customer_id_mapping.source_attribute == "customer_id"
    assert fetched.customer_id_mapping.target_identifier == "uuid"
    assert fetched.state == cpb.CONNECTION_STATE_ACTIVE


async def test_api_key_is_encrypted_in_the_state_database(
    client: TidegateClient, engine: Engine
) -> None:
    await client.create_connection("shop-eu", api_key=API_KEY, settings=SETTINGS)
    raw = (engine.config.data_dir / "state.sqlite3").read_bytes()
    wal = engine.config.data_dir / "state.sqlite3-wal"
    if wal.exists():
        raw += wal.read_bytes()
    assert API_KEY.encode() not in raw


@pytest.mark.parametrize(
    ("connection", "field"),
    [
        (
            cpb.Connection(id="Bad Id", api_key=API_KEY, settings=SETTINGS, connector="insider"),
            "connection.id",
        ),
        (
            cpb.Connection(id="x", api_key="", settings=SETTINGS, connector="insider"),
            "connection.api_key",
        ),
        (
            cpb.Connection(
                id="x", api_key=API_KEY, settings={"partner_name": "ACME"}, connector="insider"
            ),
            "connection.settings.partner_name",
        ),
        (
            cpb.Connection(id="x", api_key=API_KEY, settings={}, connector="insider"),
            "connection.settings.partner_name",
        ),
        (
            cpb.Connection(id="x", api_key=API_KEY, settings=SETTINGS, connector="segment"),
            "connector",
        ),
        (
            cpb.Connection(
                id="x",
                api_key=API_KEY,
                settings=SETTINGS,
                connector="insider",
                customer_id_mapping=cpb.CustomerIdMapping(target_identifier="insider_id"),
            ),
            "connection.customer_id_mapping.target_identifier",
        ),
    ],
)
async def test_invalid_connection_is_rejected_naming_the_field(
    client: TidegateClient, connection: cpb.Connection, field: str
) -> None:
    await expect_error(
        client.connections.CreateConnection(cpb.CreateConnectionRequest(connection=connection)),
        grpc.StatusCode.INVALID_ARGUMENT,
        field,
    )


async def test_duplicate_connection_id_is_rejected(client: TidegateClient) -> None:
    await client.create_connection("dup", api_key=API_KEY, settings=SETTINGS)
    await expect_error(
        client.connections.CreateConnection(
            cpb.CreateConnectionRequest(
                connection=cpb.Connection(
                    id="dup", api_key=API_KEY, settings=SETTINGS, connector="insider"
                )
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "already exists",
    )


async def test_update_with_mask_changes_only_named_fields(client: TidegateClient) -> None:
    await client.create_connection("c1", api_key=API_KEY, settings=SETTINGS, display_name="Old")
    response = await client.connections.UpdateConnection(
        cpb.UpdateConnectionRequest(
            connection=cpb.Connection(id="c1", display_name="New", api_key="new-key-abcdefgh9999"),
            update_mask=FieldMask(paths=["display_name"]),
        )
    )
    assert response.connection.display_name == "New"
    assert response.connection.api_key_hint == "****" + API_KEY[-4:]


async def test_update_of_unknown_field_is_rejected(client: TidegateClient) -> None:
    await client.create_connection("c1", api_key=API_KEY, settings=SETTINGS)
    await expect_error(
        client.connections.UpdateConnection(
            cpb.UpdateConnectionRequest(
                connection=cpb.Connection(id="c1"), update_mask=FieldMask(paths=["connector"])
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "update_mask",
    )


async def test_list_connections_pages_by_id(client: TidegateClient) -> None:
    for name in ("a", "b", "c"):
        await client.create_connection(name, api_key=API_KEY, settings=SETTINGS)
    first = await client.connections.ListConnections(cpb.ListConnectionsRequest(page_size=2))
    second = await client.connections.ListConnections(
        cpb.ListConnectionsRequest(page_size=2, page_token=first.next_page_token)
    )
    assert [c.id for c in first.connections] == ["a", "b"]
    assert [c.id for c in second.connections] == ["c"]
    assert second.next_page_token == ""


async def test_deleted_connection_is_gone(client: TidegateClient) -> None:
    await client.create_connection("gone", api_key=API_KEY, settings=SETTINGS)
    await client.connections.DeleteConnection(cpb.DeleteConnectionRequest(id="gone"))
    await expect_error(client.get_connection("gone"), grpc.StatusCode.NOT_FOUND, "gone")


async def test_mapping_changes_raise_the_mapping_version(client: TidegateClient) -> None:
    created = await client.create_connection("c1", api_key=API_KEY, settings=SETTINGS)
    added = await client.mappings.CreateProfileMapping(
        mpb.CreateProfileMappingRequest(
            mapping=mpb.ProfileMapping(
                connection_id="c1", source_attribute="first_name", target_attribute="name"
            )
        )
    )
    assert added.mapping_version == created.mapping_version + 1
    updated = await client.mappings.UpdateProfileMapping(
        mpb.UpdateProfileMappingRequest(
            mapping=mpb.ProfileMapping(
                id=added.mapping.id, source_attribute="handler", target_attribute="name"
            )
        )
    )
    assert updated.mapping.source_attribute == "handler"
    listed = await client.mappings.ListProfileMappings(
        mpb.ListProfileMappingsRequest(connection_id="c1")
    )
    assert [(m.source_attribute, m.target_attribute) for m in listed.mappings] == [
        ("handler", "name")
    ]
    deleted = await client.mappings.DeleteProfileMapping(
        mpb.DeleteProfileMappingRequest(id=added.mapping.id)
    )
    assert deleted.mapping_version == created.mapping_version + 3
    listed = await client.mappings.ListProfileMappings(
        mpb.ListProfileMappingsRequest(connection_id="c1")
    )
    assert list(listed.mappings) == []


async def test_event_mapping_keeps_parameters_and_custom_flags(client: TidegateClient) -> None:
    await client.create_connection("c1", api_key=API_KEY, settings=SETTINGS)
    mapping = await client.create_event_mapping(
        "c1",
        "checkout",
        "confirmation_page_view",
        [("transaction_id", "event_group_id", False), ("store", "store_code", True)],
    )
    listed = await client.mappings.ListEventMappings(
        mpb.ListEventMappingsRequest(connection_id="c1")
    )
    assert listed.mappings[0].id == mapping.id
    assert [
        (p.source_parameter, p.target_parameter, p.custom) for p in listed.mappings[0].parameters
    ] == [
        ("transaction_id", "event_group_id", False),
        ("store", "store_code", True),
    ]
    updated = await client.mappings.UpdateEventMapping(
        mpb.UpdateEventMappingRequest(
            mapping=mpb.EventMapping(
                id=mapping.id, source_event="checkout", target_event="checkout_page_view"
            )
        )
    )
    assert updated.mapping.target_event == "checkout_page_view"
    assert list(updated.mapping.parameters) == []
    await client.mappings.DeleteEventMapping(mpb.DeleteEventMappingRequest(id=mapping.id))
    listed = await client.mappings.ListEventMappings(
        mpb.ListEventMappingsRequest(connection_id="c1")
    )
    assert list(listed.mappings) == []


@pytest.mark.parametrize(
    ("mapping", "field"),
    [
        (
            mpb.ProfileMapping(connection_id="c1", source_attribute="", target_attribute="name"),
            "mapping.source_attribute",
        ),
        (
            mpb.ProfileMapping(
                connection_id="c1", source_attribute="tier", target_attribute="tier"
            ),
            "mapping.target_attribute",
        ),
        (
            mpb.ProfileMapping(
                connection_id="c1", source_attribute="email", target_attribute="email", custom=True
            ),
            "mapping.target_attribute",
        ),
        (
            mpb.ProfileMapping(connection_id="", source_attribute="a", target_attribute="name"),
            "mapping.connection_id",
        ),
    ],
)
async def test_invalid_profile_mapping_is_rejected_naming_the_field(
    client: TidegateClient, mapping: mpb.ProfileMapping, field: str
) -> None:
    await client.create_connection("c1", api_key=API_KEY, settings=SETTINGS)
    await expect_error(
        client.mappings.CreateProfileMapping(mpb.CreateProfileMappingRequest(mapping=mapping)),
        grpc.StatusCode.INVALID_ARGUMENT,
        field,
    )


@pytest.mark.parametrize(
    ("mapping", "field"),
    [
        (
            mpb.EventMapping(connection_id="c1", source_event="checkout", target_event="Purchase"),
            "mapping.target_event",
        ),
        (
            mpb.EventMapping(
                connection_id="c1",
                source_event="checkout",
                target_event="purchase",
                parameters=[
                    mpb.ParameterMapping(source_parameter="x", target_parameter="not_a_default")
                ],
            ),
            "mapping.parameters[0].target_parameter",
        ),
    ],
)
async def test_invalid_event_mapping_is_rejected_naming_the_field(
    client: TidegateClient, mapping: mpb.EventMapping, field: str
) -> None:
    await client.create_connection("c1", api_key=API_KEY, settings=SETTINGS)
    await expect_error(
        client.mappings.CreateEventMapping(mpb.CreateEventMappingRequest(mapping=mapping)),
        grpc.StatusCode.INVALID_ARGUMENT,
        field,
    )


async def test_same_antavo_event_cannot_be_mapped_twice(client: TidegateClient) -> None:
    await client.create_connection("c1", api_key=API_KEY, settings=SETTINGS)
    await client.create_event_mapping("c1", "checkout", "confirmation_page_view")
    await expect_error(
        client.create_event_mapping("c1", "checkout", "confirmation_page_view"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "mapping.source_event",
        "already mapped",
    )


async def test_mapping_for_unknown_connection_is_not_found(client: TidegateClient) -> None:
    await expect_error(
        client.create_profile_mapping("nope", "email", "email"), grpc.StatusCode.NOT_FOUND, "nope"
    )


async def test_unknown_log_id_is_not_found(client: TidegateClient) -> None:
    await expect_error(
        client.get_log("01a21bab-0000-7000-8000-000000000000"), grpc.StatusCode.NOT_FOUND
    )
