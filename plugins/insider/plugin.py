"""Hook implementations of the Insider connector (this module is the plugin object).

Loaded through the ``tidegate`` entry point ``insider = "plugins.insider.plugin"``. Every
hook that receives a connection answers only for connections whose connector is
``CONNECTOR`` and returns ``None`` for any other, so other connector plugins can coexist.
Payloads are built in ``payloads``; Insider's answers are read in ``responses``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from engine.connectors import ConnectorInfo
from engine.errors import AuthError, InvalidInputError, PermanentError
from engine.hookspecs import hookimpl
from engine.records import (
    AntavoEvent,
    Connection,
    Customer,
    CustomerIdMapping,
    Delivery,
    EventMapping,
    ItemOutcome,
    ProfileChange,
    ProfileMapping,
    SendResult,
    Transport,
)
from plugins.insider.commands import register_commands  # noqa: F401  (a hook implementation)
from plugins.insider.payloads import (
    DEFAULT_ATTRIBUTES,
    DEFAULT_EVENT_PARAMS,
    DEFAULT_IDENTIFIERS,
    MAX_USERS_PER_REQUEST,
    identifiers_for,
    insider_event,
    profile_attributes,
    upsert_batch,
)
from plugins.insider.responses import upsert_outcome

CONNECTOR = "insider"

DEFAULT_BASE_URL = "https://unification.useinsider.com"
UPSERT_PATH = "/api/user/v1/upsert"
MAX_REQUEST_BYTES = 5_000_000
"""Insider's cap on one upsert body ("must not exceed 5 MB", counted as 5,000,000 bytes)."""

PARTNER_NAME = "partner_name"
BASE_URL = "base_url"
ALLOWED_SETTINGS = (BASE_URL, PARTNER_NAME)

PARTNER_HEADER = "X-PARTNER-NAME"
TOKEN_HEADER = "X-REQUEST-TOKEN"

PARTNER_NAME_PATTERN = re.compile(r"^[a-z0-9_-]+$")
CUSTOM_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
# Insider documents ^[a-z0-9][a-zA-Z0-9._-]*$ but advises lowercase system names; the
# stricter form is what is known to be accepted.
EVENT_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@hookimpl
def connector_info() -> ConnectorInfo:
    """Declare the ``insider`` connector: Insider's upsert limits and the validators."""
    return ConnectorInfo(
        name=CONNECTOR,
        max_batch_items=MAX_USERS_PER_REQUEST,
        max_batch_bytes=MAX_REQUEST_BYTES,
        default_settings={BASE_URL: DEFAULT_BASE_URL},
        validate_settings=validate_settings,
        validate_customer_id_mapping=validate_customer_id_mapping,
        validate_profile_mapping=validate_profile_mapping,
        validate_event_mapping=validate_event_mapping,
    )


@hookimpl
def identify(connection: Connection, customer: Customer) -> Mapping[str, Any] | None:
    """Insider ``identifiers`` of ``customer``: exactly one of ``uuid``, ``email``,
    ``phone_number`` or ``custom: {name: value}``, its value a string.

    Raises ``MappingError`` when the customer has no value for the mapped attribute.
    """
    if connection.connector != CONNECTOR:
        return None
    return identifiers_for(connection.customer_id_mapping, customer)


@hookimpl
def map_profile(
    connection: Connection, customer: Customer, change: ProfileChange
) -> Mapping[str, Any] | None:
    """Insider ``attributes`` for the mapped attributes in ``change`` ({} when none).

    Default attributes sit at the root, custom ones under ``custom``; values are converted
    to Insider's formats (``birthday`` RFC 3339 ending in Z, ``gender`` M/F). Raises
    ``MappingError`` for a value that cannot be converted.
    """
    if connection.connector != CONNECTOR:
        return None
    return profile_attributes(connection.profile_mappings, customer, change.changes)


