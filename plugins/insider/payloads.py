"""Insider upsert payloads: identifiers, attributes, events and the request body.

Everything here is pure: values in, JSON-ready dicts out. Names and formats follow
Insider's UCD upsert API (identifiers §3.3, default attributes §3.4, custom attributes
§3.5, events §3.7 of ``insider-ucd-api.md``). Default names sit at the root of
``attributes`` / ``event_params``; custom ones under their ``custom`` object.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import orjson

from engine.errors import MappingError
from engine.records import (
    ANTAVO_CUSTOMER_ID,
    AntavoEvent,
    Customer,
    CustomerIdMapping,
    Delivery,
    EventMapping,
    ProfileMapping,
)

DEFAULT_IDENTIFIERS = frozenset({"uuid", "email", "phone_number"})
"""Keys Insider accepts at the root of ``identifiers``; anything else goes under ``custom``."""

DEFAULT_ATTRIBUTES = frozenset(
    {
        "email",
        "phone_number",
        "email_optin",
        "gdpr_optin",
        "sms_optin",
        "whatsapp_optin",
        "name",
        "surname",
        "birthday",
        "gender",
        "age",
        "language",
        "country",
        "city",
        "static_segment_id",
        "list_id",
        "lo",
    }
)
"""Default attributes of the upsert parameter table. ``uuid`` is left out on purpose: in
Tidegate it is only ever an identifier."""

DEFAULT_EVENT_PARAMS = frozenset(
    {
        "event_group_id",
        "product_id",
        "name",
        "taxonomy",
        "url",
        "currency",
        "quantity",
        "unit_price",
        "unit_sale_price",
        "locale",
        "color",
        "size",
        "shipping_cost",
        "promotion_name",
        "promotion_discount",
        # Predefined in Insider's web event integration table rather than the upsert table.
        "stock",
        "product_image_url",
        "session_id",
    }
)
"""Default ``event_params`` names; anything else goes under ``event_params.custom``."""

CUSTOM_KEY = "custom"

BOOLEAN_ATTRIBUTES = frozenset({"email_optin", "gdpr_optin", "sms_optin", "whatsapp_optin"})
ANTAVO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
GENDERS = {"male": "M", "female": "F", "m": "M", "f": "F"}

MAX_USERS_PER_REQUEST = 1000


def identifiers_for(mapping: CustomerIdMapping, customer: Customer) -> dict[str, Any]:
    """The ``identifiers`` object of ``customer`` under ``mapping``.

    The value is the Antavo customer ID when ``mapping.source_attribute`` is
    ``customer_id``, else that profile attribute. It is always sent as a string (Insider
    rejects a numeric ``uuid``). Raises ``MappingError`` when the value is missing, empty
    or not a string or integer.
    """
    source = mapping.source_attribute
    target = mapping.target_identifier
    if source == ANTAVO_CUSTOMER_ID:
        value: Any = customer.id
    else:
        value = customer.attributes.get(source)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise MappingError(
            "identify",
            f"customer {customer.id} has no value for {source}, "
            f"the attribute mapped to the Insider identifier {target}",
        )
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise MappingError(
            "identify",
            f"customer {customer.id}: {source} is a {type(value).__name__}, "
            f"not a string or integer, so it cannot be the Insider identifier {target}",
        )
    if mapping.custom:
        return {CUSTOM_KEY: {target: str(value)}}
    return {target: str(value)}


def profile_attributes(
    mappings: Sequence[ProfileMapping], customer: Customer, changes: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``attributes`` object for the changed attributes that ``mappings`` cover.

    Only attributes present in ``changes`` are sent; a ``None`` value is left out because
    upsert cannot clear a value (that takes Insider's delete-attribute endpoint). Returns
    ``{}`` when nothing is mapped. Raises ``MappingError`` for a value Insider cannot take.
    """
    attributes: dict[str, Any] = {}
    custom: dict[str, Any] = {}
    for mapping in mappings:
        if mapping.source_attribute not in changes:
            continue
        value = changes[mapping.source_attribute]
        if value is None:
            continue
        if mapping.custom:
            custom[mapping.target_attribute] = _plain_value(mapping, customer, value)
        else:
            attributes[mapping.target_attribute] = _default_attribute_value(
                mapping, customer, value
            )
    if custom:
        attributes[CUSTOM_KEY] = custom
    return attributes


def _plain_value(mapping: ProfileMapping, customer: Customer, value: Any) -> Any:
    # Insider attributes are scalars or arrays; an object has nowhere to go.
    if isinstance(value, Mapping):
        raise _unmappable(
            mapping, customer, value, "an object; Insider attributes are scalars or arrays"
        )
    return value


def _default_attribute_value(mapping: ProfileMapping, customer: Customer, value: Any) -> Any:
    target = mapping.target_attribute
    if target == "birthday":
        return _birthday(mapping, customer, value)
    if target == "gender":
        gender = GENDERS.get(value.lower()) if isinstance(value, str) else None
        if gender is None:
            raise _unmappable(mapping, customer, value, "not a gender Insider accepts (M or F)")
        return gender
    if target in BOOLEAN_ATTRIBUTES and not isinstance(value, bool):
        raise _unmappable(mapping, customer, value, "not a boolean")
    return _plain_value(mapping, customer, value)


