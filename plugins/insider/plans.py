"""What a connection's settings and mappings resolve to, worked out once per connection
by the ``prepare`` hook: the engine hands it back to the other hooks as ``plan``, and
asks again whenever the connection changes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.connector import Connection, Customer
from plugins.insider.events import EventPlan
from plugins.insider.payloads import identifiers_reader
from plugins.insider.settings import InsiderSettings, parse_settings


@dataclass(frozen=True)
class ConnectionPlan:
    settings: InsiderSettings
    events: Mapping[str, EventPlan]
    """By Antavo action: the plan of the mapping ``Connection.event_mapping_for`` picks."""
    identifiers: Callable[[Customer], dict[str, Any]]
    """``identifiers_reader`` of the connection's customer ID mapping."""


def plan_of(connection: Connection) -> ConnectionPlan:
    """Parses the settings and resolves every event mapping and the identifier reader."""
    settings = parse_settings(connection.settings)
    events: dict[str, EventPlan] = {}
    for mapping in connection.event_mappings:
        # The first mapping of an action wins, as in Connection.event_mapping_for.
        if mapping.source_event not in events:
            events[mapping.source_event] = EventPlan.of(mapping, settings.default_phone_region)
    identifiers = identifiers_reader(connection.customer_id_mapping, settings.default_phone_region)
    return ConnectionPlan(settings, events, identifiers)
