"""Mapping validators of the Insider connector, run when a mapping is written.

Each raises ``InvalidInputError`` naming the offending field relative to the object it
validates (the admin API prefixes where that object sits in its request) and saying what
is allowed. The rules come from ``catalog``: what is a default name and of which type,
what custom names look like, which parameters ``purchase`` and ``cart_page_view`` need.
"""

from __future__ import annotations

from collections.abc import Collection

from engine.connector import CustomerIdMapping, EventMapping, InvalidInputError, ProfileMapping
from plugins.insider import catalog
from plugins.insider.events import line_path
from plugins.insider.settings import ARRAY_MODES

ATTRIBUTE_ARRAYS = ", ".join(n for n, f in catalog.ATTRIBUTES.items() if f.is_array)


def validate_customer_id_mapping(mapping: CustomerIdMapping) -> None:
    """Source attribute non-empty; target a default identifier, or a custom identifier
    name in lowercase snake case that is not a default one."""
    if not mapping.source_attribute.strip():
        raise InvalidInputError(
            "source_attribute", "required: the Antavo attribute to identify customers by"
        )
    target = mapping.target_identifier
    if mapping.custom:
        _check_custom_name("target_identifier", target, catalog.IDENTIFIERS, "identifier")
    elif target not in catalog.IDENTIFIERS:
        raise InvalidInputError(
            "target_identifier",
            f"{target!r} is not an Insider identifier; allowed: "
            f"{', '.join(sorted(catalog.IDENTIFIERS))}, or set custom=true for a custom "
            "identifier (sent under identifiers.custom)",
        )


def validate_profile_mapping(mapping: ProfileMapping) -> None:
    """Source non-empty; target a default Insider attribute, or (custom) a lowercase snake
    case name that is not a default attribute; ``array_mode`` only on array targets."""
    if not mapping.source_attribute.strip():
        raise InvalidInputError("source_attribute", "required: the Antavo attribute to send")
    target = mapping.target_attribute
    if not target.strip():
        raise InvalidInputError("target_attribute", "required: the Insider attribute to set")
    if mapping.array_mode and mapping.array_mode not in ARRAY_MODES:
        raise InvalidInputError(
            "array_mode", f"{mapping.array_mode!r} is not allowed; use append or replace"
        )
    if mapping.custom:
        _check_custom_name("target_attribute", target, catalog.ATTRIBUTES, "attribute")
        return
    field = catalog.ATTRIBUTES.get(target)
    if field is None:
        defaults = sorted(set(catalog.ATTRIBUTES) - catalog.IDENTIFIER_ONLY_ATTRIBUTES)
        raise InvalidInputError(
            "target_attribute",
            f"{target!r} is not a default Insider attribute ({', '.join(defaults)}); "
            "set custom=true to send it as a custom attribute",
        )
    if target in catalog.IDENTIFIER_ONLY_ATTRIBUTES:
        raise InvalidInputError(
            "target_attribute",
            f"{target!r} is an identifier in Tidegate: set it with the connection's "
            f"customer_id_mapping (target_identifier {target})",
        )
    if mapping.array_mode and not field.is_array:
        raise InvalidInputError(
            "array_mode",
            f"{target!r} is not an array attribute; array_mode applies to {ATTRIBUTE_ARRAYS} "
            "and custom attributes",
        )


def validate_event_mapping(mapping: EventMapping) -> None:
    """Source event non-empty; target a lowercase Insider event name; parameters valid
    like attributes (against Insider's default event parameters), targets unique,
    per-line sources well formed and from one array, and the parameters Insider requires
    for ``purchase`` and ``cart_page_view`` present."""
    if not mapping.source_event.strip():
        raise InvalidInputError("source_event", "required: the Antavo event action")
    if not catalog.EVENT_NAME_PATTERN.fullmatch(mapping.target_event):
        raise InvalidInputError(
            "target_event",
            f"{mapping.target_event!r} is not a valid Insider event name: lowercase letters, "
            "digits, '.', '_' and '-', starting with a letter or digit",
        )
    seen: dict[str, int] = {}
    array = ""
    for index, parameter in enumerate(mapping.parameters):
        field = f"parameters[{index}]"
        source = parameter.source_parameter
        if not source.strip():
            raise InvalidInputError(
                f"{field}.source_parameter", "required: the Antavo event parameter to send"
            )
        if "[]" in source:
            path = line_path(source)
            if path is None:
                raise InvalidInputError(
                    f"{field}.source_parameter",
                    f"{source!r} is not a per-line source; write <array>[].<key>, "
                    "e.g. items[].product_id",
                )
            if array and path[0] != array:
                raise InvalidInputError(
                    f"{field}.source_parameter",
                    f"per-line parameters of one mapping must read the same array; "
                    f"found {path[0]}[] after {array}[]",
                )
            array = path[0]
        _check_parameter_target(field, parameter.target_parameter, parameter.custom)
        target = parameter.target_parameter
        if target in seen:
            raise InvalidInputError(
                f"{field}.target_parameter",
                f"{target!r} is already the target of parameters[{seen[target]}]",
            )
        seen.setdefault(target, index)
    _check_required_parameters(mapping)


def _check_parameter_target(field: str, target: str, custom: bool) -> None:
    if custom:
        _check_custom_name(
            f"{field}.target_parameter", target, catalog.EVENT_PARAMETERS, "parameter"
        )
    elif target not in catalog.EVENT_PARAMETERS:
        raise InvalidInputError(
            f"{field}.target_parameter",
            f"{target!r} is not a default Insider event parameter "
            f"({', '.join(sorted(catalog.EVENT_PARAMETERS))}); set custom=true to send it "
            "as a custom parameter",
        )


def _check_required_parameters(mapping: EventMapping) -> None:
    required = catalog.REQUIRED_EVENT_PARAMETERS.get(mapping.target_event, ())
    provided = {p.target_parameter for p in mapping.parameters if not p.custom}
    missing = [name for name in required if name not in provided]
    if missing:
        raise InvalidInputError(
            "parameters",
            f"Insider requires {', '.join(required)} on a {mapping.target_event} event; "
            f"map a parameter to {', '.join(missing)}",
        )


def _check_custom_name(field: str, name: str, defaults: Collection[str], kind: str) -> None:
    if not catalog.CUSTOM_NAME_PATTERN.fullmatch(name):
        raise InvalidInputError(
            field,
            f"{name!r} is not a valid custom {kind} name: lowercase letters, digits and '_', "
            "starting with a letter",
        )
    if name in defaults:
        raise InvalidInputError(
            field, f"{name!r} is a default Insider {kind}; set custom=false to use it"
        )
