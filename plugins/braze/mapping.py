"""What a connection's settings and mappings resolve to (worked out once by ``prepare``),
and the rendering of identifiers, attributes, events and purchases from it.

Rendered fragments carry no identifier: ``send`` puts the customer's identifier on every
object it builds. An event fragment has ``name``; a purchase fragment has ``product_id``
(and never ``name``), which is how ``send`` tells them apart, also in a replayed dead
letter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.connector import (
    ANTAVO_CUSTOMER_ID,
    AntavoEvent,
    Connection,
    Customer,
    CustomerIdMapping,
    EventMapping,
    MappingError,
    ProfileChange,
    ProfileMapping,
)
from plugins.braze import catalog, values
from plugins.braze.settings import (
    ARRAY_APPEND,
    SCOPE_ALL,
    BrazeSettings,
    echo,
    parse_settings,
)
from plugins.braze.validation import LINE_PATH

MAX_EXTERNAL_ID_BYTES = 987
MAX_QUANTITY = 100
MAX_OBJECTS_PER_ITEM = 75


def identifier_value(mapping: CustomerIdMapping, customer: Customer) -> Any:
    """The value of the attribute that identifies ``customer`` (``None`` when unset)."""
    if mapping.source_attribute == ANTAVO_CUSTOMER_ID:
        return customer.id
    return customer.attributes.get(mapping.source_attribute)


def identifiers_reader(
    mapping: CustomerIdMapping, settings: BrazeSettings
) -> Callable[[Customer], dict[str, Any]]:
    """``customer -> {identifier: value}`` for the connection's customer ID mapping."""
    target = mapping.target_identifier
    phone = values.phone_converter(settings.default_phone_region)

    def identifiers(customer: Customer) -> dict[str, Any]:
        value = identifier_value(mapping, customer)
        if value is None or value == "" or isinstance(value, bool | dict | list):
            raise MappingError(
                "identify",
                f"customer has no usable {echo(mapping.source_attribute)} to send as Braze "
                f"{echo(target)}",
            )
        text = str(value)
        try:
            if target == catalog.EXTERNAL_ID:
                if len(text.encode()) > MAX_EXTERNAL_ID_BYTES:
                    raise values.ConversionError(
                        f"{len(text.encode())} bytes; Braze takes at most {MAX_EXTERNAL_ID_BYTES}"
                    )
                return {"external_id": text}
            if target == catalog.USER_ALIAS:
                return {"user_alias": {"alias_name": text, "alias_label": settings.alias_label}}
            if target == catalog.EMAIL:
                return {"email": values.standard_converter("email", "")(text)}
            if target == catalog.PHONE:
                return {"phone": phone(text)}
        except values.ConversionError as exc:
            raise MappingError("identify", f"{target} {echo(text)}: {exc}") from None
        raise MappingError(
            "identify",
            f"{echo(target)} is not a Braze identifier ({', '.join(catalog.IDENTIFIERS)})",
        )

    return identifiers


@dataclass(frozen=True)
class AttributePlan:
    mapping: ProfileMapping
    convert: Callable[[Any], Any]
    append: bool
    """A custom array sent as add/remove operations."""


@dataclass(frozen=True)
class EventPlan:
    mapping: EventMapping
    purchase: bool
    line_array: str | None
    parameters: tuple[tuple[str, str | None, str], ...]
    """(source, line key, target) per parameter."""


@dataclass(frozen=True)
class ConnectionPlan:
    settings: BrazeSettings
    identifiers: Callable[[Customer], dict[str, Any]]
    attributes: tuple[AttributePlan, ...]
    events: Mapping[str, EventPlan]
    pacing: dict[str, float] = field(default_factory=dict, compare=False)
    """Rate-limit state learned from Braze's answers (``remaining``, ``reset_at``): the
    one mutable part, kept per connection by ``send``."""


def plan_of(connection: Connection) -> ConnectionPlan:
    settings = parse_settings(connection.settings)
    attributes = []
    for mapping in connection.profile_mappings:
        if mapping.custom:
            convert: Callable[[Any], Any] = values.custom_value
        else:
            kind = catalog.ATTRIBUTES.get(mapping.target_attribute, ("string", ""))[0]
            convert = values.standard_converter(kind, settings.default_phone_region)
        append = mapping.custom and (mapping.array_mode or settings.array_mode) == ARRAY_APPEND
        attributes.append(AttributePlan(mapping, convert, append))
    events: dict[str, EventPlan] = {}
    for event_mapping in connection.event_mappings:
        if event_mapping.source_event in events:
            continue  # the first mapping of an action wins (Connection.event_mapping_for)
        parameters = []
        line_array = None
        for parameter in event_mapping.parameters:
            line = LINE_PATH.fullmatch(parameter.source_parameter)
            if line is not None:
                line_array = line.group(1)
                parameters.append((line.group(1), line.group(2), parameter.target_parameter))
            else:
                parameters.append((parameter.source_parameter, None, parameter.target_parameter))
        events[event_mapping.source_event] = EventPlan(
            event_mapping,
            event_mapping.target_event == catalog.PURCHASE,
            line_array,
            tuple(parameters),
        )
    identifiers = identifiers_reader(connection.customer_id_mapping, settings)
    return ConnectionPlan(settings, identifiers, tuple(attributes), events)


