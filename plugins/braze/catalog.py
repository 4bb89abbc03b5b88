"""Braze's names: identifiers, standard profile attributes with their value rules, the
``purchase`` object's fields and the reserved event property keys (reference
braze-users-track.md §3.2-§3.7)."""

from __future__ import annotations

from engine.connector import CatalogEntry

EXTERNAL_ID = "external_id"
USER_ALIAS = "user_alias"
EMAIL = "email"
PHONE = "phone"
IDENTIFIERS = {
    EXTERNAL_ID: "Braze external_id (primary; at most 987 bytes)",
    USER_ALIAS: "user_alias {alias_name: value, alias_label: the connection's alias_label}",
    EMAIL: "email (secondary identifier: looked up, or an email-only profile is created)",
    PHONE: "phone in E.164 (secondary identifier)",
}

# Standard attribute -> (kind, format): the kind selects the conversion in ``values``.
ATTRIBUTES: dict[str, tuple[str, str]] = {
    "email": ("email", "an email address"),
    "first_name": ("string", ""),
    "last_name": ("string", ""),
    "home_city": ("string", ""),
    "dob": ("date", "YYYY-MM-DD"),
    "gender": ("gender", "M, F, O, N, P or null"),
    "phone": ("phone", "E.164"),
    "country": ("country", "ISO 3166-1 alpha-2"),
    "language": ("language", "ISO 639-1"),
    "time_zone": ("time_zone", "IANA time zone name"),
    "email_subscribe": ("subscription", "opted_in, subscribed or unsubscribed"),
    "push_subscribe": ("subscription", "opted_in, subscribed or unsubscribed"),
    "image_url": ("string", "URL"),
}
RESERVED_ATTRIBUTES = frozenset(
    {
        *ATTRIBUTES,
        *IDENTIFIERS,
        "braze_id",
        "alias_name",
        "alias_label",
        "_update_existing_only",
        "_merge_objects",
        "push_token_import",
        "push_tokens",
        "subscription_groups",
        "current_location",
        "facebook",
        "twitter",
        "bio",
        "email_subscription_info",
        "date_of_first_session",
        "date_of_last_session",
        "marked_email_as_spam_at",
        "email_open_tracking_disabled",
        "email_click_tracking_disabled",
    }
)

PURCHASE = "purchase"
"""The event mapping target that sends Braze purchase objects instead of a custom event."""
PURCHASE_FIELDS = {
    "product_id": ("string", "at most 255 characters"),
    "price": ("float", "in major units (dollars, not cents)"),
    "currency": ("currency", "ISO 4217"),
    "quantity": ("integer", "1-100; larger quantities are split"),
}
PURCHASE_REQUIRED = ("product_id", "price", "currency")
RESERVED_PROPERTIES = frozenset({"time", "event_name"})
MAX_NAME_CHARS = 255
MAX_STRING_CHARS = 255


def catalog_entries() -> tuple[CatalogEntry, ...]:
    """Braze's identifiers, standard attributes, the purchase object and its fields."""
    entries = [
        CatalogEntry("identifier", name, "string", "", text) for name, text in IDENTIFIERS.items()
    ]
    entries += [
        CatalogEntry("attribute", name, "string", fmt, "Braze standard attribute")
        for name, (_, fmt) in ATTRIBUTES.items()
    ]
    entries.append(
        CatalogEntry(
            "event",
            PURCHASE,
            "",
            "",
            "Braze purchase objects, one per line item (map items[].<key> sources)",
        )
    )
    entries += [
        CatalogEntry(
            "event_parameter",
            name,
            kind,
            fmt,
            "purchase object field",
            (PURCHASE,) if name in PURCHASE_REQUIRED else (),
        )
        for name, (kind, fmt) in PURCHASE_FIELDS.items()
    ]
    return tuple(entries)
