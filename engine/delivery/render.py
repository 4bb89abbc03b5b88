"""Rendering: a queued item through its connector's ``identify`` and ``map_*`` hooks into
a ``Delivery``, measured against the connector's limits. Delivery sends what this
renders; the preview shows it. Both call the same functions, so a preview cannot drift
from what would be sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from engine.connector.records import AntavoEvent, Customer, Delivery, ProfileChange
from engine.plugins import ConnectionHooks
from engine.queue.items import (
    KIND_PROFILE,
    KIND_RENDERED,
    QueueItem,
    change_from_payload,
    event_from_payload,
)

ENVELOPE_BYTES = 64
"""Room kept in a request for the body's envelope around the per-customer parts."""

Rendered = tuple[Delivery, int]
"""A delivery and the bytes its rendered values take as JSON."""

_NOTHING: Mapping[str, Any] = {}


def customer_of(item: QueueItem, profiles: Mapping[str, Mapping[str, Any]]) -> Customer:
    """The customer an item goes out for: the stored profile, overlaid with the
    identifying attributes as they were when the item was ingested (``identity``).

    Without an identity the stored profile itself is handed over, not a copy: hooks only
    read it (the contract says so), and an item costs one copy less.
    """
    attributes = profiles.get(item.customer_id, _NOTHING)
    identity = item.payload.get("identity")
    if identity:
        attributes = {**attributes, **identity}
    elif attributes is _NOTHING:
        attributes = {}
    return Customer(item.customer_id, attributes)


def render(
    hooks: ConnectionHooks,
    customer: Customer,
    item_id: int,
    attempt: int = 1,
    *,
    change: ProfileChange | None = None,
    event: AntavoEvent | None = None,
) -> Rendered | None:
    """Renders a profile ``change`` or an ``event`` of ``customer``.

    Returns ``None`` for an event its connection does not map (its mapping was removed
    after it was queued). Raises ``MappingError``: the connector's own (the customer
    cannot be identified, a value cannot be converted) or a ``ContractError`` (a hook
    returned a wrong type or a value JSON cannot carry, or the item alone is over the
    connector's request limit). A profile change is rendered even when no attribute
    maps: the connector may still have work (a cleared attribute, a changed identifier).
    """
    attributes: Mapping[str, Any] | None = None
    events: list[Mapping[str, Any]] = []
    if change is not None:
        attributes = hooks.map_profile(customer, change) or None
    else:
        assert event is not None
        events = hooks.map_event(customer, event)
        if not events:
            return None
    identifiers = hooks.identify(customer)
    delivery = Delivery(item_id, customer, identifiers, attributes, events, attempt, change, event)
    return delivery, weigh(hooks, delivery)


def render_item(hooks: ConnectionHooks, customer: Customer, item: QueueItem) -> Rendered | None:
    """Renders a queued item (see ``render``). A dead letter replayed as its stored
    fragment is not rendered again: the fragment goes out as it was."""
    payload = item.payload
    if item.kind == KIND_RENDERED:
        delivery = Delivery(
            item.seq,
            customer,
            payload["identifiers"],
            payload.get("attributes"),
            list(payload.get("events") or []),
            item.attempts + 1,
        )
        return delivery, weigh(hooks, delivery)
    if item.kind == KIND_PROFILE:
        return render(
            hooks, customer, item.seq, item.attempts + 1, change=change_from_payload(payload)
        )
    return render(
        hooks,
        customer,
        item.seq,
        item.attempts + 1,
        event=event_from_payload(customer.id, payload),
    )


def weigh(hooks: ConnectionHooks, delivery: Delivery) -> int:
    """The bytes of the delivery's rendered values as JSON. Raises ``ContractError`` for a
    value JSON cannot carry, or for an item too large for one request on its own."""
    try:
        # A tuple serializes as the same JSON array as a list.
        size = len(orjson.dumps((delivery.identifiers, delivery.attributes, delivery.events)))
    except TypeError as exc:  # orjson.JSONEncodeError
        raise hooks.broken(f"rendered a value JSON cannot carry ({exc})") from None
    limit = hooks.info.max_batch_bytes
    if size + ENVELOPE_BYTES > limit:
        raise hooks.broken(f"the item is too large for one request: {size} bytes, limit {limit}")
    return size
