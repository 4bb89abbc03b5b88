"""The Insider hooks' newer duties: catalog, phone regions, profile scope, line items,
and the send steps (identity update, attribute delete, upsert) against the sandbox over
loopback through the engine's real transport.

Endpoints and bodies follow ``insider-ucd-api.md`` §6.1 (attribute delete) and §6.4
(identity); line items §3.7; identifiers §3.3.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import pytest

from engine.connector.records import (
    AntavoEvent,
    Connection,
    Customer,
    CustomerIdMapping,
    Delivery,
    EventMapping,
    ItemOutcome,
    ParameterMapping,
    ProfileChange,
    ProfileMapping,
    SendResult,
)
from engine.connector.testing import ConnectorTester
from engine.delivery.transport import RecordingTransport
from engine.errors import MappingError, RetryableError
from plugins.insider import plugin
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import API_KEY, PARTNER

NOW = datetime(2026, 11, 27, 10, 15, tzinfo=UTC)

INSIDER = ConnectorTester(plugin, allow_destinations=["127.0.0.1"])  # the sandbox


def connection(**changes: Any) -> Connection:
    base = Connection(
        id="conn-1",
        connector="insider",
        settings={"partner_name": PARTNER},
        api_key=API_KEY,
        customer_id_mapping=CustomerIdMapping(),
        profile_mappings=(
            ProfileMapping("m1", "first_name", "name"),
            ProfileMapping("m2", "city", "city"),
            ProfileMapping("m3", "tier", "loyalty_tier", custom=True),
        ),
    )
    return dataclasses.replace(base, **changes)


# connector_info


def test_hook_connector_info_declares_insiders_defaults_as_a_catalog() -> None:
    catalog = {(e.kind, e.name): e for e in plugin.connector_info().catalog}

    assert catalog[("identifier", "phone_number")].format.startswith("E.164")
    assert catalog[("attribute", "country")].format.startswith("ISO 3166-1 alpha-2")
    assert catalog[("event_parameter", "unit_sale_price")].required_for == (
        "purchase",
        "cart_page_view",
    )
    assert catalog[("event_parameter", "quantity")].required_for == ()
    assert ("event", "purchase") in catalog


# identify


def test_hook_identify_reads_a_national_phone_number_with_the_default_region() -> None:
    c = connection(
        settings={"partner_name": PARTNER, "default_phone_region": "SG"},
        customer_id_mapping=CustomerIdMapping("mobile", "phone_number"),
    )

    identifiers = INSIDER.identify(connection=c, customer=Customer("c-1", {"mobile": "9876 5432"}))

    assert identifiers == {"phone_number": "+6598765432"}


def test_hook_identify_fails_for_a_national_phone_number_without_a_region() -> None:
    c = connection(customer_id_mapping=CustomerIdMapping("mobile", "phone_number"))

    with pytest.raises(MappingError) as caught:
        INSIDER.identify(connection=c, customer=Customer("c-1", {"mobile": "9876 5432"}))

    assert "set default_phone_region" in caught.value.message


# map_profile


def test_hook_map_profile_with_scope_all_sends_every_mapped_attribute() -> None:
    c = connection(settings={"partner_name": PARTNER, "profile_scope": "all"})
    customer = Customer("c-1", {"first_name": "Ana", "city": "Pécs", "tier": "gold"})

    attributes = INSIDER.map_profile(
        connection=c, customer=customer, change=ProfileChange({"city": "Pécs"}, NOW)
    )

    assert attributes == {"name": "Ana", "city": "Pécs", "custom": {"loyalty_tier": "gold"}}


def test_hook_map_profile_leaves_a_cleared_attribute_out() -> None:
    attributes = INSIDER.map_profile(
        connection=connection(),
        customer=Customer("c-1"),
        change=ProfileChange({"city": None, "first_name": "Ana"}, NOW, {"city": "Pécs"}),
    )

    assert attributes == {"name": "Ana"}


# map_event

LINES = EventMapping(
    "e1",
    "checkout",
    "cart_page_view",
    (
        ParameterMapping("cart_id", "event_group_id"),
        ParameterMapping("currency", "currency"),
        ParameterMapping("items[].sku", "product_id"),
        ParameterMapping("items[].price", "unit_sale_price"),
    ),
)


def checkout(items: Any) -> AntavoEvent:
    data = {"cart_id": "CART-1", "currency": "USD", "items": items}
    return AntavoEvent("ev-1", "c-1", "checkout", data, NOW)


def test_hook_map_event_sends_one_event_per_line_one_second_apart() -> None:
    events = INSIDER.map_event(
        connection=connection(event_mappings=(LINES,)),
        customer=Customer("c-1"),
        event=checkout([{"sku": "A", "price": "5.5"}, {"sku": 7, "price": 3}, {"sku": "C"}]),
    )

    shared = {"event_group_id": "CART-1", "currency": "USD"}
    assert events == [
        {
            "event_name": "cart_page_view",
            "timestamp": "2026-11-27T10:15:00Z",
            "event_params": {**shared, "product_id": "A", "unit_sale_price": 5.5},
        },
        {
            "event_name": "cart_page_view",
            "timestamp": "2026-11-27T10:15:01Z",
            "event_params": {**shared, "product_id": "7", "unit_sale_price": 3},
        },
        {
            "event_name": "cart_page_view",
            "timestamp": "2026-11-27T10:15:02Z",
            "event_params": {**shared, "product_id": "C"},
        },
    ]


def test_hook_map_event_fails_a_line_that_is_not_an_object() -> None:
    with pytest.raises(MappingError) as caught:
        INSIDER.map_event(
            connection=connection(event_mappings=(LINES,)),
            customer=Customer("c-1"),
            event=checkout([{"sku": "A"}, "B"]),
        )

    assert "items[1] is not an object" in caught.value.message


# send, against the sandbox


@pytest.fixture
async def transport() -> AsyncIterator[RecordingTransport]:
    async with aiohttp.ClientSession() as session:
        yield RecordingTransport(session, timeout=5.0)


def at(sandbox: RunningSandbox, **changes: Any) -> Connection:
    settings = {"partner_name": PARTNER, "base_url": sandbox.url, **changes.pop("settings", {})}
    return connection(settings=settings, **changes)


async def send(c: Connection, deliveries: list[Delivery], transport: Any) -> SendResult:
    return await INSIDER.send(c, deliveries, transport)


def profile_delivery(
    item_id: int,
    customer_id: str,
    identifiers: dict[str, Any],
    attributes: dict[str, Any] | None,
    change: ProfileChange,
) -> Delivery:
    return Delivery(
        item_id=item_id,
        customer=Customer(customer_id),
        identifiers=identifiers,
        attributes=attributes,
        change=change,
    )


async def seed(sandbox: RunningSandbox, *users: dict[str, Any]) -> None:
    for user in users:
        sandbox.state.upsert(user, skip_hook=False, default_append=True)


BY_EMAIL = CustomerIdMapping("email", "email")


async def test_hook_send_moves_a_changed_identifier_before_the_upsert(
    sandbox: RunningSandbox, transport: RecordingTransport
) -> None:
    await seed(sandbox, {"identifiers": {"email": "old@example.com"}, "attributes": {"age": 3}})
    change = ProfileChange(
        {"email": "new@example.com", "first_name": "Ana"}, NOW, {"email": "old@example.com"}
    )

    result = await send(
        at(sandbox, customer_id_mapping=BY_EMAIL),
        [profile_delivery(1, "c-1", {"email": "new@example.com"}, {"name": "Ana"}, change)],
        transport,
    )

    assert result.outcomes == {1: ItemOutcome(delivered=True)}
    assert [(e.method, e.url.removeprefix(sandbox.url)) for e in transport.exchanges] == [
        ("PATCH", "/api/user/v1/identity"),
        ("POST", "/api/user/v1/upsert"),
    ]
    assert orjson.loads(transport.exchanges[0].request_body) == {
        "old_identifier": {"email": "old@example.com"},
        "new_identifier": {"email": "new@example.com"},
    }
    [user] = sandbox.state.users
    assert user.identifiers == {"email": "new@example.com"}
    assert user.attributes == {"age": 3, "name": "Ana"}


async def test_hook_send_upserts_when_no_profile_holds_the_old_identifier(
    sandbox: RunningSandbox, transport: RecordingTransport
) -> None:
    change = ProfileChange({"email": "new@example.com"}, NOW, {"email": "old@example.com"})

    result = await send(
        at(sandbox, customer_id_mapping=BY_EMAIL),
        [profile_delivery(1, "c-1", {"email": "new@example.com"}, {"name": "Ana"}, change)],
        transport,
    )

    assert [e.status for e in transport.exchanges] == [404, 200]
    assert result.outcomes == {1: ItemOutcome(delivered=True)}
    assert sandbox.state.lookup("email", "new@example.com") is not None


async def test_hook_send_fails_only_the_customer_whose_new_identifier_is_taken(
    sandbox: RunningSandbox, transport: RecordingTransport
) -> None:
    await seed(
        sandbox,
        {"identifiers": {"email": "old@example.com"}, "attributes": {"age": 3}},
        {"identifiers": {"email": "taken@example.com"}, "attributes": {"age": 4}},
    )
    moving = ProfileChange({"email": "taken@example.com"}, NOW, {"email": "old@example.com"})
    other = ProfileChange({"first_name": "Bo"}, NOW)

    result = await send(
        at(sandbox, customer_id_mapping=BY_EMAIL),
        [
            profile_delivery(1, "c-1", {"email": "taken@example.com"}, {"name": "Ana"}, moving),
            profile_delivery(2, "c-2", {"email": "bo@example.com"}, {"name": "Bo"}, other),
        ],
        transport,
    )

    assert result.outcomes[2] == ItemOutcome(delivered=True)
    assert not result.outcomes[1].delivered
    assert "new identifier already has a user assigned to it" in result.outcomes[1].error
    upsert = orjson.loads(transport.exchanges[-1].request_body)
    assert [u["identifiers"] for u in upsert["users"]] == [{"email": "bo@example.com"}]


async def test_hook_send_deletes_cleared_attributes_before_the_upsert(
    sandbox: RunningSandbox, transport: RecordingTransport
) -> None:
    await seed(
        sandbox,
        {
            "identifiers": {"uuid": "c-1"},
            "attributes": {"city": "Pécs", "custom": {"loyalty_tier": "gold"}},
        },
    )
    change = ProfileChange(
        {"city": None, "tier": None, "first_name": "Ana"}, NOW, {"city": "Pécs", "tier": "gold"}
    )

    result = await send(
        at(sandbox),
        [profile_delivery(1, "c-1", {"uuid": "c-1"}, {"name": "Ana"}, change)],
        transport,
    )

    assert result.outcomes == {1: ItemOutcome(delivered=True)}
    assert [e.url.removeprefix(sandbox.url) for e in transport.exchanges] == [
        "/api/user/v1/attribute/delete",
        "/api/user/v1/upsert",
    ]
    assert orjson.loads(transport.exchanges[0].request_body) == {
        "users": [
            {
                "identifiers": {"uuid": "c-1"},
                "whole": ["city"],
                "custom": {"whole": ["loyalty_tier"]},
            }
        ]
    }
    [user] = sandbox.state.users
    assert user.attributes == {"custom": {}, "name": "Ana"}


async def test_hook_send_fails_the_items_of_a_customer_the_delete_refuses(
    sandbox: RunningSandbox, transport: RecordingTransport
) -> None:
    change = ProfileChange({"city": None, "first_name": "Ana"}, NOW, {"city": "Pécs"})

    result = await send(
        at(sandbox),
        [profile_delivery(1, "nobody", {"uuid": "nobody"}, {"name": "Ana"}, change)],
        transport,
    )

    assert not result.outcomes[1].delivered
    assert result.outcomes[1].error.startswith("attribute delete: users.0.")
    assert len(transport.exchanges) == 1  # no upsert for a customer whose delete failed


async def test_hook_send_raises_retryable_error_when_identity_updates_are_rate_limited(
    sandbox: RunningSandbox, transport: RecordingTransport, http: aiohttp.ClientSession
) -> None:
    async with http.post(
        f"{sandbox.url}/sandbox/config", json={"identity_rate_limit_per_minute": 1}
    ) as r:
        assert r.status == 200
    deliveries = [
        profile_delivery(
            n,
            f"c-{n}",
            {"email": f"new{n}@example.com"},
            None,
            ProfileChange({"email": f"new{n}@example.com"}, NOW, {"email": f"old{n}@example.com"}),
        )
        for n in (1, 2)
    ]

    with pytest.raises(RetryableError):
        await send(at(sandbox, customer_id_mapping=BY_EMAIL), deliveries, transport)

    assert [e.status for e in transport.exchanges] == [404, 429]


async def test_hook_send_marks_a_backfill_with_skip_hook_and_a_log_tag(
    sandbox: RunningSandbox, transport: RecordingTransport
) -> None:
    event = {"event_name": "loyalty_points_earned", "timestamp": "2024-03-01T10:00:00Z"}
    delivery = Delivery(
        item_id=1, customer=Customer("c-1"), identifiers={"uuid": "c-1"}, events=[event]
    )

    await send(at(sandbox, settings={"backfill": "true"}), [delivery], transport)

    [exchange] = transport.exchanges
    assert exchange.tags == ("backfill",)
    assert orjson.loads(exchange.request_body)["skip_hook"] is True
    [user] = sandbox.state.users
    assert user.events == [{**event, "skip_hook": True}]
