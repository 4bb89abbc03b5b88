"""Insider events from Antavo events, including one event per line item.

A parameter mapping whose source is ``<array>[].<key>`` (e.g. ``items[].product_id``)
reads ``<key>`` from each element of the event's ``<array>`` list. An event mapping with
any such parameter is *per line*: it sends one Insider event per element, each carrying
the shared parameters (plain sources such as ``transaction_id``) and its own line's
values. This is how an Antavo ``checkout`` becomes Insider ``purchase`` events that share
``event_group_id`` (reference §3.7).

Line timestamps: line ``n`` (from 0) is stamped ``n`` seconds after the Antavo event. Insider
has no idempotency key and practitioners report that identical events may collapse
(§3.6, §8; UNCONFIRMED), so lines never share a timestamp; the first line keeps the
event's own time and the order of the lines is kept.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from engine.errors import MappingError
from engine.records import AntavoEvent, EventMapping, ParameterMapping
from plugins.insider import catalog
from plugins.insider.values import ConversionError, rfc3339_utc, value_for

LINE_PATH = re.compile(r"^([A-Za-z0-9_]+)\[\]\.([A-Za-z0-9_]+)$")
LINE_SPACING = timedelta(seconds=1)
CUSTOM_KEY = "custom"


def line_path(source: str) -> tuple[str, str] | None:
    """``(array, key)`` of a per-line source such as ``items[].price``, else ``None``."""
    match = LINE_PATH.match(source)
    return (match.group(1), match.group(2)) if match else None


def line_array(mapping: EventMapping) -> str | None:
    """The array a per-line mapping reads its lines from; ``None`` for a plain mapping."""
    for parameter in mapping.parameters:
        path = line_path(parameter.source_parameter)
        if path is not None:
            return path[0]
    return None


def insider_events(
    mapping: EventMapping, event: AntavoEvent, phone_region: str = ""
) -> list[dict[str, Any]]:
    """The Insider events for ``event`` under ``mapping``: one, or one per line.

    Raises ``MappingError`` when a value cannot be converted, or when a per-line mapping
    meets an event without a non-empty list of line objects.
    """
    array = line_array(mapping)
    if array is None:
        return [_insider_event(mapping, event, {}, 0, phone_region)]
    lines = event.data.get(array)
    if not isinstance(lines, list) or not lines:
        raise MappingError(
            "map_event",
            f"customer {event.customer}: {event.action} event {event.id} has no {array} list, "
            f"and mapping {mapping.id} sends one {mapping.target_event} event per line",
        )
    events = []
    for index, line in enumerate(lines):
        if not isinstance(line, Mapping):
            raise MappingError(
                "map_event",
                f"customer {event.customer}: {event.action} event {event.id} "
                f"{array}[{index}] is not an object",
            )
        events.append(_insider_event(mapping, event, line, index, phone_region))
    return events


def _insider_event(
    mapping: EventMapping,
    event: AntavoEvent,
    line: Mapping[str, Any],
    index: int,
    phone_region: str,
) -> dict[str, Any]:
    params: dict[str, Any] = {}
    custom: dict[str, Any] = {}
    for parameter in mapping.parameters:
        path = line_path(parameter.source_parameter)
        raw = line.get(path[1]) if path else event.data.get(parameter.source_parameter)
        if raw is None:
            continue
        value = _parameter_value(parameter, raw, event, phone_region)
        if parameter.custom:
            custom[parameter.target_parameter] = value
        else:
            params[parameter.target_parameter] = value
    if custom:
        params[CUSTOM_KEY] = custom
    payload: dict[str, Any] = {
        "event_name": mapping.target_event,
        "timestamp": rfc3339_utc(event.timestamp + index * LINE_SPACING),
    }
    if params:
        payload["event_params"] = params
    return payload


def _parameter_value(
    parameter: ParameterMapping, raw: Any, event: AntavoEvent, phone_region: str
) -> Any:
    field = None if parameter.custom else catalog.EVENT_PARAMETERS.get(parameter.target_parameter)
    try:
        return value_for(field.kind if field else None, raw, phone_region)
    except ConversionError as exc:
        raise MappingError(
            "map_event",
            f"customer {event.customer}: {event.action} parameter {parameter.source_parameter} "
            f"value {raw!r} is {exc}, so it cannot be sent as the Insider event parameter "
            f"{parameter.target_parameter}",
        ) from None
