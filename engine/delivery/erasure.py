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
from engine.delivery.worker import Deliverer
from engine.errors import InvalidInputError, MappingError, TidegateError
from engine.outbound_log.erasure import LogErasure
from engine.outbound_log.outbox import LogOutbox
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


@dataclass(frozen=True)
class Erasure:
    """What ``EraseCustomer`` removed."""

    state: StateErasure
    log: LogErasure


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
    ) -> None:
        self._db = db
        self._queue = queue
        self._logs = logs
        self._outbox = outbox
        self._deliverer = deliverer
        self._registry = registry
        self._connectors = connectors

    async def erase(self, customer_id: str) -> Erasure:
        """Runs the steps of the module doc; returns what went."""
        if not customer_id:
            raise InvalidInputError("customer_id", "required: the Antavo customer ID")
        if len(customer_id) > MAX_CUSTOMER_ID:
            raise InvalidInputError(
                "customer_id", f"longer than {MAX_CUSTOMER_ID} characters ({len(customer_id)})"
            )
        identifiers, attributes = await self._identifiers(customer_id)
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
        return Erasure(state, erased)

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


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []
