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
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ParameterPlan:
    """One parameter mapping, resolved: where its value is read and which Insider type
    it is converted to."""

    mapping: ParameterMapping
    source: str
    line_key: str | None
    """For a per-line source (``items[].price``): the key read from each line."""
    target: str
    custom: bool
    kind: str | None
    """The catalog kind of a default parameter; ``None`` for a custom one."""


@dataclass(frozen=True)
class EventPlan:
    """An event mapping with its per-line array and its parameters resolved once, so
    rendering an event does no pattern matching or catalog lookups."""

    mapping: EventMapping
    line_array: str | None
    parameters: tuple[ParameterPlan, ...]

    @classmethod
    def of(cls, mapping: EventMapping) -> EventPlan:
        parameters = []
        for parameter in mapping.parameters:
            path = line_path(parameter.source_parameter)
            field = (
                None
                if parameter.custom
                else catalog.EVENT_PARAMETERS.get(parameter.target_parameter)
            )
            parameters.append(
                ParameterPlan(
                    parameter,
                    parameter.source_parameter,
                    path[1] if path else None,
                    parameter.target_parameter,
                    parameter.custom,
                    field.kind if field else None,
                )
            )
        return cls(mapping, line_array(mapping), tuple(parameters))


def insider_events(
    plan: EventPlan, event: AntavoEvent, phone_region: str = ""
) -> list[dict[str, Any]]:
    """The Insider events for ``event`` under ``plan``'s mapping: one, or one per line.

    Raises ``MappingError`` when a value cannot be converted, or when a per-line mapping
    meets an event without a non-empty list of line objects.
    """
    array = plan.line_array
    if array is None:
        return [_insider_event(plan, event, {}, 0, phone_region)]
    mapping = plan.mapping
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
        events.append(_insider_event(plan, event, line, index, phone_region))
    return events


def _insider_event(
    plan: EventPlan,
    event: AntavoEvent,
    line: Mapping[str, Any],
    index: int,
    phone_region: str,
) -> dict[str, Any]:
    params: dict[str, Any] = {}
    custom: dict[str, Any] = {}
    data = event.data
    for parameter in plan.parameters:
        key = parameter.line_key
        raw = data.get(parameter.source) if key is None else line.get(key)
        if raw is None:
            continue
        value = _parameter_value(parameter, raw, event, phone_region)
        if parameter.custom:
            custom[parameter.target] = value
        else:
            params[parameter.target] = value
    if custom:
        params[CUSTOM_KEY] = custom
    moment = event.timestamp if index == 0 else event.timestamp + index * LINE_SPACING
    payload: dict[str, Any] = {
        "event_name": plan.mapping.target_event,
        "timestamp": rfc3339_utc(moment),
    }
    if params:
        payload["event_params"] = params
    return payload


def _parameter_value(
    parameter: ParameterPlan, raw: Any, event: AntavoEvent, phone_region: str
) -> Any:
    try:
        return value_for(parameter.kind, raw, phone_region)
    except ConversionError as exc:
        raise MappingError(
            "map_event",
            f"customer {event.customer}: {event.action} parameter {parameter.source} "
            f"value {raw!r} is {exc}, so it cannot be sent as the Insider event parameter "
            f"{parameter.target}",
        ) from None
