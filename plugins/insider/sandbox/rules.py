"""Stateless validation rules of the Insider sandbox (see ``plugins.insider.sandbox``).

Error keys are built as Insider builds them: ``users.<N>.<path>.<rule>``, each holding a
list of messages (reference §5.2). Keys and messages documented by Insider are used
verbatim, typos included. Every key not in §5.2 is an inference and is marked as such.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

EMAIL_PATTERN = r"^.+@.+\..+$"
PHONE_PATTERN = r"^\+[1-9]\d{6,14}$"
EVENT_NAME_PATTERN = r"^[a-z0-9][a-zA-Z0-9._-]*$"

# re.ASCII because Insider's \d (Go regexp) matches ASCII digits only.
_EMAIL = re.compile(EMAIL_PATTERN, re.ASCII)
_PHONE = re.compile(PHONE_PATTERN, re.ASCII)
_EVENT_NAME = re.compile(EVENT_NAME_PATTERN, re.ASCII)
# Go's time.RFC3339 parser: upper-case T and Z, optional fraction, offset with a colon.
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.\d+)?(Z|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)

IDENTIFIER_KEYS = frozenset({"email", "phone_number", "uuid", "custom"})

# §3.7 lists quantity as required on purchase too, but Insider's own example passed
# without it, so only the three parameters that are enforced in practice are required.
REQUIRED_EVENT_PARAMS: Mapping[str, tuple[str, ...]] = {
    "purchase": ("event_group_id", "unit_sale_price", "currency"),
    "cart_page_view": ("event_group_id", "unit_sale_price", "currency"),
}

# Types of default attributes (§3.4) and event parameters (§3.7), checked only with
# strict_types. Inference: Insider may reject such a value or silently not reflect it
# ("ensure that the data types match", §3.5); the sandbox rejects it, the stricter choice.
# gender F/M comes from the web-SDK docs and is UNCONFIRMED for upsert.
ATTRIBUTE_TYPES: Mapping[str, str] = {
    "email_optin": "boolean",
    "gdpr_optin": "boolean",
    "sms_optin": "boolean",
    "whatsapp_optin": "boolean",
    "name": "string",
    "surname": "string",
    "gender": "gender",
    "age": "number",
    "language": "string",
    "country": "country",
    "city": "string",
    "static_segment_id": "number_array",
    "list_id": "number_array",
    "lo": "string",
    "uuid": "string",
}
EVENT_PARAM_TYPES: Mapping[str, str] = {
    "event_group_id": "string",
    "product_id": "string",
    "name": "string",
    "taxonomy": "string_array",
    "url": "string",
    "currency": "currency",
    "quantity": "integer",
    "unit_price": "number",
    "unit_sale_price": "number",
    "locale": "string",
    "color": "string",
    "size": "string",
    "shipping_cost": "string",
    "promotion_name": "string",
    "promotion_discount": "number",
}
_COUNTRY = re.compile(r"[A-Z]{2}", re.ASCII)
_CURRENCY = re.compile(r"[A-Z]{3}", re.ASCII)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_TYPE_CHECKS: Mapping[str, Callable[[object], bool]] = {
    "boolean": lambda v: isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "number": _is_number,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "gender": lambda v: v in ("F", "M"),
    "country": lambda v: isinstance(v, str) and _COUNTRY.fullmatch(v) is not None,
    "currency": lambda v: isinstance(v, str) and _CURRENCY.fullmatch(v) is not None,
    "string_array": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
    "number_array": lambda v: isinstance(v, list) and all(_is_number(i) for i in v),
}


@dataclass(frozen=True)
class Strictness:
    """Choices the sandbox makes where Insider's behaviour is UNCONFIRMED."""

    strict_types: bool = True
    """Reject default attributes and parameters of the wrong type (else accept them)."""
    require_purchase_quantity: bool = False
    """Insider's table marks quantity required on purchase; its own example passed
    without it (§3.7), so by default it is not required."""


ErrorMap = dict[str, list[str]]


def format_value(value: object) -> str:
    """Render a value inside a message the way Insider does (``uuid must be string: 12345``)."""
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def is_rfc3339(value: object, *, utc_only: bool = False) -> bool:
    if not isinstance(value, str):
        return False
    match = _RFC3339.fullmatch(value)
    if match is None:
        return False
    if utc_only and match.group(7) != "Z":
        return False
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    try:
        datetime(year, month, day, hour, minute, second)
    except ValueError:
        return False
    if match.group(8) is not None:
        return int(match.group(9)) <= 23 and int(match.group(10)) <= 59
    return True


