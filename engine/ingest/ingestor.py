"""Ingest: drop re-sent duplicates, keep customer profiles, and queue one item per
interested connection, all in one transaction per request.

``parse`` has validated the request as a whole before anything here runs, so a bad record
never leaves its request half-stored. The caller acknowledges only after
``Ingestor.ingest`` returns, which is after the commit.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from engine.connector.records import ANTAVO_CUSTOMER_ID, PROFILE_ACTIONS, AntavoEvent, Connection
from engine.errors import BacklogFullError
from engine.ingest.parse import CONTENT_ID_PREFIX
from engine.ingest.source_catalog import SeenName, SeenNames, seen_names
from engine.queue.items import (
    KIND_EVENT,
    KIND_PROFILE,
    NewItem,
    enqueue_rows,
    event_payload,
    new_items,
    profile_payload,
)
from engine.queue.lanes import DurableQueue
from engine.state.connections import ConnectionRegistry
from engine.state.database import Database
from engine.state.profiles import load_profile, update_profile

log = structlog.get_logger("tidegate.ingest")

CONTENT_DEDUP_WINDOW = 24 * 3600.0
"""How long a record without an id counts as a re-send of identical content. Antavo
re-sends a failed webhook within minutes; a day keeps genuine repeats (the same points
grant next week) from being mistaken for re-sends."""
ID_DEDUP_WINDOW = 30 * 24 * 3600.0
DEFAULT_MAX_BACKLOG = 5_000_000
"""Queued items across connections past which ingest answers 503: the backlog lives on
disk, but an unbounded one only postpones the failure and fills the disk."""
BACKLOG_RETRY_AFTER = 30


@dataclass(frozen=True)
class IngestResult:
    accepted: int
    duplicates: int
    deliveries_queued: int


@dataclass(frozen=True)
class Routes:
    """Which connections want what, from the connections as they are for one request."""

    profile: Mapping[str, frozenset[str]]
    """Attributes queued per connection id (``Connection.routed_attributes``)."""
    event: Mapping[str, frozenset[str]]
    """Antavo actions queued per connection id."""
    external_id_attributes: frozenset[str]
    """Attributes some connection identifies customers by, other than the Antavo id."""

    @classmethod
    def of(cls, connections: Iterable[Connection]) -> Routes:
        connections = list(connections)
        return cls(
            profile={c.id: c.routed_attributes() for c in connections},
            event={c.id: frozenset(m.source_event for m in c.event_mappings) for c in connections},
            external_id_attributes=frozenset(
                {c.customer_id_mapping.source_attribute for c in connections} - {ANTAVO_CUSTOMER_ID}
            ),
        )


class IngestTransaction:
    """The work of one request inside its write transaction: dedupe, external-id
    resolution, profile merge and routing, each event in turn."""

    def __init__(self, c: sqlite3.Connection, routes: Routes, now: float) -> None:
        self.c = c
        self.routes = routes
        self.now = now
        self.accepted = 0
        self.duplicates = 0
        self.items: list[NewItem] = []
        self.touched: set[str] = set()
        self._fresh_ids: dict[str, None] = {}
        self._received: dict[str, float] = {}
        self._event_routes: dict[str, list[str]] = {}  # connection ids per action, as met

    def run(self, events: Sequence[AntavoEvent]) -> IngestResult:
        self._received = _received(self.c, [event.id for event in events])
        for event in events:
            if self.is_resend(event):
                self.duplicates += 1
                continue
            self.accepted += 1
            customer_id = self.customer_of(event) if event.external_id else event.customer
            profile = None
            if event.action in PROFILE_ACTIONS and event.data:
                profile = self.apply_profile(customer_id, event)
            self.route_event(customer_id, event, profile)
        # Hot path (bench.ingest_cpu): one statement over a JSON array of the ids, not
        # executemany's statement per row.
        self.c.execute(
            "INSERT OR REPLACE INTO seen_events (event_id, receive_time)"
            " SELECT value, ? FROM json_each(?)",
            (self.now, orjson.dumps(list(self._fresh_ids))),
        )
        enqueue_rows(self.c, self.items)
        return IngestResult(self.accepted, self.duplicates, len(self.items))

    def is_resend(self, event: AntavoEvent) -> bool:
        """An id accepted within its window, or earlier in this request."""
        event_id = event.id
        if event_id in self._fresh_ids:
            return True
        last = self._received.get(event_id)
        if last is not None:
            window = (
                CONTENT_DEDUP_WINDOW if event_id.startswith(CONTENT_ID_PREFIX) else ID_DEDUP_WINDOW
            )
            if last >= self.now - window:
                return True
        self._fresh_ids[event_id] = None
        return False

    def customer_of(self, event: AntavoEvent) -> str:
        """The Antavo customer ID of an event.

        With ``external_id``, ``customer`` is a value of that external-ID attribute: it
        resolves to the customer whose profile holds it. An unknown value keys a profile of
        its own that holds the attribute, so identification by that attribute still works.
        """
        if not event.external_id:
            return event.customer
        c = self.c
        row = c.execute(
            "SELECT customer_id FROM external_ids WHERE attribute = ? AND value = ?",
            (event.external_id, event.customer),
        ).fetchone()
        if row:
            return str(row[0])
        update_profile(c, event.customer, {event.external_id: event.customer}, self.now)
        c.execute(
            "INSERT OR REPLACE INTO external_ids (attribute, value, customer_id) VALUES (?,?,?)",
            (event.external_id, event.customer, event.customer),
        )
        return event.customer

    def apply_profile(self, customer_id: str, event: AntavoEvent) -> dict[str, Any]:
        """Merges a profile event (``opt_in``, ``profile``) into the customer's profile and
        queues the change for every connection that routes a changed attribute. Returns
        the merged profile."""
        c, routes = self.c, self.routes
        changes, previous, profile = update_profile(c, customer_id, event.data, self.now)
        for attribute in routes.external_id_attributes & changes.keys():
            if changes[attribute] is None:
                continue
            c.execute(
                "INSERT OR REPLACE INTO external_ids (attribute, value, customer_id)"
                " VALUES (?,?,?)",
                (attribute, str(changes[attribute]), customer_id),
            )
        routed = [cid for cid, attrs in routes.profile.items() if attrs & changes.keys()]
        if routed:
            fields = profile_payload(changes, previous, event.timestamp)
            fields.update(_identity(profile, routes.external_id_attributes))
            payload = orjson.dumps(fields)
            self.items += new_items(routed, customer_id, KIND_PROFILE, event.id, payload, self.now)
            self.touched.update(routed)
        return profile

    def route_event(
        self, customer_id: str, event: AntavoEvent, profile: dict[str, Any] | None
    ) -> None:
        """Queues the event for every connection that maps its action."""
        action = event.action
        interested = self._event_routes.get(action)
        if interested is None:
            interested = self._event_routes[action] = [
                cid for cid, actions in self.routes.event.items() if action in actions
            ]
            self.touched.update(interested)  # queued for each of them just below
        if not interested:
            return
        external = self.routes.external_id_attributes
        if profile is None and external:
            profile = load_profile(self.c, customer_id)
        fields = event_payload(event)
        if profile:
            fields.update(_identity(profile, external))
        self.items += new_items(
            interested, customer_id, KIND_EVENT, event.id, orjson.dumps(fields), self.now
        )


class Ingestor:
    def __init__(
        self,
        db: Database,
        registry: ConnectionRegistry,
        queue: DurableQueue,
        on_enqueued: Callable[[set[str]], None] = lambda ids: None,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
    ) -> None:
        self._db = db
        self._registry = registry
        self._queue = queue
        self._on_enqueued = on_enqueued
        self.max_backlog = max_backlog
        self._names = SeenNames()

    async def load(self) -> None:
        await self._names.load(self._db)

    async def seen_names(self) -> list[SeenName]:
        """Every attribute, event and parameter name seen in traffic, sorted."""
        return await seen_names(self._db)

    async def ingest(self, events: Sequence[AntavoEvent]) -> IngestResult:
        """Stores ``events`` durably; returns after the commit.

        Raises ``BacklogFullError`` (storing nothing) when the queue is at its limit.
        """
        if self._queue.depth >= self.max_backlog:
            raise BacklogFullError(self._queue.depth, self.max_backlog, BACKLOG_RETRY_AFTER)
        routes = Routes.of(self._registry.runtimes())
        new_names = self._names.new_in(events)
        touched: set[str] = set()

        def store(c: sqlite3.Connection) -> IngestResult:
            now = time.time()
            SeenNames.record(c, new_names, now)
            transaction = IngestTransaction(c, routes, now)
            result = transaction.run(events)
            touched.update(transaction.touched)
            return result

        result = await self._db.write(store)
        self._queue.added(result.deliveries_queued)
        self._names.committed(new_names)
        if touched:
            self._on_enqueued(touched)
        return result

    async def requeue(self, items: Sequence[NewItem]) -> int:
        """Queues ``items`` as they are, at the end of their lanes: dead letters replayed
        through the broker's stream (``engine.broker.replay``), no re-send check and no
        routing. Items of a connection deleted since are left out. Returns how many were
        queued."""
        known = {connection.id for connection in self._registry.runtimes()}
        rows = [item for item in items if item[0] in known]
        if len(rows) < len(items):
            log.warning(
                "replay_connection_missing",
                items=len(items) - len(rows),
                reason="the dead letter's connection was deleted; nothing to send it to",
            )
        if rows:
            await self._db.write(lambda c: enqueue_rows(c, rows))
            self._queue.added(len(rows))
            self._on_enqueued({item[0] for item in rows})
        return len(rows)


def _received(c: sqlite3.Connection, event_ids: Sequence[str]) -> dict[str, float]:
    """When each of ``event_ids`` that was seen before was last accepted."""
    # Hot path (bench.ingest_cpu): the ids go in as one JSON array, each looked up by
    # primary key; unlike ``IN (?,?,...)`` lists, no limit on the number of parameters.
    return dict(
        c.execute(
            "SELECT s.event_id, s.receive_time FROM json_each(?) AS j"
            " JOIN seen_events AS s ON s.event_id = j.value",
            (orjson.dumps(event_ids),),
        ).fetchall()
    )


def _identity(profile: Mapping[str, Any] | None, attributes: Iterable[str]) -> dict[str, Any]:
    """The identifying attributes as they are when a record is ingested.

    A record is identified at the destination as its customer was identified when it
    happened: an event queued before an identifier change goes out under the old
    identifier, and the change itself moves the identifier in order.
    """
    if not profile:
        return {}
    held = {a: profile[a] for a in attributes if a in profile}
    return {"identity": held} if held else {}
