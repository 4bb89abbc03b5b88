"""One upsert request (and its attribute deletions) from the deliveries of one batch.

Deliveries of one customer merge into one user object, in order: scalar attributes keep
the latest value; arrays in *append* mode concatenate (what separate upserts would have
done) and in *replace* mode keep the latest; events concatenate; an attribute set after
being cleared is sent, one cleared after being set is deleted.

Insider's ``not_append`` applies to a whole user object (§3.2, §3.6). A customer with
arrays in both modes is therefore sent as two user objects in the same request: the
first with everything else, the second with only the replace-mode arrays and
``not_append: true``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.connector import Delivery
from plugins.insider.catalog import CUSTOM_KEY

MAX_USERS_PER_REQUEST = 1000

ReplaceRule = Callable[[bool, str], bool]
"""``(custom, target) -> True`` when that array attribute replaces Insider's values."""


class CustomerPart:
    """Everything one batch holds for one customer.

    ``attributes``, ``custom`` and ``cleared`` stay ``None`` until a delivery brings an
    attribute or a cleared one: most customers of a batch have events only.
    """

    __slots__ = ("customer_id", "identifiers", "attributes", "custom", "cleared", "events")

    def __init__(self, customer_id: str, identifiers: dict[str, Any]) -> None:
        self.customer_id = customer_id
        self.identifiers = identifiers
        self.attributes: dict[str, Any] | None = None
        self.custom: dict[str, Any] | None = None
        self.cleared: dict[tuple[bool, str], None] | None = None
        self.events: list[Mapping[str, Any]] = []

    def add(
        self, delivery: Delivery, cleared: Sequence[tuple[bool, str]], replace: ReplaceRule
    ) -> None:
        if delivery.attributes or cleared:  # most deliveries carry events only
            self._add_values(delivery.attributes or {}, cleared, replace)
        self.events.extend(delivery.events)

    def _add_values(
        self,
        values: Mapping[str, Any],
        cleared: Sequence[tuple[bool, str]],
        replace: ReplaceRule,
    ) -> None:
        if self.attributes is None or self.custom is None or self.cleared is None:
            self.attributes, self.custom, self.cleared = {}, {}, {}
        attributes, custom, was_cleared = self.attributes, self.custom, self.cleared
        for key, value in values.items():
            if key == CUSTOM_KEY and isinstance(value, Mapping):
                for name, custom_value in value.items():
                    _set(custom, was_cleared, True, name, custom_value, replace)
            else:
                _set(attributes, was_cleared, False, key, value, replace)
        for is_custom, name in cleared:
            (custom if is_custom else attributes).pop(name, None)
            was_cleared[(is_custom, name)] = None

    def deletion(self) -> dict[str, Any] | None:
        """This customer's user object for ``/attribute/delete`` (§6.1), if any."""
        if not self.cleared:
            return None
        user: dict[str, Any] = {"identifiers": self.identifiers}
        whole = [name for custom, name in self.cleared if not custom]
        custom_whole = [name for custom, name in self.cleared if custom]
        if whole:
            user["whole"] = whole
        if custom_whole:
            user[CUSTOM_KEY] = {"whole": custom_whole}
        return user

    def users(self, replace: ReplaceRule) -> list[dict[str, Any]]:
        """This customer's upsert user objects: none, one, or two (see module doc)."""
        if not self.attributes and not self.custom:
            # Events only, the common case: what the general path below builds for it
            # (the part's own list of events, not a copy: the part is made for one send).
            return [{"identifiers": self.identifiers, "events": self.events}] if self.events else []
        main: dict[str, Any] = {}
        main_custom: dict[str, Any] = {}
        replaced: dict[str, Any] = {}
        replaced_custom: dict[str, Any] = {}
        for into, custom, values in (
            ((main, replaced), False, self.attributes or {}),
            ((main_custom, replaced_custom), True, self.custom or {}),
        ):
            for name, value in values.items():
                target = into[1] if isinstance(value, list) and replace(custom, name) else into[0]
                target[name] = value
        appended = any(isinstance(v, list) for v in (*main.values(), *main_custom.values()))
        if not appended:
            # No append-mode array to protect: one user object carries everything.
            main.update(replaced)
            main_custom.update(replaced_custom)
            replaced, replaced_custom = {}, {}
        users = []
        first = self._user(main, main_custom, self.events)
        if first is not None:
            if not appended and self._has_arrays(main, main_custom):
                first["not_append"] = True
            users.append(first)
        second = self._user(replaced, replaced_custom, [])
        if second is not None:
            second["not_append"] = True
            users.append(second)
        return users

    def _has_arrays(self, *parts: dict[str, Any]) -> bool:
        return any(isinstance(value, list) for part in parts for value in part.values())

    def _user(
        self, attributes: dict[str, Any], custom: dict[str, Any], events: list[Mapping[str, Any]]
    ) -> dict[str, Any] | None:
        body = dict(attributes)
        if custom:
            body[CUSTOM_KEY] = custom
        if not body and not events:
            return None
        user: dict[str, Any] = {"identifiers": self.identifiers}
        if body:
            user["attributes"] = body
        if events:
            user["events"] = list(events)
        return user


def _set(
    into: dict[str, Any],
    cleared: dict[tuple[bool, str], None],
    custom: bool,
    name: str,
    value: Any,
    replace: ReplaceRule,
) -> None:
    cleared.pop((custom, name), None)
    current = into.get(name)
    if isinstance(value, list) and isinstance(current, list) and not replace(custom, name):
        into[name] = current + value
    else:
        into[name] = value


def customer_parts(
    deliveries: Sequence[Delivery],
    cleared: Callable[[Delivery], Sequence[tuple[bool, str]]],
    replace: ReplaceRule,
) -> list[CustomerPart]:
    """One part per distinct customer, in first-seen order. ``cleared`` is asked only
    about deliveries of a profile change (an event clears nothing).

    Identifiers come from the customer's last delivery: a batch that changes a
    customer's identifier moves it (PATCH /identity) before the upsert, so every part of
    that customer must go under the identifier it has after the move.
    """
    parts: dict[str, CustomerPart] = {}
    for delivery in deliveries:
        identifiers = delivery.identifiers
        if type(identifiers) is not dict:  # a dict goes into the request as it is
            identifiers = dict(identifiers)
        part = parts.get(delivery.customer.id)
        if part is None:
            part = parts[delivery.customer.id] = CustomerPart(delivery.customer.id, identifiers)
        else:
            part.identifiers = identifiers
        part.add(delivery, () if delivery.change is None else cleared(delivery), replace)
    return list(parts.values())


@dataclass
class UpsertBatch:
    """The users of one upsert request; ``owners[n]`` is the customer of ``users[n]``."""

    users: list[dict[str, Any]] = field(default_factory=list)
    owners: list[str] = field(default_factory=list)
    skip_hook: bool = False


def upsert_batch(
    parts: Sequence[CustomerPart], replace: ReplaceRule, skip_hook: bool = False
) -> UpsertBatch:
    """The upsert request for ``parts``. Raises ``ValueError`` for more than
    ``MAX_USERS_PER_REQUEST`` customers (the engine batches below that)."""
    if len(parts) > MAX_USERS_PER_REQUEST:
        raise ValueError(
            f"{len(parts)} customers in one upsert; Insider takes at most {MAX_USERS_PER_REQUEST}"
        )
    batch = UpsertBatch(skip_hook=skip_hook)
    users, owners = batch.users, batch.owners
    for part in parts:
        for user in part.users(replace):
            users.append(user)
            owners.append(part.customer_id)
    return batch
