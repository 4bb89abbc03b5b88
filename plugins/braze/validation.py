"""Mapping validators of the Braze connector, run when a mapping is written. Each raises
``InvalidInputError`` naming the offending field and saying what Braze allows."""

from __future__ import annotations

import re

from engine.connector import (
    ANTAVO_CUSTOMER_ID,
    CustomerIdMapping,
    EventMapping,
    InvalidInputError,
    ProfileMapping,
)
from plugins.braze import catalog
from plugins.braze.settings import ARRAY_MODES, echo

LINE_PATH = re.compile(r"([A-Za-z0-9_]+)\[\]\.([A-Za-z0-9_]+)")
NAME = re.compile(r"[^$\s][^\s]{0,254}")
NESTED_FORBIDDEN = re.compile(r"[.$\s]")


def validate_customer_id_mapping(mapping: CustomerIdMapping) -> None:
    """Source attribute non-empty; target one of Braze's identifiers."""
    if not mapping.source_attribute.strip():
        raise InvalidInputError(
            "source_attribute", "required: the Antavo attribute to identify customers by"
        )
    if mapping.custom:
        raise InvalidInputError("custom", "Braze has no custom identifiers; leave custom unset")
    if mapping.target_identifier not in catalog.IDENTIFIERS:
        raise InvalidInputError(
            "target_identifier",
            f"{echo(mapping.target_identifier)} is not a Braze identifier; allowed: "
            f"{', '.join(catalog.IDENTIFIERS)}",
        )
    if mapping.source_attribute == ANTAVO_CUSTOMER_ID and mapping.target_identifier in (
        catalog.EMAIL,
        catalog.PHONE,
    ):
        raise InvalidInputError(
            "source_attribute",
            f"the Antavo customer ID is not an {mapping.target_identifier}; name the Antavo "
            "attribute that holds it",
        )


def validate_profile_mapping(mapping: ProfileMapping) -> None:
    """Target a Braze standard attribute, or (custom) a name Braze accepts for a custom
    attribute that is not a reserved one."""
    if not mapping.source_attribute.strip():
        raise InvalidInputError("source_attribute", "required: the Antavo attribute to send")
    target = mapping.target_attribute
    if not target.strip():
        raise InvalidInputError("target_attribute", "required: the Braze attribute to set")
    if mapping.array_mode and mapping.array_mode not in ARRAY_MODES:
        raise InvalidInputError(
            "array_mode", f"{echo(mapping.array_mode)} is not allowed; use append or replace"
        )
    if mapping.custom:
        if target in catalog.RESERVED_ATTRIBUTES:
            raise InvalidInputError(
                "target_attribute",
                f"{echo(target)} is a Braze standard or reserved field; set custom=false to "
                "map onto it, or pick another name",
            )
        _check_name("target_attribute", target, "custom attribute")
        return
    if target not in catalog.ATTRIBUTES:
        raise InvalidInputError(
            "target_attribute",
            f"{echo(target)} is not a Braze standard attribute ({', '.join(catalog.ATTRIBUTES)}); "
            "set custom=true for a custom attribute",
        )
    if mapping.array_mode:
        raise InvalidInputError(
            "array_mode", "only custom array attributes take an array mode; leave it unset"
        )


def validate_event_mapping(mapping: EventMapping) -> None:
    """Target a custom event name, or ``purchase`` with product_id, price and currency
    mapped; parameter names Braze accepts as properties."""
    if not mapping.source_event.strip():
        raise InvalidInputError("source_event", "required: the Antavo action to send")
    target = mapping.target_event
    if not target.strip():
        raise InvalidInputError("target_event", "required: the Braze custom event name")
    _check_name("target_event", target, "event name")
    arrays: set[str] = set()
    targets: set[str] = set()
    for index, parameter in enumerate(mapping.parameters):
        where = f"parameters[{index}]"
        source = parameter.source_parameter
        if not source.strip():
            raise InvalidInputError(f"{where}.source_parameter", "required")
        line = LINE_PATH.fullmatch(source)
        if "[]" in source and line is None:
            raise InvalidInputError(
                f"{where}.source_parameter",
                f"{echo(source)}: a per-line source is <array>[].<key>, e.g. items[].price",
            )
        if line is not None:
            arrays.add(line.group(1))
        name = parameter.target_parameter
        if name in catalog.RESERVED_PROPERTIES:
            raise InvalidInputError(
                f"{where}.target_parameter",
                f"{echo(name)} is reserved by Braze (time, event_name); pick another name",
            )
        _check_name(f"{where}.target_parameter", name, "property name")
        if name in targets:
            raise InvalidInputError(f"{where}.target_parameter", f"{echo(name)} is mapped twice")
        targets.add(name)
    if len(arrays) > 1:
        raise InvalidInputError(
            "parameters", f"per-line sources read one array, not {', '.join(sorted(arrays))}"
        )
    if target == catalog.PURCHASE:
        missing = [f for f in catalog.PURCHASE_REQUIRED if f not in targets]
        if missing:
            raise InvalidInputError(
                "parameters",
                f"Braze requires {', '.join(catalog.PURCHASE_REQUIRED)} on a purchase; map "
                f"{', '.join(missing)} (e.g. items[].product_id -> product_id)",
            )
    elif arrays:
        raise InvalidInputError(
            "parameters", "per-line sources (items[].key) are for purchase mappings only"
        )


def _check_name(field: str, name: str, what: str) -> None:
    if not NAME.fullmatch(name):
        raise InvalidInputError(
            field,
            f"{echo(name)} is not a valid Braze {what}: 1-255 characters, no spaces, not "
            "starting with $",
        )
