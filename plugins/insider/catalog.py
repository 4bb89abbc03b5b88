"""What Insider's UCD upsert accepts by name: identifiers, default attributes, default event
parameters and default events, each with its type and format.

The source is ``insider-ucd-api.md``: identifiers §3.3, default attributes §3.4, custom
names §3.5, events and their parameters §3.7. Mapping validation, value conversion and the
``ListDestinationCatalog`` RPC all read this one table. The sandbox keeps its own rules on
purpose (``sandbox.rules``), so tests cross-check two independent readings of the reference.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from engine.connector import CatalogEntry

CUSTOM_KEY = "custom"
"""Where Insider takes custom attributes, event parameters and identifiers: under this key."""

# Value kinds. Each names a conversion in ``values``; ``type`` and ``format`` below are
# what the catalog RPC shows a person choosing a target.
STRING = "string"
EMAIL = "email"
PHONE = "phone"
UUID = "uuid"
BOOLEAN = "boolean"
INTEGER = "integer"
NUMBER = "number"
BIRTHDAY = "birthday"
DATETIME = "datetime"
GENDER = "gender"
LANGUAGE = "language"
COUNTRY = "country"
CURRENCY = "currency"
URL = "url"
STRING_ARRAY = "string_array"
NUMBER_ARRAY = "number_array"

ARRAY_KINDS = frozenset({STRING_ARRAY, NUMBER_ARRAY})

_DESCRIBE: Mapping[str, tuple[str, str]] = {
    STRING: ("string", ""),
    EMAIL: ("string", "email address matching ^.+@.+\\..+$"),
    PHONE: ("string", "E.164, e.g. +6598765432"),
    UUID: ("string", "sent as a string, never a number"),
    BOOLEAN: ("boolean", ""),
    INTEGER: ("integer", ""),
    NUMBER: ("number", ""),
    BIRTHDAY: ("datetime", "RFC 3339 at UTC midnight ending in Z, e.g. 1993-03-12T00:00:00Z"),
    DATETIME: ("datetime", "RFC 3339"),
    GENDER: ("string", "F or M"),
    LANGUAGE: ("string", "language_REGION with an underscore, e.g. en_US"),
    COUNTRY: ("string", "ISO 3166-1 alpha-2, e.g. SG"),
    CURRENCY: ("string", "ISO 4217, e.g. USD"),
    URL: ("string", "http(s) URL"),
    STRING_ARRAY: ("array<string>", ""),
    NUMBER_ARRAY: ("array<number>", ""),
}


@dataclass(frozen=True)
class Field:
    """One name Insider knows, with the kind of value it takes."""

    name: str
    kind: str
    description: str

    @property
    def is_array(self) -> bool:
        return self.kind in ARRAY_KINDS


def _table(*fields: Field) -> Mapping[str, Field]:
    return {f.name: f for f in fields}


IDENTIFIERS = _table(
    Field("uuid", UUID, "User's UUID"),
    Field("email", EMAIL, "Email address"),
    Field("phone_number", PHONE, "Phone number"),
)
"""Keys allowed at the root of ``identifiers``; any other identifier goes under ``custom``."""

ATTRIBUTES = _table(
    Field("uuid", UUID, "User's UUID; in Tidegate set only through the customer-ID mapping"),
    Field("email", EMAIL, "Email address; can also be an identifier"),
    Field("phone_number", PHONE, "Phone number; can also be an identifier"),
    Field("email_optin", BOOLEAN, "Marketing email permission"),
    Field("gdpr_optin", BOOLEAN, "false: no Insider campaign or message on any channel"),
    Field("sms_optin", BOOLEAN, "SMS permission"),
    Field("whatsapp_optin", BOOLEAN, "WhatsApp permission"),
    Field("name", STRING, "First name"),
    Field("surname", STRING, "Last name"),
    Field("birthday", BIRTHDAY, "Birthday"),
    Field("gender", GENDER, "Gender"),
    Field("age", INTEGER, "Age"),
    Field("language", LANGUAGE, "Language"),
    Field("country", COUNTRY, "Country"),
    Field("city", STRING, "City"),
    Field("static_segment_id", NUMBER_ARRAY, "Newsletter contact list IDs"),
    Field("list_id", NUMBER_ARRAY, "Newsletter contact list IDs (same meaning)"),
    Field("lo", STRING, "Locale"),
)
"""Default attributes of the upsert parameter table (§3.4); they sit at the attributes root."""

IDENTIFIER_ONLY_ATTRIBUTES = frozenset({"uuid"})
"""Defaults Tidegate sets only as identifiers (through the customer-ID mapping)."""

EVENT_PARAMETERS = _table(
    Field("event_group_id", STRING, "Groups the lines of one order or cart"),
    Field("product_id", STRING, "Product ID"),
    Field("name", STRING, "Product name"),
    Field("taxonomy", STRING_ARRAY, 'Category tree, e.g. ["Electronic", "Phone"]'),
    Field("url", URL, "Product URL"),
    Field("currency", CURRENCY, "Currency"),
    Field("quantity", INTEGER, "Quantity"),
    Field("unit_price", NUMBER, "Price before discount"),
    Field("unit_sale_price", NUMBER, "Price after discount"),
    Field("locale", STRING, "Locale"),
    Field("color", STRING, "Color"),
    Field("size", STRING, "Size"),
    # Documented as a string in the upsert table, so numbers are sent as their text.
    Field("shipping_cost", STRING, "Shipping cost"),
    Field("promotion_name", STRING, "Promotion name"),
    Field("promotion_discount", NUMBER, "Promotion discount"),
    # Predefined in the web event integration table rather than the upsert table.
    Field("stock", NUMBER, "Stock"),
    Field("product_image_url", URL, "Product image URL"),
    Field("session_id", STRING, "Session ID"),
)
"""Default ``event_params`` (§3.7); anything else goes under ``event_params.custom``."""

REQUIRED_EVENT_PARAMETERS: Mapping[str, tuple[str, ...]] = {
    "purchase": ("event_group_id", "unit_sale_price", "currency"),
    "cart_page_view": ("event_group_id", "unit_sale_price", "currency"),
}
"""Parameters a mapping to these events must provide. Insider's table also marks
``quantity`` required on ``purchase``, but its own example passed without it (§3.7,
UNCONFIRMED), so it is recommended rather than required."""

DEFAULT_EVENTS: Mapping[str, str] = {
    "purchase": "An order line (one event per line, shared event_group_id)",
    "cart_page_view": "A cart view (one event per line, shared event_group_id)",
    "confirmation_page_view": "Order confirmation page view",
    "item_added_to_cart": "Item added to the cart",
    "item_removed_from_cart": "Item removed from the cart",
    "product_detail_page_view": "Product page view",
    "listing_page_view": "Listing page view",
    "checkout_page_view": "Checkout page view",
    "sign_up_confirmation": "Sign-up confirmation",
}
"""Insider's default event system names (§3.7, §7.1); custom events need no entry."""

