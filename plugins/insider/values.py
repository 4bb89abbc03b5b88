"""Antavo values converted to the types and formats Insider documents.

``convert`` takes a value kind from ``catalog`` and returns the value as Insider wants it,
or raises ``ConversionError`` saying why it cannot be sent. A value Insider would drop or
misread is refused here, where the item can fail with a clear message, rather than
sent. Formats follow ``insider-ucd-api.md`` §3.3-3.8: E.164 phone numbers (through
``phonenumbers``), RFC 3339 date-times in UTC ending in ``Z`` (birthday at UTC midnight),
ISO 3166-1 alpha-2 countries and ISO 4217 currencies (through ``pycountry``).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import urlsplit

import phonenumbers
import pycountry

from plugins.insider import catalog

E164_PATTERN = re.compile(r"\+[1-9]\d{6,14}", re.ASCII)
ANTAVO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
ANTAVO_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(\.\d+)?", re.ASCII)
INTEGER_TEXT = re.compile(r"[+-]?\d+", re.ASCII)
NUMBER_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)

TRUE_TEXTS = frozenset({"true", "yes", "y", "1", "on"})
FALSE_TEXTS = frozenset({"false", "no", "n", "0", "off"})
GENDERS: Mapping[str, str] = {"male": "M", "female": "F", "m": "M", "f": "F"}


class ConversionError(ValueError):
    """A value that cannot be sent as the kind asked for; the message says why."""


def convert(kind: str, value: Any, *, phone_region: str = "") -> Any:
    """``value`` converted to ``kind`` (a ``catalog`` value kind).

    ``phone_region`` is the ISO 3166-1 alpha-2 region that phone numbers without a
    country code belong to. Raises ``ConversionError``.
    """
    if kind == catalog.PHONE:
        return phone_number(value, phone_region)
    return _CONVERTERS[kind](value)


def custom_value(value: Any) -> Any:
    """A value for a custom attribute or parameter, whose Insider type Tidegate does not
    know: scalars and arrays of scalars pass, Antavo dates and date-times become RFC 3339
    (Insider's DateTime type), objects are refused."""
    if isinstance(value, list):
        return [_custom_scalar(item) for item in value]
    return _custom_scalar(value)


def _custom_scalar(value: Any) -> Any:
    if isinstance(value, str):  # the most common custom value: tested first
        # Both patterns start with YYYY-: most texts fail that test without a regex.
        if (
            len(value) >= 10
            and value[4] == "-"
            and (ANTAVO_DATE.fullmatch(value) or ANTAVO_DATETIME.fullmatch(value))
        ):
            return datetime_utc(value)
        return value
    if isinstance(value, int):  # bool included
        return value
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, list | dict):
        raise ConversionError(
            "a nested array or object; Insider custom values are scalars or arrays of scalars"
        )
    raise ConversionError(f"a {type(value).__name__}, which JSON cannot carry")


