"""Value types that cross the boundary between the engine and connector plugins."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

ANTAVO_CUSTOMER_ID = "customer_id"
"""CustomerIdMapping.source_attribute value that selects the Antavo customer ID."""

_DEFAULT: Any = object()
"""Stands for a field's default in the hand-written ``__init__`` methods below."""
_set = object.__setattr__


@dataclass(frozen=True)
class CustomerIdMapping:
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
    source_parameter: str
    target_parameter: str
    custom: bool = False


@dataclass(frozen=True)
class EventMapping:
    id: str
    source_event: str
    target_event: str
    parameters: tuple[ParameterMapping, ...] = ()


@dataclass(frozen=True)
class Connection:
    """A configured destination account, with its mappings, as hooks see it.

    ``api_key`` is the decrypted secret; hooks may put it in request headers and nowhere
    else.
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
        for mapping in self.event_mappings:
            if mapping.source_event == action:
                return mapping
        return None


@dataclass(frozen=True)
class Customer:
    """An Antavo customer as Tidegate knows it: id plus the latest profile attributes."""

    id: str
    attributes: Mapping[str, Any] = field(default_factory=dict)

    # Delivery builds a Customer, an AntavoEvent or ProfileChange for every item. A frozen
    # dataclass's generated __init__ stores each field with object.__setattr__; these store
    # the instance dict in one step, a third of the cost. Same fields, defaults, equality,
    # hash and immutability.
    def __init__(self, id: str, attributes: Mapping[str, Any] = _DEFAULT) -> None:
        _set(
            self, "__dict__", {"id": id, "attributes": {} if attributes is _DEFAULT else attributes}
        )

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

    def __init__(
        self,
        id: str,
        customer: str,
        action: str,
        data: Mapping[str, Any],
        timestamp: datetime,
        external_id: str = "",
        account: str = "",
    ) -> None:
        _set(
            self,
            "__dict__",
            {
                "id": id,
                "customer": customer,
                "action": action,
                "data": data,
                "timestamp": timestamp,
                "external_id": external_id,
                "account": account,
            },
        )


@dataclass(frozen=True)
class ProfileChange:
    """Attributes of one customer that changed, with their new values.

    A value of ``None`` means Antavo cleared the attribute. ``previous`` holds the values
    before the change for attributes that had one (absent key: the attribute was new).
    """

    changes: Mapping[str, Any]
    timestamp: datetime
    previous: Mapping[str, Any] = field(default_factory=dict)

    def __init__(
        self,
        changes: Mapping[str, Any],
        timestamp: datetime,
        previous: Mapping[str, Any] = _DEFAULT,
    ) -> None:
        _set(
            self,
            "__dict__",
            {
                "changes": changes,
                "timestamp": timestamp,
                "previous": {} if previous is _DEFAULT else previous,
            },
        )


@dataclass
class Delivery:
    """One queued item rendered for a destination, ready to be put in a request.

    ``identifiers`` come from ``identify``; ``attributes`` from ``map_profile``;
    ``events`` from ``map_event``. ``change`` or ``event`` is the source record it was
    rendered from, for connectors that need more than the mapped values (an identifier
    that changed, an attribute that was cleared). Several deliveries of one customer may
    share a request.
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


@dataclass
class SendResult:
    """What ``send`` reports back: an outcome for every delivery item id it was given.

    Items missing from ``outcomes`` count as delivered when the request succeeded.
    """

    outcomes: dict[int, ItemOutcome] = field(default_factory=dict)


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes
    elapsed: float


class Transport(Protocol):
    """HTTP client handed to ``send``: the engine owns the session, timeouts and logging.

    Every call is one outbound request and becomes one outbound-log row, labelled with
    ``tags`` (e.g. "backfill"). Values of the headers named in ``secret_headers`` are
    redacted before anything is recorded.
    Timeouts and connection errors raise ``RetryableError``; an HTTP status never raises.
    """

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        secret_headers: Collection[str] = (),
        tags: Collection[str] = (),
    ) -> HttpResponse: ...
