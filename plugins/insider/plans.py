"""What a connection's settings and event mappings resolve to, worked out once.

The hooks run for every queued item. Without this, each call parsed the connection's
settings, looked the event's mapping up, matched every parameter source against the
per-line pattern and looked its Insider type up in the catalog. A ``Connection`` is
immutable (the engine builds a new object whenever the connection's settings or mappings
change), so a plan is kept for the connection object it was made from and made again
when another object arrives under the same connection id.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.records import Connection, Customer
from plugins.insider.events import EventPlan
from plugins.insider.payloads import identifiers_reader
from plugins.insider.settings import InsiderSettings, parse_settings

MAX_PLANS = 1024
"""Plans kept at most (one per connection id); past that the cache starts afresh."""


@dataclass(frozen=True)
class ConnectionPlan:
    connection: Connection
    settings: InsiderSettings
    events: Mapping[str, EventPlan]
    """By Antavo action: the plan of the mapping ``Connection.event_mapping_for`` picks."""
    identifiers: Callable[[Customer], dict[str, Any]]
    """``identifiers_reader`` of the connection's customer ID mapping."""


_plans: dict[str, ConnectionPlan] = {}


def plan_for(connection: Connection) -> ConnectionPlan:
    """The plan of ``connection``, made on first use of this connection object."""
    plan = _plans.get(connection.id)
    if plan is not None and plan.connection is connection:
        return plan
    settings = parse_settings(connection.settings)
    events: dict[str, EventPlan] = {}
    for mapping in connection.event_mappings:
        # The first mapping of an action wins, as in Connection.event_mapping_for.
        if mapping.source_event not in events:
            events[mapping.source_event] = EventPlan.of(mapping, settings.default_phone_region)
    identifiers = identifiers_reader(connection.customer_id_mapping, settings.default_phone_region)
    plan = ConnectionPlan(connection, settings, events, identifiers)
    if len(_plans) >= MAX_PLANS:
        _plans.clear()
    _plans[connection.id] = plan
    return plan
