"""Hook implementations of the Insider connector (this module is the plugin object).

Loaded through the ``tidegate`` entry point ``insider = "plugins.insider.plugin"``. The
engine calls these hooks for ``insider`` connections only. Names and types come from
``catalog``, conversions from ``values``, identifiers and attributes from ``payloads``,
events from ``events``, requests from ``sending``, mapping checks from ``validation``,
connection settings from ``settings``, and each connection's settings and event
mappings, resolved once by ``prepare``, from ``plans``.
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
from plugins.insider.batch import MAX_USERS_PER_REQUEST
from plugins.insider.catalog import catalog_entries
from plugins.insider.events import insider_events
from plugins.insider.payloads import profile_attributes
from plugins.insider.plans import ConnectionPlan, plan_of
from plugins.insider.sending import send_batch
from plugins.insider.settings import (
    BASE_URL,
    DESTINATION_HOSTS,
    PARTNER_NAME,
    SCOPE_ALL,
    validate_settings,
)
from plugins.insider.validation import (
    validate_customer_id_mapping,
    validate_event_mapping,
    validate_profile_mapping,
)

CONNECTOR = "insider"

MAX_REQUEST_BYTES = 5_000_000
"""Insider's cap on one upsert body ("must not exceed 5 MB", counted as 5,000,000 bytes)."""


@hookimpl
def connector_info() -> ConnectorInfo:
    """Declare the ``insider`` connector: Insider's upsert limits, the validators and the
    catalog of Insider's default identifiers, attributes, events and parameters."""
    return ConnectorInfo(
        name=CONNECTOR,
        max_batch_items=MAX_USERS_PER_REQUEST,
        max_batch_bytes=MAX_REQUEST_BYTES,
        validate_settings=validate_settings,
        validate_customer_id_mapping=validate_customer_id_mapping,
        validate_profile_mapping=validate_profile_mapping,
        validate_event_mapping=validate_event_mapping,
        catalog=catalog_entries(),
        destination_hosts=DESTINATION_HOSTS,
        url_settings=(BASE_URL,),
        key_bound_settings=(PARTNER_NAME,),
    )


@hookimpl
def prepare(connection: Connection) -> ConnectionPlan:
    """The connection's settings parsed, and its event mappings and identifier resolved."""
    return plan_of(connection)


@hookimpl
def identify(plan: ConnectionPlan, customer: Customer) -> Mapping[str, Any]:
    """Insider ``identifiers`` of ``customer``: exactly one of ``uuid``, ``email``,
    ``phone_number`` (E.164, read with the connection's ``default_phone_region``) or
    ``custom: {name: value}``, its value a string.

    Raises ``MappingError`` when the customer has no usable value for the mapped attribute.
    """
    return plan.identifiers(customer)


@hookimpl
def map_profile(
    connection: Connection, plan: ConnectionPlan, customer: Customer, change: ProfileChange
) -> Mapping[str, Any]:
    """Insider ``attributes`` for a profile change ({} when nothing mapped has a value).

    With ``profile_scope`` ``changed`` (the default) only the mapped attributes in
    ``change`` are sent; with ``all`` every mapped attribute of the customer's profile is.
    Default attributes sit at the root, custom ones under ``custom``; values are converted
    to Insider's types and formats. Cleared attributes are left out (``send`` deletes
    them). Raises ``MappingError`` for a value that cannot be converted.
    """
    settings = plan.settings
    values: Mapping[str, Any] = change.changes
    if settings.profile_scope == SCOPE_ALL:
        values = {**customer.attributes, **change.changes}
    return profile_attributes(
        connection.profile_mappings, customer, values, settings.default_phone_region
    )


@hookimpl
def map_event(
    plan: ConnectionPlan, customer: Customer, event: AntavoEvent
) -> Sequence[Mapping[str, Any]]:
    """Insider events for a mapped Antavo action (``[]`` for an unmapped one): one event,
    or one per line when the mapping reads ``<array>[].<key>`` sources.

    Each has ``event_name``, a UTC ``timestamp`` ending in Z and, when any parameter has a
    value, ``event_params`` (custom parameters under ``custom``). Raises ``MappingError``
    for a value that cannot be converted or a per-line event without lines.
    """
    mapping = plan.events.get(event.action)
    if mapping is None:
        return []
    return insider_events(mapping, event)


@hookimpl
async def send(
    connection: Connection,
    plan: ConnectionPlan,
    deliveries: Sequence[Delivery],
    transport: Transport,
) -> SendResult:
    """Sends ``deliveries`` to Insider and reports an outcome for every item.

    In order: identity updates for changed identifiers, one attribute delete for cleared
    attributes, then the upsert (``skip_hook`` on a backfill connection); only the items
    of customers Insider refused fail. Raises ``AuthError`` on 401/403 (or a connection
    without a partner name), ``RetryableError`` on 429 (with ``retry_after``) and
    retryable 5xx, and ``PermanentError`` on other request-level errors. The API key
    travels only in the ``X-REQUEST-TOKEN`` header, which the transport never records.
    """
    return await send_batch(connection, plan.settings, deliveries, transport)
