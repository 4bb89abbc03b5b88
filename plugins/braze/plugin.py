"""Hook implementations of the Braze connector (this module is the plugin object).

Loaded through the ``tidegate`` entry point ``braze = "plugins.braze.plugin"``, importing
from the engine only the connector kit (``engine.connector``), as a third party's
connector would. Settings in ``settings``, names in ``catalog``, conversions in
``values``, mapping checks in ``validation``, rendering in ``mapping``, requests in
``sending`` and answers in ``responses``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from engine.connector import (
    AntavoEvent,
    Connection,
    ConnectorInfo,
    Customer,
    Delivery,
    ProfileChange,
    SendResult,
    Transport,
    hookimpl,
)
from plugins.braze.catalog import catalog_entries
from plugins.braze.mapping import ConnectionPlan, braze_events, plan_of, profile_attributes
from plugins.braze.sending import MAX_OBJECTS, delete_user, send_batch
from plugins.braze.settings import BRAZE_HOSTS, REST_ENDPOINT, validate_settings
from plugins.braze.validation import (
    validate_customer_id_mapping,
    validate_event_mapping,
    validate_profile_mapping,
)

CONNECTOR = "braze"
MAX_REQUEST_BYTES = 3_900_000
"""Under Braze's 4 MB per request (§4), with room for the envelope and the alias objects."""


@hookimpl
def connector_info() -> ConnectorInfo:
    """Declare the ``braze`` connector: at most 75 customers per request (each has at least
    one object, and Braze takes 75 objects per request), the validators and the catalog."""
    return ConnectorInfo(
        name=CONNECTOR,
        max_batch_items=MAX_OBJECTS,
        max_batch_bytes=MAX_REQUEST_BYTES,
        destination_hosts=BRAZE_HOSTS,
        url_settings=(REST_ENDPOINT,),
        validate_settings=validate_settings,
        validate_customer_id_mapping=validate_customer_id_mapping,
        validate_profile_mapping=validate_profile_mapping,
        validate_event_mapping=validate_event_mapping,
        catalog=catalog_entries(),
    )


@hookimpl
def prepare(connection: Connection) -> ConnectionPlan:
    """The connection's settings parsed and its mappings resolved, once per connection."""
    return plan_of(connection)


@hookimpl
def identify(plan: ConnectionPlan, customer: Customer) -> Mapping[str, Any]:
    """Exactly one Braze identifier: ``external_id``, ``user_alias`` (name: the value,
    label: the connection's ``alias_label``), ``email`` or ``phone`` (E.164). Raises
    ``MappingError`` when the customer has no usable value."""
    return plan.identifiers(customer)


@hookimpl
def map_profile(
    plan: ConnectionPlan, customer: Customer, change: ProfileChange
) -> Mapping[str, Any]:
    """Braze attributes for a profile change: standard attributes converted to Braze's
    formats, custom ones as they are (or add/remove operations), ``null`` for a cleared
    one; every mapped attribute with ``profile_scope: all``."""
    return profile_attributes(plan, customer, change)


@hookimpl
def map_event(
    plan: ConnectionPlan, customer: Customer, event: AntavoEvent
) -> Sequence[Mapping[str, Any]]:
    """One custom event (``name``, ``time``, ``properties``), or for a ``purchase`` mapping
    one purchase object per line item (split at quantity 100); ``[]`` when unmapped."""
    return braze_events(plan, event)


@hookimpl
async def send(
    connection: Connection,
    plan: ConnectionPlan,
    deliveries: Sequence[Delivery],
    transport: Transport,
) -> SendResult:
    """Renames changed external IDs, then sends one ``/users/track`` request; see
    ``plugins.braze.sending``. The API key travels only in the Authorization header."""
    return await send_batch(connection, plan, deliveries, transport)


@hookimpl
async def erase(
    connection: Connection,
    plan: ConnectionPlan,
    identifiers: Mapping[str, Any],
    transport: Transport,
) -> None:
    """Deletes the customer's Braze profile with ``POST /users/delete`` (by external ID
    or user alias; Braze deletes by nothing else a connection identifies by)."""
    await delete_user(connection, plan, identifiers, transport)
