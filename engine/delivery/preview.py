"""Preview: what a connection would send for one sample Antavo event, sent nowhere.

The sample goes through the same steps as real traffic: an ``opt_in`` or ``profile``
event changes the given profile (``None`` clears an attribute) and, when a changed
attribute is routed to the connection, becomes a profile change (merged as ingest merges,
``engine.state.profiles``); a mapped action becomes an event. Each is rendered by
``engine.delivery.render``, the code delivery renders with, and the resulting deliveries
are handed to the connector's ``send`` with a ``CapturingTransport``, which records every
request and answers each with an empty 200 (which a connector takes as accepted).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.connector.records import (
    PROFILE_ACTIONS,
    AntavoEvent,
    Customer,
    Delivery,
    HttpResponse,
    ProfileChange,
)
from engine.delivery.render import render
from engine.errors import DeliveryError, MappingError
from engine.plugins import ConnectionHooks
from engine.state.profiles import merge_profile

ACCEPTED = HttpResponse(200, {}, b"{}", 0.0)


@dataclass(frozen=True)
class CapturedRequest:
    method: str
    url: str
    body: str
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Problem:
    """Why the sample would not be delivered as it is; ``stage`` is the hook that said so."""

    stage: str
    message: str


@dataclass
class Preview:
    requests: list[CapturedRequest] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


class CapturingTransport:
    """Implements ``engine.connector.Transport``: records requests, sends nothing. Headers
    are not recorded, so the API key never reaches a preview."""

    def __init__(self) -> None:
        self.requests: list[CapturedRequest] = []

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        tags: Collection[str] = (),
    ) -> HttpResponse:
        self.requests.append(
            CapturedRequest(method, url, body.decode("utf-8", errors="replace"), tuple(tags))
        )
        return ACCEPTED


async def preview_delivery(
    hooks: ConnectionHooks, event: AntavoEvent, profile: Mapping[str, Any] | None = None
) -> Preview:
    """The requests ``hooks.connection`` would send for ``event`` given the customer's
    ``profile`` before it, and the problems that would fail it."""
    connection = hooks.connection
    result = Preview()
    attributes = dict(profile or {})
    if event.external_id:
        attributes.setdefault(event.external_id, event.customer)
    change: ProfileChange | None = None
    if event.action in PROFILE_ACTIONS and event.data:
        changes, previous = merge_profile(attributes, event.data)
        if connection.routed_attributes() & changes.keys():
            change = ProfileChange(changes, event.timestamp, previous)
    customer = Customer(event.customer, attributes)
    deliveries: list[Delivery] = []
    for record in (change, event if connection.event_mapping_for(event.action) else None):
        if record is None:
            continue
        item_id = len(deliveries) + 1
        try:
            if isinstance(record, ProfileChange):
                rendered = render(hooks, customer, item_id, change=record)
            else:
                rendered = render(hooks, customer, item_id, event=record)
        except MappingError as exc:
            result.problems.append(Problem(exc.stage, exc.message))
            continue
        if rendered is not None:
            deliveries.append(rendered[0])
    if not deliveries or result.problems:
        return result
    transport = CapturingTransport()
    try:
        sent = await hooks.send(deliveries, transport)
    except DeliveryError as exc:
        result.problems.append(Problem("send", str(exc)))
    else:
        for delivery in deliveries:
            outcome = sent.outcomes.get(delivery.item_id)
            if outcome is None:
                message = f"plugin {hooks.plugin!r} reported no outcome for an item"
                result.problems.append(Problem("send", message))
            elif not outcome.delivered:
                result.problems.append(Problem("send", outcome.error))
    result.requests = transport.requests
    return result