def profile_attributes(
    plan: ConnectionPlan, customer: Customer, change: ProfileChange
) -> dict[str, Any]:
    """Braze attributes for ``change``: converted standard attributes, custom attributes,
    ``null`` for a cleared one, ``{"add", "remove"}`` for an append-mode array."""
    source: Mapping[str, Any] = change.changes
    if plan.settings.profile_scope == SCOPE_ALL:
        source = {**customer.attributes, **change.changes}
    result: dict[str, Any] = {}
    for attribute in plan.attributes:
        name = attribute.mapping.source_attribute
        if name not in source:
            continue
        target = attribute.mapping.target_attribute
        value = source[name]
        if value is None:
            result[target] = None  # Braze removes an attribute sent as null
            continue
        try:
            if attribute.append and isinstance(value, list):
                if name not in change.changes:
                    continue  # unchanged: nothing to add or remove
                operations = _array_operations(value, change.previous.get(name))
                if operations:
                    result[target] = operations
                continue
            result[target] = attribute.convert(value)
        except values.ConversionError as exc:
            raise MappingError(
                "map_profile", f"attribute {name!r} -> Braze {target!r}: {exc}"
            ) from None
    return result


def _array_operations(new: list[Any], old: Any) -> dict[str, list[Any]]:
    before = [values.custom_value(v) for v in old] if isinstance(old, list) else []
    after = [values.custom_value(v) for v in new]
    operations: dict[str, list[Any]] = {}
    added = [v for v in after if v not in before]
    removed = [v for v in before if v not in after]
    if added:
        operations["add"] = added
    if removed:
        operations["remove"] = removed
    return operations


def braze_events(plan: ConnectionPlan, event: AntavoEvent) -> Sequence[Mapping[str, Any]]:
    """Braze event or purchase fragments for a mapped Antavo event ([] when unmapped)."""
    event_plan = plan.events.get(event.action)
    if event_plan is None:
        return []
    time = values.braze_time(event.timestamp)
    app_id = plan.settings.app_id
    if not event_plan.purchase:
        properties = _properties(event_plan, event.data, {})
        rendered: dict[str, Any] = {"name": event_plan.mapping.target_event, "time": time}
        if properties:
            rendered["properties"] = properties
        if app_id:
            rendered["app_id"] = app_id
        return [rendered]
    lines: Sequence[Any] = [{}]
    if event_plan.line_array is not None:
        found = event.data.get(event_plan.line_array)
        if not isinstance(found, list) or not found:
            raise MappingError(
                "map_event",
                f"{event.action!r} has no {event_plan.line_array!r} lines to send as Braze "
                "purchases",
            )
        lines = found
    purchases: list[Mapping[str, Any]] = []
    for index, line in enumerate(lines):
        if not isinstance(line, Mapping):
            raise MappingError("map_event", f"{event_plan.line_array}[{index}] is not an object")
        purchases += _purchases(event_plan, event, line, index, time, app_id)
    if len(purchases) > MAX_OBJECTS_PER_ITEM:
        raise MappingError(
            "map_event",
            f"{event.action!r} makes {len(purchases)} purchase objects; Braze takes at most "
            f"{MAX_OBJECTS_PER_ITEM} objects in one request",
        )
    return purchases


_PURCHASE_CONVERTERS: dict[str, Callable[[Any], Any]] = {
    "product_id": values.product_id,
    "price": values.price,
    "currency": values.currency,
    "quantity": values.quantity,
}


def _purchases(
    plan: EventPlan,
    event: AntavoEvent,
    line: Mapping[str, Any],
    index: int,
    time: str,
    app_id: str,
) -> list[Mapping[str, Any]]:
    fields: dict[str, Any] = {}
    for source, key, target in plan.parameters:
        if target not in _PURCHASE_CONVERTERS:
            continue
        value = line.get(key) if key is not None else event.data.get(source)
        where = f"{source}[{index}].{key}" if key is not None else source
        if value is None:
            if target == "quantity":
                continue
            raise MappingError("map_event", f"purchase needs {target}: {where!r} is missing")
        try:
            fields[target] = _PURCHASE_CONVERTERS[target](value)
        except values.ConversionError as exc:
            raise MappingError("map_event", f"{where!r} -> purchase {target}: {exc}") from None
    properties = _properties(plan, event.data, line)
    quantity = int(fields.pop("quantity", 1))
    purchases: list[Mapping[str, Any]] = []
    while quantity > 0:
        part = min(quantity, MAX_QUANTITY)  # Braze takes 1-100; X counts as X purchases
        purchase: dict[str, Any] = {
            "product_id": fields["product_id"],
            "currency": fields["currency"],
            "price": fields["price"],
            "quantity": part,
            "time": time,
        }
        if properties:
            purchase["properties"] = properties
        if app_id:
            purchase["app_id"] = app_id
        purchases.append(purchase)
        quantity -= part
    return purchases


def _properties(
    plan: EventPlan, data: Mapping[str, Any], line: Mapping[str, Any]
) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for source, key, target in plan.parameters:
        if plan.purchase and target in _PURCHASE_CONVERTERS:
            continue
        value = line.get(key) if key is not None else data.get(source)
        if value is None:
            continue
        try:
            properties[target] = values.custom_value(value)
        except values.ConversionError as exc:
            raise MappingError("map_event", f"parameter {source!r} -> {target!r}: {exc}") from None
    return properties
