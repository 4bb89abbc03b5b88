"""The Insider connector plugin, hook by hook.

Expected payloads and response bodies come from Insider's UCD upsert reference
(``insider-ucd-api.md`` §2-5). The hooks are called through the connector kit
(``engine.connector.testing``), that is through the engine's own dispatch and checks.
``send`` is exercised over loopback against a small fake Insider (an aiohttp app on port
0) through the engine's transport; nothing is mocked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

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
from engine.errors import (
    AuthError,
    InvalidInputError,
    MappingError,
    PermanentError,
    RetryableError,
)
from engine.plugins import Connectors, plugin_manager
from plugins.insider import plugin
from plugins.insider.responses import retry_after_seconds
from plugins.insider.settings import parse_settings
from tests.conftest import TEST_DESTINATIONS

API_KEY = "ucd-key-do-not-leak-4f9a"
UPSERT = "/api/user/v1/upsert"  # Insider's upsert endpoint (reference §1.2)
ACCESS_DENIED = "Access Denied. You do not have sufficient access to perform this action."
EMAIL_RULE = "users.1.identifiers.*.regexp(^.+@.+\\..+$)"
NOW = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)
INSIDER = ConnectorTester(plugin, allow_destinations=["127.0.0.1"])  # the sandbox


def insider_connection(**changes: Any) -> Connection:
    connection = Connection(
        id="conn-1",
        connector="insider",
        settings={"partner_name": "mybrand"},
        api_key=API_KEY,
        customer_id_mapping=CustomerIdMapping(),
    )
    return dataclasses.replace(connection, **changes)


ANA = Customer(
    id="cust-000123",
    attributes={
        "email": "ana@example.com",
        "birth_date": "1991-04-02",
        "gender": "female",
        "loyalty_number": 12345,
        "blank": "",
    },
)


# connector_info


def test_hook_connector_info_declares_insider_limits() -> None:
    info = plugin.connector_info()

    assert info.name == "insider"
    assert info.max_batch_items == 1000
    assert info.max_batch_bytes == 5_000_000


def test_a_connection_without_base_url_sends_to_insiders_host() -> None:
    assert parse_settings({"partner_name": "mybrand"}).base_url == (
        "https://unification.useinsider.com"
    )


def test_hook_connector_info_is_loaded_through_the_entry_point() -> None:
    assert "insider" in Connectors(plugin_manager()).names()


def test_validate_settings_accepts_valid_settings() -> None:
    settings = {"partner_name": "my-brand_2", "base_url": "http://127.0.0.1:8080"}

    assert plugin.connector_info().validate_settings(settings) is None


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"partner_name": "MyBrand"}, "partner_name"),
        ({}, "partner_name"),
        ({"partner_name": "mybrand", "base_url": "ftp://unification.useinsider.com"}, "base_url"),
        ({"partner_name": "mybrand", "base_url": "https://user:pw@example.com"}, "base_url"),
        ({"partner_name": "mybrand", "region": "eu"}, "region"),
    ],
)
def test_validation_rejects_bad_settings(settings: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        plugin.connector_info().validate_settings(settings)

    assert caught.value.field == field


def test_validation_says_partner_name_must_be_lowercase() -> None:
    with pytest.raises(InvalidInputError, match="lowercase"):
        plugin.connector_info().validate_settings({"partner_name": "MyBrand"})


def test_validation_lists_allowed_settings_for_an_unknown_one() -> None:
    with pytest.raises(InvalidInputError) as caught:
        plugin.connector_info().validate_settings({"partner_name": "mybrand", "token": "x"})

    assert "base_url" in caught.value.message and "partner_name" in caught.value.message


@pytest.mark.parametrize(
    "mapping",
    [
        CustomerIdMapping("customer_id", "uuid"),
        CustomerIdMapping("email", "email"),
        CustomerIdMapping("mobile_phone", "phone_number"),
        CustomerIdMapping("loyalty_barcode", "user_loyalty_id", custom=True),
    ],
)
def test_validation_accepts_customer_id_mapping(mapping: CustomerIdMapping) -> None:
    plugin.connector_info().validate_customer_id_mapping(mapping)


@pytest.mark.parametrize(
    ("mapping", "field"),
    [
        (CustomerIdMapping("customer_id", "user_id"), "target_identifier"),
        (CustomerIdMapping("customer_id", "email", custom=True), "target_identifier"),
        (CustomerIdMapping("customer_id", "Loyalty-ID", custom=True), "target_identifier"),
        (CustomerIdMapping("", "uuid"), "source_attribute"),
    ],
)
def test_validation_rejects_customer_id_mapping(mapping: CustomerIdMapping, field: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        plugin.connector_info().validate_customer_id_mapping(mapping)

    assert caught.value.field == field


@pytest.mark.parametrize(
    "mapping",
    [
        ProfileMapping("m1", "birth_date", "birthday"),
        ProfileMapping("m2", "newsletter_optin", "email_optin"),
        ProfileMapping("m3", "tier", "loyalty_tier", custom=True),
    ],
)
def test_validation_accepts_profile_mapping(mapping: ProfileMapping) -> None:
    plugin.connector_info().validate_profile_mapping(mapping)


@pytest.mark.parametrize(
    ("mapping", "field"),
    [
        (ProfileMapping("m1", "tier", "loyalty_tier"), "target_attribute"),
        (ProfileMapping("m1", "email", "email", custom=True), "target_attribute"),
        (ProfileMapping("m1", "tier", "Loyalty Tier", custom=True), "target_attribute"),
        (ProfileMapping("m1", "tier", "", custom=True), "target_attribute"),
        (ProfileMapping("m1", "", "name"), "source_attribute"),
        # uuid is only an identifier in Tidegate, not a mappable attribute.
        (ProfileMapping("m1", "customer_id", "uuid"), "target_attribute"),
    ],
)
def test_validation_rejects_profile_mapping(mapping: ProfileMapping, field: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        plugin.connector_info().validate_profile_mapping(mapping)

    assert caught.value.field == field


def test_validation_tells_to_set_custom_for_an_unknown_attribute() -> None:
    with pytest.raises(InvalidInputError, match="custom=true"):
        plugin.connector_info().validate_profile_mapping(
            ProfileMapping("m1", "tier", "loyalty_tier")
        )


def test_validation_accepts_event_mapping() -> None:
    mapping = EventMapping(
        "e1",
        "checkout",
        "purchase",
        (
            ParameterMapping("transaction_id", "event_group_id"),
            ParameterMapping("currency", "currency"),
            ParameterMapping("total", "unit_sale_price"),
            ParameterMapping("points_burned", "points_burned", custom=True),
        ),
    )

    plugin.connector_info().validate_event_mapping(mapping)


@pytest.mark.parametrize(
    ("mapping", "field"),
    [
        (EventMapping("e1", "checkout", "Purchase"), "target_event"),
        (EventMapping("e1", "checkout", "loyalty points"), "target_event"),
        (EventMapping("e1", "", "purchase"), "source_event"),
        (
            EventMapping(
                "e1",
                "point_add",
                "loyalty_points_earned",
                (ParameterMapping("reason", "name"), ParameterMapping("points", "points")),
            ),
            "parameters[1].target_parameter",
        ),
        (
            EventMapping(
                "e1",
                "checkout",
                "purchase",
                (ParameterMapping("currency", "currency", custom=True),),
            ),
            "parameters[0].target_parameter",
        ),
        (
            EventMapping(
                "e1",
                "checkout",
                "purchase",
                (
                    ParameterMapping("price", "unit_price"),
                    ParameterMapping("total", "quantity"),
                    ParameterMapping("subtotal", "unit_price"),
                ),
            ),
            "parameters[2].target_parameter",
        ),
        (
            EventMapping("e1", "checkout", "purchase", (ParameterMapping("", "currency"),)),
            "parameters[0].source_parameter",
        ),
    ],
)
def test_validation_rejects_event_mapping(mapping: EventMapping, field: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        plugin.connector_info().validate_event_mapping(mapping)

    assert caught.value.field == field


# prepare


def test_hook_prepare_resolves_the_settings_and_each_actions_mapping() -> None:
    points = EventMapping("e2", "point_add", "loyalty_points_earned")
    connection = insider_connection(
        settings={"partner_name": "mybrand", "default_phone_region": "HU"},
        event_mappings=(points, EventMapping("e3", "point_add", "other_points_event")),
    )

    plan = plugin.prepare(connection)

    assert (plan.settings.partner_name, plan.settings.default_phone_region) == ("mybrand", "HU")
    assert set(plan.events) == {"point_add"}
    assert plan.events["point_add"].mapping == points  # the first mapping of an action wins


def test_hook_prepare_runs_once_per_connection_and_again_when_it_changes() -> None:
    connectors = Connectors(plugin_manager(), TEST_DESTINATIONS)
    first = insider_connection(settings={"partner_name": "mybrand"})

    plan = connectors.hooks(first).plan
    assert connectors.hooks(first).plan is plan
    changed = dataclasses.replace(first, settings={"partner_name": "otherbrand"})
    assert connectors.hooks(changed).plan.settings.partner_name == "otherbrand"


# identify


def test_hook_identify_sends_antavo_customer_id_as_uuid() -> None:
    assert INSIDER.identify(connection=insider_connection(), customer=ANA) == {
        "uuid": "cust-000123"
    }


def test_hook_identify_sends_a_numeric_attribute_as_a_string_uuid() -> None:
    connection = insider_connection(customer_id_mapping=CustomerIdMapping("loyalty_number", "uuid"))

    assert INSIDER.identify(connection=connection, customer=ANA) == {"uuid": "12345"}


def test_hook_identify_uses_an_attribute_as_email() -> None:
    connection = insider_connection(customer_id_mapping=CustomerIdMapping("email", "email"))

    assert INSIDER.identify(connection=connection, customer=ANA) == {"email": "ana@example.com"}


def test_hook_identify_uses_an_attribute_as_phone_number() -> None:
    connection = insider_connection(
        customer_id_mapping=CustomerIdMapping("mobile_phone", "phone_number")
    )
    customer = Customer(id="c-1", attributes={"mobile_phone": "+36201234567"})

    assert INSIDER.identify(connection=connection, customer=customer) == {
        "phone_number": "+36201234567"
    }


def test_hook_identify_puts_a_custom_identifier_under_custom() -> None:
    connection = insider_connection(
        customer_id_mapping=CustomerIdMapping("customer_id", "user_loyalty_id", custom=True)
    )

    assert INSIDER.identify(connection=connection, customer=ANA) == {
        "custom": {"user_loyalty_id": "cust-000123"}
    }


@pytest.mark.parametrize(
    ("target", "custom", "value", "expected"),
    [
        ("uuid", False, " ab 1 ", {"uuid": " ab 1 "}),  # a uuid text goes as it is
        ("uuid", False, 77, {"uuid": "77"}),
        ("user_ref", True, " ref-9", {"custom": {"user_ref": " ref-9"}}),
        ("email", False, "  ana@example.com ", {"email": "ana@example.com"}),  # stripped
    ],
)
def test_hook_identify_converts_the_value_for_the_identifier(
    target: str, custom: bool, value: Any, expected: dict[str, Any]
) -> None:
    connection = insider_connection(customer_id_mapping=CustomerIdMapping("ref", target, custom))
    customer = Customer(id="c-1", attributes={"ref": value})

    assert INSIDER.identify(connection=connection, customer=customer) == expected


@pytest.mark.parametrize(("value", "kind"), [(True, "bool"), (1.5, "float"), (["x"], "list")])
def test_hook_identify_fails_for_a_value_that_is_not_a_string_or_integer(
    value: Any, kind: str
) -> None:
    connection = insider_connection(customer_id_mapping=CustomerIdMapping("ref", "uuid"))
    customer = Customer(id="c-1", attributes={"ref": value})

    with pytest.raises(MappingError) as caught:
        INSIDER.identify(connection=connection, customer=customer)

    assert caught.value.stage == "identify"
    assert caught.value.message == (
        f"customer c-1: ref value {value!r} is a {kind}, not a string or integer, "
        "so it cannot be the Insider identifier uuid"
    )


@pytest.mark.parametrize("attribute", ["external_id", "blank"])
def test_hook_identify_fails_without_a_value(attribute: str) -> None:
    connection = insider_connection(customer_id_mapping=CustomerIdMapping(attribute, "uuid"))

    with pytest.raises(MappingError) as caught:
        INSIDER.identify(connection=connection, customer=ANA)

    assert caught.value.stage == "identify"
    assert caught.value.message == (
        f"customer cust-000123 has no value for {attribute}, "
        "the attribute mapped to the Insider identifier uuid"
    )


def test_hook_identify_through_the_engines_dispatch_answers_for_insider() -> None:
    connectors = Connectors(plugin_manager(), TEST_DESTINATIONS)

    assert connectors.hooks(insider_connection()).identify(ANA) == {"uuid": "cust-000123"}


# map_profile


def profile_connection(*mappings: ProfileMapping) -> Connection:
    return insider_connection(profile_mappings=mappings)


def change(**changes: Any) -> ProfileChange:
    return ProfileChange(changes=changes, timestamp=NOW)


def test_hook_map_profile_puts_default_at_root_and_custom_under_custom() -> None:
    connection = profile_connection(
        ProfileMapping("m1", "first_name", "name"),
        ProfileMapping("m2", "city", "city"),
        ProfileMapping("m3", "favourite_store", "favourite_store", custom=True),
    )

    attributes = INSIDER.map_profile(
        connection=connection,
        customer=ANA,
        change=change(first_name="Ana", city="Budapest", favourite_store="BUD-01"),
    )

    assert attributes == {
        "name": "Ana",
        "city": "Budapest",
        "custom": {"favourite_store": "BUD-01"},
    }


def test_hook_map_profile_sends_only_changed_attributes() -> None:
    connection = profile_connection(
        ProfileMapping("m1", "first_name", "name"), ProfileMapping("m2", "city", "city")
    )

    attributes = INSIDER.map_profile(
        connection=connection, customer=ANA, change=change(city="Pécs")
    )

    assert attributes == {"city": "Pécs"}


def test_hook_map_profile_returns_empty_when_nothing_is_mapped() -> None:
    connection = profile_connection(ProfileMapping("m1", "first_name", "name"))

    assert INSIDER.map_profile(connection=connection, customer=ANA, change=change(points=5)) == {}


def test_hook_map_profile_sends_birth_date_as_rfc3339_birthday() -> None:
    connection = profile_connection(ProfileMapping("m1", "birth_date", "birthday"))

    attributes = INSIDER.map_profile(
        connection=connection, customer=ANA, change=change(birth_date="1991-04-02")
    )

    assert attributes == {"birthday": "1991-04-02T00:00:00Z"}


@pytest.mark.parametrize(("antavo", "insider"), [("female", "F"), ("male", "M")])
def test_hook_map_profile_sends_gender_as_m_or_f(antavo: str, insider: str) -> None:
    connection = profile_connection(ProfileMapping("m1", "gender", "gender"))

    attributes = INSIDER.map_profile(
        connection=connection, customer=ANA, change=change(gender=antavo)
    )

    assert attributes == {"gender": insider}


def test_hook_map_profile_passes_booleans_through() -> None:
    connection = profile_connection(
        ProfileMapping("m1", "newsletter_optin", "email_optin"),
        ProfileMapping("m2", "vip", "vip", custom=True),
    )

    attributes = INSIDER.map_profile(
        connection=connection, customer=ANA, change=change(newsletter_optin=False, vip=True)
    )

    assert attributes == {"email_optin": False, "custom": {"vip": True}}


@pytest.mark.parametrize(
    ("mapping", "value"),
    [
        (ProfileMapping("m1", "birth_date", "birthday"), "02/04/1991"),
        (ProfileMapping("m1", "birth_date", "birthday"), "1991-02-30"),
        (ProfileMapping("m1", "newsletter_optin", "email_optin"), "maybe"),
    ],
)
def test_hook_map_profile_fails_on_an_unconvertible_value(
    mapping: ProfileMapping, value: Any
) -> None:
    with pytest.raises(MappingError) as caught:
        INSIDER.map_profile(
            connection=profile_connection(mapping),
            customer=ANA,
            change=change(**{mapping.source_attribute: value}),
        )

    assert caught.value.stage == "map_profile"


# map_event

CHECKOUT_MAPPING = EventMapping(
    "e1",
    "checkout",
    "purchase",
    (
        ParameterMapping("transaction_id", "event_group_id"),
        ParameterMapping("currency", "currency"),
        ParameterMapping("total", "unit_sale_price"),
        ParameterMapping("points_burned", "points_burned", custom=True),
        ParameterMapping("coupon", "coupon_code", custom=True),
    ),
)


def antavo_event(
    action: str = "checkout",
    data: Mapping[str, Any] | None = None,
    timestamp: datetime = NOW,
) -> AntavoEvent:
    if data is None:
        data = {
            "transaction_id": "ORD-88213",
            "total": 129.9,
            "currency": "EUR",
            "points_burned": 0,
        }
    return AntavoEvent(
        id="ev-1", customer="cust-000123", action=action, data=data, timestamp=timestamp
    )


def test_hook_map_event_builds_an_insider_event() -> None:
    connection = insider_connection(event_mappings=(CHECKOUT_MAPPING,))

    events = INSIDER.map_event(connection=connection, customer=ANA, event=antavo_event())

    assert events == [
        {
            "event_name": "purchase",
            "timestamp": "2026-11-27T10:00:00Z",
            "event_params": {
                "event_group_id": "ORD-88213",
                "currency": "EUR",
                "unit_sale_price": 129.9,
                "custom": {"points_burned": 0},
            },
        }
    ]


def test_hook_map_event_converts_the_timestamp_to_utc() -> None:
    connection = insider_connection(event_mappings=(CHECKOUT_MAPPING,))
    plus_three = timezone(timedelta(hours=3))
    event = antavo_event(timestamp=datetime(2026, 11, 27, 13, 0, tzinfo=plus_three))

    [insider] = INSIDER.map_event(connection=connection, customer=ANA, event=event)

    assert insider["timestamp"] == "2026-11-27T10:00:00Z"


def test_hook_map_event_keeps_nonzero_milliseconds() -> None:
    connection = insider_connection(event_mappings=(CHECKOUT_MAPPING,))
    event = antavo_event(timestamp=NOW.replace(microsecond=250_000))

    [insider] = INSIDER.map_event(connection=connection, customer=ANA, event=event)

    assert insider["timestamp"] == "2026-11-27T10:00:00.250Z"


def test_hook_map_event_omits_event_params_when_none_is_mapped() -> None:
    connection = insider_connection(
        event_mappings=(EventMapping("e2", "point_add", "points_earned"),)
    )

    events = INSIDER.map_event(
        connection=connection, customer=ANA, event=antavo_event("point_add", {"points": 250})
    )

    assert events == [{"event_name": "points_earned", "timestamp": "2026-11-27T10:00:00Z"}]


def test_hook_map_event_returns_empty_for_an_unmapped_action() -> None:
    connection = insider_connection(event_mappings=(CHECKOUT_MAPPING,))

    assert (
        INSIDER.map_event(connection=connection, customer=ANA, event=antavo_event("refund")) == []
    )


# send: a fake Insider over loopback and a real aiohttp transport


@dataclasses.dataclass
class Received:
    path: str
    headers: Mapping[str, str]
    body: bytes


class FakeInsider:
    """Answers every upsert with the canned response and records what it received."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.status = 200
        self.body: bytes = orjson.dumps({"data": {"successful": {"count": 1}, "fail": {}}})
        self.headers: dict[str, str] = {}
        self.base_url = ""

    def answer(self, status: int, body: Any = b"", headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body if isinstance(body, bytes) else orjson.dumps(body)
        self.headers = headers or {}

    async def upsert(self, request: web.Request) -> web.Response:
        self.received.append(Received(request.path, request.headers.copy(), await request.read()))
        return web.Response(
            status=self.status,
            body=self.body,
            headers={"Content-Type": "application/json", **self.headers},
        )


@pytest.fixture
async def insider() -> AsyncIterator[FakeInsider]:
    fake = FakeInsider()
    app = web.Application()
    app.router.add_post(UPSERT, fake.upsert)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.base_url = f"http://127.0.0.1:{port}"
    yield fake
    await runner.cleanup()


@pytest.fixture
async def transport() -> AsyncIterator[RecordingTransport]:
    async with aiohttp.ClientSession() as session:
        yield RecordingTransport(session, timeout=5.0)


def send_connection(insider: FakeInsider, partner_name: str = "mybrand") -> Connection:
    return insider_connection(settings={"partner_name": partner_name, "base_url": insider.base_url})


async def send(connection: Connection, deliveries: list[Delivery], transport: Any) -> SendResult:
    return await INSIDER.send(connection, deliveries, transport)


def delivery(
    item_id: int,
    customer_id: str,
    identifiers: dict[str, Any],
    attributes: dict[str, Any] | None = None,
    events: list[dict[str, Any]] | None = None,
) -> Delivery:
    return Delivery(
        item_id=item_id,
        customer=Customer(id=customer_id),
        identifiers=identifiers,
        attributes=attributes,
        events=list(events or []),
    )


def one_delivery() -> list[Delivery]:
    return [delivery(1, "c", {"uuid": "c"}, {"name": "A"})]


PURCHASE = {
    "event_name": "purchase",
    "timestamp": "2024-03-01T10:00:00Z",
    "event_params": {"event_group_id": "ORD-1", "unit_sale_price": 99.0, "currency": "USD"},
}
POINTS = {
    "event_name": "loyalty_points_earned",
    "timestamp": "2024-03-01T10:00:02Z",
    "event_params": {"custom": {"points": 120}},
}


async def test_hook_send_posts_one_upsert_and_reports_all_delivered(
    insider: FakeInsider, transport: RecordingTransport
) -> None:
    insider.answer(200, {"data": {"successful": {"count": 2}, "fail": {}}})
    deliveries = [
        delivery(1, "cust-a", {"uuid": "cust-a"}, attributes={"name": "Ana", "email_optin": True}),
        delivery(2, "cust-b", {"email": "bob@example.com"}, events=[PURCHASE]),
    ]

    result = await send(send_connection(insider), deliveries, transport)

    [received] = insider.received
    assert received.path == "/api/user/v1/upsert"
    assert received.headers["X-PARTNER-NAME"] == "mybrand"
    assert received.headers["X-REQUEST-TOKEN"] == API_KEY
    assert received.headers["Content-Type"] == "application/json"
    assert orjson.loads(received.body) == {
        "users": [
            {"identifiers": {"uuid": "cust-a"}, "attributes": {"name": "Ana", "email_optin": True}},
            {"identifiers": {"email": "bob@example.com"}, "events": [PURCHASE]},
        ]
    }
    assert result.outcomes == {1: ItemOutcome(delivered=True), 2: ItemOutcome(delivered=True)}


async def test_hook_send_lowercases_the_partner_name(
    insider: FakeInsider, transport: RecordingTransport
) -> None:
    connection = send_connection(insider, partner_name="MyBrand")

    await send(connection, one_delivery(), transport)

    assert insider.received[0].headers["X-PARTNER-NAME"] == "mybrand"


async def test_hook_send_fails_only_the_items_of_the_user_insider_rejected(
    insider: FakeInsider, transport: RecordingTransport
) -> None:
    insider.answer(
        200,
        {
            "data": {
                "successful": {"count": 2},
                "fail": {
                    "count": 1,
                    "errors": {EMAIL_RULE: ["not a valid email address: bob-at-example"]},
                },
            }
        },
    )
    deliveries = [
        delivery(1, "cust-a", {"uuid": "cust-a"}, attributes={"name": "Ana"}),
        delivery(
            2,
            "cust-b",
            {"email": "bob-at-example"},
            attributes={"city": "Budapest", "custom": {"tier": "silver"}},
        ),
        delivery(3, "cust-c", {"uuid": "cust-c"}, events=[PURCHASE]),
        delivery(
            4,
            "cust-b",
            {"email": "bob-at-example"},
            attributes={"city": "Szeged", "custom": {"points": 10}},
            events=[PURCHASE, POINTS],
        ),
    ]

    result = await send(send_connection(insider), deliveries, transport)

    assert orjson.loads(insider.received[0].body) == {
        "users": [
            {"identifiers": {"uuid": "cust-a"}, "attributes": {"name": "Ana"}},
            {
                "identifiers": {"email": "bob-at-example"},
                "attributes": {"city": "Szeged", "custom": {"tier": "silver", "points": 10}},
                "events": [PURCHASE, POINTS],
            },
            {"identifiers": {"uuid": "cust-c"}, "events": [PURCHASE]},
        ]
    }
    rejected = ItemOutcome(
        delivered=False, error=f"{EMAIL_RULE}: not a valid email address: bob-at-example"
    )
    assert result.outcomes == {
        1: ItemOutcome(delivered=True),
        2: rejected,
        3: ItemOutcome(delivered=True),
        4: rejected,
    }


async def test_hook_send_reports_every_error_of_a_rejected_user(
    insider: FakeInsider, transport: RecordingTransport
) -> None:
    insider.answer(
        200,
        {
            "data": {
                "successful": {},
                "fail": {
                    "count": 1,
                    "errors": {
                        "users.0.events.0.event_params.*.required": [
                            "event_group_id parameter is required on purchase event",
                            "unit_sale_price parameter is required on purchase event",
                        ],
                        "users.0.identifiers.*.regexp(^.+@.+\\..+$)": [
                            "not a valid email address: sample"
                        ],
                    },
                },
            }
        },
    )

    result = await send(
        send_connection(insider),
        [delivery(7, "c", {"email": "sample"}, events=[{"event_name": "purchase"}])],
        transport,
    )

    outcome = result.outcomes[7]
    assert not outcome.delivered
    for message in (
        "event_group_id parameter is required on purchase event",
        "unit_sale_price parameter is required on purchase event",
        "not a valid email address: sample",
    ):
        assert message in outcome.error


async def test_hook_send_counts_a_200_with_an_unexpected_body_as_delivered(
    insider: FakeInsider, transport: RecordingTransport
) -> None:
    insider.answer(200, b"<html>ok</html>")

    result = await send(send_connection(insider), one_delivery(), transport)

    assert result.outcomes == {1: ItemOutcome(delivered=True)}


async def test_hook_send_raises_auth_error_on_403(
    insider: FakeInsider, transport: RecordingTransport
) -> None:
    insider.answer(403, {"success": False, "message": ACCESS_DENIED})

    with pytest.raises(AuthError) as caught:
        await send(send_connection(insider), one_delivery(), transport)

    assert str(caught.value) == f"Insider refused the credentials (HTTP 403): {ACCESS_DENIED}"


async def test_hook_send_never_puts_the_api_key_in_an_error(
    insider: FakeInsider, transport: RecordingTransport
) -> None:
    insider.answer(401, {"success": False, "message": f"token {API_KEY} authentication failed."})

    with pytest.raises(AuthError) as caught:
        await send(send_connection(insider), one_delivery(), transport)

    assert API_KEY not in str(caught.value)


async def test_hook_send_raises_retryable_error_with_retry_after_on_429(
    insider: FakeInsider, transport: RecordingTransport
) -> None:
    insider.answer(429, {"error": "rejected: too many requests"}, headers={"Retry-After": "7"})

    with pytest.raises(RetryableError) as caught:
        await send(send_connection(insider), one_delivery(), transport)

    assert caught.value.retry_after == 7
    assert "429" in str(caught.value)


async def test_hook_send_raises_retryable_error_without_retry_after_on_bare_429(
    insider: FakeInsider, transport: RecordingTransport
) -> None:
    insider.answer(429, {"error": "rejected: too many requests"})

    with pytest.raises(RetryableError) as caught:
        await send(send_connection(insider), one_delivery(), transport)

    assert caught.value.retry_after is None


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_hook_send_raises_retryable_error_on_server_errors(
    insider: FakeInsider, transport: RecordingTransport, status: int
) -> None:
    insider.answer(status)

    with pytest.raises(RetryableError) as caught:
        await send(send_connection(insider), one_delivery(), transport)

    assert f"HTTP {status}" in str(caught.value)


async def test_hook_send_raises_permanent_error_on_501(
    insider: FakeInsider, transport: RecordingTransport
) -> None:
    insider.answer(501)

    with pytest.raises(PermanentError):
        await send(send_connection(insider), one_delivery(), transport)


async def test_hook_send_raises_permanent_error_on_400(
    insider: FakeInsider, transport: RecordingTransport
) -> None:
    insider.answer(400, {"error": "users must be defined: bad request"})

    with pytest.raises(PermanentError) as caught:
        await send(send_connection(insider), one_delivery(), transport)

    assert str(caught.value) == (
        "Insider rejected the request (HTTP 400): users must be defined: bad request"
    )


async def test_hook_send_leaves_out_a_customer_with_nothing_to_send(
    insider: FakeInsider, transport: RecordingTransport
) -> None:
    # Insider rejects a user with neither attributes nor events (reference §3.2).
    deliveries = [
        delivery(1, "cust-a", {"uuid": "cust-a"}, attributes={}),
        delivery(2, "cust-b", {"uuid": "cust-b"}, attributes={"name": "Bo"}),
    ]

    result = await send(send_connection(insider), deliveries, transport)

    assert orjson.loads(insider.received[0].body) == {
        "users": [{"identifiers": {"uuid": "cust-b"}, "attributes": {"name": "Bo"}}]
    }
    assert result.outcomes == {1: ItemOutcome(delivered=True), 2: ItemOutcome(delivered=True)}


async def test_hook_send_raises_auth_error_without_a_partner_name(
    insider: FakeInsider, transport: RecordingTransport
) -> None:
    connection = insider_connection(settings={"base_url": insider.base_url})

    with pytest.raises(AuthError):
        await send(connection, one_delivery(), transport)

    assert insider.received == []


async def test_hook_send_through_the_engines_dispatch_reports_the_outcome(
    insider: FakeInsider, transport: RecordingTransport
) -> None:
    hooks = Connectors(plugin_manager(), TEST_DESTINATIONS).hooks(send_connection(insider))

    result = await hooks.send(one_delivery(), transport)

    assert result.outcomes == {1: ItemOutcome(delivered=True)}


def test_retry_after_accepts_an_http_date() -> None:
    assert retry_after_seconds("Fri, 27 Nov 2026 10:00:30 GMT", now=NOW) == 30


@pytest.mark.parametrize("value", [None, "", "soon", "-3"])
def test_retry_after_is_none_when_absent_or_invalid(value: str | None) -> None:
    assert retry_after_seconds(value, now=NOW) is None
