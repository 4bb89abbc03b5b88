"""Ingest's stored result, row by row: dedupe, profiles, external IDs, routing and order.

Drives ``Ingestor`` directly with several connections that want different actions and
attributes, and compares every queued row, the counts and the connections reported as
touched with what ingest is specified to store.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.connector.records import CustomerIdMapping
from engine.ingest.ingestor import Ingestor, IngestResult
from engine.ingest.parse import parse_request
from engine.plugins import Connectors, plugin_manager
from engine.queue.items import event_from_payload, event_payload
from engine.queue.lanes import DurableQueue
from engine.state.connections import ConnectionRegistry
from engine.state.database import Database
from engine.state.secrets import SecretBox
from tests.conftest import TEST_DESTINATIONS

T1 = "2026-03-01T10:00:00+00:00"
T2 = "2026-03-01T11:00:00+00:00"


async def real_registry(db: Database, data_dir: Path) -> ConnectionRegistry:
    """The real registry, with three Insider connections that want different actions and
    attributes: a identifies by Antavo's customer ID, b by email, c wants nothing."""
    registry = ConnectionRegistry(
        db, Connectors(plugin_manager(), TEST_DESTINATIONS), SecretBox.for_data_dir(data_dir)
    )
    await registry.load()
    for cid, id_attribute, id_target, attributes, actions in [
        ("a", "customer_id", "uuid", ["email", "tier"], ["checkout", "point_add"]),
        ("b", "email", "email", ["first_name"], ["checkout", "visit"]),
        ("c", "customer_id", "uuid", [], []),
    ]:
        await registry.create(
            connection_id=cid,
            display_name="",
            connector="insider",
            settings={"partner_name": "acme", "base_url": "http://127.0.0.1:9"},
            api_key="k",
            customer_id_mapping=CustomerIdMapping(id_attribute, id_target),
        )
        for attribute in attributes:
            default = attribute == "email"
            await registry.add_profile_mapping(cid, attribute, attribute, custom=not default)
        for action in actions:
            await registry.add_event_mapping(cid, action, action, ())
    return registry


class Run:
    def __init__(self, db: Database, ingestor: Ingestor, touched: list[set[str]]) -> None:
        self.db = db
        self.ingestor = ingestor
        self.touched = touched

    async def ingest(self, *events: dict[str, Any]) -> IngestResult:
        return await self.ingestor.ingest(parse_request({"events": list(events)}))

    async def rows(self) -> list[tuple[Any, ...]]:
        found = await self.db.read(
            lambda c: c.execute(
                "SELECT connection_id, customer_id, kind, event_id, payload FROM queue ORDER BY seq"
            ).fetchall()
        )
        rows = [
            (cid, customer, kind, eid, orjson.loads(p)) for cid, customer, kind, eid, p in found
        ]
        await self.db.write(lambda c: c.execute("DELETE FROM queue"))
        return rows


@pytest.fixture
async def run(tmp_path: Path) -> AsyncIterator[Run]:
    db = Database(tmp_path / "state.sqlite3")
    await db.start()
    touched: list[set[str]] = []
    try:
        registry = await real_registry(db, tmp_path)
        ingestor = Ingestor(db, registry, DurableQueue(db), touched.append)
        await ingestor.load()
        yield Run(db, ingestor, touched)
    finally:
        await db.close()


def ev(customer: str, action: str, **fields: Any) -> dict[str, Any]:
    return {"customer": customer, "action": action, "timestamp": T1, **fields}


FIRST_REQUEST = [
    ev("c1", "opt_in", id="p1", data={"email": "one@x.io", "tier": "gold", "shoe": 42}),
    ev("c1", "checkout", id="e1", data={"transaction_id": "T1"}),
    ev("c2", "checkout", data={"transaction_id": "T2"}),  # no id: a content hash
    ev("c1", "checkout", id="e1", data={"transaction_id": "T1"}),  # re-sent in the request
    ev("c1", "point_add", id="e2", data={"points": 5}, account="acc-1"),
    ev("c1", "visit", id="e3", timestamp=T2),
    ev("c1", "unmapped", id="e4", data={"x": 1}),
    ev("one@x.io", "checkout", id="e5", external_id="email", data={"transaction_id": "T5"}),
    ev("new@x.io", "visit", id="e6", external_id="email"),
    ev("c3", "profile", id="p2", data={"first_name": "Ann", "tier": None}),
    ev("c1", "profile", id="p3", data={"tier": None, "email": "two@x.io"}),
    ev("c1", "profile", id="p4", data={"tier": "silver", "email": "two@x.io"}),
    ev("c2", "point_add", data={"points": 1}),
]