@hookimpl
def map_event(
    connection: Connection, customer: Customer, event: AntavoEvent
) -> Sequence[Mapping[str, Any]] | None:
    """One Insider event for a mapped Antavo action, ``[]`` for an unmapped one.

    The event has ``event_name``, a UTC ``timestamp`` ending in Z and, when any parameter
    is mapped, ``event_params`` (custom parameters under ``custom``).
    """
    if connection.connector != CONNECTOR:
        return None
    mapping = connection.event_mapping_for(event.action)
    if mapping is None:
        return []
    return [insider_event(mapping, event)]


@hookimpl
def send(
    connection: Connection, deliveries: Sequence[Delivery], transport: Transport
) -> Awaitable[SendResult] | None:
    """An awaitable that upserts ``deliveries`` in one request, or ``None`` for another
    connector (decided synchronously, so pluggy's firstresult never sees a stray coroutine).

    The awaitable returns an outcome for every item, failing only the items of users
    Insider lists in ``data.fail``. It raises ``AuthError`` on 401/403 (or a connection
    without a partner name), ``RetryableError`` on 429 (with ``retry_after``) and
    retryable 5xx, and ``PermanentError`` on other errors. The API key travels only in
    the ``X-REQUEST-TOKEN`` header, declared secret to the transport.
    """
    if connection.connector != CONNECTOR:
        return None
    return _upsert(connection, list(deliveries), transport)


async def _upsert(
    connection: Connection, deliveries: list[Delivery], transport: Transport
) -> SendResult:
    partner_name = connection.settings.get(PARTNER_NAME, "")
    if not partner_name:
        raise AuthError(f"connection {connection.id} has no Insider partner name")
    batch = upsert_batch(deliveries)
    result = SendResult()
    if batch.users:
        try:
            body = batch.body()
        except TypeError as error:  # orjson.JSONEncodeError: a value JSON cannot hold
            raise PermanentError(f"cannot serialize the upsert body: {error}") from None
        response = await transport.request(
            "POST",
            upsert_url(connection.settings),
            headers={
                PARTNER_HEADER: partner_name.lower(),
                TOKEN_HEADER: connection.api_key,
                "Content-Type": "application/json",
            },
            body=body,
            secret_headers=(TOKEN_HEADER,),
        )
        result = upsert_outcome(response, batch.item_ids, secrets=(connection.api_key,))
    for item_id in batch.empty_item_ids:
        result.outcomes.setdefault(item_id, ItemOutcome(delivered=True))
    return result


def upsert_url(settings: Mapping[str, str]) -> str:
    """The upsert endpoint under the connection's ``base_url`` (or Insider's host)."""
    return (settings.get(BASE_URL) or DEFAULT_BASE_URL).rstrip("/") + UPSERT_PATH


# Validators. Each raises InvalidInputError naming the offending field relative to the
# object it validates (the admin API knows where that object sits in its request).


def validate_settings(settings: Mapping[str, str]) -> None:
    """Settings must hold a lowercase ``partner_name`` and may hold an http(s) ``base_url``."""
    for key in settings:
        if key not in ALLOWED_SETTINGS:
            raise InvalidInputError(
                key, f"unknown Insider setting; allowed: {', '.join(ALLOWED_SETTINGS)}"
            )
    partner_name = settings.get(PARTNER_NAME)
    if not partner_name:
        raise InvalidInputError(PARTNER_NAME, "required: the name of the Insider account")
    if not PARTNER_NAME_PATTERN.match(partner_name):
        raise InvalidInputError(
            PARTNER_NAME,
            f"{partner_name!r} is not valid: Insider requires the partner name in lowercase; "
            "allowed characters are a-z, 0-9, '_' and '-'",
        )
    base_url = settings.get(BASE_URL)
    if base_url is not None:
        _check_base_url(base_url)


def _check_base_url(base_url: str) -> None:
    if not _is_http_url(base_url):
        raise InvalidInputError(
            BASE_URL, f"{base_url!r} is not an http(s) URL, e.g. {DEFAULT_BASE_URL}"
        )
    parts = urlsplit(base_url)
    # Credentials in the URL would end up in the outbound log, which redacts headers only.
    if parts.username is not None or parts.password is not None:
        raise InvalidInputError(BASE_URL, "must not contain credentials")
    if parts.query or parts.fragment:
        raise InvalidInputError(BASE_URL, "must not contain a query or fragment")


