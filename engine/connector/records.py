"""Records that cross the boundary between the engine and connector plugins.

The engine builds them; hooks read them and never change them. ``Delivery`` and
``SendResult`` are the two a connector builds or fills in itself.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

ANTAVO_CUSTOMER_ID = "customer_id"
"""CustomerIdMapping.source_attribute value that selects the Antavo customer ID."""
PROFILE_ACTIONS = frozenset({"opt_in", "profile"})
"""Antavo actions whose data are customer attributes: ingest merges them into the
customer's profile and queues the attributes that changed."""


@dataclass(frozen=True)
class CustomerIdMapping:
    """Which Antavo attribute identifies a customer at the destination, and as what."""

    source_attribute: str = ANTAVO_CUSTOMER_ID
    target_identifier: str = "uuid"
    custom: bool = False


ARRAY_MODE_INHERIT = ""
"""ProfileMapping.array_mode value: use the connection's array mode."""


@dataclass(frozen=True)
class ProfileMapping:
    """One Antavo attribute synced to one destination attribute. ``array_mode`` is
    ``append``, ``replace`` or ``""`` (the connection's setting decides)."""

    id: str
    source_attribute: str
    target_attribute: str
    custom: bool = False
    array_mode: str = ARRAY_MODE_INHERIT


@dataclass(frozen=True)
class ParameterMapping:
    """One Antavo event data key synced to one destination event parameter."""

    source_parameter: str
    target_parameter: str
    custom: bool = False


@dataclass(frozen=True)
class EventMapping:
    """One Antavo action synced as one destination event, with its parameters."""

    id: str
    source_event: str
    target_event: str
    parameters: tuple[ParameterMapping, ...] = ()


@dataclass(frozen=True)
class Connection:
    """A configured destination account, with its mappings, as hooks see it.

    The engine builds a new object whenever the connection's settings, key or mappings
    change, so a connector may keep what it works out from one object (see the
    ``prepare`` hook). ``api_key`` is the decrypted secret; hooks may put it in request
    headers and nowhere else.
    """

    id: str
    connector: str
    settings: Mapping[str, str]
    api_key: str
    customer_id_mapping: CustomerIdMapping
    profile_mappings: tuple[ProfileMapping, ...] = ()
    event_mappings: tuple[EventMapping, ...] = ()
    mapping_version: int = 0
    display_name: str = ""
    retry_window_seconds: float = 0.0
    """0: the engine's default."""
    credentials_version: int = 1
    """Raised whenever the API key or settings change."""

    def event_mapping_for(self, action: str) -> EventMapping | None:
        """The mapping of an Antavo action: the first one listed for it, if any."""
        for mapping in self.event_mappings:
            if mapping.source_event == action:
                return mapping
        return None

    def routed_attributes(self) -> frozenset[str]:
        """The Antavo attributes whose change is queued for this connection: the mapped
        ones and the identifying one (when it changes, the connector may have to move the
        customer's identifier at the destination)."""
        return frozenset(
            {m.source_attribute for m in self.profile_mappings}
            | ({self.customer_id_mapping.source_attribute} - {ANTAVO_CUSTOMER_ID})
        )


@dataclass(frozen=True)
class Customer:
    """An Antavo customer as Tidegate knows it: id plus the latest profile attributes,
    with the identifying attributes as they were when the record was ingested."""

    id: str
    attributes: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """First and last name joined by a space, leaving out either when empty."""
        first = self.attributes.get("first_name")
        last = self.attributes.get("last_name")
        if first and last:
            return f"{first!s} {last!s}"
        return str(first or last or "")


@dataclass(frozen=True)
class AntavoEvent:
    """One Antavo event after validation. ``id`` is Antavo's id or a content hash."""

    id: str
    customer: str
    action: str
    data: Mapping[str, Any]
    timestamp: datetime
    external_id: str = ""
    account: str = ""


@dataclass(frozen=True)
class ProfileChange:
    """Attributes of one customer that changed, with their new values.

    A value of ``None`` means Antavo cleared the attribute. ``previous`` holds the values
    before the change for attributes that had one (absent key: the attribute was new).
    """

    changes: Mapping[str, Any]
    timestamp: datetime
    previous: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Delivery:
    """One queued item rendered for a destination, ready to be put in a request.

    ``identifiers`` come from ``identify``; ``attributes`` from ``map_profile`` (``None``
    when nothing mapped); ``events`` from ``map_event``. ``change`` or ``event`` is the
    source record it was rendered from, for connectors that need more than the mapped
    values (an identifier that changed, an attribute that was cleared); both are ``None``
    for a dead letter replayed as its stored fragment. Several deliveries of one customer
    may share a request.
    """

    item_id: int
    customer: Customer
    identifiers: Mapping[str, Any]
    attributes: Mapping[str, Any] | None = None
    events: list[Mapping[str, Any]] = field(default_factory=list)
    attempt: int = 1
    change: ProfileChange | None = None
    event: AntavoEvent | None = None


@dataclass(frozen=True)
class ItemOutcome:
    """Per-item result of a send. ``error`` is the destination's message when it failed."""

    delivered: bool
    error: str = ""


DELIVERED = ItemOutcome(delivered=True)
"""The outcome of a delivered item (immutable, so one object serves every item)."""


@dataclass(slots=True)
class SendResult:
    """What ``send`` reports back: an outcome for every item id it was given.

    An item the result leaves out was not reported on: the engine dead-letters it at stage
    ``send`` as a connector error (the request may have been applied), never counts it
    delivered. ``SendResult.of`` builds a complete result.
    """

    outcomes: dict[int, ItemOutcome] = field(default_factory=dict)

    @classmethod
    def of(
        cls, deliveries: Sequence[Delivery], failed: Mapping[str, str] | None = None
    ) -> SendResult:
        """Every delivery delivered, except those of the customers in ``failed``
        (customer id -> the destination's message), which failed."""
        if not failed:
            return cls({d.item_id: DELIVERED for d in deliveries})
        return cls(
            {
                d.item_id: ItemOutcome(False, failed[d.customer.id])
                if d.customer.id in failed
                else DELIVERED
                for d in deliveries
            }
        )


@dataclass(frozen=True)
class HttpResponse:
    """The destination's answer to one request; ``elapsed`` in seconds. ``headers`` are
    looked up case-insensitively, as HTTP says (``headers.get("retry-after")``)."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    elapsed: float

    def __post_init__(self) -> None:
        if not isinstance(self.headers, CIMultiDictProxy):
            object.__setattr__(self, "headers", CIMultiDictProxy(CIMultiDict(self.headers)))


class Transport(Protocol):
    """The HTTP client handed to ``send``: the engine owns the session, timeouts and the
    outbound log.

    Every call is one outbound request and becomes one outbound-log row, labelled with
    ``tags`` (e.g. "backfill"). Headers are never recorded, so a key carried in a header
    never reaches the log. Timeouts and connection errors raise ``RetryableError``; an
    HTTP status never raises: the connector turns it into the engine's errors.
    """

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        tags: Collection[str] = (),
    ) -> HttpResponse: ...