def identifier_pairs(identifiers: Mapping[str, Any]) -> set[tuple[str, str]]:
    """Flatten identifiers to ``(key, value)`` pairs; custom ones become ``custom.<name>``."""
    pairs: set[tuple[str, str]] = set()
    for key, value in identifiers.items():
        if key == "custom" and isinstance(value, Mapping):
            pairs.update((f"custom.{name}", v) for name, v in value.items() if isinstance(v, str))
        elif isinstance(value, str):
            pairs.add((key, value))
    return pairs


def identifier_value_error(key: str, value: object) -> tuple[str, str] | None:
    """The ``(rule, message)`` a default identifier value breaks, if any."""
    if key == "email" and not (isinstance(value, str) and _EMAIL.fullmatch(value)):
        return f"regexp({EMAIL_PATTERN})", f"not a valid email address: {format_value(value)}"
    if key == "phone_number" and not (isinstance(value, str) and _PHONE.fullmatch(value)):
        return (
            f"regexp({PHONE_PATTERN})",
            f"user has an invalid phone number: {format_value(value)}",
        )
    if key == "uuid":
        if not isinstance(value, str):
            return "type(string)", f"uuid must be string: {format_value(value)}"
        if not value:
            # Inference: an empty uuid identifies nobody, so it is refused.
            return "required", "uuid must not be empty"
    return None


class _Collector:
    def __init__(self, index: int) -> None:
        self.prefix = f"users.{index}."
        self.errors: ErrorMap = {}

    def add(self, path: str, message: str) -> None:
        messages = self.errors.setdefault(self.prefix + path, [])
        if message not in messages:
            messages.append(message)


def _check_user_key(user: Mapping[str, Any], errors: _Collector) -> None:
    identifiers = user.get("identifiers")
    insider_id = user.get("insider_id")
    if insider_id is not None and not (isinstance(insider_id, str) and insider_id):
        # Inference: §3.2 only says insider_id is a string.
        message = f"insider_id must be string: {format_value(insider_id)}"
        errors.add("insider_id.type(string)", message)
    if identifiers is None:
        if insider_id is None:
            message = "either insider_id or idenifiers must be specified"
            errors.add("identifiers.required", message)
            errors.add("insider_id.required", message)
        return
    if not isinstance(identifiers, dict):
        errors.add("identifiers.type(object)", "identifiers must be an object")  # inference
        return
    if not identifiers and insider_id is None:
        message = "either insider_id or idenifiers must be specified"
        errors.add("identifiers.required", message)
        errors.add("insider_id.required", message)
    for key, value in identifiers.items():
        if key not in IDENTIFIER_KEYS:
            errors.add(
                "identifiers.*.in(defaults_column)",
                "key must be one of phone_number(pn), email(em) or uuid",
            )
        elif key == "custom":
            _check_custom_identifiers(value, errors)
        elif (problem := identifier_value_error(key, value)) is not None:
            errors.add(f"identifiers.*.{problem[0]}", problem[1])


def _check_custom_identifiers(custom: object, errors: _Collector) -> None:
    # Inference: custom identifiers must be a non-empty object of non-empty strings.
    if not isinstance(custom, dict) or not custom:
        errors.add(
            "identifiers.custom.type(object)", "custom identifiers must be a non-empty object"
        )
        return
    for name, value in custom.items():
        if not (isinstance(value, str) and value):
            errors.add(
                "identifiers.custom.*.type(string)",
                f"custom identifier must be a non-empty string: {name}",
            )


def _check_types(
    values: Mapping[str, Any], types: Mapping[str, str], path: str, errors: _Collector
) -> None:
    for name, value in values.items():
        expected = types.get(name)
        if expected is not None and value is not None and not _TYPE_CHECKS[expected](value):
            message = f"{name} must be {expected}: {format_value(value)}"  # inference
            errors.add(f"{path}{name}.*.type({expected})", message)


def _check_attributes(attributes: object, errors: _Collector, strictness: Strictness) -> None:
    if not isinstance(attributes, dict):
        errors.add("attributes.type(object)", "attributes must be an object")  # inference
        return
    custom = attributes.get("custom")
    if custom is not None and not isinstance(custom, dict):
        errors.add("attributes.custom.type(object)", "custom attributes must be an object")
    # §3.2: "at least one attribute in your object"; an empty custom object is no attribute.
    if not any(key != "custom" for key in attributes) and not custom:
        errors.add("attributes.min(1)", "attributes must have at least one attribute")
    for key in ("email", "phone_number"):
        value = attributes.get(key)
        if value is not None and (problem := identifier_value_error(key, value)) is not None:
            errors.add(f"attributes.{key}.*.{problem[0]}", problem[1])
    birthday = attributes.get("birthday")
    if birthday is not None and not is_rfc3339(birthday, utc_only=True):
        errors.add("attributes.birthday.*.rfc3339", f"invalid birthday: {format_value(birthday)}")
    if strictness.strict_types:
        _check_types(attributes, ATTRIBUTE_TYPES, "attributes.", errors)


