"""Preview: what a connection would send for one sample Antavo event, sent nowhere.

The sample goes through the same steps as real traffic: an ``opt_in`` or ``profile``
event changes the given profile (``None`` clears an attribute) and, when a changed
attribute is routed to the connection, becomes a profile change; a mapped action
becomes an event. Each is rendered by the connector's ``map_profile`` / ``map_event``
and ``identify`` hooks, called as delivery calls them, and the resulting deliveries are
handed to its ``send`` hook with a ``CapturingTransport``, which records every request
and answers each with an empty 200 (which a connector takes as accepted).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from engine.errors import DeliveryError, MappingError
from engine.ingest import PROFILE_ACTIONS
from engine.records import (
    ANTAVO_CUSTOMER_ID,
    AntavoEvent,
    Connection,
    Customer,
    Delivery,
    HttpResponse,
    ProfileChange,
)

ACCEPTED = HttpResponse(200, {}, b"{}", 0.0)
_MISSING = object()


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
    """Implements ``engine.records.Transport``: records requests, sends nothing. Headers
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
        secret_headers: Collection[str] = (),
        tags: Collection[str] = (),
    ) -> HttpResponse:
        self.requests.append(
            CapturedRequest(method, url, body.decode("utf-8", errors="replace"), tuple(tags))
        )
        return ACCEPTED


def profile_change(
    profile: Mapping[str, Any], data: Mapping[str, Any], event: AntavoEvent
) -> tuple[dict[str, Any], ProfileChange]:
    """The profile after ``data`` and the change it makes, as ingest computes them."""
    current = dict(profile)
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if value is None:
            if key in current:
                changes[key] = None
        elif current.get(key, _MISSING) != value:
            changes[key] = value
    previous = {key: current[key] for key in changes if key in current}
    for key, value in changes.items():
        if value is None:
            current.pop(key, None)
        else:
            current[key] = value
    return current, ProfileChange(changes, event.timestamp, previous)


def routed_attributes(connection: Connection) -> set[str]:
    """Attributes whose change is queued for ``connection`` (as ingest routes them)."""
    return {m.source_attribute for m in connection.profile_mappings} | (
        {connection.customer_id_mapping.source_attribute} - {ANTAVO_CUSTOMER_ID}
    )


async def preview_delivery(
    hook: pluggy.HookRelay,
    connection: Connection,
    event: AntavoEvent,
    profile: Mapping[str, Any] | None = None,
) -> Preview:
    """The requests ``connection`` would send for ``event`` given the customer's
    ``profile`` before it, and the problems that would fail it."""
    result = Preview()
    attributes = dict(profile or {})
    if event.external_id:
        attributes.setdefault(event.external_id, event.customer)
    change: ProfileChange | None = None
    if event.action in PROFILE_ACTIONS and event.data:
        attributes, change = profile_change(attributes, event.data, event)
        if not routed_attributes(connection) & change.changes.keys():
            change = None
    customer = Customer(event.customer, attributes)
    deliveries: list[Delivery] = []
    if change is not None:
        _render(hook, connection, customer, result, deliveries, change=change)
    if connection.event_mapping_for(event.action) is not None:
        _render(hook, connection, customer, result, deliveries, event=event)
    if not deliveries or result.problems:
        return result
    transport = CapturingTransport()
    try:
        pending = hook.send(connection=connection, deliveries=deliveries, transport=transport)
        if pending is None:
            raise MappingError("send", f"no installed plugin sends for {connection.connector!r}")
        outcome = await pending
    except DeliveryError as exc:
        result.problems.append(Problem("send", str(exc)))
    else:
        result.problems.extend(
            Problem("send", o.error) for o in outcome.outcomes.values() if not o.delivered
        )
    result.requests = transport.requests
    return result


def _render(
    hook: pluggy.HookRelay,
    connection: Connection,
    customer: Customer,
    result: Preview,
    deliveries: list[Delivery],
    change: ProfileChange | None = None,
    event: AntavoEvent | None = None,
) -> None:
    """Renders one item the way delivery does; records a problem instead of raising."""
    try:
        attributes: Any = None
        events: Any = []
        if change is not None:
            attributes = hook.map_profile(connection=connection, customer=customer, change=change)
            if attributes is None:
                raise MappingError(
                    "map_profile", f"no installed plugin maps for {connection.connector!r}"
                )
        else:
            events = hook.map_event(connection=connection, customer=customer, event=event)
            if events is None:
                raise MappingError(
                    "map_event", f"no installed plugin maps for {connection.connector!r}"
                )
            if not events:
                return
        identifiers = hook.identify(connection=connection, customer=customer)
        if identifiers is None:
            raise MappingError(
                "identify", f"no installed plugin identifies for {connection.connector!r}"
            )
    except MappingError as exc:
        result.problems.append(Problem(exc.stage, exc.message))
        return
    deliveries.append(
        Delivery(
            item_id=len(deliveries) + 1,
            customer=customer,
            identifiers=identifiers,
            attributes=attributes or None,
            events=list(events),
            change=change,
            event=event,
        )
    )
