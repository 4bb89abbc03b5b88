"""Realistic Antavo records -> the exact requests Insider receives, table driven.

Every expected body below is written from ``insider-ucd-api.md`` (identifiers §3.3,
attributes §3.4-3.6, events §3.7, formats §3.8, attribute delete §6.1, identity §6.4),
not from the code's output. The records come from ``antavo-source.md`` §2.4. The first
tests render each record through the Insider hooks and ``send`` with a capturing
transport (``engine.preview``); the same bodies are then checked by the sandbox's own,
independent rules; the last tests send the same records through a real engine to the
sandbox and read Insider's resulting state back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest

from clients.client import TidegateClient
from engine.app import Engine
from engine.connector.records import Connection, CustomerIdMapping, EventMapping, ParameterMapping
from engine.connector.records import ProfileMapping as PM
from engine.delivery.preview import preview_delivery
from engine.ingest.parse import parse_event
from engine.pb import mappings_pb2 as mpb
from engine.plugins import Connectors, plugin_manager
from plugins.insider.sandbox import RunningSandbox
from plugins.insider.sandbox.rules import validate_delete_user, validate_upsert_user
from tests.conftest import API_KEY, PARTNER, TEST_DESTINATIONS, eventually, post_events

BASE = "http://insider.test"
UPSERT = f"{BASE}/api/user/v1/upsert"
DELETE = f"{BASE}/api/user/v1/attribute/delete"
IDENTITY = f"{BASE}/api/user/v1/identity"
WHEN = "2026-11-27T10:15:00Z"
ANA = {"uuid": "cust-000123"}

PROFILE_MAPPINGS = (
    PM("m-email", "email", "email"),
    PM("m-first", "first_name", "name"),
    PM("m-last", "last_name", "surname"),
    PM("m-birth", "birth_date", "birthday"),
    PM("m-gender", "gender", "gender"),
    PM("m-language", "language", "language"),
    PM("m-phone", "mobile_phone", "phone_number"),
    PM("m-country", "country", "country"),
    PM("m-city", "city", "city"),
    PM("m-news", "newsletter", "email_optin"),
    PM("m-sms", "sms_consent", "sms_optin"),
    PM("m-age", "age", "age"),
    PM("m-lists", "lists", "list_id"),
    PM("m-tier", "tier", "loyalty_tier", custom=True),
    PM("m-store", "favourite_store", "favourite_store", custom=True),
    PM("m-since", "member_since", "member_since", custom=True),
    PM("m-interests", "interests", "interests", custom=True, array_mode="replace"),
)
EVENT_MAPPINGS = (
    EventMapping("e-signup", "opt_in", "sign_up_confirmation"),
    EventMapping(
        "e-checkout",
        "checkout",
        "purchase",
        (
            ParameterMapping("transaction_id", "event_group_id"),
            ParameterMapping("currency", "currency"),
            ParameterMapping("items[].product_id", "product_id"),
            ParameterMapping("items[].product_name", "name"),
            ParameterMapping("items[].price", "unit_price"),
            ParameterMapping("items[].sale_price", "unit_sale_price"),
            ParameterMapping("items[].quantity", "quantity"),
            ParameterMapping("store", "store_code", custom=True),
        ),
    ),
    EventMapping(
        "e-points",
        "point_add",
        "loyalty_points_earned",
        (
            ParameterMapping("points", "points", custom=True),
            ParameterMapping("reason", "reason", custom=True),
        ),
    ),
)
CONNECTION = Connection(
    id="insider-main",
    connector="insider",
    settings={"partner_name": PARTNER, "base_url": BASE, "default_phone_region": "HU"},
    api_key=API_KEY,
    customer_id_mapping=CustomerIdMapping(),
    profile_mappings=PROFILE_MAPPINGS,
    event_mappings=EVENT_MAPPINGS,
)
BY_EMAIL = dataclasses.replace(CONNECTION, customer_id_mapping=CustomerIdMapping("email", "email"))

OPT_IN = {
    "customer": "cust-000123",
    "action": "opt_in",
    "id": "evt-optin",
    "timestamp": WHEN,
    "data": {
        "email": "ana@example.com",
        "first_name": "Ana",
        "last_name": "Kovacs",
        "birth_date": "1991-04-02",
        "gender": "female",
        "language": "hu",
        "newsletter": "Yes",
        "sms_consent": "false",
        "favourite_store": "BUD-01",
        "city": "Budapest",
        "tier": "gold",
    },
}
PROFILE = {
    "customer": "cust-000123",
    "action": "profile",
    "id": "evt-profile",
    "timestamp": WHEN,
    "data": {
        "mobile_phone": "06 20 123 4567",
        "country": "hu",
        "age": "34",
        "sms_consent": "Yes",
        "member_since": "2024-05-01 08:30:00",
    },
}
CHECKOUT = {
    "customer": "cust-000123",
    "action": "checkout",
    "id": "evt-checkout",
    "timestamp": WHEN,
    "data": {
        "transaction_id": "ORD-88213",
        "total": 129.9,
        "currency": "eur",
        "store": "BUD-01",
        "items": [
            {
                "product_id": "SKU-1",
                "product_name": "Trail shoe",
                "price": 119.9,
                "sale_price": 109.9,
                "quantity": 1,
            },
            {
                "product_id": "SKU-9",
                "product_name": "Socks",
                "price": "10",
                "sale_price": "10",
                "quantity": "2",
            },
        ],
    },
}
POINT_ADD = {
    "customer": "cust-000123",
    "action": "point_add",
    "id": "evt-points",
    "timestamp": WHEN,
    "data": {"points": 250, "reason": "goodwill"},
}
CLEARED = {
    "customer": "cust-000123",
    "action": "profile",
    "id": "evt-cleared",
    "timestamp": WHEN,
    "data": {"city": None, "tier": None},
}
ARRAYS = {
    "customer": "cust-000123",
    "action": "profile",
    "id": "evt-arrays",
    "timestamp": WHEN,
    "data": {"lists": [12, "14"], "interests": ["running", "yoga"]},
}
MORE_ARRAYS = {**ARRAYS, "id": "evt-arrays-2", "data": {"lists": [15], "interests": ["swimming"]}}
NEW_EMAIL = {
    "customer": "cust-000123",
    "action": "profile",
    "id": "evt-email",
    "timestamp": WHEN,
    "data": {"email": "ana.kovacs@example.com"},
}
AFTER_OPT_IN = {"email": "ana@example.com", "first_name": "Ana", "city": "Budapest", "tier": "gold"}

CONNECTORS = Connectors(plugin_manager(), TEST_DESTINATIONS)


@dataclass(frozen=True)
class Case:
    name: str
    record: dict[str, Any]
    expected: list[tuple[str, str, Any]]
    profile: dict[str, Any] = field(default_factory=dict)
    connection: Connection = CONNECTION
    tags: tuple[str, ...] = ()


CASES = [
    Case(
        "opt_in: converted defaults, custom attributes and the sign-up event in one user",
        OPT_IN,
        [
            (
                "POST",
                UPSERT,
                {
                    "users": [
                        {
                            "identifiers": ANA,
                            "attributes": {
                                "email": "ana@example.com",
                                "name": "Ana",
                                "surname": "Kovacs",
                                "birthday": "1991-04-02T00:00:00Z",
                                "gender": "F",
                                "language": "hu",
                                "email_optin": True,
                                "sms_optin": False,
                                "city": "Budapest",
                                "custom": {"favourite_store": "BUD-01", "loyalty_tier": "gold"},
                            },
                            "events": [{"event_name": "sign_up_confirmation", "timestamp": WHEN}],
                        }
                    ]
                },
            )
        ],
    ),
    Case(
        "profile: national phone to E.164, country code, numeric and boolean strings, datetime",
        PROFILE,
        [
            (
                "POST",
                UPSERT,
                {
                    "users": [
                        {
                            "identifiers": ANA,
                            "attributes": {
                                "phone_number": "+36201234567",
                                "country": "HU",
                                "age": 34,
                                "sms_optin": True,
                                "custom": {"member_since": "2024-05-01T08:30:00Z"},
                            },
                        }
                    ]
                },
            )
        ],
        profile=AFTER_OPT_IN,
    ),
    Case(
        "checkout with items: one purchase per line sharing event_group_id and currency",
        CHECKOUT,
        [
            (
                "POST",
                UPSERT,
                {
                    "users": [
                        {
                            "identifiers": ANA,
                            "events": [
                                {
                                    "event_name": "purchase",
                                    "timestamp": "2026-11-27T10:15:00Z",
                                    "event_params": {
                                        "event_group_id": "ORD-88213",
                                        "currency": "EUR",
                                        "product_id": "SKU-1",
                                        "name": "Trail shoe",
                                        "unit_price": 119.9,
                                        "unit_sale_price": 109.9,
                                        "quantity": 1,
                                        "custom": {"store_code": "BUD-01"},
                                    },
                                },
                                {
                                    "event_name": "purchase",
                                    "timestamp": "2026-11-27T10:15:01Z",
                                    "event_params": {
                                        "event_group_id": "ORD-88213",
                                        "currency": "EUR",
                                        "product_id": "SKU-9",
                                        "name": "Socks",
                                        "unit_price": 10,
                                        "unit_sale_price": 10,
                                        "quantity": 2,
                                        "custom": {"store_code": "BUD-01"},
                                    },
                                },
                            ],
                        }
                    ]
                },
            )
        ],
    ),
    Case(
        "point_add: a custom event with custom parameters",
        POINT_ADD,
        [
            (
                "POST",
                UPSERT,
                {
                    "users": [
                        {
                            "identifiers": ANA,
                            "events": [
                                {
                                    "event_name": "loyalty_points_earned",
                                    "timestamp": WHEN,
                                    "event_params": {
                                        "custom": {"points": 250, "reason": "goodwill"}
                                    },
                                }
                            ],
                        }
                    ]
                },
            )
        ],
    ),
    Case(
        "cleared attributes: Insider's attribute delete, whole default and custom, no upsert",
        CLEARED,
        [
            (
                "POST",
                DELETE,
                {
                    "users": [
                        {
                            "identifiers": ANA,
                            "whole": ["city"],
                            "custom": {"whole": ["loyalty_tier"]},
                        }
                    ]
                },
            )
        ],
        profile=AFTER_OPT_IN,
    ),
    Case(
        "arrays: append-mode list_id and replace-mode interests travel as two user objects",
        ARRAYS,
        [
            (
                "POST",
                UPSERT,
                {
                    "users": [
                        {"identifiers": ANA, "attributes": {"list_id": [12, 14]}},
                        {
                            "identifiers": ANA,
                            "attributes": {"custom": {"interests": ["running", "yoga"]}},
                            "not_append": True,
                        },
                    ]
                },
            )
        ],
        profile=AFTER_OPT_IN,
    ),
    Case(
        "identifier change: PATCH identity first, then upsert under the new identifier",
        NEW_EMAIL,
        [
            (
                "PATCH",
                IDENTITY,
                {
                    "old_identifier": {"email": "ana@example.com"},
                    "new_identifier": {"email": "ana.kovacs@example.com"},
                },
            ),
            (
                "POST",
                UPSERT,
                {
                    "users": [
                        {
                            "identifiers": {"email": "ana.kovacs@example.com"},
                            "attributes": {"email": "ana.kovacs@example.com"},
                        }
                    ]
                },
            ),
        ],
        profile=AFTER_OPT_IN,
        connection=BY_EMAIL,
    ),
    Case(
        "backfill: skip_hook so old data triggers no journey, and the log row is tagged",
        POINT_ADD,
        [
            (
                "POST",
                UPSERT,
                {
                    "skip_hook": True,
                    "users": [
                        {
                            "identifiers": ANA,
                            "events": [
                                {
                                    "event_name": "loyalty_points_earned",
                                    "timestamp": WHEN,
                                    "event_params": {
                                        "custom": {"points": 250, "reason": "goodwill"}
                                    },
                                }
                            ],
                        }
                    ],
                },
            )
        ],
        connection=dataclasses.replace(
            CONNECTION, settings={**CONNECTION.settings, "backfill": "true"}
        ),
        tags=("backfill",),
    ),
    Case(
        "profile_scope all: every mapped attribute on any change",
        {**PROFILE, "data": {"last_name": "Kovacs-Nagy"}},
        [
            (
                "POST",
                UPSERT,
                {
                    "users": [
                        {
                            "identifiers": ANA,
                            "attributes": {
                                "email": "ana@example.com",
                                "name": "Ana",
                                "surname": "Kovacs-Nagy",
                                "city": "Budapest",
                                "custom": {"loyalty_tier": "gold"},
                            },
                        }
                    ]
                },
            )
        ],
        profile=AFTER_OPT_IN,
        connection=dataclasses.replace(
            CONNECTION, settings={**CONNECTION.settings, "profile_scope": "all"}
        ),
    ),
    Case(
        "custom identifier: under identifiers.custom, as a string",
        POINT_ADD,
        [
            (
                "POST",
                UPSERT,
                {
                    "users": [
                        {
                            "identifiers": {"custom": {"loyalty_id": "40012345"}},
                            "events": [
                                {
                                    "event_name": "loyalty_points_earned",
                                    "timestamp": WHEN,
                                    "event_params": {
                                        "custom": {"points": 250, "reason": "goodwill"}
                                    },
                                }
                            ],
                        }
                    ]
                },
            )
        ],
        profile={"loyalty_barcode": 40012345},
        connection=dataclasses.replace(
            CONNECTION,
            customer_id_mapping=CustomerIdMapping("loyalty_barcode", "loyalty_id", custom=True),
        ),
    ),
    Case(
        "phone identifier: a national number read with the default region, sent in E.164",
        {**POINT_ADD, "data": {"points": 50}},
        [
            (
                "POST",
                UPSERT,
                {
                    "users": [
                        {
                            "identifiers": {"phone_number": "+36201234567"},
                            "events": [
                                {
                                    "event_name": "loyalty_points_earned",
                                    "timestamp": WHEN,
                                    "event_params": {"custom": {"points": 50}},
                                }
                            ],
                        }
                    ]
                },
            )
        ],
        profile={"mobile_phone": "06 20 123 4567"},
        connection=dataclasses.replace(
            CONNECTION, customer_id_mapping=CustomerIdMapping("mobile_phone", "phone_number")
        ),
    ),
]


async def rendered(case: Case) -> list[tuple[str, str, Any, tuple[str, ...]]]:
    event = parse_event(case.record, "record")
    preview = await preview_delivery(CONNECTORS.hooks(case.connection), event, case.profile)
    assert preview.problems == []
    return [(r.method, r.url, orjson.loads(r.body), r.tags) for r in preview.requests]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_antavo_record_becomes_the_exact_insider_requests(case: Case) -> None:
    requests = await rendered(case)

    assert [(m, u, b) for m, u, b, _ in requests] == case.expected
    assert {tags for *_, tags in requests} == {case.tags}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_the_sandbox_rules_accept_every_rendered_user(case: Case) -> None:
    # The sandbox's rules are written separately from the plugin's: a second reading of
    # the reference must find nothing wrong with what the plugin sends.
    for _, url, body, _ in await rendered(case):
        if url == IDENTITY:
            continue
        validate = validate_delete_user if url == DELETE else validate_upsert_user
        for index, user in enumerate(body["users"]):
            assert validate(index, user) == {}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"gender": "other"}, "gender value 'other' is not a gender Insider accepts"),
        ({"country": "Hungaria"}, "country value 'Hungaria' is not an ISO 3166-1 country code"),
        ({"mobile_phone": "12"}, "mobile_phone value '12' is not a"),
        ({"birth_date": "02/04/1991"}, "birth_date value '02/04/1991' is not a date"),
        ({"newsletter": "maybe"}, "newsletter value 'maybe' is not a boolean"),
        ({"age": "thirty"}, "age value 'thirty' is not a number"),
        ({"lists": ["twelve"]}, "lists value ['twelve'] is not a number"),
        ({"favourite_store": {"id": 1}}, "favourite_store value {'id': 1} is a"),
    ],
)
async def test_an_unconvertible_value_fails_the_item_naming_it(
    data: dict[str, Any], message: str
) -> None:
    record = {**PROFILE, "data": data}
    preview = await preview_delivery(CONNECTORS.hooks(CONNECTION), parse_event(record, "record"))

    assert preview.requests == []
    [problem] = preview.problems
    assert problem.stage == "map_profile"
    assert message in problem.message
    assert "cannot be sent as the Insider attribute" in problem.message


async def test_an_unknown_currency_fails_the_checkout() -> None:
    record = {**CHECKOUT, "data": {**CHECKOUT["data"], "currency": "EURO"}}
    preview = await preview_delivery(CONNECTORS.hooks(CONNECTION), parse_event(record, "record"))

    [problem] = preview.problems
    assert problem.stage == "map_event"
    assert "currency value 'EURO' is not an ISO 4217 currency code" in problem.message


async def test_a_per_line_checkout_without_items_fails_instead_of_sending_nothing() -> None:
    record = {**CHECKOUT, "data": {"transaction_id": "ORD-1", "currency": "EUR"}}
    preview = await preview_delivery(CONNECTORS.hooks(CONNECTION), parse_event(record, "record"))

    [problem] = preview.problems
    assert "has no items list" in problem.message


# --- the same records through a real engine into the sandbox ---------------------------


async def connect(client: TidegateClient, sandbox: RunningSandbox, connection: Connection) -> None:
    settings = {**connection.settings, "base_url": sandbox.url}
    id_mapping = connection.customer_id_mapping
    await client.create_connection(
        connection.id,
        api_key=API_KEY,
        settings=settings,
        source_attribute=id_mapping.source_attribute,
        target_identifier=id_mapping.target_identifier,
        custom_identifier=id_mapping.custom,
    )
    modes = {"": mpb.ARRAY_MODE_UNSPECIFIED, "replace": mpb.ARRAY_MODE_REPLACE}
    for m in connection.profile_mappings:
        await client.mappings.CreateProfileMapping(
            mpb.CreateProfileMappingRequest(
                mapping=mpb.ProfileMapping(
                    connection_id=connection.id,
                    source_attribute=m.source_attribute,
                    target_attribute=m.target_attribute,
                    custom=m.custom,
                    array_mode=modes[m.array_mode],
                )
            )
        )
    for e in connection.event_mappings:
        await client.create_event_mapping(
            connection.id,
            e.source_event,
            e.target_event,
            [(p.source_parameter, p.target_parameter, p.custom) for p in e.parameters],
        )


async def deliver_in_turn(
    engine: Engine, client: TidegateClient, http: aiohttp.ClientSession, records: list[Any]
) -> None:
    """Posts each record after the previous one is delivered, so each is its own send."""
    for record in records:
        before = len((await client.list_logs(connection_id="insider-main")).logs)
        await post_events(http, engine, record)

        async def settled(before: int = before) -> bool:
            connection = await client.get_connection("insider-main")
            logs = (await client.list_logs(connection_id="insider-main")).logs
            return connection.queue_depth == 0 and len(logs) > before

        await eventually(settled)


async def assert_no_per_user_failure(client: TidegateClient) -> None:
    connection = await client.get_connection("insider-main")
    assert connection.dead_letter_count == 0
    for row in (await client.list_logs(connection_id="insider-main")).logs:
        assert row.status_code == 200, row.error
        assert row.error == ""
        assert {c.outcome for c in row.customers} == {"delivered"}
        body = orjson.loads((await client.get_log(row.id)).response_body)
        if "data" in body:
            assert body["data"]["fail"] == {}


async def test_records_sent_through_the_engine_leave_insider_in_the_expected_state(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await connect(client, sandbox, CONNECTION)
    await deliver_in_turn(
        engine, client, http, [OPT_IN, PROFILE, CHECKOUT, POINT_ADD, ARRAYS, MORE_ARRAYS, CLEARED]
    )

    await assert_no_per_user_failure(client)
    async with http.get(
        f"{sandbox.url}/sandbox/users/lookup", params={"key": "uuid", "value": "cust-000123"}
    ) as r:
        user = await r.json()
    assert user["identifiers"] == {"uuid": "cust-000123"}
    # Scalars overwrite (sms_optin false -> true); list_id appends, interests is
    # replaced; city and loyalty_tier were deleted (§3.6, §6.1).
    assert user["attributes"] == {
        "email": "ana@example.com",
        "name": "Ana",
        "surname": "Kovacs",
        "birthday": "1991-04-02T00:00:00Z",
        "gender": "F",
        "language": "hu",
        "email_optin": True,
        "sms_optin": True,
        "phone_number": "+36201234567",
        "country": "HU",
        "age": 34,
        "list_id": [12, 14, 15],
        "custom": {
            "favourite_store": "BUD-01",
            "member_since": "2024-05-01T08:30:00Z",
            "interests": ["swimming"],
        },
    }
    names = [(e["event_name"], e["timestamp"]) for e in user["events"]]
    assert names == [
        ("sign_up_confirmation", "2026-11-27T10:15:00Z"),
        ("purchase", "2026-11-27T10:15:00Z"),
        ("purchase", "2026-11-27T10:15:01Z"),
        ("loyalty_points_earned", "2026-11-27T10:15:00Z"),
    ]
    assert {e["event_params"]["event_group_id"] for e in user["events"][1:3]} == {"ORD-88213"}


async def test_an_identifier_change_moves_the_insider_profile(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await connect(client, sandbox, BY_EMAIL)
    await deliver_in_turn(engine, client, http, [OPT_IN, NEW_EMAIL, POINT_ADD])

    await assert_no_per_user_failure(client)
    async with http.get(f"{sandbox.url}/sandbox/users") as r:
        users = (await r.json())["users"]
    [user] = users  # moved, not duplicated
    assert user["identifiers"] == {"email": "ana.kovacs@example.com"}
    assert user["attributes"]["email"] == "ana.kovacs@example.com"
    assert [e["event_name"] for e in user["events"]] == [
        "sign_up_confirmation",
        "loyalty_points_earned",
    ]
    methods = [
        row.method for row in reversed((await client.list_logs(connection_id="insider-main")).logs)
    ]
    assert methods == ["POST", "PATCH", "POST", "POST"]
