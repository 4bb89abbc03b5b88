"""``EraseCustomer``: forgetting one Antavo customer everywhere Tidegate keeps them.

The steps, in this order:

1. The customer's identifiers are worked out while their profile still exists: the
   external-ID values that name them, and what each connection's ``identify`` hook sends
   for them (an e-mail address, say). These are what the outbound log's bodies and
   messages are searched for, besides the customer ID.
2. The state database forgets them in one transaction (``engine.queue.erasure``):
   profile, external IDs, queued items, dead letters, their events' re-send marks.
3. A batch already claimed may still carry the customer: its settle could write a retry,
   a dead letter or a log row after step 2. The deliverer says when every batch claimed
   before step 2 has settled, and step 2 runs again.
4. The outbound log (``engine.outbound_log.erasure``): every row appended so far is
   committed first, then each partition loses the customer's rows, index entries and
   their part of bodies and messages. Outbox rows that carry them, all in the log by now,
   are deleted.

A request for the customer that arrives after the call began is a new record of them and
is kept: erase again once Antavo has stopped sending them. Rows a ``StreamLogs`` client
already received are not recalled.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

import structlog

from engine.connector.records import Customer
from engine.delivery.outcomes import log_rows
from engine.delivery.worker import Deliverer
from engine.errors import DeliveryError, InvalidInputError, MappingError, TidegateError
from engine.outbound_log.erasure import LogErasure
from engine.outbound_log.outbox import LogOutbox
from engine.outbound_log.rows import Outcome
from engine.outbound_log.store import LogStore
from engine.plugins import Connectors
from engine.queue.erasure import StateErasure, erase_outbox, erase_state, identifier_values
from engine.queue.lanes import DurableQueue
from engine.state.connections import ConnectionRegistry
from engine.state.database import Database
from engine.state.profiles import load_profile

log = structlog.get_logger(__name__)

MAX_CUSTOMER_ID = 512
"""The longest customer ID accepted (Antavo's are far shorter)."""


ERASURE_TAG = "erasure"
"""The outbound-log tag of the requests that delete a customer at a destination."""
MAX_MESSAGE = 300
"""Longest destination message kept in a ``DestinationErasure``."""


@dataclass(frozen=True)
class DestinationErasure:
    """What deleting the customer at one connection's destination did."""

    connection_id: str
    outcome: str  # DELETED, FAILED or UNSUPPORTED
    message: str = ""


DELETED, FAILED, UNSUPPORTED = "deleted", "failed", "unsupported"


@dataclass(frozen=True)
class Erasure:
    """What ``EraseCustomer`` removed."""

    state: StateErasure
    log: LogErasure
    destinations: tuple[DestinationErasure, ...] = ()


class CustomerEraser:
    def __init__(
        self,
        db: Database,
        queue: DurableQueue,
        logs: LogStore,
        outbox: LogOutbox,
        deliverer: Deliverer,
        registry: ConnectionRegistry,
        connectors: Connectors,
        refusal: str | None = None,
    ) -> None:
        """``refusal``: erasure is not available in this process (a broker role: the
        customer's data is spread over the cluster); ``erase`` refuses with this text."""
        self._refusal = refusal
        self._db = db
        self._queue = queue
        self._logs = logs
        self._outbox = outbox
        self._deliverer = deliverer
        self._registry = registry
        self._connectors = connectors

    async def erase(self, customer_id: str, at_destinations: bool = False) -> Erasure:
        """Runs the steps of the module doc; returns what went. ``at_destinations``: first
        delete the customer at every connection's destination whose connector can."""
        if self._refusal is not None:
            raise TidegateError(self._refusal)
        if not customer_id:
            raise InvalidInputError("customer_id", "required: the Antavo customer ID")
        if len(customer_id) > MAX_CUSTOMER_ID:
            raise InvalidInputError(
                "customer_id", f"longer than {MAX_CUSTOMER_ID} characters ({len(customer_id)})"
            )
        identifiers, attributes = await self._identifiers(customer_id)
        destinations: tuple[DestinationErasure, ...] = ()
        if at_destinations:
            destinations = await self._erase_at_destinations(customer_id)
        state = await self._db.write(lambda c: erase_state(c, customer_id))
        await self._deliverer.settled()
        state += await self._db.write(lambda c: erase_state(c, customer_id))
        self._queue.depth -= state.queued_items
        try:
            erased = await self._logs.erase_customer(customer_id, identifiers, attributes)
        except TidegateError:
            raise
        except Exception as exc:  # a DuckDB error: the state part is done, say so
            log.error("erase_log_failed", error=str(exc))
            raise TidegateError(
                "the customer is erased from the state database but the outbound log could"
                " not be changed (see the engine's log); call EraseCustomer again"
            ) from exc
        await self._outbox.drain()
        state += await self._db.write(lambda c: erase_outbox(c, customer_id))
        log.info(
            "customer_erased",
            profile=state.profile,
            queued_items=state.queued_items,
            dead_letters=state.dead_letters,
            log_requests=erased.requests,
            log_customer_rows=erased.customer_rows,
        )
        return Erasure(state, erased, destinations)

    async def _erase_at_destinations(self, customer_id: str) -> tuple[DestinationErasure, ...]:
        """Step 0 (on request): each connection's connector deletes the customer at its
        destination; its requests are logged, tagged ``erasure``, and erased from the log
        with the rest."""
        profile = await self._db.read(lambda c: load_profile(c, customer_id))
        customer = Customer(customer_id, profile)
        done = []
        for connection in self._registry.runtimes():
            done.append(await self._erase_at(connection.id, customer))
        return tuple(done)

    async def _erase_at(self, connection_id: str, customer: Customer) -> DestinationErasure:
        try:
            hooks = self._connectors.hooks(self._registry.runtime(connection_id))
        except TidegateError as exc:
            return DestinationErasure(connection_id, FAILED, _cut(str(exc)))
        if not hooks.can_erase:
            return DestinationErasure(
                connection_id, UNSUPPORTED, f"connector {hooks.info.name!r} cannot delete"
            )
        try:
            identifiers = hooks.identify(customer)
        except MappingError as exc:
            return DestinationErasure(connection_id, FAILED, _cut(str(exc)))
        transport = self._deliverer.transport(hooks, (ERASURE_TAG,))
        outcome: DestinationErasure
        try:
            await hooks.erase(customer, identifiers, transport)
            outcome = DestinationErasure(connection_id, DELETED)
        except DeliveryError as exc:
            outcome = DestinationErasure(connection_id, FAILED, _cut(str(exc)))
        logged = Outcome.DELIVERED if outcome.outcome == DELETED else Outcome.FAILED
        rows = log_rows(
            hooks.connection,
            transport.exchanges,
            {customer.id: customer.name},
            {customer.id: (logged, outcome.message)},
            outcome.message,
            1,
        )
        for row in rows:
            await self._logs.append(row)
        log.info(
            "customer_erased_at_destination", connection=connection_id, outcome=outcome.outcome
        )
        return outcome

    async def _identifiers(self, customer_id: str) -> tuple[set[str], set[str]]:
        """Step 1: the values that name the customer in requests besides their ID, and
        the string values of their stored profile."""

        def read(c: sqlite3.Connection) -> tuple[dict[str, Any], list[str]]:
            return load_profile(c, customer_id), identifier_values(c, customer_id)

        profile, values = await self._db.read(read)
        found = set(values)
        customer = Customer(customer_id, profile)
        for connection in self._registry.runtimes():
            try:
                identifiers = self._connectors.hooks(connection).identify(customer)
            except (MappingError, TidegateError):
                continue  # no identifiers from this connection: its requests carry none
            found.update(_strings(identifiers))
        found.discard(customer_id)
        return found, set(_strings(profile))


def _cut(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "..."


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []
