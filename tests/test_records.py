"""The plugin-facing records built per item keep the dataclass contract: fields,
defaults, equality, hashing, immutability, ``replace`` and pickling."""

from __future__ import annotations

import dataclasses
import pickle
from datetime import UTC, datetime

import pytest

from engine.connector.records import AntavoEvent, Customer, HttpResponse, ProfileChange
from engine.outbound_log.rows import LogCustomer

MOMENT = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)


def test_records_compare_hash_and_print_by_their_fields() -> None:
    event = AntavoEvent("e1", "c1", "checkout", {"total": 1}, MOMENT)
    same = AntavoEvent(
        id="e1", customer="c1", action="checkout", data={"total": 1}, timestamp=MOMENT
    )
    assert event == same
    assert event != dataclasses.replace(event, account="acme")
    assert (event.external_id, event.account) == ("", "")
    assert repr(event) == (
        "AntavoEvent(id='e1', customer='c1', action='checkout', data={'total': 1}, "
        f"timestamp={MOMENT!r}, external_id='', account='')"
    )
    assert [f.name for f in dataclasses.fields(event)] == [
        "id", "customer", "action", "data", "timestamp", "external_id", "account"
    ]  # fmt: skip
    with pytest.raises(TypeError):  # hashed by fields, as before: a dict field cannot be
        hash(Customer("c1"))
    assert ProfileChange({"tier": "gold"}, MOMENT) == ProfileChange({"tier": "gold"}, MOMENT, {})


def test_records_stay_immutable() -> None:
    for record in (
        Customer("c1", {"first_name": "Anna"}),
        AntavoEvent("e1", "c1", "checkout", {}, MOMENT),
        ProfileChange({"tier": "gold"}, MOMENT),
    ):
        with pytest.raises(dataclasses.FrozenInstanceError):
            record.id = "other"  # type: ignore[misc,union-attr]
        with pytest.raises(dataclasses.FrozenInstanceError):
            del record.timestamp  # type: ignore[misc,union-attr]


def test_default_mappings_are_fresh_per_record() -> None:
    a, b = Customer("a"), Customer("b")
    assert a.attributes == {} and a.attributes is not b.attributes
    first, second = ProfileChange({}, MOMENT), ProfileChange({}, MOMENT)
    assert first.previous == {} and first.previous is not second.previous


def test_records_survive_replace_and_pickle() -> None:
    customer = Customer("c1", {"first_name": "Anna", "last_name": "Kovács"})
    assert customer.name == "Anna Kovács"
    assert dataclasses.replace(customer, id="c2") == Customer("c2", customer.attributes)
    event = AntavoEvent("e1", "c1", "point_add", {"points": 5}, MOMENT, "email", "acme")
    change = ProfileChange({"tier": None}, MOMENT, {"tier": "gold"})
    for record in (customer, event, change):
        assert pickle.loads(pickle.dumps(record)) == record


def test_log_customers_keep_the_dataclass_contract() -> None:
    customer = LogCustomer("c1", "Anna Kovács", "failed", "rejected")
    assert customer == LogCustomer(
        customer_id="c1", name="Anna Kovács", outcome="failed", error="rejected"
    )
    assert hash(customer) == hash(LogCustomer("c1", "Anna Kovács", "failed", "rejected"))
    assert LogCustomer("c2") == LogCustomer("c2", "", "delivered", "")
    assert dataclasses.asdict(customer) == {
        "customer_id": "c1", "name": "Anna Kovács", "outcome": "failed", "error": "rejected"
    }  # fmt: skip
    assert dataclasses.replace(customer, outcome="retry").outcome == "retry"
    assert pickle.loads(pickle.dumps(customer)) == customer
    with pytest.raises(dataclasses.FrozenInstanceError):
        customer.outcome = "delivered"  # type: ignore[misc]


def test_a_responses_headers_are_read_case_insensitively() -> None:
    response = HttpResponse(429, {"Retry-After": "30", "X-RateLimit-Remaining": "0"}, b"", 0.1)

    assert response.headers.get("retry-after") == "30"
    assert response.headers["x-ratelimit-remaining"] == "0"
    assert response == HttpResponse(
        429, {"retry-after": "30", "X-RateLimit-Remaining": "0"}, b"", 0.1
    )
