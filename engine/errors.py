"""Errors the engine and connector plugins raise.

    TidegateError
    ├── InvalidInputError        bad input from a user or Antavo; never retried
    ├── NotFoundError            a named object does not exist; never retried
    ├── BacklogFullError         the queue is at its configured limit; ingest later
    ├── PluginError              an installed plugin breaks the contract; no start
    └── DeliveryError            raised by connector hooks while mapping or sending
        ├── MappingError         a record cannot be identified or mapped; dead-lettered
        │   └── ContractError    a hook returned what the contract forbids; dead-lettered
        ├── RetryableError       transient; retried with backoff (honours retry_after)
        │   └── ConnectorCrashError  send raised an exception of its own; retried
        ├── PermanentError       the destination rejected the request; dead-lettered
        │   └── PayloadTooLargeError  the request was too big; the batch is split
        └── AuthError            credentials refused; the connection pauses

Messages never contain secrets.
"""

from __future__ import annotations

MAX_ECHO = 100
"""Characters of a value a user sent that an error message quotes at most."""


def shown(value: object, limit: int = MAX_ECHO) -> str:
    """``value`` as an error message may quote it: a string's first ``limit`` characters,
    quoted, with a count of the rest."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text) - limit} more characters)"


class TidegateError(Exception):
    """Base class of every error Tidegate raises on purpose."""


class InvalidInputError(TidegateError):
    """Input failed validation. ``field`` names the offending field. Not retried."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotFoundError(TidegateError):
    """The object named by the caller does not exist. Not retried."""


class BacklogFullError(TidegateError):
    """The delivery backlog reached its limit (the destination is down or slow). Ingest
    answers 503 with Retry-After; the sender retries later. Nothing was stored."""

    def __init__(self, depth: int, limit: int, retry_after: int) -> None:
        super().__init__(
            f"delivery backlog is full ({depth} items queued, limit {limit}); retry later"
        )
        self.retry_after = retry_after


class PluginError(TidegateError):
    """An installed plugin breaks the connector contract (an unknown hook, a connector
    declared twice, a missing hook). The engine refuses to start; the message names the
    plugin. Not retried."""


class DeliveryError(TidegateError):
    """Base of errors raised by connector hooks."""


class MappingError(DeliveryError):
    """A record cannot be identified or mapped. The item is dead-lettered, not retried."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message


class ContractError(MappingError):
    """A connector's hook returned what the contract forbids (a wrong type, a value JSON
    cannot carry, an item over the connector's own limits). Raised by the engine, never
    by a connector: the item is dead-lettered at stage ``map`` naming the plugin, and the
    connection goes on. Not retried. ``stage`` is ``prepare`` or ``send`` when those hooks
    broke it."""

    def __init__(self, plugin: str, message: str, stage: str = "map") -> None:
        super().__init__(stage, f"plugin {plugin!r}: {message}")
        self.plugin = plugin


class RetryableError(DeliveryError):
    """A transient failure (429, 5xx, timeout). Retried after ``retry_after`` seconds or
    after the engine's backoff, whichever is longer. ``throttled`` (a 429) also slows the
    connection's request rate."""

    def __init__(
        self, message: str, retry_after: float | None = None, throttled: bool = False
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.throttled = throttled


class ConnectorCrashError(RetryableError):
    """A connector's ``send`` raised an exception of its own, not one of the engine's
    errors: a bug, or a failure it did not classify. Raised by the engine, never by a
    connector. Retried like a timeout, within the retry window; ``crash`` is the
    connector's exception and the message names the plugin."""

    def __init__(self, plugin: str, message: str, crash: Exception) -> None:
        super().__init__(f"plugin {plugin!r} failed in send: {message}")
        self.plugin = plugin
        self.crash = crash


class PermanentError(DeliveryError):
    """The destination rejected the request for good. Its items are dead-lettered."""


class PayloadTooLargeError(PermanentError):
    """The destination refused the request for its size. The engine resends the batch in
    halves; an item too large on its own is dead-lettered."""


class AuthError(DeliveryError):
    """The destination refused the credentials. The connection pauses; nothing is lost."""
