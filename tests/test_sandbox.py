"""The Insider sandbox, driven over real HTTP on 127.0.0.1.

Expected status codes, bodies, error keys and messages are taken from the reference
document (/work/shared/reference/insider-ucd-api.md, section numbers in comments) or,
where the reference leaves them open, from the sandbox brief's stated inferences.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from plugins.insider.sandbox import RunningSandbox, SandboxConfig, start_sandbox

PARTNER = "tidegate"
TOKEN = "sandbox-key"
HEADERS = {"X-PARTNER-NAME": PARTNER, "X-REQUEST-TOKEN": TOKEN}
UPSERT = "/api/user/v1/upsert"
ATTRIBUTE_DELETE = "/api/user/v1/attribute/delete"
IDENTITY = "/api/user/v1/identity"

# §2 / §5.3
ACCESS_DENIED = {
    "success": False,
    "message": "Access Denied. You do not have sufficient access to perform this action.",
}
# §5.3
TOO_MANY = {"error": "rejected: too many requests"}
UNKNOWN_ERROR = {
    "success": False,
    "message": "The request processing has failed because of an unknown error.",
}
# §5.2
EMAIL_KEY = "users.0.identifiers.*.regexp(^.+@.+\\..+$)"
PHONE_KEY = "users.0.identifiers.*.regexp(^\\+[1-9]\\d{6,14}$)"
EVENT_NAME_KEY = "users.0.events.0.event_name.*.regexp(^[a-z0-9][a-zA-Z0-9._-]*$)"

SandboxFactory = Callable[..., Awaitable[RunningSandbox]]


@pytest.fixture
async def make_sandbox() -> AsyncIterator[SandboxFactory]:
    started: list[RunningSandbox] = []

    async def make(**config: Any) -> RunningSandbox:
        running = await start_sandbox(port=0, config=SandboxConfig(**config))
        started.append(running)
        return running

    yield make
    for running in started:
        await running.close()


@pytest.fixture
async def sandbox(make_sandbox: SandboxFactory) -> RunningSandbox:
    return await make_sandbox()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class Answer:
    def __init__(self, status: int, body: Any, headers: Any) -> None:
        self.status = status
        self.body = body
        self.headers = headers


async def call(
    http: aiohttp.ClientSession,
    sandbox: RunningSandbox,
    path: str,
    body: Any = None,
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
) -> Answer:
    kwargs: dict[str, Any] = {"headers": HEADERS if headers is None else headers}
    if data is not None:
        kwargs["data"] = data
    elif body is not None:
        kwargs["json"] = body
    async with http.request(method, sandbox.url + path, **kwargs) as response:
        text = await response.text()
        parsed = await response.json(content_type=None) if text else None
        return Answer(response.status, parsed, response.headers)


async def upsert(http: aiohttp.ClientSession, sandbox: RunningSandbox, *users: Any) -> Answer:
    return await call(http, sandbox, UPSERT, {"users": list(users)})


async def stored_users(http: aiohttp.ClientSession, sandbox: RunningSandbox) -> list[Any]:
    answer = await call(http, sandbox, "/sandbox/users", method="GET", headers={})
    users: list[Any] = answer.body["users"]
    return users


async def lookup(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, key: str, value: str
) -> Answer:
    path = f"/sandbox/users/lookup?key={key}&value={value}"
    return await call(http, sandbox, path, method="GET", headers={})


async def request_log(http: aiohttp.ClientSession, sandbox: RunningSandbox) -> list[Any]:
    answer = await call(http, sandbox, "/sandbox/requests", method="GET", headers={})
    log: list[Any] = answer.body["requests"]
    return log


async def add_fault(http: aiohttp.ClientSession, sandbox: RunningSandbox, **spec: Any) -> Answer:
    return await call(http, sandbox, "/sandbox/faults", spec, headers={})


def user(uuid: str = "u-1", **fields: Any) -> dict[str, Any]:
    fields.setdefault("attributes", {"name": "Jane"})
    return {"identifiers": {"uuid": uuid}, **fields}


def by(identifiers: dict[str, Any], **attributes: Any) -> dict[str, Any]:
    return {"identifiers": identifiers, "attributes": attributes}


def purchase(**params: Any) -> dict[str, Any]:
    return {"event_name": "purchase", "timestamp": "2024-03-01T10:00:00Z", "event_params": params}


def fail_errors(answer: Answer) -> dict[str, list[str]]:
    assert answer.status == 200
    errors: dict[str, list[str]] = answer.body["data"]["fail"]["errors"]
    return errors


# --- auth (§2) -----------------------------------------------------------------------


async def test_upsert_accepts_valid_user_with_200_summary(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    answer = await upsert(http, sandbox, user())
    assert answer.status == 200
    assert answer.body == {"data": {"successful": {"count": 1}, "fail": {}}}


async def test_upsert_rejects_wrong_token_with_403(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    headers = {"X-PARTNER-NAME": PARTNER, "X-REQUEST-TOKEN": "wrong"}
    answer = await call(http, sandbox, UPSERT, {"users": [user()]}, headers=headers)
    assert (answer.status, answer.body) == (403, ACCESS_DENIED)


async def test_upsert_rejects_missing_partner_header_with_403(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    headers = {"X-REQUEST-TOKEN": TOKEN}
    answer = await call(http, sandbox, UPSERT, {"users": [user()]}, headers=headers)
    assert (answer.status, answer.body) == (403, ACCESS_DENIED)


async def test_upsert_rejects_uppercase_partner_name_with_403(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    headers = {"X-PARTNER-NAME": PARTNER.upper(), "X-REQUEST-TOKEN": TOKEN}
    answer = await call(http, sandbox, UPSERT, {"users": [user()]}, headers=headers)
    assert (answer.status, answer.body) == (403, ACCESS_DENIED)


def test_config_refuses_uppercase_partner_name() -> None:
    with pytest.raises(ValueError):
        SandboxConfig(partner_name="TideGate")


# --- request-level 400s (§3.1, §4, §5.3) ----------------------------------------------


async def test_upsert_rejects_non_json_content_type_with_400(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    headers = {**HEADERS, "Content-Type": "text/plain"}
    answer = await call(http, sandbox, UPSERT, data=b'{"users": []}', headers=headers)
    assert answer.status == 400
    assert answer.body == {"error": "content type must be application/json"}


async def test_upsert_without_users_is_400(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    answer = await call(http, sandbox, UPSERT, {"skip_hook": True})
    assert (answer.status, answer.body) == (400, {"error": "users must be defined: bad request"})


async def test_upsert_with_invalid_json_is_400(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    headers = {**HEADERS, "Content-Type": "application/json"}
    answer = await call(http, sandbox, UPSERT, data=b'{"users": [', headers=headers)
    assert answer.status == 400
    assert answer.body == {"success": False, "message": "Request data is not in valid JSON format."}


async def test_upsert_over_max_body_bytes_is_400_not_413(
    make_sandbox: SandboxFactory, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(max_body_bytes=2_000)
    big = {"users": [user(attributes={"name": "x" * 3_000})]}
    answer = await call(http, sandbox, UPSERT, big)
    assert answer.status == 400
    assert answer.body == {"error": "request body is bigger than maximum allowed size 2,000 bytes"}


async def test_upsert_at_exactly_max_body_bytes_is_accepted(
    make_sandbox: SandboxFactory, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(max_body_bytes=2_000)
    prefix = b'{"users":[{"identifiers":{"uuid":"u-1"},"attributes":{"name":"'
    suffix = b'"}}]}'
    body = prefix + b"x" * (2_000 - len(prefix) - len(suffix)) + suffix
    headers = {**HEADERS, "Content-Type": "application/json"}
    answer = await call(http, sandbox, UPSERT, data=body, headers=headers)
    assert answer.status == 200


async def test_upsert_with_more_than_1000_users_is_400(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    users = [user(f"u-{i}") for i in range(1_001)]
    answer = await upsert(http, sandbox, *users)
    # The 400 and its wording are an inference (§9.3): only the limit is documented.
    assert answer.status == 400
    assert answer.body == {"error": "users must be at most 1000: bad request"}
    assert await stored_users(http, sandbox) == []


async def test_upsert_with_1000_users_is_accepted(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    users = [user(f"u-{i}") for i in range(1_000)]
    answer = await upsert(http, sandbox, *users)
    assert answer.body == {"data": {"successful": {"count": 1_000}, "fail": {}}}


# --- per-user validation (§3.2, §3.3, §3.7, §5.2) -------------------------------------


async def test_invalid_email_identifier_fails_user_with_documented_key(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    answer = await upsert(http, sandbox, by({"email": "sample"}, age=3))
    assert answer.body["data"]["successful"] == {}
    assert answer.body["data"]["fail"] == {
        "count": 1,
        "errors": {EMAIL_KEY: ["not a valid email address: sample"]},
    }


async def test_numeric_uuid_fails_user_with_type_string_key(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    answer = await upsert(http, sandbox, by({"uuid": 12345}, age=3))
    assert fail_errors(answer) == {
        "users.0.identifiers.*.type(string)": ["uuid must be string: 12345"]
    }


async def test_invalid_phone_identifier_fails_with_e164_regexp_key(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    answer = await upsert(http, sandbox, by({"phone_number": "12345"}, age=3))
    assert fail_errors(answer) == {PHONE_KEY: ["user has an invalid phone number: 12345"]}


async def test_unknown_identifier_key_fails_with_defaults_column_key(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    answer = await upsert(http, sandbox, by({"uuid": "u-1", "loyalty_id": "L-1"}, age=3))
    assert fail_errors(answer) == {
        "users.0.identifiers.*.in(defaults_column)": [
            "key must be one of phone_number(pn), email(em) or uuid"
        ]
    }


async def test_user_without_identifiers_or_insider_id_fails_with_both_keys(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    answer = await upsert(http, sandbox, {"attributes": {"age": 3}})
    message = "either insider_id or idenifiers must be specified"
    assert fail_errors(answer) == {
        "users.0.identifiers.required": [message],
        "users.0.insider_id.required": [message],
    }


async def test_camel_case_event_name_fails_with_documented_regex_key(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    event = {"event_name": "homepageView", "timestamp": "2021-01-10T21:35:20Z"}
    answer = await upsert(http, sandbox, user(events=[event]))
    assert fail_errors(answer) == {EVENT_NAME_KEY: ["invalid event name: homepageView"]}


async def test_event_name_starting_with_underscore_fails(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    event = {"event_name": "_points", "timestamp": "2021-01-10T21:35:20Z"}
    answer = await upsert(http, sandbox, user(events=[event]))
    assert fail_errors(answer) == {EVENT_NAME_KEY: ["invalid event name: _points"]}


async def test_purchase_without_required_params_fails_with_one_message_each(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    answer = await upsert(http, sandbox, user(events=[purchase(product_id="SKU-1")]))
    assert fail_errors(answer) == {
        "users.0.events.0.event_params.*.required": [
            "event_group_id parameter is required on purchase event",
            "unit_sale_price parameter is required on purchase event",
            "currency parameter is required on purchase event",
        ]
    }


async def test_cart_page_view_requires_group_id_sale_price_and_currency(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    event = {
        "event_name": "cart_page_view",
        "timestamp": "2024-03-01T10:00:00Z",
        "event_params": {"event_group_id": "C-1"},
    }
    answer = await upsert(http, sandbox, user(events=[event]))
    assert fail_errors(answer) == {
        "users.0.events.0.event_params.*.required": [
            "unit_sale_price parameter is required on cart_page_view event",
            "currency parameter is required on cart_page_view event",
        ]
    }


async def test_purchase_with_required_params_passes_without_quantity(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    event = purchase(event_group_id="ORD-1", unit_sale_price=99.0, currency="USD")
    answer = await upsert(http, sandbox, user(events=[event]))
    assert answer.body == {"data": {"successful": {"count": 1}, "fail": {}}}


async def test_event_timestamp_must_be_rfc3339(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    event = {"event_name": "sign_up_confirmation", "timestamp": "2024-03-01 10:00:00"}
    answer = await upsert(http, sandbox, user(events=[event]))
    assert fail_errors(answer) == {
        "users.0.events.0.timestamp.*.rfc3339": ["invalid timestamp: 2024-03-01 10:00:00"]
    }


async def test_event_timestamps_with_offset_and_fraction_are_accepted(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    events = [
        {"event_name": "sign_up_confirmation", "timestamp": "2021-01-17T14:41:21+03:00"},
        {"event_name": "sign_up_confirmation", "timestamp": "2021-02-01T00:00:00.000Z"},
    ]
    answer = await upsert(http, sandbox, user(events=events))
    assert answer.body == {"data": {"successful": {"count": 1}, "fail": {}}}


async def test_empty_attributes_object_fails_user(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    answer = await upsert(http, sandbox, user(attributes={}))
    assert answer.body["data"]["successful"] == {}
    assert answer.body["data"]["fail"]["count"] == 1
    # The key is not documented (§3.2 gives only the rule); it must point at attributes.
    assert [key.startswith("users.0.attributes") for key in fail_errors(answer)] == [True]


async def test_user_without_attributes_or_events_fails(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    answer = await upsert(http, sandbox, {"identifiers": {"uuid": "u-1"}})
    assert answer.body["data"]["fail"]["count"] == 1
    assert answer.body["data"]["successful"] == {}


async def test_birthday_attribute_must_end_in_z(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    answer = await upsert(http, sandbox, user(attributes={"birthday": "1993-03-12T00:00:00+03:00"}))
    assert answer.body["data"]["fail"]["count"] == 1
    assert [key.startswith("users.0.attributes.birthday") for key in fail_errors(answer)] == [True]


async def test_birthday_attribute_in_utc_is_accepted(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    answer = await upsert(http, sandbox, user(attributes={"birthday": "1993-03-12T00:00:00Z"}))
    assert answer.body == {"data": {"successful": {"count": 1}, "fail": {}}}


async def test_email_attribute_must_match_email_regexp(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    answer = await upsert(http, sandbox, user(attributes={"email": "nope"}))
    # Key chosen by analogy with the identifier one (§5.2); the message is documented.
    [(key, messages)] = fail_errors(answer).items()
    assert key.startswith("users.0.attributes.email")
    assert messages == ["not a valid email address: nope"]


async def test_mixed_batch_counts_successful_and_failed_users(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    users = [
        user("u-0"),
        by({"email": "sample"}, age=3),
        user("u-2"),
        # Two problems in one user still count as one failed user (§5.2).
        {"identifiers": {"uuid": 12345}, "events": [purchase()]},
        user("u-4"),
    ]
    answer = await upsert(http, sandbox, *users)
    data = answer.body["data"]
    assert data["successful"] == {"count": 3}
    assert data["fail"]["count"] == 2
    assert data["fail"]["errors"]["users.1.identifiers.*.regexp(^.+@.+\\..+$)"] == [
        "not a valid email address: sample"
    ]
    assert data["fail"]["errors"]["users.3.identifiers.*.type(string)"] == [
        "uuid must be string: 12345"
    ]
    assert "users.3.events.0.event_params.*.required" in data["fail"]["errors"]
    assert sorted(u["identifiers"]["uuid"] for u in await stored_users(http, sandbox)) == [
        "u-0",
        "u-2",
        "u-4",
    ]


async def test_user_with_one_bad_event_is_not_stored_at_all(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    good = {"event_name": "sign_up_confirmation", "timestamp": "2024-03-01T10:00:00Z"}
    bad = {"event_name": "Bad Name", "timestamp": "2024-03-01T10:00:00Z"}
    await upsert(http, sandbox, user(attributes={"name": "Jane"}, events=[good, bad]))
    assert await stored_users(http, sandbox) == []


# --- storage semantics (§3.3, §3.6) ---------------------------------------------------


async def test_scalar_attribute_is_overwritten(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await upsert(http, sandbox, user(attributes={"name": "Jane", "age": 30}))
    await upsert(http, sandbox, user(attributes={"name": "Janet"}))
    stored = (await lookup(http, sandbox, "uuid", "u-1")).body
    assert stored["attributes"] == {"name": "Janet", "age": 30}


async def test_array_attribute_appends_by_default(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await upsert(http, sandbox, user(attributes={"list_id": [1]}))
    await upsert(http, sandbox, user(attributes={"list_id": [2, 3]}))
    stored = (await lookup(http, sandbox, "uuid", "u-1")).body
    assert stored["attributes"]["list_id"] == [1, 2, 3]


async def test_not_append_true_replaces_array_attribute(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await upsert(http, sandbox, user(attributes={"list_id": [1]}))
    await upsert(http, sandbox, user(attributes={"list_id": [2]}, not_append=True))
    stored = (await lookup(http, sandbox, "uuid", "u-1")).body
    assert stored["attributes"]["list_id"] == [2]


async def test_append_false_replaces_array_attribute(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await upsert(http, sandbox, user(attributes={"list_id": [1]}))
    await upsert(http, sandbox, user(attributes={"list_id": [2]}, append=False))
    stored = (await lookup(http, sandbox, "uuid", "u-1")).body
    assert stored["attributes"]["list_id"] == [2]


async def test_append_wins_over_not_append(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await upsert(http, sandbox, user(attributes={"list_id": [1]}))
    await upsert(http, sandbox, user(attributes={"list_id": [2]}, not_append=True, append=True))
    stored = (await lookup(http, sandbox, "uuid", "u-1")).body
    assert stored["attributes"]["list_id"] == [1, 2]


async def test_custom_array_attribute_appends_and_custom_scalar_overwrites(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await upsert(http, sandbox, user(attributes={"custom": {"tier": "silver", "tags": ["a"]}}))
    await upsert(http, sandbox, user(attributes={"custom": {"tier": "gold", "tags": ["b"]}}))
    stored = (await lookup(http, sandbox, "uuid", "u-1")).body
    assert stored["attributes"]["custom"] == {"tier": "gold", "tags": ["a", "b"]}


async def test_events_append_in_order_and_remember_skip_hook(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    first = {"event_name": "points_earned", "timestamp": "2024-03-01T10:00:00Z"}
    second = {"event_name": "points_spent", "timestamp": "2024-03-01T10:00:00Z"}
    await call(http, sandbox, UPSERT, {"users": [user(events=[first])], "skip_hook": True})
    await call(http, sandbox, UPSERT, {"users": [user(events=[first, second])]})
    events = (await lookup(http, sandbox, "uuid", "u-1")).body["events"]
    assert [(e["event_name"], e["skip_hook"]) for e in events] == [
        ("points_earned", True),
        ("points_earned", False),
        ("points_spent", False),
    ]


async def test_upsert_never_changes_an_existing_identifier_value(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await upsert(http, sandbox, by({"uuid": "u-1", "email": "a@x.com"}, age=1))
    await upsert(http, sandbox, by({"uuid": "u-1", "email": "b@x.com"}, age=2))
    users = await stored_users(http, sandbox)
    assert len(users) == 1
    assert users[0]["identifiers"] == {"uuid": "u-1", "email": "a@x.com"}
    assert users[0]["attributes"] == {"age": 2}


async def test_upsert_adds_a_new_identifier_key_to_a_matched_profile(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await upsert(http, sandbox, user())
    await upsert(
        http,
        sandbox,
        by({"uuid": "u-1", "custom": {"loyalty_id": "L-9"}}, age=1),
    )
    stored = (await lookup(http, sandbox, "custom.loyalty_id", "L-9")).body
    assert stored["identifiers"] == {"uuid": "u-1", "custom": {"loyalty_id": "L-9"}}


async def test_user_matching_by_any_identifier_updates_the_same_profile(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await upsert(http, sandbox, by({"email": "a@x.com"}, name="A"))
    await upsert(http, sandbox, by({"uuid": "u-1", "email": "a@x.com"}, age=9))
    users = await stored_users(http, sandbox)
    assert len(users) == 1
    assert users[0]["attributes"] == {"name": "A", "age": 9}


async def test_insider_id_addresses_an_existing_profile(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await upsert(http, sandbox, user())
    insider_id = (await stored_users(http, sandbox))[0]["insider_id"]
    answer = await upsert(http, sandbox, {"insider_id": insider_id, "attributes": {"age": 5}})
    assert answer.body == {"data": {"successful": {"count": 1}, "fail": {}}}
    stored = (await lookup(http, sandbox, "uuid", "u-1")).body
    assert stored["attributes"] == {"name": "Jane", "age": 5}


async def test_unknown_top_level_keys_and_headers_are_tolerated(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    headers = {**HEADERS, "X-PLATFORM-NAME": "segment"}
    body = {"users": [user()], "platform": "segment", "skip_hook": False}
    answer = await call(http, sandbox, UPSERT, body, headers=headers)
    assert answer.body == {"data": {"successful": {"count": 1}, "fail": {}}}


# --- attribute delete (§6.1) ----------------------------------------------------------


async def test_attribute_delete_removes_whole_and_partial_values(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    attributes = {
        "name": "Jane",
        "surname": "Doe",
        "email_optin": True,
        "list_id": [1, 2, 3],
        "custom": {"tier": "gold", "tags": ["v1", "v2", "v3"]},
    }
    await upsert(http, sandbox, {"identifiers": {"email": "a@b.com"}, "attributes": attributes})
    body = {
        "users": [
            {
                "identifiers": {"email": "a@b.com"},
                "whole": ["name", "email_optin"],
                "partial": {"list_id": [1, 2]},
                "custom": {"whole": ["tier"], "partial": {"tags": ["v1", "v2"]}},
            }
        ]
    }
    answer = await call(http, sandbox, ATTRIBUTE_DELETE, body)
    assert (answer.status, answer.body) == (200, {"data": {"successful": {"count": 1}, "fail": {}}})
    stored = (await lookup(http, sandbox, "email", "a@b.com")).body
    assert stored["attributes"] == {"surname": "Doe", "list_id": [3], "custom": {"tags": ["v3"]}}


async def test_attribute_delete_rejects_wrong_token_with_403(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    body = {"users": [{"identifiers": {"uuid": "u-1"}, "whole": ["name"]}]}
    headers = {"X-PARTNER-NAME": PARTNER, "X-REQUEST-TOKEN": "nope"}
    answer = await call(http, sandbox, ATTRIBUTE_DELETE, body, headers=headers)
    assert (answer.status, answer.body) == (403, ACCESS_DENIED)


# --- identity update (§6.4, §5.3) -----------------------------------------------------


async def test_identity_update_changes_the_identifier_and_answers_empty_object(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await upsert(http, sandbox, by({"email": "old@x.com"}, age=1))
    body = {"old_identifier": {"email": "old@x.com"}, "new_identifier": {"email": "new@x.com"}}
    answer = await call(http, sandbox, IDENTITY, body, method="PATCH")
    assert (answer.status, answer.body) == (200, {})
    assert (await lookup(http, sandbox, "email", "new@x.com")).body["attributes"] == {"age": 1}
    assert (await lookup(http, sandbox, "email", "old@x.com")).status == 404


async def test_identity_update_of_a_custom_identifier(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await upsert(http, sandbox, by({"custom": {"loyalty_id": "L-1"}}, age=1))
    body = {
        "old_identifier": {"custom": {"loyalty_id": "L-1"}},
        "new_identifier": {"custom": {"loyalty_id": "L-2"}},
    }
    answer = await call(http, sandbox, IDENTITY, body, method="PATCH")
    assert (answer.status, answer.body) == (200, {})
    assert (await lookup(http, sandbox, "custom.loyalty_id", "L-2")).status == 200


async def test_identity_update_with_same_values_is_400(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await upsert(http, sandbox, by({"email": "a@x.com"}, age=1))
    body = {"old_identifier": {"email": "a@x.com"}, "new_identifier": {"email": "a@x.com"}}
    answer = await call(http, sandbox, IDENTITY, body, method="PATCH")
    assert answer.status == 400
    assert answer.body == {"error": "identifier values are the same: bad request"}


async def test_identity_update_with_two_entries_is_400(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    body = {
        "old_identifier": {"email": "a@x.com", "uuid": "u-1"},
        "new_identifier": {"email": "b@x.com"},
    }
    answer = await call(http, sandbox, IDENTITY, body, method="PATCH")
    assert answer.status == 400
    assert answer.body == {
        "error": "there must be exactly 1 entry for both new and old identifiers: bad request"
    }


async def test_identity_update_to_an_identifier_already_in_use_is_400(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await upsert(http, sandbox, by({"email": "a@x.com"}, age=1))
    await upsert(http, sandbox, by({"email": "b@x.com"}, age=2))
    body = {"old_identifier": {"email": "a@x.com"}, "new_identifier": {"email": "b@x.com"}}
    answer = await call(http, sandbox, IDENTITY, body, method="PATCH")
    assert answer.status == 400
    assert answer.body == {"error": "new identifier already has a user assigned to it: bad request"}


# --- rate limiting (§4, §5.3, §5.4) ---------------------------------------------------


async def test_rate_limit_answers_429_without_retry_after_by_default(
    make_sandbox: SandboxFactory, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(rate_limit_per_minute=2)
    statuses = [(await upsert(http, sandbox, user())).status for _ in range(2)]
    answer = await upsert(http, sandbox, user())
    assert statuses == [200, 200]
    assert (answer.status, answer.body) == (429, TOO_MANY)
    assert "Retry-After" not in answer.headers


async def test_rate_limit_sends_retry_after_when_configured(
    make_sandbox: SandboxFactory, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(rate_limit_per_minute=1, rate_limit_retry_after="30")
    await upsert(http, sandbox, user())
    answer = await upsert(http, sandbox, user())
    assert (answer.status, answer.body) == (429, TOO_MANY)
    assert answer.headers["Retry-After"] == "30"


async def test_rate_limit_is_shared_by_upsert_and_attribute_delete(
    make_sandbox: SandboxFactory, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(rate_limit_per_minute=1)
    await upsert(http, sandbox, user())
    body = {"users": [{"identifiers": {"uuid": "u-1"}, "whole": ["name"]}]}
    answer = await call(http, sandbox, ATTRIBUTE_DELETE, body)
    assert (answer.status, answer.body) == (429, TOO_MANY)


async def test_rate_limit_zero_disables_limiting(
    make_sandbox: SandboxFactory, http: aiohttp.ClientSession
) -> None:
    sandbox = await make_sandbox(rate_limit_per_minute=0)
    statuses = {(await upsert(http, sandbox, user())).status for _ in range(5)}
    assert statuses == {200}


# --- fault injection and run-time config (§5.3, §9.7) ---------------------------------


async def test_fault_503_is_served_count_times_then_service_recovers(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    answer = await add_fault(http, sandbox, status=503, count=2, retry_after="2")
    assert answer.status == 200
    first = await upsert(http, sandbox, user())
    second = await upsert(http, sandbox, user())
    third = await upsert(http, sandbox, user())
    assert [first.status, second.status, third.status] == [503, 503, 200]
    assert first.headers["Retry-After"] == "2"
    assert third.body == {"data": {"successful": {"count": 1}, "fail": {}}}
    assert len(await stored_users(http, sandbox)) == 1


async def test_fault_500_and_429_get_documented_bodies(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await add_fault(http, sandbox, status=500)
    await add_fault(http, sandbox, status=429)
    server_error = await upsert(http, sandbox, user())
    too_many = await upsert(http, sandbox, user())
    assert (server_error.status, server_error.body) == (500, UNKNOWN_ERROR)
    assert (too_many.status, too_many.body) == (429, TOO_MANY)


async def test_fault_with_explicit_body_answers_that_body(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await call(http, sandbox, "/sandbox/faults", {"status": 401, "body": {"x": 1}}, headers={})
    answer = await upsert(http, sandbox, user())
    assert (answer.status, answer.body) == (401, {"x": 1})


async def test_reset_fault_makes_the_client_see_a_connection_error(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await add_fault(http, sandbox, status=0, count=1)
    with pytest.raises(aiohttp.ClientConnectionError):
        await upsert(http, sandbox, user())
    assert (await upsert(http, sandbox, user())).status == 200


async def test_applied_fault_stores_the_request_before_failing(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await add_fault(http, sandbox, status=504, apply=True)
    event = {"event_name": "points_earned", "timestamp": "2024-03-01T10:00:00Z"}
    answer = await upsert(http, sandbox, user(events=[event]))
    assert answer.status == 504
    assert len((await lookup(http, sandbox, "uuid", "u-1")).body["events"]) == 1


async def test_delete_faults_clears_the_queue(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await add_fault(http, sandbox, status=503, count=5)
    await call(http, sandbox, "/sandbox/faults", method="DELETE", headers={})
    assert (await upsert(http, sandbox, user())).status == 200


async def test_fault_with_invalid_status_is_refused(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    answer = await add_fault(http, sandbox, status=42)
    assert answer.status == 400


async def test_runtime_config_changes_the_expected_token(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    answer = await call(http, sandbox, "/sandbox/config", {"api_key": "rotated"}, headers={})
    assert answer.status == 200
    assert (await upsert(http, sandbox, user())).status == 403
    headers = {"X-PARTNER-NAME": PARTNER, "X-REQUEST-TOKEN": "rotated"}
    assert (await call(http, sandbox, UPSERT, {"users": [user()]}, headers=headers)).status == 200


async def test_runtime_config_refuses_uppercase_partner(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    answer = await call(http, sandbox, "/sandbox/config", {"partner_name": "Tidegate"}, headers={})
    assert answer.status == 400


async def test_runtime_config_latency_delays_answers(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await call(http, sandbox, "/sandbox/config", {"latency_ms": 200}, headers={})
    started = time.monotonic()
    await upsert(http, sandbox, user())
    assert time.monotonic() - started >= 0.2


async def test_runtime_config_rate_limit_applies(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await call(http, sandbox, "/sandbox/config", {"rate_limit_per_minute": 1}, headers={})
    await upsert(http, sandbox, user())
    assert (await upsert(http, sandbox, user())).status == 429


# --- read-back -------------------------------------------------------------------------


async def test_requests_log_lists_api_requests_in_order_with_token_redacted(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await upsert(http, sandbox, user())
    await call(http, sandbox, UPSERT, {"skip_hook": True})
    log = await request_log(http, sandbox)
    assert [(r["method"], r["path"], r["status"]) for r in log] == [
        ("POST", UPSERT, 200),
        ("POST", UPSERT, 400),
    ]
    assert log[0]["headers"]["X-REQUEST-TOKEN"] == "***"
    assert log[0]["headers"]["X-PARTNER-NAME"] == PARTNER
    assert log[0]["body"] == {"users": [user()]}
    assert log[1]["body"] == {"skip_hook": True}


async def test_requests_log_keeps_invalid_json_body_as_null(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    headers = {**HEADERS, "Content-Type": "application/json"}
    await call(http, sandbox, UPSERT, data=b"{nope", headers=headers)
    log = await request_log(http, sandbox)
    assert log[0]["body"] is None
    assert log[0]["status"] == 400


async def test_lookup_by_custom_identifier_and_404_for_unknown(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await upsert(http, sandbox, by({"custom": {"loyalty_id": "L-9"}}, age=1))
    found = await lookup(http, sandbox, "custom.loyalty_id", "L-9")
    assert found.status == 200
    assert found.body["identifiers"] == {"custom": {"loyalty_id": "L-9"}}
    assert (await lookup(http, sandbox, "uuid", "missing")).status == 404


async def test_delete_state_resets_users_requests_and_faults(
    sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await upsert(http, sandbox, user())
    await add_fault(http, sandbox, status=503, count=3)
    answer = await call(http, sandbox, "/sandbox/state", method="DELETE", headers={})
    assert answer.status == 200
    assert await stored_users(http, sandbox) == []
    log = await request_log(http, sandbox)
    assert log == []
    assert (await upsert(http, sandbox, user())).status == 200


# --- the blocking entry point ------------------------------------------------------------


async def test_run_sandbox_prints_url_and_serves_until_interrupted(
    http: aiohttp.ClientSession,
) -> None:
    code = (
        "from plugins.insider.sandbox import SandboxConfig, run_sandbox\n"
        "run_sandbox('127.0.0.1', 0, SandboxConfig(api_key='k-1'))\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-u",
        "-c",
        code,
        stdout=asyncio.subprocess.PIPE,
        # Ctrl-C must reach it even when this run inherited SIGINT ignored (a background
        # job of a non-interactive shell), which the child would inherit in turn.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 20)).decode()
        url = next(word for word in line.split() if word.startswith("http://"))
        assert "tidegate" in line and "k-1" in line
        headers = {"X-PARTNER-NAME": PARTNER, "X-REQUEST-TOKEN": "k-1"}
        async with http.post(url + UPSERT, json={"users": [user()]}, headers=headers) as response:
            assert response.status == 200
        process.send_signal(2)  # SIGINT, as Ctrl-C would
        assert await asyncio.wait_for(process.wait(), 20) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
