"""Ingest limits: how much one request, one record and one connection may ask of ingest.

Each limit answers with a clear error naming it (``413`` for the body size, ``400`` for
the rest, ``408`` for a body that does not arrive in time) before anything is stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from engine.errors import InvalidInputError

MAX_DEPTH_CEILING = 200
"""orjson reads 1,024 levels of nesting but writes only 254; a queued item wraps ``data``
a few levels deeper, so ``max_depth`` stays well below that."""
ECHO_LIMIT = 100


@dataclass(frozen=True)
class IngestLimits:
    max_body_bytes: int = 10 * 1024 * 1024
    """Largest request body (``413`` past it)."""
    max_events: int = 10_000
    """Events in one ``{"events": [...]}`` request."""
    max_depth: int = 32
    """Nesting levels of an event's ``data``: ``{"a": 1}`` is 1, ``{"a": {"b": 1}}`` 2."""
    max_string_length: int = 65_536
    """Characters in one string value inside ``data``."""
    max_key_length: int = 256
    """Characters in one key inside ``data``."""
    max_keys: int = 1_000
    """Keys in one event's ``data``, counted over every nested object."""
    idle_timeout: float = 75.0
    """Seconds a connection may wait for the next request's headers to be complete, from
    its opening or its last answer (aiohttp's ``keepalive_timeout``): this bounds both
    idle keep-alive connections and headers sent slowly."""
    body_timeout: float = 60.0
    """Seconds to receive a request's whole body once its headers are in (``408``)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> IngestLimits:
        return cls(**values)

    def problem(self) -> str | None:
        """What is wrong with these limits, if anything, naming ``serve``'s flag."""
        for name, flag in FLAGS.items():
            if getattr(self, name) < (0 if name == "max_keys" else 1):
                return f"{flag} must be at least {0 if name == 'max_keys' else 1}"
        if not 1 <= self.max_depth <= MAX_DEPTH_CEILING:
            return f"--ingest-max-depth must be from 1 to {MAX_DEPTH_CEILING}"
        if not (self.idle_timeout > 0 and self.body_timeout > 0):
            return "--ingest-idle-timeout and --ingest-body-timeout must be positive seconds"
        return None


FLAGS = {
    "max_body_bytes": "--ingest-max-body-size",
    "max_events": "--ingest-max-events",
    "max_string_length": "--ingest-max-string-length",
    "max_key_length": "--ingest-max-key-length",
    "max_keys": "--ingest-max-keys",
}
DEFAULT_LIMITS = IngestLimits()


def echo(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` for an error message: at most ``limit`` characters, then how many more."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


class _Refused(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str] = []  # innermost first


def check_data(data: dict[str, Any], where: str, limits: IngestLimits) -> None:
    """Raises ``InvalidInputError`` naming the field when ``data`` breaks a limit."""
    try:
        _walk_object(data, 1, limits, 0)
    except _Refused as refused:
        raise InvalidInputError(
            f"{where}.data{''.join(reversed(refused.path))}", refused.message
        ) from None


def _walk_object(value: dict[str, Any], depth: int, limits: IngestLimits, keys: int) -> int:
    """Checks one object at ``depth``; returns the keys counted so far."""
    if depth > limits.max_depth:
        raise _Refused(f"nested deeper than {limits.max_depth} levels (the limit)")
    keys += len(value)
    if keys > limits.max_keys:
        raise _Refused(f"more than {limits.max_keys} keys in one event's data (the limit)")
    max_key, max_string = limits.max_key_length, limits.max_string_length
    for key, item in value.items():
        if len(key) > max_key:
            refused = _Refused(f"a key of {len(key)} characters: at most {max_key}")
            refused.path.append(f".{echo(key)}")
            raise refused
        kind = type(item)
        if kind is str:
            if len(item) > max_string:
                refused = _Refused(f"a string of {len(item)} characters: at most {max_string}")
                refused.path.append(f".{echo(key)}")
                raise refused
        elif kind is dict or kind is list:
            try:
                if kind is dict:
                    keys = _walk_object(item, depth + 1, limits, keys)
                else:
                    keys = _walk_array(item, depth + 1, limits, keys)
            except _Refused as refused:
                refused.path.append(f".{echo(key)}")
                raise
    return keys


def _walk_array(value: list[Any], depth: int, limits: IngestLimits, keys: int) -> int:
    if depth > limits.max_depth:
        raise _Refused(f"nested deeper than {limits.max_depth} levels (the limit)")
    max_string = limits.max_string_length
    for index, item in enumerate(value):
        kind = type(item)
        if kind is str:
            if len(item) > max_string:
                refused = _Refused(f"a string of {len(item)} characters: at most {max_string}")
                refused.path.append(f"[{index}]")
                raise refused
        elif kind is dict or kind is list:
            try:
                if kind is dict:
                    keys = _walk_object(item, depth + 1, limits, keys)
                else:
                    keys = _walk_array(item, depth + 1, limits, keys)
            except _Refused as refused:
                refused.path.append(f"[{index}]")
                raise
    return keys
