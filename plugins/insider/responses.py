"""Insider upsert and attribute-delete answers turned into per-user errors or engine errors.

Insider answers 200 for every request it validated, with per-user failures listed in
``data.fail.errors`` under keys ``users.<N>.<path>.<rule>`` (§5.1-5.2 of
``insider-ucd-api.md``). Other statuses are request-level (§5.3): 401/403 mean the
credentials were refused, 429 rate limiting, 5xx a transient fault, other 4xx a request
Insider will never accept.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

from engine.connector import (
    AuthError,
    HttpResponse,
    PayloadTooLargeError,
    PermanentError,
    RetryableError,
)

# Insider's 400 for an oversize body reads "request body is bigger than maximum allowed
# size 5,000,000 bytes" (reference §5.3); a 413 from the edge means the same.
OVERSIZE_MARKER = "bigger than maximum allowed size"

USER_ERROR_KEY = re.compile(r"^users\.(\d+)\.")
PERMANENT_SERVER_STATUSES = frozenset({501, 505})
"""5xx answers that will not change on retry: Not Implemented, HTTP Version Not Supported."""
MAX_MESSAGE_CHARS = 200
REDACTED = "[redacted]"


def user_errors(
    response: HttpResponse,
    users: int,
    secrets: Collection[str] = (),
    now: datetime | None = None,
) -> dict[int, str]:
    """The error message of each refused user (by index, below ``users``) of an upsert
    or attribute-delete answer; users not in the result were accepted.

    A 2xx fails the users named in ``data.fail.errors`` (and none when the body is not the
    documented shape, since 200 means Insider accepted the request). Any other status
    raises ``AuthError``, ``RetryableError`` or ``PermanentError``. No message contains
    any of ``secrets``.
    """
    status = response.status
    if 200 <= status < 300:
        return _per_user_errors(response.body, users, secrets)
    detail = insider_message(response.body, secrets)
    if status in (401, 403):
        raise AuthError(f"Insider refused the credentials (HTTP {status}): {detail}")
    if status == 429:
        raise RetryableError(
            "rate limited by Insider (HTTP 429)",
            retry_after=retry_after_seconds(response.headers.get("Retry-After"), now),
            throttled=True,
        )
    if status >= 500 and status not in PERMANENT_SERVER_STATUSES:
        raise RetryableError(f"Insider answered HTTP {status}: {detail}")
    if status == 413 or (status == 400 and OVERSIZE_MARKER in detail):
        raise PayloadTooLargeError(f"Insider refused the request size (HTTP {status}): {detail}")
    if 400 <= status < 500:
        raise PermanentError(f"Insider rejected the request (HTTP {status}): {detail}")
    raise PermanentError(f"Insider answered HTTP {status}: {detail}")


def _per_user_errors(body: bytes, users: int, secrets: Collection[str]) -> dict[int, str]:
    errors_by_user: dict[int, list[str]] = {}
    for key, messages in _fail_errors(body).items():
        match = USER_ERROR_KEY.match(key)
        if match is None:
            continue
        user = int(match.group(1))
        if user < users:
            errors_by_user.setdefault(user, []).append(f"{key}: {_join_messages(messages)}")
    # In user order: a customer's two user objects report their errors in that order.
    return {
        user: _redact(" | ".join(errors), secrets)
        for user, errors in sorted(errors_by_user.items())
    }


def _fail_errors(body: bytes) -> Mapping[str, Any]:
    # Tolerant on purpose: a 200 whose body is not the documented shape is still accepted.
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    errors: Any = parsed
    for key in ("data", "fail", "errors"):
        if not isinstance(errors, Mapping):
            return {}
        errors = errors.get(key)
    return errors if isinstance(errors, Mapping) else {}


def _join_messages(messages: Any) -> str:
    if isinstance(messages, list):
        return "; ".join(str(message) for message in messages)
    return str(messages)


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait per a ``Retry-After`` value (delay-seconds or HTTP-date).

    ``None`` when the value is absent or invalid; a date in the past gives ``0.0``.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def insider_message(body: bytes, secrets: Collection[str]) -> str:
    """Insider's ``message`` or ``error`` field, else the start of the body as text, with
    ``secrets`` redacted. Insider's bodies carry one or the other (reference §5)."""
    # Redact before shortening, so a cut cannot leave part of a secret behind.
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, Mapping):
        for key in ("message", "error"):
            text = parsed.get(key)
            if isinstance(text, str) and text.strip():
                return _shorten(_redact(text, secrets))
    text = " ".join(body.decode("utf-8", errors="replace").split())
    return _shorten(_redact(text, secrets)) if text else "(empty body)"


def _shorten(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return text[: MAX_MESSAGE_CHARS - 1] + "…"


def _redact(text: str, secrets: Collection[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text
