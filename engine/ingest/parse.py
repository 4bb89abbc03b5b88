"""Antavo records in: a request body validated as a whole into ``AntavoEvent`` records.

Errors name the offending field from the request's root (``events[2].action``), so a
sender can fix the record. An event without Antavo's ``id`` gets a content hash as its id,
which is how a re-send of it is recognised.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from engine.connector.records import AntavoEvent
from engine.errors import InvalidInputError
from engine.ingest.limits import DEFAULT_LIMITS, IngestLimits, check_data, echo

MAX_EVENTS_PER_REQUEST = DEFAULT_LIMITS.max_events
MAX_ID_LENGTH = 256
CONTENT_ID_PREFIX = "sha256:"
"""Starts the id of an event that came without one: the hash of its content."""
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_UNIX = 253_402_300_799  # 9999-12-31T23:59:59Z
TIMESTAMP_RANGE = "from 1970-01-01T00:00:00Z to 9999-12-31T23:59:59Z"


def parse_request(payload: Any, limits: IngestLimits = DEFAULT_LIMITS) -> list[AntavoEvent]:
    """Validates a request body: one event object, or ``{"events": [...]}``."""
    if not isinstance(payload, dict):
        raise InvalidInputError("body", 'expected a JSON object: one event or {"events": [...]}')
    if "events" in payload:
        events = payload["events"]
        if not isinstance(events, list) or not events:
            raise InvalidInputError("events", "expected a non-empty array of events")
        if len(events) > limits.max_events:
            raise InvalidInputError(
                "events", f"at most {limits.max_events} events per request (the limit)"
            )
        try:
            # Unnamed first: a record's name (its position) matters only in an error.
            return [parse_event(e, "", limits=limits) for e in events]
        except InvalidInputError:
            # Validation is pure: this pass raises the same error, naming the record.
            return [parse_event(e, f"events[{i}]", limits=limits) for i, e in enumerate(events)]
    return [parse_event(payload, "event", limits=limits)]


def parse_event(
    raw: Any,
    where: str,
    received: datetime | None = None,
    limits: IngestLimits = DEFAULT_LIMITS,
) -> AntavoEvent:
    """Validates one Antavo event; errors name the field, e.g. ``events[2].action``."""
    if not isinstance(raw, dict):
        raise InvalidInputError(where, "expected an object")
    get = raw.get
    # Hot path (bench.ingest_cpu): the usual case, a plain string, is checked inline;
    # anything else goes to _required_str / _optional_str, which accept it or raise.
    customer = get("customer")
    if type(customer) is not str or len(customer) > MAX_ID_LENGTH or not customer.strip():
        customer = _required_str(raw, "customer", where)
    action = get("action")
    if type(action) is not str or len(action) > MAX_ID_LENGTH or not action.strip():
        action = _required_str(raw, "action", where)
    data = get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidInputError(f"{where}.data", "expected an object")
    if data:
        check_data(data, where, limits)
    external_id = get("external_id")
    if external_id is None:
        external_id = ""
    elif type(external_id) is not str or len(external_id) > MAX_ID_LENGTH:
        external_id = _optional_str(raw, "external_id", where)
    account = get("account")
    if account is None:
        account = ""
    elif type(account) is not str or len(account) > MAX_ID_LENGTH:
        account = _optional_str(raw, "account", where)
    given_id = get("id")
    if given_id is None:
        given_id = ""
    elif type(given_id) is not str or len(given_id) > MAX_ID_LENGTH:
        given_id = _optional_str(raw, "id", where)
    given_time = get("timestamp")
    timestamp = _timestamp(given_time, where)
    event_id = (
        given_id
        or CONTENT_ID_PREFIX
        + hashlib.sha256(
            orjson.dumps(
                [customer, action, data, external_id, account, given_time],
                option=orjson.OPT_SORT_KEYS,
            )
        ).hexdigest()
    )
    return AntavoEvent(
        event_id,
        customer,
        action,
        data,
        timestamp or received or datetime.now(UTC),
        external_id,
        account,
    )


def _required_str(raw: Mapping[str, Any], key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(f"{where}.{key}", "required: a non-empty string")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidInputError(f"{where}.{key}", f"at most {MAX_ID_LENGTH} characters")
    return value


def _optional_str(raw: Mapping[str, Any], key: str, where: str) -> str:
    value = raw.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidInputError(f"{where}.{key}", "expected a string")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidInputError(f"{where}.{key}", f"at most {MAX_ID_LENGTH} characters")
    return value


def _timestamp(value: Any, where: str) -> datetime | None:
    """The record's ``timestamp`` in UTC; errors name the field ``<where>.timestamp``."""
    if isinstance(value, str) and value:  # the usual case first: an RFC 3339 string
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            if parsed.tzinfo is UTC:
                utc = parsed
            else:
                try:
                    utc = parsed.astimezone(UTC)
                except (OverflowError, ValueError):  # e.g. 0001-01-01T00:00:00+01:00
                    utc = EARLIEST - timedelta(days=1)
            if utc < EARLIEST:
                raise InvalidInputError(
                    f"{where}.timestamp", f"out of range: {echo(value)!r}; {TIMESTAMP_RANGE}"
                )
            return utc
        raise InvalidInputError(
            f"{where}.timestamp", f"not an RFC 3339 date-time with offset: {echo(value)!r}"
        )
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise InvalidInputError(f"{where}.timestamp", "expected an RFC 3339 string or Unix seconds")
    if isinstance(value, int | float):
        if not 0 <= value <= LATEST_UNIX:  # also NaN
            raise InvalidInputError(
                f"{where}.timestamp",
                f"out of range: {echo(str(value))} Unix seconds; from 0 to {LATEST_UNIX}"
                f" ({TIMESTAMP_RANGE})",
            )
        return datetime.fromtimestamp(value, UTC)
    raise InvalidInputError(f"{where}.timestamp", "expected an RFC 3339 string or Unix seconds")
