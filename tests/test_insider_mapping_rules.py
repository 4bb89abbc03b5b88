"""Insider's rules applied when a mapping or setting is written, over a real gRPC server.

Every mapping Insider would reject (``insider-ucd-api.md`` §3.3-3.7) is refused with
``INVALID_ARGUMENT`` naming the field; the valid forms the rules allow are accepted.
"""

from __future__ import annotations

import grpc
import pytest

from clients.client import TidegateClient
from engine.pb import connections_pb2 as cpb
from engine.pb import mappings_pb2 as mpb
from tests.conftest import API_KEY, PARTNER

SETTINGS = {"partner_name": PARTNER, "base_url": "http://insider.test"}


def param(source: str, target: str, custom: bool = False) -> mpb.ParameterMapping:
    return mpb.ParameterMapping(source_parameter=source, target_parameter=target, custom=custom)


PURCHASE_BASICS = [
    param("transaction_id", "event_group_id"),
    param("total", "unit_sale_price"),
    param("currency", "currency"),
]


async def refused(call: object, field: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert details.startswith(f"{field}: "), details
    return details


@pytest.fixture
async def connection(client: TidegateClient) -> str:
    await client.create_connection("c1", api_key=API_KEY, settings=SETTINGS)
    return "c1"


@pytest.mark.parametrize(
    ("mapping", "field", "says"),
    [
        (
            mpb.ProfileMapping(source_attribute="tier", target_attribute="loyalty_tier"),
            "mapping.target_attribute",
            "set custom=true",
        ),
        (
            mpb.ProfileMapping(source_attribute="email", target_attribute="email", custom=True),
            "mapping.target_attribute",
            "is a default Insider attribute",
        ),
        (
            mpb.ProfileMapping(source_attribute="tier", target_attribute="Tier Level", custom=True),
            "mapping.target_attribute",
            "lowercase letters, digits and '_'",
        ),
        (
            mpb.ProfileMapping(source_attribute="customer_id", target_attribute="uuid"),
            "mapping.target_attribute",
            "customer_id_mapping",
        ),
        (
            mpb.ProfileMapping(
                source_attribute="first_name",
                target_attribute="name",
                array_mode=mpb.ARRAY_MODE_REPLACE,
            ),
            "mapping.array_mode",
            "list_id",
        ),
        (
            mpb.ProfileMapping(source_attribute="tier", target_attribute="tier", array_mode=9),
            "mapping.array_mode",
            "ARRAY_MODE_APPEND",
        ),
    ],
)
async def test_invalid_profile_mapping_is_refused_naming_the_field(
    client: TidegateClient, connection: str, mapping: mpb.ProfileMapping, field: str, says: str
) -> None:
    mapping.connection_id = connection
    details = await refused(
        client.mappings.CreateProfileMapping(mpb.CreateProfileMappingRequest(mapping=mapping)),
        field,
    )

    assert says in details


@pytest.mark.parametrize(
    ("target", "parameters", "field", "says"),
    [
        ("Purchase", PURCHASE_BASICS, "mapping.target_event", "lowercase"),
        ("loyalty points", [], "mapping.target_event", "lowercase"),
        (
            "purchase",
            [param("transaction_id", "event_group_id"), param("total", "unit_sale_price")],
            "mapping.parameters",
            "map a parameter to currency",
        ),
        (
            "cart_page_view",
            [param("cart_id", "event_group_id")],
            "mapping.parameters",
            "unit_sale_price, currency",
        ),
        (
            "purchase",
            [*PURCHASE_BASICS, param("store", "store_code")],
            "mapping.parameters[3].target_parameter",
            "set custom=true",
        ),
        (
            "purchase",
            [*PURCHASE_BASICS, param("sku", "product_id", custom=True)],
            "mapping.parameters[3].target_parameter",
            "is a default Insider parameter",
        ),
        (
            "purchase",
            [*PURCHASE_BASICS, param("items[]product_id", "product_id")],
            "mapping.parameters[3].source_parameter",
            "items[].product_id",
        ),
        (
            "purchase",
            [
                *PURCHASE_BASICS,
                param("items[].sku", "product_id"),
                param("lines[].qty", "quantity"),
            ],
            "mapping.parameters[4].source_parameter",
            "same array",
        ),
        (
            "purchase",
            [*PURCHASE_BASICS, param("discount", "unit_sale_price")],
            "mapping.parameters[3].target_parameter",
            "already the target of parameters[1]",
        ),
    ],
)
async def test_invalid_event_mapping_is_refused_naming_the_field(
    client: TidegateClient,
    connection: str,
    target: str,
    parameters: list[mpb.ParameterMapping],
    field: str,
    says: str,
) -> None:
    mapping = mpb.EventMapping(
        connection_id=connection,
        source_event="checkout",
        target_event=target,
        parameters=parameters,
    )
    details = await refused(
        client.mappings.CreateEventMapping(mpb.CreateEventMappingRequest(mapping=mapping)), field
    )

    assert says in details


async def test_a_per_line_purchase_mapping_is_accepted(
    client: TidegateClient, connection: str
) -> None:
    mapping = await client.create_event_mapping(
        connection,
        "checkout",
        "purchase",
        [
            ("transaction_id", "event_group_id", False),
            ("currency", "currency", False),
            ("items[].product_id", "product_id", False),
            ("items[].price", "unit_sale_price", False),
            ("items[].quantity", "quantity", False),
        ],
    )

    assert [p.source_parameter for p in mapping.parameters][2:] == [
        "items[].product_id",
        "items[].price",
        "items[].quantity",
    ]


async def test_an_array_mode_is_kept_on_a_profile_mapping(
    client: TidegateClient, connection: str
) -> None:
    added = await client.mappings.CreateProfileMapping(
        mpb.CreateProfileMappingRequest(
            mapping=mpb.ProfileMapping(
                connection_id=connection,
                source_attribute="labels",
                target_attribute="labels",
                custom=True,
                array_mode=mpb.ARRAY_MODE_REPLACE,
            )
        )
    )
    listed = await client.mappings.ListProfileMappings(
        mpb.ListProfileMappingsRequest(connection_id=connection)
    )

    assert added.mapping.array_mode == mpb.ARRAY_MODE_REPLACE
    assert [m.array_mode for m in listed.mappings] == [mpb.ARRAY_MODE_REPLACE]


@pytest.mark.parametrize(
    ("mapping", "field", "says"),
    [
        (
            cpb.CustomerIdMapping(source_attribute="customer_id", target_identifier="user_id"),
            "connection.customer_id_mapping.target_identifier",
            "allowed: email, phone_number, uuid",
        ),
        (
            cpb.CustomerIdMapping(
                source_attribute="customer_id", target_identifier="email", custom=True
            ),
            "connection.customer_id_mapping.target_identifier",
            "is a default Insider identifier",
        ),
    ],
)
async def test_invalid_customer_id_mapping_is_refused_naming_the_field(
    client: TidegateClient, mapping: cpb.CustomerIdMapping, field: str, says: str
) -> None:
    request = cpb.CreateConnectionRequest(
        connection=cpb.Connection(
            id="c2",
            settings=SETTINGS,
            api_key=API_KEY,
            customer_id_mapping=mapping,
            connector="insider",
        )
    )
    details = await refused(client.connections.CreateConnection(request), field)

    assert says in details


@pytest.mark.parametrize(
    ("settings", "field", "says"),
    [
        ({"default_phone_region": "XX"}, "default_phone_region", "HU, SG or US"),
        ({"array_mode": "merge"}, "array_mode", "append, replace"),
        ({"profile_scope": "everything"}, "profile_scope", "changed, all"),
        ({"backfill": "yes"}, "backfill", "true, false"),
        ({"region": "eu"}, "region", "allowed: array_mode, backfill"),
    ],
)
async def test_invalid_setting_is_refused_naming_it(
    client: TidegateClient, settings: dict[str, str], field: str, says: str
) -> None:
    request = cpb.CreateConnectionRequest(
        connection=cpb.Connection(
            id="c2", settings={**SETTINGS, **settings}, api_key=API_KEY, connector="insider"
        )
    )
    details = await refused(
        client.connections.CreateConnection(request), f"connection.settings.{field}"
    )

    assert says in details


async def test_the_new_settings_are_accepted(client: TidegateClient) -> None:
    settings = {
        **SETTINGS,
        "default_phone_region": "HU",
        "array_mode": "replace",
        "profile_scope": "all",
        "backfill": "true",
    }

    created = await client.create_connection("c3", api_key=API_KEY, settings=settings)

    assert dict(created.settings) == settings
