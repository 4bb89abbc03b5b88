"""Insider identifiers and attributes from Antavo customers and profile changes.

Everything here is pure: values in, JSON-ready dicts out. Names and formats follow
Insider's UCD API (identifiers §3.3, default attributes §3.4, custom attributes §3.5 of
``insider-ucd-api.md``). Default names sit at the root of ``attributes``; custom ones
under ``attributes.custom``; custom identifiers under ``identifiers.custom``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine.connector import (
    ANTAVO_CUSTOMER_ID,
    Customer,
    CustomerIdMapping,
    MappingError,
    ProfileChange,
    ProfileMapping,
)
from plugins.insider import catalog
from plugins.insider.values import ConversionError, converter, string, uuid, value_for


def identifier_value(mapping: CustomerIdMapping, value: Any, phone_region: str = "") -> str:
    """``value`` as the Insider identifier ``mapping`` targets: always a string (Insider
    rejects a numeric ``uuid``), a phone number in E.164. Raises ``ConversionError``."""
    return identifier_converter(mapping, phone_region)(value)


def identifier_converter(
    mapping: CustomerIdMapping, phone_region: str = ""
) -> Callable[[Any], str]:
    """``identifier_value`` for ``mapping`` and ``phone_region``, with the identifier's
    type looked up once (``identify`` runs for every delivered item)."""
    field = None if mapping.custom else catalog.IDENTIFIERS.get(mapping.target_identifier)
    to_kind = converter(field.kind if field else catalog.UUID, phone_region)

    def to_identifier(value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ConversionError(f"a {type(value).__name__}, not a string or integer")
        return str(to_kind(value))

    return to_identifier


def identifier_object(mapping: CustomerIdMapping, value: str) -> dict[str, Any]:
    """The ``identifiers`` object holding ``value`` under ``mapping``'s identifier."""
    if mapping.custom:
        return {catalog.CUSTOM_KEY: {mapping.target_identifier: value}}
    return {mapping.target_identifier: value}


def identifiers_reader(
    mapping: CustomerIdMapping,
    phone_region: str = "",
    to_identifier: Callable[[Any], str] | None = None,
) -> Callable[[Customer], dict[str, Any]]:
    """A function giving the ``identifiers`` object of a customer under ``mapping``.

    The value is the Antavo customer ID when ``mapping.source_attribute`` is
    ``customer_id``, else that profile attribute. The function raises ``MappingError``
    when the value is missing, empty or cannot be the identifier. ``to_identifier``, when
    given, is ``identifier_converter(mapping, phone_region)``.
    """
    source, target, custom = mapping.source_attribute, mapping.target_identifier, mapping.custom
    by_id = source == ANTAVO_CUSTOMER_ID
    if to_identifier is None:
        to_identifier = identifier_converter(mapping, phone_region)
    field = None if custom else catalog.IDENTIFIERS.get(target)
    # A uuid (custom identifiers included) or string identifier takes a non-blank text as
    # it is: what to_identifier returns for it, without the calls.
    text_as_is = converter(field.kind if field else catalog.UUID, phone_region) in (uuid, string)

    def identifiers(customer: Customer) -> dict[str, Any]:
        value: Any = customer.id if by_id else customer.attributes.get(source)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise MappingError(
                "identify",
                f"customer {customer.id} has no value for {source}, "
                f"the attribute mapped to the Insider identifier {target}",
            )
        if type(value) is str and text_as_is:
            text = value
        else:
            try:
                text = to_identifier(value)
            except ConversionError as exc:
                raise MappingError(
                    "identify",
                    f"customer {customer.id}: {source} value {value!r} is {exc}, "
                    f"so it cannot be the Insider identifier {target}",
                ) from None
        return identifier_object(mapping, text)

    return identifiers


@dataclass(frozen=True)
class IdentityChange:
    """The mapped identifier of a customer moved from ``old`` to ``new`` (both
    ``identifiers``-shaped objects, as Insider's identity endpoint takes them)."""

    old: dict[str, Any]
    new: dict[str, Any]


def identity_change(
    mapping: CustomerIdMapping, change: ProfileChange | None, phone_region: str = ""
) -> IdentityChange | None:
    """The identifier move a profile change implies, or ``None``: none when the identifier
    is the Antavo customer ID, was not changed, had no earlier value, was cleared, or
    converts to the same Insider value."""
    source = mapping.source_attribute
    if change is None or source == ANTAVO_CUSTOMER_ID or source not in change.changes:
        return None
    new, old = change.changes[source], change.previous.get(source)
    if new is None or old is None:
        return None
    try:
        old_value = identifier_value(mapping, old, phone_region)
    except ConversionError:
        return None  # Insider never held a value it could not take: nothing to move
    try:
        new_value = identifier_value(mapping, new, phone_region)
    except ConversionError as exc:
        raise MappingError(
            "identify",
            f"{source} changed to {new!r}, which is {exc}, "
            f"so it cannot be the Insider identifier {mapping.target_identifier}",
        ) from None
    if old_value == new_value:
        return None
    return IdentityChange(
        identifier_object(mapping, old_value), identifier_object(mapping, new_value)
    )


def profile_attributes(
    mappings: Sequence[ProfileMapping],
    customer: Customer,
    values: Mapping[str, Any],
    phone_region: str = "",
) -> dict[str, Any]:
    """The ``attributes`` object for the attributes in ``values`` that ``mappings`` cover.

    A ``None`` value (a cleared attribute) is left out: upsert cannot clear, Insider's
    attribute-delete endpoint does (see ``cleared_attributes``). Returns ``{}`` when
    nothing is mapped. Raises ``MappingError`` for a value Insider cannot take.
    """
    attributes: dict[str, Any] = {}
    custom: dict[str, Any] = {}
    for mapping in mappings:
        value = values.get(mapping.source_attribute)
        if value is None:
            continue
        converted = _attribute_value(mapping, customer, value, phone_region)
        if mapping.custom:
            custom[mapping.target_attribute] = converted
        else:
            attributes[mapping.target_attribute] = converted
    if custom:
        attributes[catalog.CUSTOM_KEY] = custom
    return attributes


def _attribute_value(
    mapping: ProfileMapping, customer: Customer, value: Any, phone_region: str
) -> Any:
    field = None if mapping.custom else catalog.ATTRIBUTES.get(mapping.target_attribute)
    try:
        return value_for(field.kind if field else None, value, phone_region)
    except ConversionError as exc:
        raise MappingError(
            "map_profile",
            f"customer {customer.id}: {mapping.source_attribute} value {value!r} is {exc}, "
            f"so it cannot be sent as the Insider attribute {mapping.target_attribute}",
        ) from None


def cleared_attributes(
    mappings: Sequence[ProfileMapping], change: ProfileChange | None
) -> list[tuple[bool, str]]:
    """``(custom, target)`` of every mapped attribute that ``change`` cleared."""
    if change is None:
        return []
    return [
        (m.custom, m.target_attribute)
        for m in mappings
        if m.source_attribute in change.changes and change.changes[m.source_attribute] is None
    ]
