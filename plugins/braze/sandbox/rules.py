"""The sandbox's own reading of Braze's object rules (reference braze-users-track.md §3),
written apart from the connector. Each check returns the error ``type`` text Braze would
put in ``errors[]``, or ``None`` when the object is valid."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

PRIMARY = ("external_id", "user_alias", "braze_id")
SECONDARY = ("email", "phone")
MISSING_IDENTIFIER = "'external_id', 'braze_id', 'user_alias', 'email' or 'phone' is required"
TWO_PRIMARIES = "only one of 'external_id', 'braze_id' or 'user_alias' may be provided"
BAD_EMAIL = "The value provided for the 'email' field is not a valid email."
BAD_QUANTITY = "'quantity' is not valid"
SUBSCRIPTION_STATES = {"opted_in", "subscribed", "unsubscribed"}
GENDERS = {"M", "F", "O", "N", "P"}
EMAIL_SHAPE = re.compile(r"[^@\s]+@[^@\s]+\.[A-Za-z]{2,}")
RESERVED_PROPERTIES = {"time", "event_name"}
MAX_EXTERNAL_ID_BYTES = 987
MAX_TEXT = 255


def parse_time(value: Any) -> datetime | None:
    """A Braze date string as an aware datetime (no zone: UTC), else ``None``."""
    if not isinstance(value, str) or not value:
        return None
    text = value.replace("Z", "+00:00")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def identifier_error(obj: dict[str, Any], blocklist: frozenset[str]) -> str | None:
    primaries = [key for key in PRIMARY if obj.get(key) is not None]
    if len(primaries) > 1:
        return TWO_PRIMARIES
    if not primaries and not any(obj.get(key) for key in SECONDARY):
        return MISSING_IDENTIFIER
    external_id = obj.get("external_id")
    if external_id is not None:
        if not isinstance(external_id, str) or not external_id:
            return "'external_id' must be a non-empty string"
        if len(external_id.encode()) > MAX_EXTERNAL_ID_BYTES:
            return "EXTERNAL_USER_ID_TOO_LARGE: external_id is longer than 987 bytes"
        if external_id in blocklist:
            return "provided external_id is blacklisted and disallowed"
    alias = obj.get("user_alias")
    if alias is not None and not (
        isinstance(alias, dict)
        and isinstance(alias.get("alias_name"), str)
        and alias.get("alias_name")
        and isinstance(alias.get("alias_label"), str)
        and alias.get("alias_label")
    ):
        return "'user_alias' must have 'alias_name' and 'alias_label'"
    if not primaries and obj.get("email") is not None and not _is_email(obj["email"]):
        return BAD_EMAIL
    return None


def _is_email(value: Any) -> bool:
    return isinstance(value, str) and EMAIL_SHAPE.fullmatch(value) is not None


def attributes_error(obj: dict[str, Any], accept_gender_u: bool) -> str | None:
    if "email" in obj and obj["email"] is not None and not _is_email(obj["email"]):
        return BAD_EMAIL
    for key, code in (("email_subscribe", "BAD_EMAIL_SUBSCRIPTION_STATE"),
                      ("push_subscribe", "BAD_PUSH_SUBSCRIPTION_STATE")):  # fmt: skip
        if key in obj and obj[key] not in SUBSCRIPTION_STATES:
            return f"{code}: '{key}' must be opted_in, subscribed or unsubscribed"
    gender = obj.get("gender")
    if gender is not None and gender not in GENDERS and not (accept_gender_u and gender == "U"):
        return "'gender' must be one of M, F, O, N, P or null"
    dob = obj.get("dob")
    if dob is not None and not (isinstance(dob, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", dob)):
        return "'dob' must be YYYY-MM-DD"
    location = obj.get("current_location")
    if location is not None and not (
        isinstance(location, dict)
        and isinstance(location.get("latitude"), int | float)
        and isinstance(location.get("longitude"), int | float)
    ):
        return "BAD_LOCATION_UPDATE"
    for key, value in obj.items():
        if isinstance(value, str) and len(value) > MAX_TEXT and key not in ("external_id",):
            return f"'{key}' is longer than 255 characters"
    return None


def properties_error(properties: Any) -> str | None:
    if properties is None:
        return None
    if not isinstance(properties, dict):
        return "'properties' must be an object"
    for name, value in properties.items():
        if name in RESERVED_PROPERTIES:
            return f"'{name}' is a reserved property key"
        if not name or len(name) > MAX_TEXT or name.startswith("$"):
            return f"property name '{name[:MAX_TEXT]}' is not valid"
        if isinstance(value, str) and len(value) > MAX_TEXT:
            return f"property '{name}' is longer than 255 characters"
    return None


def event_error(obj: dict[str, Any]) -> str | None:
    if not isinstance(obj.get("name"), str) or not obj["name"]:
        return "'name' is required"
    if parse_time(obj.get("time")) is None:
        return "'time' is required and must be a date"
    return properties_error(obj.get("properties"))


def purchase_error(obj: dict[str, Any]) -> str | None:
    product = obj.get("product_id")
    if not isinstance(product, str) or not product or len(product) > MAX_TEXT:
        return "'product_id' is required"
    currency = obj.get("currency")
    if not isinstance(currency, str) or not re.fullmatch(r"[A-Z]{3}", currency):
        return "'currency' is not valid"
    price = obj.get("price")
    if isinstance(price, bool) or not isinstance(price, int | float):
        return "'price' is not valid"
    if parse_time(obj.get("time")) is None:
        return "'time' is required and must be a date"
    quantity = obj.get("quantity", 1)
    if isinstance(quantity, bool) or not isinstance(quantity, int) or not 1 <= quantity <= 100:
        return BAD_QUANTITY
    return properties_error(obj.get("properties"))


COUNTRY_NAMES = {
    "hungary": "HU", "united states": "US", "germany": "DE", "australia": "AU",
    "singapore": "SG", "united kingdom": "GB", "france": "FR", "japan": "JP",
}  # fmt: skip
"""A few names Braze's best-effort country mapping knows (§3.4); others become null."""


def stored_country(value: Any) -> str | None:
    if isinstance(value, str) and re.fullmatch(r"[A-Z]{2}", value):
        return value
    if isinstance(value, str):
        return COUNTRY_NAMES.get(value.strip().lower())
    return None
