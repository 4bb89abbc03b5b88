"""What a connector plugin declares about itself through the ``connector_info`` hook."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from engine.records import CustomerIdMapping, EventMapping, ProfileMapping


def _accept(_: object) -> None:
    return None


@dataclass(frozen=True)
class CatalogEntry:
    """A name the destination knows, for people choosing mapping targets.

    ``kind`` is ``identifier``, ``attribute``, ``event`` or ``event_parameter``;
    ``type`` and ``format`` describe the value (e.g. ``string`` / ``E.164``);
    ``required_for`` lists the events that need this parameter.
    """

    kind: str
    name: str
    type: str = ""
    format: str = ""
    description: str = ""
    required_for: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConnectorInfo:
    """A connector: its name, request limits and validators.

    Validators raise ``InvalidInputError`` naming the field; the admin API turns that into
    ``INVALID_ARGUMENT``. ``max_batch_bytes`` bounds the serialized request body.
    """

    name: str
    max_batch_items: int
    max_batch_bytes: int
    secret_required: bool = True
    default_settings: Mapping[str, str] = field(default_factory=dict)
    validate_settings: Callable[[Mapping[str, str]], None] = _accept
    validate_customer_id_mapping: Callable[[CustomerIdMapping], None] = _accept
    validate_profile_mapping: Callable[[ProfileMapping], None] = _accept
    validate_event_mapping: Callable[[EventMapping], None] = _accept
    catalog: tuple[CatalogEntry, ...] = ()
    """Optional: the destination's default attributes, events and parameters."""
