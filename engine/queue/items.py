"""The queued item: what ingest and replay put in a lane and what delivery claims.

This module is the one place that knows an item's row and payload formats. An ``event``
item's payload is the Antavo event (``event_payload``); a ``profile`` item's holds the
changed attributes, their previous values and the time; a ``rendered`` item's is a
destination fragment kept from a dead letter and resent as it was. Any of the first two
may carry ``identity``: the identifying attributes as they were at ingest.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import orjson

from engine.connector.records import AntavoEvent, ProfileChange

KIND_EVENT = "event"
KIND_PROFILE = "profile"
KIND_RENDERED = "rendered"
"""A destination fragment kept from a dead letter, resent as it was ("stored request")."""
ORIGIN_REPLAY = "replay"
ORIGIN_REPLAY_STORED = "replay-stored"


class QueueItem(NamedTuple):
    """One queued item as ``DurableQueue.claim`` hands it out. A named tuple: immutable,
    and cheap to build per claimed row (bench/results/2026-11-27-hotspots.md)."""

    seq: int
    connection_id: str
    customer_id: str
    kind: str
    event_id: str
    payload: dict[str, Any]
    enqueue_time: float
    attempts: int
    first_attempt_time: float | None
    origin: str = ""


NewItem = tuple[str, str, str, str, bytes, float, float, str]
"""An item to add to a lane, in ``INSERT_ITEM``'s column order: connection id, customer
id, kind, event id, the payload's JSON, enqueue time, next attempt time, origin. A plain
tuple: SQLite binds a named tuple's fields several times slower (bench.ingest_cpu)."""


INSERT_ITEM = (
    "INSERT INTO queue (connection_id, customer_id, kind, event_id, payload, enqueue_time,"
    " next_attempt_time, origin) VALUES (?,?,?,?,?,?,?,?)"
)


def new_items(
    connection_ids: Iterable[str],
    customer_id: str,
    kind: str,
    event_id: str,
    payload: bytes,
    now: float,
    origin: str = "",
) -> list[NewItem]:
    """One item of the same record for each of ``connection_ids``, ready now."""
    return [
        (connection_id, customer_id, kind, event_id, payload, now, now, origin)
        for connection_id in connection_ids
    ]


def enqueue_rows(c: sqlite3.Connection, rows: Sequence[NewItem]) -> None:
    """Adds items at the end of their lanes, in order, inside the caller's transaction."""
    c.executemany(INSERT_ITEM, rows)


def enqueue(
    c: sqlite3.Connection,
    connection_id: str,
    customer_id: str,
    kind: str,
    event_id: str,
    payload: Mapping[str, Any],
    now: float,
    origin: str = "",
) -> None:
    """Adds one item inside the caller's transaction (tests and tools; ingest adds a
    request's items with ``enqueue_rows``)."""
    enqueue_rows(
        c,
        new_items([connection_id], customer_id, kind, event_id, orjson.dumps(payload), now, origin),
    )


def event_payload(event: AntavoEvent) -> dict[str, Any]:
    """The queued form of an event; orjson writes the timestamp as ``isoformat()`` does.

    ``external_id`` and ``account`` are left out when empty, their default (a dead
    letter's ``record_json`` is this payload, so it leaves them out too).
    """
    fields: dict[str, Any] = {
        "id": event.id,
        "action": event.action,
        "data": event.data,
        "timestamp": event.timestamp,
    }
    if event.external_id:
        fields["external_id"] = event.external_id
    if event.account:
        fields["account"] = event.account
    return fields


def profile_payload(
    changes: Mapping[str, Any], previous: Mapping[str, Any], timestamp: datetime
) -> dict[str, Any]:
    """The queued form of a profile change (``identity`` may be added to it)."""
    return {"changes": changes, "previous": previous, "timestamp": timestamp}


def change_from_payload(payload: Mapping[str, Any]) -> ProfileChange:
    """The profile change from its queued form."""
    return ProfileChange(
        payload["changes"],
        datetime.fromisoformat(payload["timestamp"]),
        payload.get("previous", {}),
    )


def event_from_payload(customer_id: str, payload: Mapping[str, Any]) -> AntavoEvent:
    """The event from its queued form. Empty ``external_id`` and ``account`` may be
    present or absent."""
    get = payload.get
    return AntavoEvent(
        payload["id"],
        customer_id,
        payload["action"],
        payload["data"],
        datetime.fromisoformat(payload["timestamp"]),
        get("external_id", ""),
        get("account", ""),
    )
