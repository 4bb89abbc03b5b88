"""Braze's answers read: messages, per-object ``errors``, rate-limit headers (reference
§5). Headers are read case-insensitively (Braze sends them in lower case over HTTP/2)."""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
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

MAX_MESSAGE_CHARS = 200
REDACTED = "[redacted]"
EPOCH_THRESHOLD = 1_000_000_000
"""An ``X-RateLimit-Reset`` above this is UTC epoch seconds, else seconds remaining
(the docs say both, §5.4: UNCONFIRMED, so both are read)."""
MAX_WAIT = 3600.0
PERMANENT_SERVER_STATUSES = frozenset({501, 505})
OVERSIZE_MARKER = "max input length"
SUCCESS_MESSAGES = frozenset({"success", "queued"})


def parsed_body(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def shorten(text: str, secrets: Collection[str] = ()) -> str:
    """``text`` with ``secrets`` redacted, on one line, at most 200 characters."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = " ".join(text.split())
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return f"{text[:MAX_MESSAGE_CHARS]}… ({len(text) - MAX_MESSAGE_CHARS} more characters)"


def braze_message(body: bytes, secrets: Collection[str]) -> str:
    """Braze's ``message``, else the start of the body, redacted and shortened."""
    parsed = parsed_body(body)
    if isinstance(parsed, Mapping):
        message = parsed.get("message")
        if isinstance(message, str) and message.strip():
            return shorten(message, secrets)
    text = body.decode("utf-8", errors="replace")
    return shorten(text, secrets) if text.strip() else "(empty body)"


def object_errors(body: bytes, secrets: Collection[str]) -> list[tuple[str, int, str]]:
    """``(input_array, index, type)`` of each per-object error in a Braze answer."""
    parsed = parsed_body(body)
    errors = parsed.get("errors") if isinstance(parsed, Mapping) else None
    found: list[tuple[str, int, str]] = []
    if not isinstance(errors, list):
        return found
    for error in errors:
        if not isinstance(error, Mapping):
            continue
        array, index = error.get("input_array"), error.get("index")
        if isinstance(array, str) and isinstance(index, int) and not isinstance(index, bool):
            found.append((array, index, shorten(str(error.get("type") or "refused"), secrets)))
    return found


def unsuccessful_message(body: bytes) -> str | None:
    """The ``message`` of a 2xx that is not ``success`` (``None`` when it is, or absent)."""
    parsed = parsed_body(body)
    if not isinstance(parsed, Mapping):
        return None
    message = parsed.get("message")
    if message is None or (isinstance(message, str) and message.lower() in SUCCESS_MESSAGES):
        return None
    return str(message)


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if number >= 0 else None


def reset_in(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds until the rate-limit window resets, from ``X-RateLimit-Reset`` (epoch or
    delta)."""
    reset = _number(headers.get("x-ratelimit-reset"))
    if reset is None:
        return None
    if reset > EPOCH_THRESHOLD:
        reset = reset - (now if now is not None else time.time())
    return min(MAX_WAIT, max(0.0, reset))


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait after a 429: ``X-Ratelimit-Retry-After``, ``Retry-After`` (seconds or
    an HTTP date) or ``X-RateLimit-Reset``, the first present."""
    wait = _number(headers.get("x-ratelimit-retry-after"))
    if wait is None:
        value = headers.get("retry-after")
        wait = _number(value)
        if wait is None and value:
            try:
                wait = parsedate_to_datetime(value).timestamp() - (now or time.time())
            except (TypeError, ValueError):
                wait = None
    if wait is None:
        wait = reset_in(headers, now)
    return None if wait is None else min(MAX_WAIT, max(0.0, wait))


def raise_for_request_failure(response: HttpResponse, what: str, secrets: Collection[str]) -> None:
    """Raises the engine's error for an answer that failed the whole request: 401/403/404
    ``AuthError`` (the connection pauses), 429 and 5xx ``RetryableError``, 413 or "Max
    Input Length Exceeded" ``PayloadTooLargeError``, other statuses ``PermanentError``.
    Returns for a 2xx and for any other 400 (the caller reads its per-object errors)."""
    status = response.status
    if 200 <= status < 300:
        return
    detail = braze_message(response.body, secrets)
    if status in (401, 403):
        raise AuthError(
            f"Braze refused the API key for {what} (HTTP {status}): {detail}; check the key, "
            "its permissions and that rest_endpoint is your workspace's cluster"
        )
    if status == 404:
        raise AuthError(
            f"Braze answered HTTP 404 for {what}: {detail}; check rest_endpoint (it must be "
            "your workspace's REST endpoint)"
        )
    if status == 429:
        raise RetryableError(
            f"rate limited by Braze (HTTP 429) on {what}",
            retry_after=retry_after(response.headers),
            throttled=True,
        )
    if status >= 500 and status not in PERMANENT_SERVER_STATUSES:
        raise RetryableError(f"Braze answered HTTP {status} on {what}: {detail}")
    if status == 413 or (status == 400 and OVERSIZE_MARKER in detail.lower()):
        raise PayloadTooLargeError(f"Braze refused the request size (HTTP {status}): {detail}")
    if status == 400:
        return
    raise PermanentError(f"Braze rejected {what} (HTTP {status}): {detail}")