ONE = {"email": "one@x.io"}
TWO = {"email": "two@x.io"}


def event_row(
    cid: str,
    customer: str,
    event_id: str,
    action: str,
    data: dict[str, Any],
    identity: dict[str, Any] | None = None,
    timestamp: str = T1,
    external_id: str = "",
    account: str = "",
) -> tuple[Any, ...]:
    payload: dict[str, Any] = {
        "id": event_id,
        "action": action,
        "data": data,
        "timestamp": timestamp,
    }
    # Empty (the default) is left out.
    if external_id:
        payload["external_id"] = external_id
    if account:
        payload["account"] = account
    if identity:
        payload["identity"] = identity
    return (cid, customer, "event", event_id, payload)


def profile_row(
    cid: str,
    customer: str,
    event_id: str,
    changes: dict[str, Any],
    previous: dict[str, Any],
    identity: dict[str, Any] | None = None,
) -> tuple[Any, ...]:
    payload = {"changes": changes, "previous": previous, "timestamp": T1}
    if identity:
        payload["identity"] = identity
    return (cid, customer, "profile", event_id, payload)


def content_id(event: dict[str, Any]) -> str:
    [parsed] = parse_request(event)
    return parsed.id


async def test_each_interested_connection_gets_each_new_record_in_order(run: Run) -> None:
    result = await run.ingest(*FIRST_REQUEST)
    assert result == IngestResult(accepted=12, duplicates=1, deliveries_queued=16)
    h2 = content_id(FIRST_REQUEST[2])
    h12 = content_id(FIRST_REQUEST[12])
    assert h2.startswith("sha256:") and h12.startswith("sha256:")
    first_profile = {"email": "one@x.io", "shoe": 42, "tier": "gold"}
    assert await run.rows() == [
        profile_row("a", "c1", "p1", first_profile, {}, ONE),
        profile_row("b", "c1", "p1", first_profile, {}, ONE),
        event_row("a", "c1", "e1", "checkout", {"transaction_id": "T1"}, ONE),
        event_row("b", "c1", "e1", "checkout", {"transaction_id": "T1"}, ONE),
        event_row("a", "c2", h2, "checkout", {"transaction_id": "T2"}),
        event_row("b", "c2", h2, "checkout", {"transaction_id": "T2"}),
        event_row("a", "c1", "e2", "point_add", {"points": 5}, ONE, account="acc-1"),
        event_row("b", "c1", "e3", "visit", {}, ONE, timestamp=T2),
        # e4's action is mapped nowhere: accepted, not queued.
        event_row("a", "c1", "e5", "checkout", {"transaction_id": "T5"}, ONE, external_id="email"),
        event_row("b", "c1", "e5", "checkout", {"transaction_id": "T5"}, ONE, external_id="email"),
        # An unknown external-ID value keys a profile of its own.
        event_row("b", "new@x.io", "e6", "visit", {}, {"email": "new@x.io"}, external_id="email"),
        # Clearing an attribute the customer never had is no change.
        profile_row("b", "c3", "p2", {"first_name": "Ann"}, {}),
        profile_row(
            "a",
            "c1",
            "p3",
            {"tier": None, "email": "two@x.io"},
            {"tier": "gold", "email": "one@x.io"},
            TWO,
        ),
        profile_row(
            "b",
            "c1",
            "p3",
            {"tier": None, "email": "two@x.io"},
            {"tier": "gold", "email": "one@x.io"},
            TWO,
        ),
        profile_row("a", "c1", "p4", {"tier": "silver"}, {}, TWO),
        event_row("a", "c2", h12, "point_add", {"points": 1}),
    ]
    assert run.touched == [{"a", "b"}]

    # The old external-ID value no longer resolves to c1; the new one does.
    result = await run.ingest(
        FIRST_REQUEST[1],  # re-sent: id seen
        FIRST_REQUEST[2],  # re-sent: same content
        ev("two@x.io", "point_add", id="e7", external_id="email", data={"points": 2}),
        ev("c4", "checkout", id="e8", external_id="", account="", data={}),
    )
    assert result == IngestResult(accepted=2, duplicates=2, deliveries_queued=3)
    assert await run.rows() == [
        event_row("a", "c1", "e7", "point_add", {"points": 2}, TWO, external_id="email"),
        event_row("a", "c4", "e8", "checkout", {}),
        event_row("b", "c4", "e8", "checkout", {}),
    ]
    assert run.touched == [{"a", "b"}, {"a", "b"}]

    # Only connection b wants visits; nobody wants point_add from a duplicate.
    result = await run.ingest(ev("c5", "visit", id="e9"), FIRST_REQUEST[4])
    assert result == IngestResult(accepted=1, duplicates=1, deliveries_queued=1)
    assert await run.rows() == [event_row("b", "c5", "e9", "visit", {})]
    assert run.touched[-1] == {"b"}

    # Nothing routed: on_enqueued is not called.
    result = await run.ingest(ev("c5", "unmapped", id="e10"))
    assert result == IngestResult(accepted=1, duplicates=0, deliveries_queued=0)
    assert len(run.touched) == 3


