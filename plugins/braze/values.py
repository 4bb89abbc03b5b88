"""Values converted to Braze's formats (reference §3.4, §3.8). Each converter returns the
value to send or raises ``ConversionError`` saying what Braze accepts."""

from __future__ import annotations

import math
import re
import zoneinfo
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from functools import cache
from typing import Any

import phonenumbers
import pycountry

from plugins.braze.catalog import MAX_STRING_CHARS
from plugins.braze.settings import echo

EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
GENDERS = {
    "m": "M", "male": "M", "man": "M",
    "f": "F", "female": "F", "woman": "F",
    "o": "O", "other": "O",
    "n": "N", "not applicable": "N",
    "p": "P", "prefer not to say": "P",
}  # fmt: skip
UNKNOWN_GENDERS = frozenset({"u", "unknown", ""})
SUBSCRIPTIONS = ("opted_in", "subscribed", "unsubscribed")


class ConversionError(ValueError):
    """A value Braze would not accept; the message says what it accepts."""


def braze_time(moment: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.sssZ`` in UTC (a naive time is taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _string(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConversionError(f"expected text, got {type(value).__name__}")
    text = str(value)
    if len(text) > MAX_STRING_CHARS:
        raise ConversionError(f"{len(text)} characters; Braze keeps at most {MAX_STRING_CHARS}")
    return text


def _email(value: Any) -> str:
    text = _string(value).strip()
    if not EMAIL.fullmatch(text):
        raise ConversionError(f"{echo(text)} is not an email address")
    return text


def _date(value: Any) -> str:
    if isinstance(value, datetime):
        return value.date().isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, str):
        try:
            return date.fromisoformat(value[:10]).isoformat()
        except ValueError:
            pass
    raise ConversionError(f"{echo(str(value))} is not a date; use YYYY-MM-DD")


def _gender(value: Any) -> str | None:
    text = str(value).strip().lower() if value is not None else ""
    if text in UNKNOWN_GENDERS:
        return None  # Braze's "unknown" is null; "U" is not in its REST docs
    gender = GENDERS.get(text)
    if gender is None:
        raise ConversionError(
            f"{echo(str(value))} is not a gender Braze knows: use M, F, O (other), "
            "N (not applicable), P (prefer not to say) or unknown"
        )
    return gender


def phone_converter(region: str) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = _string(value)
        try:
            number = phonenumbers.parse(text, region or None)
        except phonenumbers.NumberParseException:
            number = None
        if number is None or not phonenumbers.is_valid_number(number):
            hint = "" if region else " (or set default_phone_region)"
            raise ConversionError(f"{echo(text)} is not a phone number in E.164 form{hint}")
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)

    return convert


@cache
def _country(text: str) -> str | None:
    try:
        return str(pycountry.countries.lookup(text).alpha_2)
    except LookupError:
        return None


def _country_code(value: Any) -> str:
    code = _country(_string(value).strip())
    if code is None:
        raise ConversionError(
            f"{echo(str(value))} is not a country; use an ISO 3166-1 alpha-2 code such as HU"
        )
    return code


@cache
def _language(text: str) -> str | None:
    language = None
    if len(text) == 2:
        language = pycountry.languages.get(alpha_2=text.lower())
    if language is None:
        try:
            language = pycountry.languages.lookup(text)
        except LookupError:
            return None
    code = getattr(language, "alpha_2", None)
    return str(code) if code else None


def _language_code(value: Any) -> str:
    code = _language(_string(value).strip().replace("_", "-").split("-")[0])
    if code is None:
        raise ConversionError(
            f"{echo(str(value))} is not a language with an ISO 639-1 code; use e.g. en, hu"
        )
    return code


@cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _time_zone(value: Any) -> str:
    text = _string(value)
    if text not in _zones():
        raise ConversionError(f"{echo(text)} is not an IANA time zone, e.g. Europe/Budapest")
    return text


def _subscription(value: Any) -> str:
    if value is True:
        return "opted_in"
    if value is False:
        return "unsubscribed"
    if value not in SUBSCRIPTIONS:
        raise ConversionError(f"{echo(str(value))} is not one of {', '.join(SUBSCRIPTIONS)}")
    return str(value)


def currency(value: Any) -> str:
    text = _string(value).strip().upper()
    if pycountry.currencies.get(alpha_3=text) is None:
        raise ConversionError(f"{echo(str(value))} is not an ISO 4217 currency code")
    return text


def price(value: Any) -> float:
    if isinstance(value, bool):
        raise ConversionError("a price must be a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConversionError(f"{echo(str(value))} is not a price") from None
    if not math.isfinite(number):
        raise ConversionError(f"{value} is not a price")
    return number


def quantity(value: Any) -> int:
    if isinstance(value, bool):
        raise ConversionError("a quantity must be a whole number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConversionError(f"{echo(str(value))} is not a quantity") from None
    if not number.is_integer() or number < 1:
        raise ConversionError(f"{value} is not a whole quantity of at least 1")
    return int(number)


def product_id(value: Any) -> str:
    text = _string(value)
    if not text:
        raise ConversionError("a product id must not be empty")
    return text


def custom_value(value: Any) -> Any:
    """A custom attribute or property value: text at most 255 characters, numbers,
    booleans, dates as ``YYYY-MM-DDTHH:MM:SS.sssZ``, arrays and objects of those."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConversionError(f"{value} is not a number Braze stores")
        return value
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, datetime):
        return braze_time(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [custom_value(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): custom_value(v) for k, v in value.items()}
    raise ConversionError(f"a {type(value).__name__} cannot be sent to Braze")


def standard_converter(kind: str, region: str) -> Callable[[Any], Any]:
    """The converter of a standard attribute's kind (``catalog.ATTRIBUTES``)."""
    converters: dict[str, Callable[[Any], Any]] = {
        "email": _email,
        "string": _string,
        "date": _date,
        "gender": _gender,
        "phone": phone_converter(region),
        "country": _country_code,
        "language": _language_code,
        "time_zone": _time_zone,
        "subscription": _subscription,
    }
    return converters[kind]
