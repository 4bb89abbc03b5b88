"""The sandbox's switches for Insider behaviour the reference marks UNCONFIRMED
(``insider-ucd-api.md`` §3.5 types, §3.6 de-duplication, §3.7 purchase quantity), each
exercised in both positions over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from plugins.insider.sandbox import RunningSandbox, SandboxConfig, start_sandbox
from tests.test_sandbox import call, fail_errors, purchase, stored_users, upsert, user

PAID = {"event_group_id": "ORD-1", "unit_sale_price": 99.0, "currency": "USD"}


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningSandbox]:
    # The default partner and key, which tests.test_sandbox's helpers send.
    running = await start_sandbox(config=SandboxConfig())
    yield running
    await running.close()


async def configure(http: aiohttp.ClientSession, sandbox: RunningSandbox, **changes: Any) -> None:
    answer = await call(http, sandbox, "/sandbox/config", changes, headers={})
    assert answer.status == 200, answer.body


@pytest.mark.parametrize(
    ("attributes", "key", "message"),
    [
        ({"age": "34"}, "users.0.attributes.age.*.type(number)", "age must be number: 34"),
        (
            {"gender": "female"},
            "users.0.attributes.gender.*.type(gender)",
            "gender must be gender: female",
        ),
        (
            {"email_optin": "Yes"},
            "users.0.attributes.email_optin.*.type(boolean)",
            "email_optin must be boolean: Yes",
        ),
        (
            {"country": "Hungary"},
            "users.0.attributes.country.*.type(country)",
            "country must be country: Hungary",
        ),
        (
            {"list_id": ["12"]},
            "users.0.attributes.list_id.*.type(number_array)",
            'list_id must be number_array: ["12"]',
        ),
    ],
)
async def test_strict_types_fail_a_default_attribute_of_the_wrong_type(
    http: aiohttp.ClientSession,
    sandbox: RunningSandbox,
    attributes: dict[str, Any],
    key: str,
    message: str,
) -> None:
    answer = await upsert(http, sandbox, user(attributes=attributes))

    assert fail_errors(answer) == {key: [message]}


async def test_strict_types_fail_an_event_parameter_of_the_wrong_type(
    http: aiohttp.ClientSession, sandbox: RunningSandbox
) -> None:
    event = purchase(**{**PAID, "quantity": "2"})

    answer = await upsert(http, sandbox, user(events=[event]))

    assert fail_errors(answer) == {
        "users.0.events.0.event_params.quantity.*.type(integer)": ["quantity must be integer: 2"]
    }


async def test_without_strict_types_a_wrong_type_is_stored(
    http: aiohttp.ClientSession, sandbox: RunningSandbox
) -> None:
    await configure(http, sandbox, strict_types=False)

    answer = await upsert(http, sandbox, user(attributes={"age": "34"}))

    assert answer.body["data"]["fail"] == {}
    assert (await stored_users(http, sandbox))[0]["attributes"] == {"age": "34"}


async def test_purchase_without_quantity_passes_by_default(
    http: aiohttp.ClientSession, sandbox: RunningSandbox
) -> None:
    answer = await upsert(http, sandbox, user(events=[purchase(**PAID)]))

    assert answer.body["data"] == {"successful": {"count": 1}, "fail": {}}


async def test_purchase_without_quantity_fails_when_quantity_is_required(
    http: aiohttp.ClientSession, sandbox: RunningSandbox
) -> None:
    await configure(http, sandbox, require_purchase_quantity=True)

    answer = await upsert(http, sandbox, user(events=[purchase(**PAID)]))

    assert fail_errors(answer) == {
        "users.0.events.0.event_params.*.required": [
            "quantity parameter is required on purchase event"
        ]
    }


@pytest.mark.parametrize(("collapse", "stored"), [(False, 2), (True, 1)])
async def test_identical_events_are_collapsed_only_when_configured(
    http: aiohttp.ClientSession, sandbox: RunningSandbox, collapse: bool, stored: int
) -> None:
    await configure(http, sandbox, collapse_identical_events=collapse)
    line = purchase(**PAID, product_id="SKU-1")
    next_second = {**line, "timestamp": "2024-03-01T10:00:01Z"}

    await upsert(http, sandbox, user(events=[line]))
    await upsert(http, sandbox, user(events=[line, next_second]))

    events = (await stored_users(http, sandbox))[0]["events"]
    assert len(events) == stored + 1  # lines with distinct timestamps are never collapsed