def _check_events(events: object, errors: _Collector, strictness: Strictness) -> None:
    if not isinstance(events, list):
        errors.add("events.type(array)", "events must be an array")  # inference
        return
    for m, event in enumerate(events):
        path = f"events.{m}."
        if not isinstance(event, dict):
            errors.add(path + "type(object)", "event must be an object")
            continue
        name = event.get("event_name")
        if name is None:
            errors.add(path + "event_name.required", "event_name is required")
        elif (
            not isinstance(name, str)
            or not _EVENT_NAME.fullmatch(name)
            # The documented regex accepts "homepageView", yet Insider rejected it (§3.7).
            or any("A" <= char <= "Z" for char in name)
        ):
            errors.add(
                path + f"event_name.*.regexp({EVENT_NAME_PATTERN})",
                f"invalid event name: {format_value(name)}",
            )
        timestamp = event.get("timestamp")
        if timestamp is None:
            errors.add(path + "timestamp.required", "timestamp is required")
        elif not is_rfc3339(timestamp):
            message = f"invalid timestamp: {format_value(timestamp)}"
            errors.add(path + "timestamp.*.rfc3339", message)
        params = event.get("event_params")
        if params is not None and not isinstance(params, dict):
            errors.add(path + "event_params.type(object)", "event_params must be an object")
            params = None
        required = REQUIRED_EVENT_PARAMS.get(name, ()) if isinstance(name, str) else ()
        if name == "purchase" and strictness.require_purchase_quantity:
            required = (*required, "quantity")
        if params is not None and strictness.strict_types:
            _check_types(params, EVENT_PARAM_TYPES, path + "event_params.", errors)
        for param in required:
            if params is None or params.get(param) in (None, ""):
                errors.add(
                    path + "event_params.*.required",
                    f"{param} parameter is required on {name} event",
                )


def validate_upsert_user(
    index: int, user: object, strictness: Strictness = Strictness()
) -> ErrorMap:
    """Errors of one upsert user object; empty when the user is acceptable."""
    errors = _Collector(index)
    if not isinstance(user, dict):
        errors.add("type(object)", "user must be an object")  # inference
        return errors.errors
    _check_user_key(user, errors)
    attributes = user.get("attributes")
    events = user.get("events")
    if attributes is None and not events:
        # Inference: §3.2 states the rule; the key mirrors the identifiers/insider_id pair.
        message = "either attributes or events must be specified"
        errors.add("attributes.required", message)
        errors.add("events.required", message)
    if attributes is not None:
        _check_attributes(attributes, errors, strictness)
    if events is not None:
        _check_events(events, errors, strictness)
    return errors.errors


def _check_deletions(spec: Mapping[str, Any], path: str, errors: _Collector) -> bool:
    """Check ``whole`` and ``partial`` of one delete spec; True when it deletes something."""
    whole = spec.get("whole")
    partial = spec.get("partial")
    if whole is not None and not (
        isinstance(whole, list) and all(isinstance(name, str) for name in whole)
    ):
        errors.add(path + "whole.type(array)", "whole must be an array of attribute names")
    if partial is not None:
        if not isinstance(partial, dict):
            errors.add(path + "partial.type(object)", "partial must be an object")
        else:
            for name, values in partial.items():
                if not isinstance(values, list):
                    message = f"partial values must be an array: {name}"
                    errors.add(path + "partial.*.type(array)", message)
    return bool(whole) or bool(partial)


def validate_delete_user(index: int, user: object) -> ErrorMap:
    """Errors of one ``/attribute/delete`` user object (§6.1). All keys here are inferences
    except the identifier ones, which are shared with upsert."""
    errors = _Collector(index)
    if not isinstance(user, dict):
        errors.add("type(object)", "user must be an object")
        return errors.errors
    _check_user_key(user, errors)
    deletes = _check_deletions(user, "", errors)
    custom = user.get("custom")
    if custom is not None:
        if isinstance(custom, dict):
            deletes = _check_deletions(custom, "custom.", errors) or deletes
        else:
            errors.add("custom.type(object)", "custom must be an object")
    if not deletes:
        errors.add("whole.required", "either whole or partial must be specified")
    return errors.errors


def identity_side(identifier: object) -> tuple[str, Any] | None:
    """The single ``(key, value)`` of one side of an identity update, or None if it does
    not hold exactly one entry (custom entries count individually, §6.4)."""
    if not isinstance(identifier, dict):
        return None
    entries: list[tuple[str, Any]] = []
    for key, value in identifier.items():
        if key == "custom" and isinstance(value, dict):
            entries.extend((f"custom.{name}", v) for name, v in value.items())
        else:
            entries.append((key, value))
    return entries[0] if len(entries) == 1 else None
