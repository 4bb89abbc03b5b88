"""The Braze sandbox (its own reading of braze-users-track.md), and a table of realistic
Antavo records sent by the Braze connector through the engine's real HTTP transport to
the sandbox over loopback: each row's body is written from the reference, and the
sandbox must accept every object in it (it validates with rules the connector does not
share)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import pytest

from engine.connector import CustomerIdMapping, ProfileChange
from engine.connector.records import AntavoEvent, Connection
from engine.connector.testing import (
    ConnectorTester,
    connection,
    customer,
    event,
    event_mapping,
    profile_change,
    profile_mapping,
)
from engine.delivery.transport import RecordingTransport
from plugins.braze import plugin
from plugins.braze.sandbox import RunningBrazeSandbox, SandboxConfig, start_sandbox

KEY = "braze-sandbox-key-0123456789"
BRAZE = ConnectorTester(plugin, allow_destinations=["127.0.0.1"])  # the sandbox
NOW = datetime(2026, 11, 30, 10, 0, 5, 250000, tzinfo=UTC)
T = "2026-11-30T10:00:05.250Z"


@pytest.fixture
async def braze_sandbox() -> AsyncIterator[RunningBrazeSandbox]:
    running = await start_sandbox(config=SandboxConfig(api_key=KEY))
    yield running
    await running.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(
    http: aiohttp.ClientSession,
    sandbox: RunningBrazeSandbox,
    path: str,
    body: Any,
    key: str = KEY,
    **headers: str,
) -> tuple[int, Any, Any]:
    async with http.post(
        sandbox.url + path,
        data=orjson.dumps(body) if not isinstance(body, bytes) else body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers},
    ) as r:
        return r.status, await r.json(), r.headers


def ev(n: int, who: str = "c-1") -> dict[str, Any]:
    return {"external_id": who, "name": "points_earned", "time": T, "properties": {"n": n}}


# -- the sandbox on its own -------------------------------------------------------------


async def test_sandbox_bearer_auth_and_permissions(
    http: aiohttp.ClientSession, braze_sandbox: RunningBrazeSandbox
) -> None:
    status, body, _ = await post(http, braze_sandbox, "/users/track", {"events": [ev(1)]}, "bad")
    assert (status, body) == (401, {"message": "Invalid API Key"})
    braze_sandbox.state.config.permissions = ("users.track",)
    status, _, _ = await post(http, braze_sandbox, "/users/delete", {"external_ids": ["c-1"]})
    assert status == 403
    status, _, _ = await post(http, braze_sandbox, "/users/nothing", {})
    assert status == 404


async def test_sandbox_object_limit_in_total_and_per_array(
    http: aiohttp.ClientSession, braze_sandbox: RunningBrazeSandbox
) -> None:
    body = {
        "attributes": [{"external_id": f"c-{n}", "tier": "gold"} for n in range(40)],
        "events": [ev(n, f"c-{n}") for n in range(36)],
    }
    status, answer, _ = await post(http, braze_sandbox, "/users/track", body)
    assert (status, answer) == (400, {"message": "Max Input Length Exceeded"})
    braze_sandbox.state.config.per_array_limit = True
    status, answer, _ = await post(http, braze_sandbox, "/users/track", body)
    assert status == 201 and answer["events_processed"] == 36


async def test_sandbox_answers_201_with_errors_for_the_invalid_objects_only(
    http: aiohttp.ClientSession, braze_sandbox: RunningBrazeSandbox
) -> None:
    body = {
        "partner": "RudderStack",  # unknown top-level keys are tolerated (§2)
        "attributes": [
            {"external_id": "c-1", "email": "not-an-email"},
            {"external_id": "c-2", "user_alias": {"alias_name": "a", "alias_label": "l"}},
            {"external_id": "c-3", "first_name": "Ana"},
        ],
        "events": [ev(1), {"name": "x", "time": T}],
        "purchases": [
            {"external_id": "c-1", "product_id": "P", "currency": "EUR", "price": 1.0,
             "time": T, "quantity": 101}
        ],
    }  # fmt: skip
    status, answer, _ = await post(
        http, braze_sandbox, "/users/track", body, **{"X-Braze-Batch": "true"}
    )
    assert status == 201
    assert answer["message"] == "success"
    assert [(e["input_array"], e["index"]) for e in answer["errors"]] == [
        ("attributes", 0),
        ("attributes", 1),
        ("events", 1),
        ("purchases", 0),
    ]
    assert answer["errors"][0]["type"] == (
        "The value provided for the 'email' field is not a valid email."
    )
    assert answer["errors"][3]["type"] == "'quantity' is not valid"
    assert answer["attributes_processed"] == 1 and answer["events_processed"] == 1


async def test_sandbox_400_when_no_object_is_valid(
    http: aiohttp.ClientSession, braze_sandbox: RunningBrazeSandbox
) -> None:
    status, answer, _ = await post(
        http, braze_sandbox, "/users/track", {"events": [{"name": "x", "time": T}]}
    )
    assert status == 400
    assert answer["message"].startswith("Valid data must be provided")
    assert answer["errors"][0]["input_array"] == "events"


@pytest.mark.parametrize("mode", ["epoch", "delta"])
async def test_sandbox_rate_limit_headers_and_429(
    http: aiohttp.ClientSession, braze_sandbox: RunningBrazeSandbox, mode: str
) -> None:
    config = braze_sandbox.state.config
    config.rate_limit, config.rate_window, config.reset_mode = 2, 30.0, mode
    config.retry_after_header = True
    _, _, first = await post(http, braze_sandbox, "/users/track", {"events": [ev(1)]})
    assert first["x-ratelimit-limit"] == "2" and first["x-ratelimit-remaining"] == "1"
    reset = int(first["x-ratelimit-reset"])
    if mode == "epoch":
        assert time.time() < reset <= time.time() + 31
    else:
        assert 0 < reset <= 30
    await post(http, braze_sandbox, "/users/track", {"events": [ev(2)]})
    status, _, limited = await post(http, braze_sandbox, "/users/track", {"events": [ev(3)]})
    assert status == 429
    assert "x-ratelimit-remaining" not in limited
    assert 1 <= int(limited["x-ratelimit-retry-after"]) <= 30
    assert limited["Retry-After"] == limited["x-ratelimit-retry-after"]


async def test_sandbox_stores_attributes_events_and_purchases_like_braze(
    http: aiohttp.ClientSession, braze_sandbox: RunningBrazeSandbox
) -> None:
    first = {"external_id": "c-1", "tier": "gold", "points": 5, "tags": ["a", "a", "b"],
             "country": "Hungary"}  # fmt: skip
    await post(http, braze_sandbox, "/users/track", {"attributes": [first], "events": [ev(1)]})
    second = {"external_id": "c-1", "tier": None, "points": {"inc": 3},
              "tags": {"add": ["c", "a"], "remove": ["b"]}, "country": "Atlantis"}  # fmt: skip
    await post(http, braze_sandbox, "/users/track", {"attributes": [second], "events": [ev(1)]})
    [user] = braze_sandbox.state.profiles
    assert user.attributes == {"points": 8, "tags": ["c", "a"]}
    assert len(user.events) == 2  # no de-duplication (§6)


async def test_sandbox_alias_update_only_rules_with_the_unconfirmed_switch(
    http: aiohttp.ClientSession, braze_sandbox: RunningBrazeSandbox
) -> None:
    alias = {"alias_name": "anon-1", "alias_label": "antavo_id"}
    event_only = {"events": [{"user_alias": alias, "name": "x", "time": T,
                              "_update_existing_only": False}]}  # fmt: skip
    await post(http, braze_sandbox, "/users/track", event_only)
    assert braze_sandbox.state.profiles == []  # "always true" for events, per the docs
    braze_sandbox.state.config.alias_events_create = True
    await post(http, braze_sandbox, "/users/track", event_only)
    assert len(braze_sandbox.state.profiles) == 1
    braze_sandbox.state.reset()
    await post(http, braze_sandbox, "/users/track", {"attributes": [{"user_alias": alias}]})
    assert braze_sandbox.state.profiles == []  # an alias attributes object defaults to true


async def test_sandbox_rename_deprecates_the_old_id_and_delete_queues(
    http: aiohttp.ClientSession, braze_sandbox: RunningBrazeSandbox
) -> None:
    await post(http, braze_sandbox, "/users/track", {"events": [ev(1, "old"), ev(2, "other")]})
    rename = {"external_id_renames": [{"current_external_id": "old", "new_external_id": "new"}]}
    status, answer, _ = await post(http, braze_sandbox, "/users/external_ids/rename", rename)
    assert (status, answer["external_ids"], answer["rename_errors"]) == (201, ["new"], [])
    await post(http, braze_sandbox, "/users/track", {"events": [ev(3, "old")]})
    profile = braze_sandbox.state.find({"external_id": "new"})
    assert profile is not None and len(profile.events) == 2  # the old ID still resolves
    _, again, _ = await post(http, braze_sandbox, "/users/external_ids/rename", rename)
    assert again["rename_errors"]
    status, answer, _ = await post(http, braze_sandbox, "/users/delete", {"external_ids": ["new"]})
    assert (status, answer) == (201, {"deleted": 1})
    mixed = {"external_ids": ["other"], "braze_ids": ["x"]}
    status, _, _ = await post(http, braze_sandbox, "/users/delete", mixed)
    assert status == 400


async def test_sandbox_fault_can_drop_the_answer_after_applying_the_request(
    http: aiohttp.ClientSession, braze_sandbox: RunningBrazeSandbox
) -> None:
    async with http.post(braze_sandbox.url + "/sandbox/faults", json={"drop": True, "apply": True}):
        pass
    with pytest.raises(aiohttp.ClientError):
        await post(http, braze_sandbox, "/users/track", {"events": [ev(1)]})
    [user] = braze_sandbox.state.profiles  # applied although no answer came back
    assert len(user.events) == 1


# -- the table: Antavo records -> exact Braze bodies ------------------------------------

CHECKOUT = event_mapping(
    "checkout",
    "purchase",
    ("items[].product_id", "product_id"),
    ("items[].price", "price"),
    ("currency", "currency"),
    ("items[].quantity", "quantity"),
    ("transaction_id", "order_id"),
    ("store", "store"),
)
POINTS = event_mapping("point_add", "points_earned", ("points", "points"), ("reason", "reason"))
PROFILE = [
    profile_mapping("email", "email"),
    profile_mapping("first_name", "first_name"),
    profile_mapping("last_name", "last_name"),
    profile_mapping("birth_date", "dob"),
    profile_mapping("gender", "gender"),
    profile_mapping("mobile", "phone"),
    profile_mapping("country", "country"),
    profile_mapping("language", "language"),
    profile_mapping("newsletter", "email_subscribe"),
    profile_mapping("tier", "loyalty_tier", custom=True),
    profile_mapping("score", "loyalty_score", custom=True),
    profile_mapping("badges", "badges", custom=True, array_mode="append"),
]
ALIAS = {"alias_name": "cust-7", "alias_label": "antavo_id"}

Record = ProfileChange | AntavoEvent
TABLE: list[tuple[str, dict[str, Any], CustomerIdMapping, list[Record], dict[str, Any]]] = [
    (
        "opt_in with standard attributes in Braze's formats",
        {"default_phone_region": "HU"},
        CustomerIdMapping("customer_id", "external_id"),
        [
            profile_change(
                {
                    "email": "ana@example.com",
                    "first_name": "Ana",
                    "last_name": "Kis",
                    "birth_date": "1990-05-01",
                    "gender": "female",
                    "mobile": "+36 30 123 4567",
                    "country": "hu",
                    "language": "Hungarian",
                    "newsletter": True,
                    "tier": "gold",
                }
            )
        ],  # fmt: skip
        {
            "attributes": [
                {
                    "external_id": "cust-7",
                    "email": "ana@example.com",
                    "first_name": "Ana",
                    "last_name": "Kis",
                    "dob": "1990-05-01",
                    "gender": "F",
                    "phone": "+36301234567",
                    "country": "HU",
                    "language": "hu",
                    "email_subscribe": "opted_in",
                    "loyalty_tier": "gold",
                }
            ]
        },  # fmt: skip
    ),
    (
        "a cleared tier is null, badges add and remove, unknown gender is null",
        {},
        CustomerIdMapping("customer_id", "external_id"),
        [
            profile_change(
                {"tier": None, "badges": ["vip", "early"], "gender": "unknown"},
                {"tier": "gold", "badges": ["early", "newbie"]},
            )
        ],  # fmt: skip
        {
            "attributes": [
                {
                    "external_id": "cust-7",
                    "loyalty_tier": None,
                    "gender": None,
                    "badges": {"add": ["vip"], "remove": ["newbie"]},
                }
            ]
        },  # fmt: skip
    ),
    (
        "point_add is a custom event with properties",
        {"app_id": "app-42"},
        CustomerIdMapping("customer_id", "external_id"),
        [event("point_add", {"points": 250, "reason": "order", "ignored": 1}, timestamp=NOW)],
        {
            "events": [
                {
                    "external_id": "cust-7",
                    "name": "points_earned",
                    "time": T,
                    "properties": {"points": 250, "reason": "order"},
                    "app_id": "app-42",
                }
            ]
        },
    ),  # fmt: skip
    (
        "checkout in purchase mode: one purchase per line, quantity split at 100",
        {},
        CustomerIdMapping("customer_id", "external_id"),
        [
            event(
                "checkout",
                {
                    "transaction_id": "ORD-1",
                    "currency": "huf",
                    "store": "BUD-01",
                    "items": [
                        {"product_id": "SHOE", "price": 24990, "quantity": 1},
                        {"product_id": "SOCK", "price": 990.5, "quantity": 120},
                    ],
                },
                timestamp=NOW,
            )
        ],  # fmt: skip
        {
            "purchases": [
                {
                    "external_id": "cust-7",
                    "product_id": "SHOE",
                    "currency": "HUF",
                    "price": 24990.0,
                    "quantity": 1,
                    "time": T,
                    "properties": {"order_id": "ORD-1", "store": "BUD-01"},
                },
                {
                    "external_id": "cust-7",
                    "product_id": "SOCK",
                    "currency": "HUF",
                    "price": 990.5,
                    "quantity": 100,
                    "time": T,
                    "properties": {"order_id": "ORD-1", "store": "BUD-01"},
                },
                {
                    "external_id": "cust-7",
                    "product_id": "SOCK",
                    "currency": "HUF",
                    "price": 990.5,
                    "quantity": 20,
                    "time": T,
                    "properties": {"order_id": "ORD-1", "store": "BUD-01"},
                },
            ]
        },
    ),  # fmt: skip
    (
        "an alias customer: its profile is created before its event",
        {},
        CustomerIdMapping("customer_id", "user_alias"),
        [event("point_add", {"points": 10}, timestamp=NOW)],
        {
            "attributes": [{"user_alias": ALIAS, "_update_existing_only": False}],
            "events": [
                {
                    "user_alias": ALIAS,
                    "name": "points_earned",
                    "time": T,
                    "properties": {"points": 10},
                }
            ],
        },
    ),  # fmt: skip
    (
        "update-only connection: the flag on every object",
        {"update_existing_only": "true"},
        CustomerIdMapping("customer_id", "external_id"),
        [profile_change({"tier": "silver"}), event("point_add", {"points": 1}, timestamp=NOW)],
        {
            "attributes": [
                {"external_id": "cust-7", "_update_existing_only": True, "loyalty_tier": "silver"}
            ],
            "events": [
                {
                    "external_id": "cust-7",
                    "name": "points_earned",
                    "time": T,
                    "properties": {"points": 1},
                    "_update_existing_only": True,
                }
            ],
        },
    ),  # fmt: skip
    (
        "profile then event of one customer: attributes and events in one request",
        {},
        CustomerIdMapping("customer_id", "external_id"),
        [profile_change({"score": 12.5}), event("point_add", {"points": 3}, timestamp=NOW)],
        {
            "attributes": [{"external_id": "cust-7", "loyalty_score": 12.5}],
            "events": [
                {
                    "external_id": "cust-7",
                    "name": "points_earned",
                    "time": T,
                    "properties": {"points": 3},
                }
            ],
        },
    ),  # fmt: skip
]


def table_connection(
    sandbox: RunningBrazeSandbox, settings: dict[str, str], id_mapping: CustomerIdMapping
) -> Connection:
    return connection(
        "braze",
        settings={"rest_endpoint": sandbox.url, **settings},
        api_key=KEY,
        customer_id_mapping=id_mapping,
        profile_mappings=PROFILE,
        event_mappings=[CHECKOUT, POINTS],
    )


@pytest.mark.parametrize(
    ("settings", "id_mapping", "records", "expected"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
async def test_antavo_records_become_exact_braze_bodies_the_sandbox_accepts(
    braze_sandbox: RunningBrazeSandbox,
    settings: dict[str, str],
    id_mapping: CustomerIdMapping,
    records: list[Record],
    expected: dict[str, Any],
) -> None:
    c = table_connection(braze_sandbox, settings, id_mapping)
    deliveries = BRAZE.deliveries(c, customer("cust-7"), *records)
    async with aiohttp.ClientSession() as session:
        transport = RecordingTransport(session, timeout=5.0)
        result = await BRAZE.send(c, deliveries, transport)
    assert all(o.delivered for o in result.outcomes.values()), result.outcomes
    [request] = braze_sandbox.state.requests
    assert orjson.loads(request["body"]) == expected
    assert request["status"] == 201
    assert "errors" not in request["response"]


@pytest.mark.parametrize("alias_events_create", [False, True])
async def test_an_alias_customers_event_lands_whichever_way_braze_reads_the_flag(
    braze_sandbox: RunningBrazeSandbox, alias_events_create: bool
) -> None:
    braze_sandbox.state.config.alias_events_create = alias_events_create
    c = table_connection(braze_sandbox, {}, CustomerIdMapping("customer_id", "user_alias"))
    deliveries = BRAZE.deliveries(c, customer("cust-7"), event("point_add", {"points": 4}))
    async with aiohttp.ClientSession() as session:
        await BRAZE.send(c, deliveries, RecordingTransport(session, timeout=5.0))
    profile = braze_sandbox.state.find({"user_alias": ALIAS})
    assert profile is not None
    assert [e["properties"] for e in profile.events] == [{"points": 4}]


@pytest.mark.parametrize(("mode", "success"), [("epoch", 201), ("delta", 200)])
async def test_the_connector_paces_itself_on_the_sandboxs_rate_limit(
    braze_sandbox: RunningBrazeSandbox, mode: str, success: int
) -> None:
    from engine.connector import RetryableError

    config = braze_sandbox.state.config
    config.rate_limit, config.rate_window, config.reset_mode = 1, 20.0, mode
    config.success_status = success
    c = table_connection(braze_sandbox, {}, CustomerIdMapping("customer_id", "external_id"))
    hooks = BRAZE.hooks(c)
    deliveries = BRAZE.deliveries(c, customer("cust-7"), event("point_add", {"points": 1}))
    async with aiohttp.ClientSession() as session:
        transport = RecordingTransport(session, timeout=5.0)
        first = await hooks.send(deliveries, transport)
        assert first.outcomes[1].delivered  # 200 or 201: both are Braze's success
        with pytest.raises(RetryableError) as paced:
            await hooks.send(deliveries, transport)  # remaining 0: waits, sends nothing
        assert len(braze_sandbox.state.requests) == 1
        assert 10 <= (paced.value.retry_after or 0) <= 21
        # A changed connection gets a fresh plan, which knows nothing yet: Braze answers 429.
        other = BRAZE.hooks(dataclasses.replace(c, mapping_version=2))
        with pytest.raises(RetryableError) as limited:
            await other.send(deliveries, transport)
        assert limited.value.throttled
        assert 10 <= (limited.value.retry_after or 0) <= 21
