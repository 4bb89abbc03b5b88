"""What the benchmarks send: Antavo events for ingest, Insider upsert bodies for the
bare-client baselines, and the connection (with mappings) that routes one to the other.

Every event is a ``checkout`` mapped to Insider's ``purchase`` with four parameters, so
the upsert bodies built here have the shape the Insider plugin renders for the same
events, and the baselines post what Tidegate would post.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson

from bench.sink import API_KEY, PARTNER_NAME
from clients.client import TidegateClient

CONNECTION_ID = "bench"
SOURCE_EVENT = "checkout"
TARGET_EVENT = "purchase"
PARAMETERS = [
    ("transaction_id", "event_group_id", False),
    ("total", "unit_sale_price", False),
    ("currency", "currency", False),
    ("store", "store_code", True),
    ("bench_id", "bench_id", True),
]


async def create_connection(
    grpc_target: str, base_url: str, api_key: str = API_KEY, *, token: str = ""
) -> None:
    """The bench connection: Antavo customer ID -> Insider ``uuid``, ``checkout`` mapped.
    With another ``api_key`` the sink answers 403 and the engine pauses the connection.
    ``token``: the engine's admin token (``start_engine``'s ``extra["token"]``)."""
    async with TidegateClient(grpc_target, token) as client:
        await client.create_connection(
            CONNECTION_ID,
            api_key=api_key,
            settings={"partner_name": PARTNER_NAME, "base_url": base_url},
        )
        await client.create_event_mapping(CONNECTION_ID, SOURCE_EVENT, TARGET_EVENT, PARAMETERS)


BRAZE_EVENT = "checkout_completed"
BRAZE_PROPERTIES = [
    ("transaction_id", "order_id", False),
    ("total", "total", False),
    ("currency", "currency", False),
    ("store", "store_code", False),
    ("bench_id", "bench_id", False),
]


async def create_braze_connection(grpc_target: str, base_url: str, *, token: str = "") -> None:
    """The bench connection for Braze: Antavo customer ID -> ``external_id``, ``checkout``
    mapped to a custom event with the same five values as properties (one object per
    event, as Insider's is one event per checkout). ``token`` as for ``create_connection``."""
    async with TidegateClient(grpc_target, token) as client:
        await client.create_connection(
            CONNECTION_ID,
            connector="braze",
            api_key=API_KEY,
            settings={"rest_endpoint": base_url},
            target_identifier="external_id",
        )
        await client.create_event_mapping(
            CONNECTION_ID, SOURCE_EVENT, BRAZE_EVENT, BRAZE_PROPERTIES
        )


def antavo_event(number: int, customer: str, bench_id: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "transaction_id": f"ORD-{number}",
        "total": 129.9,
        "currency": "EUR",
        "store": "BUD-01",
    }
    if bench_id is not None:
        data["bench_id"] = bench_id
    return {
        "id": f"evt-{number}",
        "customer": customer,
        "action": SOURCE_EVENT,
        "timestamp": datetime.now(UTC).isoformat(),
        "data": data,
    }


def ingest_bodies(
    batch: int, customers: int, seed: int = 1, start: int = 0
) -> Iterator[tuple[bytes, int]]:
    """Endless ingest bodies of ``batch`` events each, for customers drawn at random from a
    pool of ``customers``; yields (body, events in it)."""
    rng = random.Random(seed)
    number = start
    while True:
        events = []
        for _ in range(batch):
            events.append(antavo_event(number, f"cust-{rng.randrange(customers)}"))
            number += 1
        yield orjson.dumps({"events": events}), batch


def insider_user(number: int) -> dict[str, Any]:
    """One upsert user as the Insider plugin renders a mapped checkout."""
    return {
        "identifiers": {"uuid": f"cust-{number}"},
        "events": [
            {
                "event_name": TARGET_EVENT,
                "timestamp": "2026-01-01T12:00:00.123Z",
                "event_params": {
                    "event_group_id": f"ORD-{number}",
                    "unit_sale_price": 129.9,
                    "currency": "EUR",
                    "custom": {"store_code": "BUD-01"},
                },
            }
        ],
    }


def upsert_body(users: int, first: int = 0) -> bytes:
    return orjson.dumps({"users": [insider_user(first + n) for n in range(users)]})


UPSERT_HEADERS = {
    "X-PARTNER-NAME": PARTNER_NAME,
    "X-REQUEST-TOKEN": API_KEY,
    "Content-Type": "application/json",
}
