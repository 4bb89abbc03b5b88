"""Packing: claimed items rendered into one request's worth of deliveries, within the
connector's item and byte limits, in queue order."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.connector.records import Delivery
from engine.delivery.render import ENVELOPE_BYTES, customer_of, render_item
from engine.errors import MappingError
from engine.plugins import ConnectionHooks
from engine.queue.dead_letters import DeadLetter
from engine.queue.items import QueueItem


@dataclass
class Batch:
    """One request's worth of rendered items, and what rendering settled already."""

    deliveries: list[Delivery] = field(default_factory=list)
    items: dict[int, QueueItem] = field(default_factory=dict)
    """The deliveries' items by seq, in the deliveries' order."""
    skipped: list[int] = field(default_factory=list)
    """Items with nothing to send (their event's mapping was removed): done."""
    dead: list[DeadLetter] = field(default_factory=list)
    """Items that could not be rendered."""


def pack(
    hooks: ConnectionHooks,
    items: list[QueueItem],
    profiles: Mapping[str, Mapping[str, Any]],
    max_items: int,
) -> Batch:
    """Renders ``items`` in order until the next one would not fit: at most the
    connector's ``max_batch_items`` customers, ``max_items`` deliveries and
    ``max_batch_bytes`` bytes. Items that do not fit stay queued for the next request."""
    info = hooks.info
    max_customers, max_bytes = info.max_batch_items, info.max_batch_bytes
    batch = Batch()
    deliveries, batch_items = batch.deliveries, batch.items
    size = ENVELOPE_BYTES
    customers: set[str] = set()
    for item in items:
        customer_id = item.customer_id
        if customer_id not in customers and len(customers) >= max_customers:
            break
        if len(deliveries) >= max_items:
            break
        try:
            rendered = render_item(hooks, customer_of(item, profiles), item)
        except MappingError as exc:
            batch.dead.append(DeadLetter(item, exc.stage, exc.message))
            continue
        if rendered is None:
            batch.skipped.append(item.seq)
            continue
        delivery, weight = rendered
        if size + weight > max_bytes:
            break  # the rest waits for the next request, in order
        size += weight
        customers.add(customer_id)
        deliveries.append(delivery)
        batch_items[item.seq] = item
    return batch
