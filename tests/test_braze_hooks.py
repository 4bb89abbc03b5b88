"""The Braze connector's hooks, run through the kit's ``ConnectorTester`` (the engine's own
dispatch and checks), with Braze's answers scripted by the kit's ``FakeTransport``.

Expected bodies are written from braze-users-track.md (§3.2 identifiers, §3.3
``_update_existing_only``, §3.4 standard attributes, §3.5 custom attributes, §3.6 events,
§3.7 purchases, §5 responses, §7.3 renames), never copied from the connector's output.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest

from engine.connector import (
    Allowance,
    AuthError,
    Connection,
    CustomerIdMapping,
    DestinationError,
    InvalidInputError,
    MappingError,
    PayloadTooLargeError,
    PermanentError,
    RetryableError,
    check_destination,
)
from engine.connector.testing import (
    ConnectorTester,
    FakeTransport,
    Sample,
    check_connector,
    connection,
    customer,
    event,
    event_mapping,
    profile_change,
    profile_mapping,
    response,
)
from plugins.braze import plugin
from plugins.braze.sending import erasure_bodies
from plugins.braze.settings import validate_settings

KEY = "braze-rest-key-0123456789"
ENDPOINT = "https://rest.fra-01.braze.eu"
NOW = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
NOW_TEXT = "2026-11-30T10:00:00.000Z"
BRAZE = ConnectorTester(plugin)
OK = response(201, {"message": "success"})


def braze(
    *,
    settings: dict[str, str] | None = None,
    id_mapping: CustomerIdMapping | None = None,
    profile: list[Any] | None = None,
    events: list[Any] | None = None,
) -> Connection:
    return connection(
        "braze",
        settings={"rest_endpoint": ENDPOINT, **(settings or {})},
        api_key=KEY,
        customer_id_mapping=id_mapping or CustomerIdMapping("customer_id", "external_id"),
        profile_mappings=profile
        if profile is not None
        else [
            profile_mapping("email", "email"),
            profile_mapping("first_name", "first_name"),
            profile_mapping("tier", "loyalty_tier", custom=True),
        ],
        event_mappings=events
        if events is not None
        else [event_mapping("point_add", "points_earned", ("points", "points"))],
    )


CHECKOUT = event_mapping(
    "checkout",
    "purchase",
    ("items[].sku", "product_id"),
    ("items[].price", "price"),
    ("currency", "currency"),
    ("items[].quantity", "quantity"),
    ("transaction_id", "order_id"),
)


def sent(transport: FakeTransport, index: int = -1) -> Any:
    return transport.requests[index].json()


# connector_info and the contract


async def test_hook_connector_info_passes_the_kits_contract_check() -> None:
    sample = Sample(
        connection=braze(),
        customer=customer("customer-1", email="ana@example.com", first_name="Ana"),
        change=profile_change({"email": "ana@example.com"}),
        event=event("point_add", {"points": 50}),
        success=OK,
    )
    await check_connector(plugin, sample)


def test_hook_connector_info_declares_braze_limits_and_catalog() -> None:
    info = plugin.connector_info()
    assert info.name == "braze"
    assert info.max_batch_items == 75  # §4: 75 objects per request, each customer >= 1
    assert info.max_batch_bytes < 4_000_000  # §4: 4 MB per request
    catalog = {(e.kind, e.name): e for e in info.catalog}
    assert catalog[("attribute", "dob")].format == "YYYY-MM-DD"
    assert catalog[("attribute", "country")].format == "ISO 3166-1 alpha-2"
    assert ("event", "purchase") in catalog
    assert catalog[("event_parameter", "currency")].required_for == ("purchase",)
    assert ("identifier", "user_alias") in catalog


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://rest.iad-01.braze.com",
        "https://rest.us-10.braze.com",
        "https://rest.fra-02.braze.eu/",
        "https://rest.au-01.braze.com",
        "https://rest.us-09.braze.com",  # UNCONFIRMED cluster: the pattern accepts it
        "http://127.0.0.1:8091",  # the loopback sandbox
    ],
)
def test_settings_accept_braze_rest_endpoints(endpoint: str) -> None:
    validate_settings({"rest_endpoint": endpoint})


@pytest.mark.parametrize(
    ("endpoint", "says"),
    [
        ("http://rest.iad-01.braze.com", "not a Braze REST endpoint"),
        ("https://dashboard-01.braze.com", "not a Braze REST endpoint"),
        ("https://rest.iad-01.braze.com/users/track", "host alone"),
        ("https://user:pw@rest.iad-01.braze.com", "credentials"),
        ("US-01", "not a URL"),
        ("https://rest.iad-01.braze.com/" + "x" * 300, "host alone"),
    ],
)
def test_settings_refuse_other_hosts_and_say_what_to_use(endpoint: str, says: str) -> None:
    with pytest.raises(InvalidInputError) as raised:
        validate_settings({"rest_endpoint": endpoint})
    assert raised.value.field == "rest_endpoint"
    assert says in raised.value.message
    assert len(raised.value.message) < 400  # the echo is bounded


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://rest.iad-01.braze.com.evil.example",
        "https://example.com",
        "https://rest.iad-01.braze.com:8443",
        "http://127.0.0.1:8091",  # a loopback sandbox, unless the operator allows it
    ],
)
def test_only_brazes_hosts_are_destinations(endpoint: str) -> None:
    """Which hosts a connection may name is the engine's check of the connector's
    declaration (the settings validator leaves other hosts to it)."""
    hosts = plugin.connector_info().destination_hosts
    with pytest.raises(DestinationError):
        check_destination(endpoint, hosts, connector="braze")
    check_destination("https://rest.fra-02.braze.eu", hosts, connector="braze")
    allowed = (Allowance.parse("http://127.0.0.1:8091"),)
    check_destination("http://127.0.0.1:8091", hosts, allowed, connector="braze")


def test_settings_require_the_endpoint_and_name_unknown_keys() -> None:
    with pytest.raises(InvalidInputError, match="rest_endpoint: required"):
        validate_settings({})
    with pytest.raises(InvalidInputError) as raised:
        validate_settings({"rest_endpoint": ENDPOINT, "region": "EU-01"})
    assert raised.value.field == "region"
    with pytest.raises(InvalidInputError, match="batch_rule"):
        validate_settings({"rest_endpoint": ENDPOINT, "batch_rule": "225"})


PM, EM, CM = "validate_profile_mapping", "validate_event_mapping", "validate_customer_id_mapping"


@pytest.mark.parametrize(
    ("validator", "value", "field"),
    [
        (PM, profile_mapping("city", "hometown"), "target_attribute"),
        (PM, profile_mapping("c", "email", custom=True), "target_attribute"),
        (PM, profile_mapping("c", "$bad", custom=True), "target_attribute"),
        (EM, event_mapping("a", "purchase", ("sku", "product_id")), "parameters"),
        (EM, event_mapping("a", "ev", ("x", "time")), "parameters[0].target_parameter"),
        (EM, event_mapping("a", "ev", ("items[].x", "x")), "parameters"),
        (CM, CustomerIdMapping("customer_id", "uuid"), "target_identifier"),
        (CM, CustomerIdMapping("customer_id", "email"), "source_attribute"),
    ],
)
def test_validators_refuse_what_braze_refuses(validator: str, value: Any, field: str) -> None:
    with pytest.raises(InvalidInputError) as raised:
        getattr(BRAZE.info, validator)(value)
    assert raised.value.field == field


# identify


def test_hook_identify_maps_each_identifier_kind() -> None:
    ana = customer("c-1", card="CARD-7", email="Ana@Example.com", mobile="06 30 123 4567")
    assert BRAZE.identify(braze(), ana) == {"external_id": "c-1"}
    by_card = braze(id_mapping=CustomerIdMapping("card", "external_id"))
    assert BRAZE.identify(by_card, ana) == {"external_id": "CARD-7"}
    alias = braze(id_mapping=CustomerIdMapping("customer_id", "user_alias"))
    assert BRAZE.identify(alias, ana) == {
        "user_alias": {"alias_name": "c-1", "alias_label": "antavo_id"}
    }
    labelled = braze(
        id_mapping=CustomerIdMapping("customer_id", "user_alias"),
        settings={"alias_label": "loyalty"},
    )
    assert BRAZE.identify(labelled, ana)["user_alias"]["alias_label"] == "loyalty"
    by_email = braze(id_mapping=CustomerIdMapping("email", "email"))
    assert BRAZE.identify(by_email, ana) == {"email": "Ana@Example.com"}
    by_phone = braze(
        id_mapping=CustomerIdMapping("mobile", "phone"), settings={"default_phone_region": "HU"}
    )
    assert BRAZE.identify(by_phone, ana) == {"phone": "+36301234567"}


def test_hook_identify_refuses_a_customer_without_the_attribute_or_a_long_id() -> None:
    by_card = braze(id_mapping=CustomerIdMapping("card", "external_id"))
    with pytest.raises(MappingError, match="no usable 'card'"):
        BRAZE.identify(by_card, customer("c-1"))
    with pytest.raises(MappingError, match="987"):
        BRAZE.identify(braze(), customer("x" * 988))


# map_profile


def test_hook_map_profile_converts_standard_attributes_to_brazes_formats() -> None:
    mappings = [
        profile_mapping(source, target)
        for source, target in [
            ("birthday", "dob"),
            ("sex", "gender"),
            ("mobile", "phone"),
            ("country", "country"),
            ("language", "language"),
            ("newsletter", "email_subscribe"),
            ("tz", "time_zone"),
        ]
    ]
    c = braze(profile=mappings, settings={"default_phone_region": "HU"})
    change = profile_change(
        {
            "birthday": "1990-05-01T00:00:00Z",
            "sex": "female",
            "mobile": "06 30 123 4567",
            "country": "Hungary",
            "language": "Hungarian",
            "newsletter": True,
            "tz": "Europe/Budapest",
        }
    )
    assert BRAZE.map_profile(c, customer("c-1"), change) == {
        "dob": "1990-05-01",
        "gender": "F",
        "phone": "+36301234567",
        "country": "HU",
        "language": "hu",
        "email_subscribe": "opted_in",
        "time_zone": "Europe/Budapest",
    }


@pytest.mark.parametrize(
    ("target", "value", "says"),
    [
        ("gender", "robot", "not a gender"),
        ("country", "Atlantis", "ISO 3166-1"),
        ("email", "not-an-email", "not an email"),
        ("email_subscribe", "maybe", "opted_in"),
        ("time_zone", "Mars/Olympus", "IANA"),
        ("dob", "yesterday", "YYYY-MM-DD"),
    ],
)
def test_hook_map_profile_refuses_values_braze_would_drop(
    target: str, value: Any, says: str
) -> None:
    c = braze(profile=[profile_mapping("v", target)])
    with pytest.raises(MappingError, match=says):
        BRAZE.map_profile(c, customer("c-1"), profile_change({"v": value}))


def test_hook_map_profile_sends_null_for_a_cleared_attribute_and_unknown_gender() -> None:
    c = braze(
        profile=[profile_mapping("tier", "tier", custom=True), profile_mapping("g", "gender")]
    )
    change = profile_change({"tier": None, "g": "unknown"}, {"tier": "gold"})
    assert BRAZE.map_profile(c, customer("c-1"), change) == {"tier": None, "gender": None}


def test_hook_map_profile_all_scope_sends_every_mapped_attribute() -> None:
    c = braze(settings={"profile_scope": "all"})
    ana = customer("c-1", email="ana@example.com", first_name="Ana", tier="gold")
    assert BRAZE.map_profile(c, ana, profile_change({"tier": "silver"})) == {
        "email": "ana@example.com",
        "first_name": "Ana",
        "loyalty_tier": "silver",
    }
    only_changed = braze()
    assert BRAZE.map_profile(only_changed, ana, profile_change({"tier": "silver"})) == {
        "loyalty_tier": "silver"
    }


def test_hook_map_profile_append_mode_sends_add_and_remove() -> None:
    c = braze(profile=[profile_mapping("labels", "labels", custom=True, array_mode="append")])
    change = profile_change({"labels": ["vip", "early"]}, {"labels": ["early", "newbie"]})
    assert BRAZE.map_profile(c, customer("c-1"), change) == {
        "labels": {"add": ["vip"], "remove": ["newbie"]}
    }
    replace = braze(profile=[profile_mapping("labels", "labels", custom=True)])
    assert BRAZE.map_profile(replace, customer("c-1"), change) == {"labels": ["vip", "early"]}


def test_hook_map_profile_refuses_a_custom_string_over_255_characters() -> None:
    with pytest.raises(MappingError, match="255"):
        BRAZE.map_profile(braze(), customer("c-1"), profile_change({"tier": "x" * 256}))


# map_event


def test_hook_map_event_builds_a_custom_event_with_properties() -> None:
    c = braze(settings={"app_id": "app-123"})
    rendered = BRAZE.map_event(
        c, customer("c-1"), event("point_add", {"points": 120}, timestamp=NOW)
    )
    assert rendered == [
        {
            "name": "points_earned",
            "time": NOW_TEXT,
            "properties": {"points": 120},
            "app_id": "app-123",
        }
    ]
    assert BRAZE.map_event(c, customer("c-1"), event("unmapped")) == []


def test_hook_map_event_purchase_mode_makes_one_purchase_per_line() -> None:
    c = braze(events=[CHECKOUT])
    data = {
        "transaction_id": "ORD-1",
        "currency": "eur",
        "items": [
            {"sku": "SHOE-1", "price": 99.0, "quantity": 1},
            {"sku": "SOCK-2", "price": "4.5", "quantity": 150},
        ],
    }
    assert BRAZE.map_event(c, customer("c-1"), event("checkout", data, timestamp=NOW)) == [
        {"product_id": "SHOE-1", "currency": "EUR", "price": 99.0, "quantity": 1,
         "time": NOW_TEXT, "properties": {"order_id": "ORD-1"}},
        # §3.7: quantity at most 100; Braze counts quantity X as X purchases, so 150 is 100 + 50
        {"product_id": "SOCK-2", "currency": "EUR", "price": 4.5, "quantity": 100,
         "time": NOW_TEXT, "properties": {"order_id": "ORD-1"}},
        {"product_id": "SOCK-2", "currency": "EUR", "price": 4.5, "quantity": 50,
         "time": NOW_TEXT, "properties": {"order_id": "ORD-1"}},
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"currency": "EUR", "items": []}, "no 'items' lines"),
        ({"currency": "XXQ", "items": [{"sku": "A", "price": 1}]}, "ISO 4217"),
        ({"currency": "EUR", "items": [{"price": 1}]}, "product_id"),
        ({"currency": "EUR", "items": [{"sku": "A", "price": 1, "quantity": 0}]}, "quantity"),
    ],
)
def test_hook_map_event_refuses_a_checkout_braze_would_refuse(data: Any, says: str) -> None:
    with pytest.raises(MappingError, match=says):
        BRAZE.map_event(braze(events=[CHECKOUT]), customer("c-1"), event("checkout", data))


# prepare


def test_hook_prepare_resolves_settings_once_per_connection() -> None:
    c = braze(settings={"batch_rule": "per_array", "update_existing_only": "true"})
    plan = BRAZE.hooks(c).plan
    assert plan.settings.batch_rule == "per_array"
    assert plan.settings.update_existing_only is True
    assert set(plan.events) == {"point_add"}


# send


async def test_hook_send_puts_every_object_in_one_track_request_with_the_key_in_a_header() -> None:
    c = braze()
    ana = customer("c-1", email="ana@example.com")
    deliveries = BRAZE.deliveries(
        c,
        ana,
        profile_change({"email": "ana@example.com", "tier": "gold"}),
        event("point_add", {"points": 5}, timestamp=NOW),
    )
    transport = FakeTransport(OK)
    result = await BRAZE.send(c, deliveries, transport)
    assert all(o.delivered for o in result.outcomes.values())
    [request] = transport.requests
    assert request.url == "https://rest.fra-01.braze.eu/users/track"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.json() == {
        "attributes": [{"external_id": "c-1", "email": "ana@example.com", "loyalty_tier": "gold"}],
        "events": [
            {"external_id": "c-1", "name": "points_earned", "time": NOW_TEXT,
             "properties": {"points": 5}}
        ],
    }  # fmt: skip


async def test_hook_send_maps_per_object_errors_back_to_the_right_item() -> None:
    c = braze()
    ana, bob = customer("ana"), customer("bob")
    batch = [
        *BRAZE.deliveries(c, ana, event("point_add", {"points": 1}, timestamp=NOW)),
        *BRAZE.deliveries(c, bob, profile_change({"email": "bob@example.com"})),
    ]
    batch[1].item_id = 2
    batch += BRAZE.deliveries(c, bob, event("point_add", {"points": 2}, timestamp=NOW))
    batch[2].item_id = 3
    answer = response(
        201,
        {
            "message": "success",
            "events_processed": 1,
            "errors": [{"type": "'quantity' is not valid", "input_array": "events", "index": 1}],
        },
    )
    result = await BRAZE.send(c, batch, FakeTransport(answer))
    # events[1] is bob's event (item 3): only that item fails; bob's attributes went through.
    assert result.outcomes[1].delivered
    assert result.outcomes[2].delivered
    assert not result.outcomes[3].delivered
    assert "'quantity' is not valid" in result.outcomes[3].error


async def test_hook_send_400_no_valid_data_fails_every_item_with_brazes_message() -> None:
    c = braze()
    batch = BRAZE.deliveries(c, customer("c-1"), event("point_add", {"points": 1}))
    answer = response(
        400,
        {"message": "Valid data must be provided in the 'attributes', 'events', or "
         "'purchases' fields.", "errors": [{"type": "'name' is required", "input_array":
         "events", "index": 0}]},
    )  # fmt: skip
    result = await BRAZE.send(c, batch, FakeTransport(answer))
    assert not result.outcomes[1].delivered
    assert "'name' is required" in result.outcomes[1].error


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (response(401, {"message": "Invalid API Key"}), AuthError),
        (response(403, {"message": "Access Denied"}), AuthError),
        (response(404, {"message": "Not Found"}), AuthError),
        (response(500, {}), RetryableError),
        (response(503, {}), RetryableError),
        (response(413, {}), PayloadTooLargeError),
        (response(400, {"message": "Max Input Length Exceeded"}), PayloadTooLargeError),
        (response(422, {"message": "nope"}), PermanentError),
        (response(201, {"message": "failure"}), PermanentError),
    ],
)
async def test_hook_send_turns_request_level_answers_into_engine_errors(
    answer: Any, error: type[Exception]
) -> None:
    c = braze()
    batch = BRAZE.deliveries(c, customer("c-1"), event("point_add", {"points": 1}))
    with pytest.raises(error) as raised:
        await BRAZE.send(c, batch, FakeTransport(answer))
    assert KEY not in str(raised.value)


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"x-ratelimit-retry-after": "7"}, 7.0),
        ({"Retry-After": "9"}, 9.0),
        ({"X-RateLimit-Reset": "12"}, 12.0),
    ],
)
async def test_hook_send_429_reports_brazes_wait_and_throttles(
    headers: dict[str, str], wait: float
) -> None:
    c = braze()
    batch = BRAZE.deliveries(c, customer("c-1"), event("point_add", {"points": 1}))
    with pytest.raises(RetryableError) as raised:
        await BRAZE.send(c, batch, FakeTransport(response(429, {}, headers)))
    assert raised.value.throttled
    assert raised.value.retry_after == pytest.approx(wait, abs=1.0)


@pytest.mark.parametrize("mode", ["epoch", "delta"])
async def test_hook_send_waits_for_the_reset_when_remaining_is_zero(mode: str) -> None:
    c = braze()
    hooks = BRAZE.hooks(c)  # one plan: the pace learned by one send holds for the next
    reset = str(int(time.time()) + 30) if mode == "epoch" else "30"
    spent = response(
        201, {"message": "success"}, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": reset}
    )
    batch = BRAZE.deliveries(c, customer("c-1"), event("point_add", {"points": 1}))
    transport = FakeTransport(spent)
    await hooks.send(batch, transport)
    with pytest.raises(RetryableError) as raised:
        await hooks.send(batch, transport)
    assert len(transport.requests) == 1  # nothing was sent while the window is used up
    assert 25 <= (raised.value.retry_after or 0) <= 31
    assert not raised.value.throttled


async def test_hook_send_refuses_to_send_more_than_75_objects_and_never_splits_itself() -> None:
    c = braze(events=[CHECKOUT])
    lines = [{"sku": f"P{n}", "price": 1.0} for n in range(40)]
    batch = [
        *BRAZE.deliveries(c, customer("a"), event("checkout", {"currency": "EUR", "items": lines})),
    ]
    second = BRAZE.deliveries(
        c, customer("b"), event("checkout", {"currency": "EUR", "items": lines})
    )
    second[0].item_id = 2
    transport = FakeTransport(OK)
    with pytest.raises(PayloadTooLargeError, match="75 in total"):
        await BRAZE.send(c, batch + second, transport)
    assert transport.requests == []  # the engine resends in halves: one request per send
    assert (await BRAZE.send(c, batch, transport)).outcomes[1].delivered
    legacy = braze(events=[CHECKOUT], settings={"batch_rule": "per_array"})
    with pytest.raises(PayloadTooLargeError, match="75 per array"):
        await BRAZE.send(legacy, batch + second, FakeTransport(OK))


async def test_hook_send_renames_a_changed_external_id_before_tracking() -> None:
    c = braze(
        id_mapping=CustomerIdMapping("card", "external_id"),
        profile=[profile_mapping("card", "card_number", custom=True)],
    )
    moved = customer("c-1", card="NEW-2")
    batch = BRAZE.deliveries(c, moved, profile_change({"card": "NEW-2"}, {"card": "OLD-1"}))
    transport = FakeTransport(
        response(201, {"message": "success", "external_ids": ["NEW-2"], "rename_errors": []}), OK
    )
    result = await BRAZE.send(c, batch, transport)
    assert result.outcomes[1].delivered
    assert transport.requests[0].url.endswith("/users/external_ids/rename")
    assert sent(transport, 0) == {
        "external_id_renames": [{"current_external_id": "OLD-1", "new_external_id": "NEW-2"}]
    }
    assert sent(transport, 1) == {"attributes": [{"external_id": "NEW-2", "card_number": "NEW-2"}]}


async def test_hook_send_a_refused_rename_fails_that_customer_only() -> None:
    c = braze(id_mapping=CustomerIdMapping("card", "external_id"))
    moved = BRAZE.deliveries(
        c, customer("c-1", card="NEW-2"), profile_change({"card": "NEW-2"}, {"card": "OLD-1"})
    )
    other = BRAZE.deliveries(c, customer("c-2", card="K"), event("point_add", {"points": 1}))
    other[0].item_id = 2
    refused = response(
        201, {"message": "success", "external_ids": [], "rename_errors": [[0, "in use"]]}
    )
    transport = FakeTransport(refused, OK)
    result = await BRAZE.send(c, moved + other, transport)
    assert not result.outcomes[1].delivered and "in use" in result.outcomes[1].error
    assert result.outcomes[2].delivered
    assert sent(transport, 1) == {
        "events": [{"external_id": "K", "name": "points_earned", "time": "2026-01-15T09:30:00.000Z",
                    "properties": {"points": 1}}]
    }  # fmt: skip
    # On a retry the same refusal means an earlier attempt renamed it: the rest goes on.
    moved[0].attempt = 2
    retried = await BRAZE.send(c, moved, FakeTransport(refused, OK))
    assert retried.outcomes[1].delivered


async def test_hook_send_creates_an_alias_profile_before_its_events() -> None:
    c = braze(id_mapping=CustomerIdMapping("customer_id", "user_alias"))
    batch = BRAZE.deliveries(c, customer("c-9"), event("point_add", {"points": 3}, timestamp=NOW))
    transport = FakeTransport(OK)
    await BRAZE.send(c, batch, transport)
    alias = {"alias_name": "c-9", "alias_label": "antavo_id"}
    assert sent(transport) == {
        "attributes": [{"user_alias": alias, "_update_existing_only": False}],
        "events": [{"user_alias": alias, "name": "points_earned", "time": NOW_TEXT,
                    "properties": {"points": 3}}],
    }  # fmt: skip


async def test_hook_send_update_existing_only_goes_on_every_object() -> None:
    c = braze(settings={"update_existing_only": "true"})
    batch = BRAZE.deliveries(
        c, customer("c-1"), profile_change({"tier": "gold"}), event("point_add", {"points": 1})
    )
    transport = FakeTransport(OK)
    await BRAZE.send(c, batch, transport)
    body = sent(transport)
    assert body["attributes"][0]["_update_existing_only"] is True
    assert body["events"][0]["_update_existing_only"] is True


async def test_hook_send_merges_a_customers_attribute_changes_into_one_object() -> None:
    c = braze()
    batch = BRAZE.deliveries(
        c,
        customer("c-1"),
        profile_change({"tier": "gold", "first_name": "Ana"}),
        profile_change({"tier": "silver"}),
    )
    transport = FakeTransport(OK)
    result = await BRAZE.send(c, batch, transport)
    assert sent(transport) == {
        "attributes": [{"external_id": "c-1", "loyalty_tier": "silver", "first_name": "Ana"}]
    }
    assert all(o.delivered for o in result.outcomes.values())


def test_erasure_bodies_hold_one_identifier_type_and_at_most_50() -> None:
    ids = [f"c-{n}" for n in range(51)]
    alias = {"alias_name": "a", "alias_label": "antavo_id"}
    assert erasure_bodies(ids, [alias]) == [
        {"external_ids": ids[:50]},
        {"external_ids": ids[50:]},
        {"user_aliases": [alias]},
    ]


def test_the_braze_connector_imports_only_the_kit_of_the_engine() -> None:
    import ast
    from pathlib import Path

    root = Path(plugin.__file__).parent
    engine_imports: set[str] = set()
    plugin_imports: set[str] = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            engine_imports |= {n for n in names if n.split(".")[0] == "engine"}
            plugin_imports |= {n for n in names if n.startswith("plugins.")}
    assert engine_imports == {"engine.connector"}
    assert all(name.startswith("plugins.braze") for name in plugin_imports)
    sandbox = {p for p in plugin_imports if p.startswith("plugins.braze.sandbox")}
    connector_files = [p for p in root.glob("*.py")]
    for path in connector_files:  # the connector never imports its sandbox
        assert "plugins.braze.sandbox" not in path.read_text(), path
    assert sandbox  # the sandbox imports its own rules, and nothing of the connector:
    for path in (root / "sandbox").glob("*.py"):
        text = path.read_text()
        assert "plugins.braze." not in text.replace("plugins.braze.sandbox", ""), path


async def test_hook_send_an_error_on_an_alias_profile_object_fails_that_customers_items() -> None:
    c = braze(id_mapping=CustomerIdMapping("customer_id", "user_alias"))
    batch = BRAZE.deliveries(c, customer("c-9"), event("point_add", {"points": 3}))
    answer = response(
        201,
        {"message": "success", "errors": [
            {"type": "'user_alias' must have 'alias_name' and 'alias_label'",
             "input_array": "attributes", "index": 0}]},
    )  # fmt: skip
    result = await BRAZE.send(c, batch, FakeTransport(answer))
    assert not result.outcomes[1].delivered
    assert "attributes[0]" in result.outcomes[1].error


# -- erase: POST /users/delete (reference 7.4) ---------------------------------------------


async def test_hook_erase_deletes_by_external_id_with_the_key_in_a_header() -> None:
    transport = FakeTransport(response(201, {"deleted": 1}))
    await BRAZE.erase(braze(), customer("c-9"), transport)
    [request] = transport.requests
    assert request.url == "https://rest.fra-01.braze.eu/users/delete"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.json() == {"external_ids": ["c-9"]}


async def test_hook_erase_deletes_an_alias_customer_by_alias() -> None:
    c = braze(id_mapping=CustomerIdMapping("customer_id", "user_alias"))
    transport = FakeTransport(response(201, {"deleted": 1}))
    await BRAZE.erase(c, customer("c-9"), transport)
    assert transport.requests[0].json() == {
        "user_aliases": [{"alias_name": "c-9", "alias_label": "antavo_id"}]
    }


async def test_hook_erase_treats_404_as_done_and_refusals_as_errors() -> None:
    await BRAZE.erase(braze(), customer("c-9"), FakeTransport(response(404, {})))
    with pytest.raises(AuthError):
        await BRAZE.erase(braze(), customer("c-9"), FakeTransport(response(401, {})))
    with pytest.raises(RetryableError):
        await BRAZE.erase(braze(), customer("c-9"), FakeTransport(response(503, {})))
    email = braze(id_mapping=CustomerIdMapping("email", "email"))
    with pytest.raises(PermanentError, match="external_id or a user_alias"):
        await BRAZE.erase(email, customer("c-9", email="a@example.com"), FakeTransport())