async def test_a_resend_counts_as_a_duplicate_within_its_window(run: Run) -> None:
    by_content = ev("c1", "point_add", data={"points": 3})
    by_id = ev("c1", "point_add", id="e1", data={"points": 4})
    assert (await run.ingest(by_content, by_id)).accepted == 2
    assert (await run.ingest(by_content, by_id)).duplicates == 2
    await run.rows()

    # Two days later: past the content window (a day), within the id window (30 days).
    await run.db.write(
        lambda c: c.execute("UPDATE seen_events SET receive_time = receive_time - 2 * 86400")
    )
    result = await run.ingest(by_content, by_id)
    assert result == IngestResult(accepted=1, duplicates=1, deliveries_queued=1)
    assert await run.rows() == [
        event_row("a", "c1", content_id(by_content), "point_add", {"points": 3})
    ]

    # 31 days later: past both.
    await run.db.write(
        lambda c: c.execute("UPDATE seen_events SET receive_time = receive_time - 31 * 86400")
    )
    result = await run.ingest(by_content, by_id)
    assert result == IngestResult(accepted=2, duplicates=0, deliveries_queued=2)


async def test_ids_of_any_form_are_deduplicated_in_large_requests(run: Run) -> None:
    odd = ["12", "1e3", 'q"uote', "back\\slash", "ü ñ 字", " ", "x" * 256, "null", "[1]"]
    many = [ev(f"c{n % 7}", "visit", id=f"evt-{n}") for n in range(10_000)]
    first = [ev("c1", "visit", id=i) for i in odd] + many[: 10_000 - len(odd)]
    assert (await run.ingest(*first)).accepted == 10_000
    again = [ev("c1", "visit", id=i) for i in odd] + many[5_000:] + [ev("c1", "visit", id="new")]
    result = await run.ingest(*again)
    # Duplicates: the odd ids and evt-5000 .. evt-9990; new: evt-9991 .. evt-9999 and "new".
    assert result == IngestResult(accepted=10, duplicates=5_000, deliveries_queued=10)
    new_ids = {row[3] for row in await run.rows()}
    assert {"new", *(f"evt-{n}" for n in range(10_000 - len(odd), 10_000))} <= new_ids


def test_event_from_payload_reads_payloads_of_either_form() -> None:
    [plain, full] = parse_request(
        {
            "events": [
                ev("c1", "checkout", id="e1", data={"total": 1}),
                ev("c1", "checkout", id="e2", external_id="email", account="acc"),
            ]
        }
    )
    written_before = {
        "id": "e1",
        "action": "checkout",
        "data": {"total": 1},
        "timestamp": T1,
        "external_id": "",
        "account": "",
    }
    assert event_from_payload("c1", written_before) == plain
    for event in (plain, full):
        queued = orjson.loads(orjson.dumps(event_payload(event)))
        assert event_from_payload("c1", queued) == event
    assert "external_id" not in orjson.loads(orjson.dumps(event_payload(plain)))
