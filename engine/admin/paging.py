"""The admin API's one paging rule, used by every List RPC (AIP-158).

Page size: 0 asks for ``DEFAULT_PAGE_SIZE``; more than ``MAX_PAGE_SIZE`` gets
``MAX_PAGE_SIZE``; a negative size is ``INVALID_ARGUMENT`` naming ``page_size``.

Page tokens are opaque to clients. Inside, a token is the URL-safe base64 (unpadded) of
a small JSON envelope::

    {"v": 1, "list": "ListLogs", "after": [1767225600000000, "0194..."]}

``v`` is the format version (``TOKEN_VERSION``), ``list`` the RPC the token belongs to,
and ``after`` the cursor: where the next page starts, in the shape its list declares
with a ``Pager`` (the last id of a list ordered by id, the last sort key, or an offset
into a list that only grows at its end). Cursor values are strings and integers in
0 .. 2**63 - 1. A token of another list, an unknown version or a garbled token is
``INVALID_ARGUMENT`` naming ``page_token``, with what to do instead.

Tokens are not signed: a crafted cursor can only move where a page starts, and the
request's own filter still decides what is listed.
"""

from __future__ import annotations

import base64
import binascii
import re
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import orjson

from engine.errors import InvalidInputError

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
TOKEN_VERSION = 1
MAX_CURSOR_INT = 2**63 - 1  # what SQLite and DuckDB BIGINT hold

_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+")
_START_OVER = "leave page_token empty to start from the first page"

T = TypeVar("T")
C = TypeVar("C", bound=tuple[Any, ...])


def page_size(requested: int) -> int:
    """The number of entries a page holds for a request's ``page_size``."""
    if requested < 0:
        raise InvalidInputError(
            "page_size",
            f"must not be negative; 0 means the default ({DEFAULT_PAGE_SIZE}), and sizes "
            f"above {MAX_PAGE_SIZE} return {MAX_PAGE_SIZE}",
        )
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


@dataclass(frozen=True)
class Pager(Generic[C]):
    """Page tokens of one List RPC: ``list_name`` is the RPC's name, ``shape`` the types
    of its cursor's values in order, and ``check`` an optional test a decoded cursor
    must pass (for limits the types do not express)."""

    list_name: str
    shape: tuple[type[int] | type[str], ...]
    check: Callable[[C], bool] | None = None

    def token(self, cursor: C | None) -> str:
        """The ``next_page_token`` for ``cursor``; "" when there is no next page."""
        if cursor is None:
            return ""
        self._check_shape(list(cursor))
        envelope = {"v": TOKEN_VERSION, "list": self.list_name, "after": list(cursor)}
        return base64.urlsafe_b64encode(orjson.dumps(envelope)).decode().rstrip("=")

    def cursor(self, token: str) -> C | None:
        """The cursor a request's ``page_token`` carries; None for an empty token (the
        first page). Raises ``InvalidInputError`` naming ``page_token``."""
        if not token:
            return None
        envelope = self._envelope(token)
        version = envelope.get("v")
        if type(version) is not int:
            raise self._garbled()
        if version != TOKEN_VERSION:
            raise InvalidInputError(
                "page_token",
                f"was made by a Tidegate with page token version {version}, and this one "
                f"reads version {TOKEN_VERSION}; {_START_OVER}",
            )
        list_name = envelope.get("list")
        if type(list_name) is not str:
            raise self._garbled()
        if list_name != self.list_name:
            raise InvalidInputError(
                "page_token",
                f"is a page token of {list_name}, not of {self.list_name}; pass the "
                f"next_page_token of a {self.list_name} response, or {_START_OVER}",
            )
        after = envelope.get("after")
        if type(after) is not list or not self._fits(after):
            raise self._garbled()
        cursor = cast(C, tuple(after))
        if self.check is not None and not self.check(cursor):
            raise self._garbled()
        return cursor

    def _envelope(self, token: str) -> dict[str, Any]:
        if not _TOKEN_RE.fullmatch(token):
            raise self._garbled()
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            envelope = orjson.loads(raw)
        except (binascii.Error, ValueError):
            raise self._garbled() from None
        if type(envelope) is not dict:
            raise self._garbled()
        return cast(dict[str, Any], envelope)

    def _fits(self, values: list[Any]) -> bool:
        if len(values) != len(self.shape):
            return False
        for value, kind in zip(values, self.shape, strict=True):
            if type(value) is not kind:
                return False
            if isinstance(value, int) and not 0 <= value <= MAX_CURSOR_INT:
                return False
        return True

    def _check_shape(self, values: list[Any]) -> None:
        if not self._fits(values):
            raise ValueError(f"{self.list_name} cursor {values!r} does not fit {self.shape}")

    def _garbled(self) -> InvalidInputError:
        return InvalidInputError(
            "page_token",
            f"is not a page token from a previous {self.list_name} response; pass "
            f"next_page_token exactly as it was returned, or {_START_OVER}",
        )


def offset_page(
    entries: Sequence[T], size: int, after: tuple[int] | None
) -> tuple[Sequence[T], tuple[int] | None]:
    """One page of ``entries`` from the offset ``after`` holds, and the cursor of the
    next page (None on the last). For lists that only grow at their end, or not at all."""
    start = 0 if after is None else after[0]
    end = start + size
    return entries[start:end], ((end,) if end < len(entries) else None)


def keyset_page(
    entries: Sequence[T], key: Callable[[T], C], size: int, after: C | None
) -> tuple[Sequence[T], C | None]:
    """One page of ``entries`` (sorted by ``key``, keys unique): those whose key is
    greater than ``after``, and the key of the page's last entry when more follow."""
    start = 0 if after is None else bisect_right(entries, after, key=key)
    page = entries[start : start + size]
    more = start + size < len(entries)
    return page, (key(page[-1]) if more and page else None)