def _birthday(mapping: ProfileMapping, customer: Customer, value: Any) -> str:
    # Insider wants RFC 3339 at UTC midnight ending in Z; Antavo dates are YYYY-MM-DD.
    day: date | None = None
    if isinstance(value, datetime):
        day = value.date()
    elif isinstance(value, date):
        day = value
    elif isinstance(value, str) and ANTAVO_DATE.match(value):
        try:
            day = date.fromisoformat(value)
        except ValueError:
            day = None
    if day is None:
        raise _unmappable(mapping, customer, value, "not a date YYYY-MM-DD")
    return f"{day.isoformat()}T00:00:00Z"


def _unmappable(mapping: ProfileMapping, customer: Customer, value: Any, why: str) -> MappingError:
    return MappingError(
        "map_profile",
        f"customer {customer.id}: {mapping.source_attribute} value {value!r} is {why}, "
        f"so it cannot be sent as the Insider attribute {mapping.target_attribute}",
    )


def insider_event(mapping: EventMapping, event: AntavoEvent) -> dict[str, Any]:
    """One Insider event for ``event`` under ``mapping``.

    Each parameter mapping copies ``event.data[source_parameter]`` when present and not
    ``None``. ``event_params`` is left out when no parameter is mapped.
    """
    params: dict[str, Any] = {}
    custom: dict[str, Any] = {}
    for parameter in mapping.parameters:
        value = event.data.get(parameter.source_parameter)
        if value is None:
            continue
        if parameter.custom:
            custom[parameter.target_parameter] = value
        else:
            params[parameter.target_parameter] = value
    if custom:
        params[CUSTOM_KEY] = custom
    payload: dict[str, Any] = {
        "event_name": mapping.target_event,
        "timestamp": rfc3339_utc(event.timestamp),
    }
    if params:
        payload["event_params"] = params
    return payload


def rfc3339_utc(moment: datetime) -> str:
    """``moment`` in UTC as RFC 3339 with ``Z``; milliseconds only when nonzero.

    A naive datetime is taken to be UTC already.
    """
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    millis = moment.microsecond // 1000
    if millis:
        text += f".{millis:03d}"
    return text + "Z"


@dataclass
class UpsertBatch:
    """The users of one upsert request and, per user index, the delivery items it carries.

    ``item_ids[n]`` are the items merged into ``users[n]``. ``empty_item_ids`` are items
    with neither attributes nor events: Insider would reject such a user, and there is
    nothing to deliver for them.
    """

    users: list[dict[str, Any]] = field(default_factory=list)
    item_ids: list[list[int]] = field(default_factory=list)
    empty_item_ids: list[int] = field(default_factory=list)

    def body(self) -> bytes:
        return orjson.dumps({"users": self.users})


def upsert_batch(deliveries: Sequence[Delivery]) -> UpsertBatch:
    """Merge ``deliveries`` into one user object per distinct customer, in first-seen order.

    Identifiers come from the customer's first delivery; attributes merge in order (later
    values win, ``custom`` merged key by key); events are concatenated in order.
    ``attributes`` / ``events`` are left out of a user when empty. Raises ``ValueError``
    for more than ``MAX_USERS_PER_REQUEST`` customers (the engine batches below that).
    """
    merged: dict[str, _MergedUser] = {}
    for delivery in deliveries:
        user = merged.get(delivery.customer.id)
        if user is None:
            user = merged[delivery.customer.id] = _MergedUser(dict(delivery.identifiers))
        user.add(delivery)
    batch = UpsertBatch()
    for user in merged.values():
        payload = user.payload()
        if payload is None:
            batch.empty_item_ids.extend(user.item_ids)
            continue
        batch.users.append(payload)
        batch.item_ids.append(user.item_ids)
    if len(batch.users) > MAX_USERS_PER_REQUEST:
        raise ValueError(
            f"{len(batch.users)} users in one upsert; Insider takes at most {MAX_USERS_PER_REQUEST}"
        )
    return batch


@dataclass
class _MergedUser:
    identifiers: dict[str, Any]
    attributes: dict[str, Any] = field(default_factory=dict)
    custom: dict[str, Any] = field(default_factory=dict)
    events: list[Mapping[str, Any]] = field(default_factory=list)
    item_ids: list[int] = field(default_factory=list)

    def add(self, delivery: Delivery) -> None:
        self.item_ids.append(delivery.item_id)
        for key, value in (delivery.attributes or {}).items():
            if key == CUSTOM_KEY and isinstance(value, Mapping):
                self.custom.update(value)
            else:
                self.attributes[key] = value
        self.events.extend(delivery.events)

    def payload(self) -> dict[str, Any] | None:
        attributes = dict(self.attributes)
        if self.custom:
            attributes[CUSTOM_KEY] = self.custom
        if not attributes and not self.events:
            return None
        user: dict[str, Any] = {"identifiers": self.identifiers}
        if attributes:
            user["attributes"] = attributes
        if self.events:
            user["events"] = self.events
        return user
