"""The outbound log's rows and queries: what a request looks like in the log, how a
filter matches one, and the time-ordered request identifier."""

from __future__ import annotations

import secrets
import threading
import time as monotime
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

LIST_CUSTOMERS = 100  # customers shown per row in lists and streams
# A row's time must lie this close to the time embedded in its id, so that an id lookup
# scanning only this window around the id cannot miss the row.
ID_TIME_SLACK = timedelta(minutes=10)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Outcome(StrEnum):
    """What one request did for one customer's items."""

    DELIVERED = "delivered"
    FAILED = "failed"
    """Dead-lettered: the destination refused them, or retries ran out."""
    RETRY = "retry"
    """Sent again later (a transient failure, or the batch resent in halves)."""
    PAUSED = "paused"
    """The destination refused the credentials; the connection paused with them queued."""


@dataclass(frozen=True)
class LogCustomer:
    """One customer a request carried, with what the request did for them."""

    customer_id: str
    name: str = ""
    outcome: str = Outcome.DELIVERED
    """An ``Outcome`` value."""
    error: str = ""


@dataclass(frozen=True)
class LogRow:
    """One outbound request. ``time`` is tz-aware and close to the time in ``id``."""

    id: str
    time: datetime
    connection_id: str
    method: str
    url: str
    status_code: int  # 0 when no response arrived
    response_time: float  # seconds
    error: str  # "" when fully successful
    customers: tuple[LogCustomer, ...]
    mapping_version: int
    attempt: int = 1
    ambiguous: bool = False
    request_body: str = ""
    response_body: str = ""
    customer_count: int = -1  # len(customers) unless given (lists cap customers)
    tags: str = ""  # comma-separated labels, e.g. "backfill" or "replay"

    def __post_init__(self) -> None:
        if self.customer_count == -1:
            object.__setattr__(self, "customer_count", len(self.customers))


@dataclass(frozen=True)
class LogQuery:
    """A row matches when it satisfies every field that is set."""

    identifier: str = ""
    customer_id: str = ""
    error_contains: str = ""  # case-insensitive, in the row's or a carried customer's error
    status_codes: tuple[int, ...] = ()
    start_time: datetime | None = None  # inclusive
    end_time: datetime | None = None  # exclusive
    connection_id: str = ""
    errors_only: bool = False
    tags: tuple[str, ...] = ()  # any of these tags

    def matches(self, row: LogRow) -> bool:
        """The same test ``LogStore.list`` applies in SQL. Use it on full rows."""
        needle = self.error_contains.lower()
        return (
            (not self.identifier or row.id == self.identifier)
            and (
                not self.customer_id
                or any(c.customer_id == self.customer_id for c in row.customers)
            )
            and (
                not needle
                or needle in row.error.lower()
                or any(needle in c.error.lower() for c in row.customers)
            )
            and (not self.status_codes or row.status_code in self.status_codes)
            and (self.start_time is None or row.time >= self.start_time)
            and (self.end_time is None or row.time < self.end_time)
            and (not self.connection_id or row.connection_id == self.connection_id)
            and (not self.errors_only or row.error != "")
            and (not self.tags or any(t in self.tags for t in row.tags.split(",") if t))
        )


_id_lock = threading.Lock()
_id_last_ms = 0
_id_counter = 0


def new_request_id(at: datetime | None = None) -> str:
    """A UUIDv7. Ids made without ``at`` sort lexically in the order they were made.

    ``at`` stamps the id with that time instead of now (to the millisecond).
    """
    global _id_last_ms, _id_counter
    if at is not None:
        ms, counter = micros(at) // 1000, secrets.randbits(12)
    else:
        with _id_lock:
            now_ms = monotime.time_ns() // 1_000_000
            if now_ms > _id_last_ms:
                # Seeding at most 2**11 leaves room for 2,048 more ids in the same millisecond.
                _id_last_ms, _id_counter = now_ms, secrets.randbits(11)
            elif _id_counter < 0xFFF:
                _id_counter += 1
            else:  # counter spent: borrow the next millisecond rather than break the order
                _id_last_ms, _id_counter = _id_last_ms + 1, secrets.randbits(11)
            ms, counter = _id_last_ms, _id_counter
    value = ms << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | secrets.randbits(62)
    return str(uuid.UUID(int=value))


def micros(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


def from_micros(micros: int) -> datetime:
    return EPOCH + timedelta(microseconds=micros)
