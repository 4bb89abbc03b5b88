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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from engine.connector import AntavoEvent, EventMapping, MappingError, ParameterMapping
from plugins.insider import catalog
from plugins.insider.values import ConversionError, converter, rfc3339_utc

LINE_PATH = re.compile(r"([A-Za-z0-9_]+)\[\]\.([A-Za-z0-9_]+)")
LINE_SPACING = timedelta(seconds=1)
_NO_LINE: Mapping[str, Any] = {}
"""The line of an event that is not per line: never read, as no parameter has a line key."""


def line_path(source: str) -> tuple[str, str] | None:
    """``(array, key)`` of a per-line source such as ``items[].price``, else ``None``."""
    match = LINE_PATH.fullmatch(source)
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
    convert: Callable[[Any], Any]
    """To the Insider type of a default parameter, or checked as a custom value."""


_Step = tuple[str, str | None, str, bool, Callable[[Any], Any], ParameterPlan]
"""(source, line_key, target, custom, convert, plan) of one parameter."""


@dataclass(frozen=True)
class EventPlan:
    """An event mapping with its per-line array and its parameters resolved once (for the
    connection's phone region), so rendering an event does no pattern matching or
    catalog lookups."""

    mapping: EventMapping
    line_array: str | None
    parameters: tuple[ParameterPlan, ...]

    steps: tuple[_Step, ...] = field(init=False, repr=False, compare=False)
    """``parameters`` as tuples, unpacked per rendered event: cheaper than reading five
    attributes of each plan."""

    def __post_init__(self) -> None:
        steps = tuple(
            (p.source, p.line_key, p.target, p.custom, p.convert, p) for p in self.parameters
        )
        object.__setattr__(self, "steps", steps)

    @classmethod
    def of(cls, mapping: EventMapping, phone_region: str = "") -> EventPlan:
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
                    converter(field.kind if field else None, phone_region),
                )
            )
        return cls(mapping, line_array(mapping), tuple(parameters))


def insider_events(plan: EventPlan, event: AntavoEvent) -> list[dict[str, Any]]:
    """The Insider events for ``event`` under ``plan``'s mapping: one, or one per line.

    Raises ``MappingError`` when a value cannot be converted, or when a per-line mapping
    meets an event without a non-empty list of line objects.
    """
    array = plan.line_array
    if array is None:
        return [_insider_event(plan, event, _NO_LINE, 0)]
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
        events.append(_insider_event(plan, event, line, index))
    return events


def _insider_event(
    plan: EventPlan,
    event: AntavoEvent,
    line: Mapping[str, Any],
    index: int,
) -> dict[str, Any]:
    params: dict[str, Any] = {}
    custom: dict[str, Any] = {}
    data = event.data
    for source, key, target, is_custom, convert, parameter in plan.steps:
        raw = data.get(source) if key is None else line.get(key)
        if raw is None:
            continue
        try:
            value = convert(raw)
        except ConversionError as exc:
            raise _unconvertible(parameter, raw, event, exc) from None
        if is_custom:
            custom[target] = value
        else:
            params[target] = value
    if custom:
        params[catalog.CUSTOM_KEY] = custom
    moment = event.timestamp if index == 0 else event.timestamp + index * LINE_SPACING
    payload: dict[str, Any] = {
        "event_name": plan.mapping.target_event,
        "timestamp": rfc3339_utc(moment),
    }
    if params:
        payload["event_params"] = params
    return payload


def _unconvertible(
    parameter: ParameterPlan, raw: Any, event: AntavoEvent, exc: ConversionError
) -> MappingError:
    return MappingError(
        "map_event",
        f"customer {event.customer}: {event.action} parameter {parameter.source} "
        f"value {raw!r} is {exc}, so it cannot be sent as the Insider event parameter "
        f"{parameter.target}",
    )