def _is_http_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a malformed port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def validate_customer_id_mapping(mapping: CustomerIdMapping) -> None:
    """Source attribute non-empty; target a default identifier, or a custom identifier
    name in lowercase snake case that is not a default one."""
    if not mapping.source_attribute.strip():
        raise InvalidInputError(
            "source_attribute", "required: the Antavo attribute to identify customers by"
        )
    defaults = ", ".join(sorted(DEFAULT_IDENTIFIERS))
    target = mapping.target_identifier
    if not mapping.custom:
        if target not in DEFAULT_IDENTIFIERS:
            raise InvalidInputError(
                "target_identifier",
                f"{target!r} is not an Insider identifier; allowed: {defaults}, "
                "or set custom=true for a custom identifier",
            )
        return
    _check_custom_name("target_identifier", target, DEFAULT_IDENTIFIERS, "identifier")


def validate_profile_mapping(mapping: ProfileMapping) -> None:
    """Source non-empty; target a default Insider attribute, or (custom) a lowercase snake
    case name that is not a default attribute."""
    if not mapping.source_attribute.strip():
        raise InvalidInputError("source_attribute", "required: the Antavo attribute to send")
    target = mapping.target_attribute
    if not target.strip():
        raise InvalidInputError("target_attribute", "required: the Insider attribute to set")
    if not mapping.custom:
        if target not in DEFAULT_ATTRIBUTES:
            raise InvalidInputError(
                "target_attribute",
                f"{target!r} is not a default Insider attribute "
                f"({', '.join(sorted(DEFAULT_ATTRIBUTES))}); set custom=true to send it "
                "as a custom attribute",
            )
        return
    _check_custom_name("target_attribute", target, DEFAULT_ATTRIBUTES, "attribute")


def validate_event_mapping(mapping: EventMapping) -> None:
    """Source event non-empty; target a lowercase Insider event name; parameters valid
    like attributes (against Insider's default event parameters) and targets unique."""
    if not mapping.source_event.strip():
        raise InvalidInputError("source_event", "required: the Antavo event action")
    if not EVENT_NAME_PATTERN.match(mapping.target_event):
        raise InvalidInputError(
            "target_event",
            f"{mapping.target_event!r} is not a valid Insider event name: lowercase letters, "
            "digits, '.', '_' and '-', starting with a letter or digit",
        )
    seen: dict[str, int] = {}
    for index, parameter in enumerate(mapping.parameters):
        field = f"parameters[{index}]"
        if not parameter.source_parameter.strip():
            raise InvalidInputError(
                f"{field}.source_parameter", "required: the Antavo event parameter to send"
            )
        target = parameter.target_parameter
        if parameter.custom:
            _check_custom_name(
                f"{field}.target_parameter", target, DEFAULT_EVENT_PARAMS, "parameter"
            )
        elif target not in DEFAULT_EVENT_PARAMS:
            raise InvalidInputError(
                f"{field}.target_parameter",
                f"{target!r} is not a default Insider event parameter "
                f"({', '.join(sorted(DEFAULT_EVENT_PARAMS))}); set custom=true to send it "
                "as a custom parameter",
            )
        if target in seen:
            raise InvalidInputError(
                f"{field}.target_parameter",
                f"{target!r} is already the target of parameters[{seen[target]}]",
            )
        seen[target] = index


def _check_custom_name(field: str, name: str, defaults: frozenset[str], kind: str) -> None:
    if not CUSTOM_NAME_PATTERN.match(name):
        raise InvalidInputError(
            field,
            f"{name!r} is not a valid custom {kind} name: lowercase letters, digits and '_', "
            "starting with a letter",
        )
    if name in defaults:
        raise InvalidInputError(
            field, f"{name!r} is a default Insider {kind}; set custom=false to use it"
        )