def string(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConversionError(f"a {_type_name(value)}, not text")
    if isinstance(value, float):
        value = _finite(value)
        if value.is_integer():
            return str(int(value))
    return str(value)


def email(value: Any) -> str:
    # Not checked against Insider's pattern here: Insider validates emails itself and
    # rejects a bad one loudly, per user, with its own message (reference §5.2).
    text = string(value).strip()
    if not text:
        raise ConversionError("an empty email address")
    return text


def phone_number(value: Any, region: str = "") -> str:
    """E.164 form of a phone number; a national number needs ``region``."""
    text = string(value).strip()
    if not text:
        raise ConversionError("an empty phone number")
    try:
        parsed = phonenumbers.parse(text, region.upper() or None)
    except phonenumbers.NumberParseException as exc:
        hint = "" if region else "; set default_phone_region for numbers without +country"
        raise ConversionError(f"not a phone number ({exc}){hint}") from None
    if not phonenumbers.is_possible_number(parsed):
        raise ConversionError("not a possible phone number for its country")
    formatted = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    if not E164_PATTERN.fullmatch(formatted):
        raise ConversionError(f"not expressible in E.164 ({formatted})")
    return formatted


def uuid(value: Any) -> str:
    text = string(value)
    if not text.strip():
        raise ConversionError("empty")
    return text


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TRUE_TEXTS:
            return True
        if text in FALSE_TEXTS:
            return False
    raise ConversionError("not a boolean (true/false, yes/no, 1/0)")


def integer(value: Any) -> int:
    number_value = number(value)
    if isinstance(number_value, float):
        if not number_value.is_integer():
            raise ConversionError("not a whole number")
        return int(number_value)
    return number_value


def number(value: Any) -> int | float:
    if isinstance(value, bool):
        raise ConversionError("a boolean, not a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, str):
        text = value.strip()
        if INTEGER_TEXT.fullmatch(text):
            return int(text)
        if NUMBER_TEXT.fullmatch(text):
            return _finite(float(text))
    raise ConversionError("not a number")


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ConversionError("not a finite number")
    return value


def birthday(value: Any) -> str:
    """RFC 3339 at UTC midnight with Z, of the calendar date as Antavo wrote it."""
    return f"{_calendar_date(value).isoformat()}T00:00:00Z"


def _calendar_date(value: Any) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            if ANTAVO_DATE.fullmatch(text):
                return date.fromisoformat(text)
            return _parse_datetime(text).date()
        except (ValueError, ConversionError):
            pass
    raise ConversionError("not a date (YYYY-MM-DD)")


def datetime_utc(value: Any) -> str:
    """RFC 3339 in UTC ending in Z; an Antavo date is its UTC midnight, a date-time
    without an offset is taken as UTC, a number as Unix seconds."""
    if isinstance(value, bool):
        raise ConversionError("a boolean, not a date-time")
    if isinstance(value, int | float):
        moment = datetime.fromtimestamp(_finite(float(value)), UTC)
    elif isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day, tzinfo=UTC)
    elif isinstance(value, str):
        moment = _parse_datetime(value.strip())
    else:
        raise ConversionError("not a date-time")
    return rfc3339_utc(moment)


def _parse_datetime(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ConversionError("not a date-time (RFC 3339 or YYYY-MM-DD hh:mm:ss)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


_TWO_DIGITS = tuple(f"{n:02d}" for n in range(100))
_MILLIS = ("", *(f".{n:03d}" for n in range(1, 1000)))
"""Texts of the two-digit fields and of the milliseconds ("" for none), looked up: every
event carries a timestamp, and formatting the numbers cost three times as much."""


def rfc3339_utc(moment: datetime) -> str:
    """``moment`` in UTC as RFC 3339 with Z; milliseconds only when nonzero. A naive
    datetime is taken to be UTC already."""
    if moment.tzinfo is not None and moment.tzinfo is not UTC:  # already UTC: no copy
        moment = moment.astimezone(UTC)
    # The text of strftime("%Y-%m-%dT%H:%M:%S") (whose %Y is unpadded below year 1000).
    two = _TWO_DIGITS
    return (
        f"{moment.year}-{two[moment.month]}-{two[moment.day]}T{two[moment.hour]}:"
        f"{two[moment.minute]}:{two[moment.second]}{_MILLIS[moment.microsecond // 1000]}Z"
    )


def gender(value: Any) -> str:
    insider = GENDERS.get(value.strip().lower()) if isinstance(value, str) else None
    if insider is None:
        raise ConversionError("not a gender Insider accepts (F or M; Antavo female or male)")
    return insider


def language(value: Any) -> str:
    # Insider's samples write en_US; Antavo and browsers write en-US.
    text = string(value).strip()
    if not text:
        raise ConversionError("empty")
    return text.replace("-", "_")


def country(value: Any) -> str:
    text = string(value).strip().upper()
    found = _country_alpha_2(text) if len(text) in (2, 3) else None
    if found is None:
        raise ConversionError("not an ISO 3166-1 country code (e.g. SG)")
    return found


def currency(value: Any) -> str:
    text = string(value).strip().upper()
    if len(text) != 3 or not _is_currency(text):
        raise ConversionError("not an ISO 4217 currency code (e.g. USD)")
    return text


# pycountry's lookups cost more than the rest of a conversion. Their answers never
# change, and only 2- and 3-letter codes are looked up, so the caches stay small.
@functools.cache
def _country_alpha_2(code: str) -> str | None:
    if len(code) == 2:
        found = pycountry.countries.get(alpha_2=code)
    else:
        found = pycountry.countries.get(alpha_3=code)
    return None if found is None else str(found.alpha_2)


@functools.cache
def _is_currency(code: str) -> bool:
    return pycountry.currencies.get(alpha_3=code) is not None


def url(value: Any) -> str:
    text = string(value).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConversionError("not an http(s) URL")
    return text


def string_array(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [string(item) for item in items]


def number_array(value: Any) -> list[int | float]:
    if isinstance(value, str):
        # A comma-separated list, as contact-list IDs are often kept in a text field.
        value = [part for part in value.split(",") if part.strip()]
    items = value if isinstance(value, list) else [value]
    return [number(item) for item in items]


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


_CONVERTERS: Mapping[str, Callable[[Any], Any]] = {
    catalog.STRING: string,
    catalog.EMAIL: email,
    catalog.UUID: uuid,
    catalog.BOOLEAN: boolean,
    catalog.INTEGER: integer,
    catalog.NUMBER: number,
    catalog.BIRTHDAY: birthday,
    catalog.DATETIME: datetime_utc,
    catalog.GENDER: gender,
    catalog.LANGUAGE: language,
    catalog.COUNTRY: country,
    catalog.CURRENCY: currency,
    catalog.URL: url,
    catalog.STRING_ARRAY: string_array,
    catalog.NUMBER_ARRAY: number_array,
}


def converter(kind: str | None, phone_region: str = "") -> Callable[[Any], Any]:
    """The conversion ``value_for(kind, value, phone_region)`` applies, resolved once for
    code that converts many values of one kind."""
    if kind is None:
        return custom_value
    if kind == catalog.PHONE:
        return functools.partial(phone_number, region=phone_region)
    return _CONVERTERS[kind]


def value_for(kind: str | None, value: Any, phone_region: str = "") -> Any:
    """``value`` as Insider takes it: converted to ``kind`` for a default attribute or
    parameter, or checked as a custom value (``kind`` None). Raises ``ConversionError``."""
    if kind is None:
        return custom_value(value)
    return convert(kind, value, phone_region=phone_region)