CUSTOM_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")
"""Custom attribute, parameter and identifier names: Insider advises "all lowercase,
without spaces" (§3.5); no formal rule is published."""

EVENT_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
"""Insider documents ``^[a-z0-9][a-zA-Z0-9._-]*$`` yet rejected ``homepageView`` (§3.7);
the lowercase form is the one known to be accepted."""


def describe(kind: str) -> tuple[str, str]:
    """``(type, format)`` of a value kind, as the catalog RPC shows it."""
    return _DESCRIBE[kind]


def catalog_entries() -> tuple[CatalogEntry, ...]:
    """The destination catalog the ``connector_info`` hook declares."""
    entries: list[CatalogEntry] = []

    def add(kind: str, field: Field, required_for: tuple[str, ...] = ()) -> None:
        value_type, value_format = describe(field.kind)
        entries.append(
            CatalogEntry(
                kind=kind,
                name=field.name,
                type=value_type,
                format=value_format,
                description=field.description,
                required_for=required_for,
            )
        )

    for field in IDENTIFIERS.values():
        add("identifier", field)
    for field in ATTRIBUTES.values():
        if field.name not in IDENTIFIER_ONLY_ATTRIBUTES:
            add("attribute", field)
    for name, description in DEFAULT_EVENTS.items():
        entries.append(CatalogEntry(kind="event", name=name, description=description))
    for field in EVENT_PARAMETERS.values():
        required = tuple(
            event for event, names in REQUIRED_EVENT_PARAMETERS.items() if field.name in names
        )
        add("event_parameter", field, required)
    return tuple(entries)
