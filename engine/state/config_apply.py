"""Applying a configuration document: the changes it makes, all checked before any is
written.

``plan_apply`` reads the document (``config_document``), matches it to the registry's
connections and mappings, validates the configuration it would leave behind with the
connectors' validators and the registry's own rules, and works out the changes and the
one ``ConfigBatch`` that writes them (``ConnectionRegistry.write_batch``: one SQLite
transaction, then a reload of every connection it touched). The first problem found is
raised as ``InvalidInputError`` naming the field by its path in the document, and
nothing is written.

How a document meets the engine's configuration (the README's "Configuration as code"
says the same to users):

- Connections are matched by id. A mapping is matched within its connection by id; one
  written without an id is matched to the connection's mapping of the same source (the
  Antavo attribute or event, which a connection maps once), or created with an id made
  from the connection and the source (the same in a dry run and in the apply). The order
  of mappings is not compared: an export lists them in the order they were created.
- A field the document leaves out of a listed connection or mapping has its default.
  The one exception is the key: without ``api_key_env``, an existing connection keeps
  its key.
- Connections and mappings the document does not mention are deleted only with
  ``prune``. Without it they are kept, listed as unmentioned, and the document is
  checked with them in place (a kept mapping still holds its source and its id).
- A key is compared with the stored key inside the engine (the registry holds it
  decrypted for delivery), in constant time, so applying the same key again is no
  change. The key never leaves the engine; a change shows only the masked hints.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from engine.connector.info import ConnectorInfo
from engine.connector.records import (
    Connection,
    EventMapping,
    ParameterMapping,
    ProfileMapping,
)
from engine.errors import InvalidInputError
from engine.plugins import Connectors, key_bound_changes
from engine.state.config_document import (
    ConnectionEntry,
    M,
    MappingEntry,
    parameter_data,
    parse_document,
)
from engine.state.connections import (
    CONNECTION_ID_RE,
    MAPPING_ID_RE,
    ConfigBatch,
    ConnectionRegistry,
    ConnectionUpdate,
    ConnectionView,
    NewConnection,
    check_api_key,
    check_retry_window,
    field_prefix,
    key_bound_rule,
)
from engine.state.secrets import hint

CONNECTION = "connection"
PROFILE_MAPPING = "profile_mapping"
EVENT_MAPPING = "event_mapping"
CREATE = "create"
UPDATE = "update"
DELETE = "delete"
ID_RULE = "use 1-63 lowercase letters, digits and dashes, starting with a letter or digit"


@dataclass(frozen=True)
class FieldChange:
    """One field of an updated object. Values are JSON text, ``""`` when absent; for
    ``api_key`` they are the masked hints."""

    field: str
    old: str
    new: str


@dataclass(frozen=True)
class ObjectRef:
    """A connection (``mapping_id`` empty) or one of its mappings."""

    kind: str
    connection_id: str
    mapping_id: str = ""


@dataclass(frozen=True)
class Change:
    action: str
    object: ObjectRef
    fields: tuple[FieldChange, ...] = ()


@dataclass(frozen=True)
class Plan:
    """What applying a document changes (in document order), what it leaves alone
    without prune, and the batch that writes the changes."""

    changes: tuple[Change, ...]
    unmentioned: tuple[ObjectRef, ...]
    batch: ConfigBatch


def plan_apply(
    registry: ConnectionRegistry,
    connectors: Connectors,
    text: str,
    api_keys: Mapping[str, str],
    prune: bool,
) -> Plan:
    """The changes that applying ``text`` makes. ``api_keys``: the values of the
    environment variables the document names. Raises ``InvalidInputError``."""
    document = parse_document(text)
    return _Planner(registry, connectors, api_keys, prune).plan(document.connections)


@dataclass
class _Batch:
    expected: dict[str, tuple[float, int]] = field(default_factory=dict)
    deletes: list[str] = field(default_factory=list)
    removed_mappings: list[tuple[str, str]] = field(default_factory=list)
    updates: list[tuple[str, ConnectionUpdate]] = field(default_factory=list)
    creates: list[NewConnection] = field(default_factory=list)
    profile_mappings: list[tuple[str, ProfileMapping]] = field(default_factory=list)
    event_mappings: list[tuple[str, EventMapping]] = field(default_factory=list)
    mappings_changed: list[str] = field(default_factory=list)

    def frozen(self) -> ConfigBatch:
        return ConfigBatch(
            expected=dict(self.expected),
            deletes=tuple(self.deletes),
            removed_mappings=tuple(self.removed_mappings),
            updates=tuple(self.updates),
            creates=tuple(self.creates),
            profile_mappings=tuple(self.profile_mappings),
            event_mappings=tuple(self.event_mappings),
            mappings_changed=tuple(self.mappings_changed),
        )


@dataclass(frozen=True)
class _Kind:
    """What differs between profile and event mappings, for the code they share."""

    name: str  # "profile" or "event", as ConfigBatch.removed_mappings names them
    ref: str  # PROFILE_MAPPING or EVENT_MAPPING
    id_prefix: str
    source_field: str


PROFILE = _Kind("profile", PROFILE_MAPPING, "pm", "source_attribute")
EVENT = _Kind("event", EVENT_MAPPING, "em", "source_event")


def _source(mapping: ProfileMapping | EventMapping) -> str:
    if isinstance(mapping, ProfileMapping):
        return mapping.source_attribute
    return mapping.source_event


class _Planner:
    def __init__(
        self,
        registry: ConnectionRegistry,
        connectors: Connectors,
        api_keys: Mapping[str, str],
        prune: bool,
    ) -> None:
        self._connectors = connectors
        self._api_keys = api_keys
        self._prune = prune
        self._views = {v.id: v for v in registry.views()}
        self._runtimes = {i: registry.runtime(i) for i in self._views}
        self._changes: list[Change] = []
        self._unmentioned: list[ObjectRef] = []
        self._batch = _Batch()
        self._final_ids: dict[str, str] = {}
        """Every mapping id the configuration will hold -> where it is, for messages."""
        self._listed: list[tuple[str, str]] = []
        """(mapping id, path) of the document's mappings, checked against _final_ids."""

    def plan(self, entries: Sequence[ConnectionEntry]) -> Plan:
        seen: dict[str, str] = {}
        for entry in entries:
            if entry.id in seen:
                raise InvalidInputError(
                    f"{entry.path}.id", f"{entry.id!r} is also the id of {seen[entry.id]}"
                )
            seen[entry.id] = entry.path
            self._connection(entry)
        for connection_id in sorted(set(self._views) - set(seen)):
            self._left_out_connection(self._runtimes[connection_id])
        self._check_mapping_ids()
        return Plan(tuple(self._changes), tuple(self._unmentioned), self._batch.frozen())

    # -- connections -------------------------------------------------------------------

    def _connection(self, entry: ConnectionEntry) -> None:
        if not CONNECTION_ID_RE.fullmatch(entry.id):
            raise InvalidInputError(f"{entry.path}.id", ID_RULE)
        view = self._views.get(entry.id)
        info = self._connector(entry, view)
        with field_prefix(f"{entry.path}.settings"):
            info.validate_settings(entry.settings)
            self._connectors.check_settings(info, entry.settings)
        with field_prefix(f"{entry.path}.customer_id_mapping"):
            info.validate_customer_id_mapping(entry.customer_id_mapping)
        try:
            check_retry_window(entry.retry_window_seconds)
        except InvalidInputError as exc:
            raise InvalidInputError(f"{entry.path}.retry_window_seconds", exc.message) from None
        key = self._key(entry, info, view)
        runtime = self._runtimes.get(entry.id)
        if view is None or runtime is None:
            self._create(entry, info, key or "")
        else:
            self._update(entry, view, runtime, key)
        self._mappings(entry, info, runtime, PROFILE, entry.profile_mappings)
        self._mappings(entry, info, runtime, EVENT, entry.event_mappings)

    def _connector(self, entry: ConnectionEntry, view: ConnectionView | None) -> ConnectorInfo:
        name = entry.connector
        if view is not None:
            if name and name != view.connector:
                raise InvalidInputError(
                    f"{entry.path}.connector",
                    f"connection {entry.id!r} is served by {view.connector!r}, and a "
                    "connection's connector cannot change: give a connection of another "
                    "connector an id of its own",
                )
            name = view.connector
        try:
            return self._connectors.info(name or self._connectors.only())
        except InvalidInputError as exc:
            raise InvalidInputError(f"{entry.path}.connector", exc.message) from None

    def _key(
        self, entry: ConnectionEntry, info: ConnectorInfo, view: ConnectionView | None
    ) -> str | None:
        """The key to store: ``None`` keeps the stored one."""
        name = entry.api_key_env
        field_path = f"{entry.path}.api_key_env"
        if not name:
            if view is None and info.secret_required:
                raise InvalidInputError(
                    field_path,
                    f"required to create connection {entry.id!r}: name the environment "
                    "variable that holds its API key (a key is never written in the file)",
                )
            return None
        keep = " or leave api_key_env out to keep the stored key" if view is not None else ""
        if name not in self._api_keys:
            raise InvalidInputError(
                field_path,
                f"the environment variable {name} is not set: set it to the API key of "
                f"connection {entry.id!r}{keep} (tidegate config apply reads it from its "
                "environment; over gRPC, pass it in api_keys)",
            )
        key = self._api_keys[name]
        if not key and info.secret_required:
            raise InvalidInputError(
                field_path,
                f"the environment variable {name} is empty: set it to the API key of "
                f"connection {entry.id!r}{keep}",
            )
        if key:
            try:
                check_api_key(key, field_path)
            except InvalidInputError as exc:
                raise InvalidInputError(
                    field_path, f"the API key in {name} {exc.message.removeprefix('is ')}"
                ) from None
        return key

    def _create(self, entry: ConnectionEntry, info: ConnectorInfo, key: str) -> None:
        self._batch.creates.append(
            NewConnection(
                entry.id,
                entry.display_name,
                info.name,
                dict(entry.settings),
                key,
                entry.customer_id_mapping,
                float(entry.retry_window_seconds),
            )
        )
        self._changes.append(Change(CREATE, ObjectRef(CONNECTION, entry.id)))

    def _update(
        self, entry: ConnectionEntry, view: ConnectionView, runtime: Connection, key: str | None
    ) -> None:
        self._expect(view)
        changed: list[FieldChange] = []
        display_name = _differs(changed, "display_name", view.display_name, entry.display_name)
        key_changed = key is not None and not hmac.compare_digest(
            key.encode(), runtime.api_key.encode()
        )
        if key is not None and key_changed:
            changed.append(FieldChange("api_key", _json(hint(runtime.api_key)), _json(hint(key))))
        info = self._connectors.info(view.connector)
        redirected = key_bound_changes(info, view.settings, entry.settings)
        if redirected and key is None and info.secret_required:
            raise key_bound_rule(f"{entry.path}.api_key_env", redirected)
        retry = _differs(
            changed,
            "retry_window_seconds",
            int(view.retry_window_seconds),
            entry.retry_window_seconds,
        )
        settings_changed = False
        for name in sorted(set(view.settings) | set(entry.settings)):
            if _differs(
                changed, f"settings.{name}", view.settings.get(name), entry.settings.get(name)
            ):
                settings_changed = True
        id_mapping_changed = False
        old_id, new_id = view.customer_id_mapping, entry.customer_id_mapping
        for name in ("source_attribute", "target_identifier", "custom"):
            old, new = getattr(old_id, name), getattr(new_id, name)
            if _differs(changed, f"customer_id_mapping.{name}", old, new):
                id_mapping_changed = True
        if not changed:
            return
        update = ConnectionUpdate(
            display_name=entry.display_name if display_name else None,
            settings=dict(entry.settings) if settings_changed else None,
            api_key=key if key_changed else None,
            customer_id_mapping=entry.customer_id_mapping if id_mapping_changed else None,
            retry_window_seconds=float(entry.retry_window_seconds) if retry else None,
        )
        self._batch.updates.append((entry.id, update))
        self._changes.append(Change(UPDATE, ObjectRef(CONNECTION, entry.id), tuple(changed)))

    def _left_out_connection(self, runtime: Connection) -> None:
        ref = ObjectRef(CONNECTION, runtime.id)
        if self._prune:
            self._expect(self._views[runtime.id])
            self._batch.deletes.append(runtime.id)
            self._changes.append(Change(DELETE, ref))
            return
        self._unmentioned.append(ref)
        for profile in runtime.profile_mappings:
            self._final_ids[profile.id] = _unlisted(runtime.id, profile.id)
        for event in runtime.event_mappings:
            self._final_ids[event.id] = _unlisted(runtime.id, event.id)

    def _expect(self, view: ConnectionView) -> None:
        self._batch.expected[view.id] = (view.update_time, view.mapping_version)

    # -- mappings ----------------------------------------------------------------------

    def _mappings(
        self,
        entry: ConnectionEntry,
        info: ConnectorInfo,
        runtime: Connection | None,
        kind: _Kind,
        entries: Sequence[MappingEntry[M]],
    ) -> None:
        existing: Sequence[Any] = ()
        if runtime is not None:
            existing = runtime.profile_mappings if kind is PROFILE else runtime.event_mappings
        pairs, left_out = _match(entries, existing)
        sources: dict[str, str] = {}
        for old in left_out if not self._prune else ():
            sources[_source(old)] = (
                f"{kind.name} mapping {old.id!r}, which the document does not mention "
                "(apply with prune to delete it)"
            )
            self._final_ids[old.id] = _unlisted(entry.id, old.id)
            self._unmentioned.append(ObjectRef(kind.ref, entry.id, old.id))
        changed = False
        for mapping_entry, old in pairs:
            mapping = self._checked(entry, info, kind, mapping_entry, old)
            source = _source(mapping)
            if source in sources:
                raise InvalidInputError(
                    f"{mapping_entry.path}.{kind.source_field}",
                    f"{source!r} is already mapped by {sources[source]}",
                )
            sources[source] = mapping_entry.path
            self._listed.append((mapping.id, mapping_entry.path))
            ref = ObjectRef(kind.ref, entry.id, mapping.id)
            if old is None:
                self._changes.append(Change(CREATE, ref))
            elif old != mapping:
                self._changes.append(Change(UPDATE, ref, tuple(_mapping_fields(old, mapping))))
            else:
                continue
            changed = True
            if isinstance(mapping, ProfileMapping):
                self._batch.profile_mappings.append((entry.id, mapping))
            else:
                self._batch.event_mappings.append((entry.id, mapping))
        for old in left_out if self._prune else ():
            self._batch.removed_mappings.append((kind.name, old.id))
            self._changes.append(Change(DELETE, ObjectRef(kind.ref, entry.id, old.id)))
            changed = True
        if changed and runtime is not None and entry.id not in self._batch.mappings_changed:
            self._batch.mappings_changed.append(entry.id)

    def _checked(
        self,
        entry: ConnectionEntry,
        info: ConnectorInfo,
        kind: _Kind,
        mapping_entry: MappingEntry[M],
        old: M | None,
    ) -> M:
        """The mapping to store for ``mapping_entry``, with its id, checked."""
        mapping = mapping_entry.mapping
        if mapping.id and not MAPPING_ID_RE.fullmatch(mapping.id):
            raise InvalidInputError(f"{mapping_entry.path}.id", ID_RULE)
        mapping_id = mapping.id or (old.id if old is not None else _new_id(kind, entry, mapping))
        final: Any
        with field_prefix(mapping_entry.path):
            if isinstance(mapping, ProfileMapping):
                final = ProfileMapping(
                    mapping_id,
                    mapping.source_attribute,
                    mapping.target_attribute,
                    mapping.custom,
                    mapping.array_mode,
                )
                info.validate_profile_mapping(final)
            else:
                final = EventMapping(
                    mapping_id, mapping.source_event, mapping.target_event, mapping.parameters
                )
                info.validate_event_mapping(final)
        checked: M = final
        return checked

    def _check_mapping_ids(self) -> None:
        """Mapping ids are unique across every connection, kept ones included."""
        for mapping_id, path in self._listed:
            where = self._final_ids.get(mapping_id)
            if where is not None:
                raise InvalidInputError(
                    f"{path}.id", f"{mapping_id!r} is already the id of {where}"
                )
            self._final_ids[mapping_id] = path


def _match(
    entries: Sequence[MappingEntry[M]], existing: Sequence[M]
) -> tuple[list[tuple[MappingEntry[M], M | None]], list[M]]:
    """Pairs each entry with the existing mapping it names by id or, without an id, the
    unclaimed one of the same source; returns the pairs and the existing ones left out."""
    by_id = {m.id: m for m in existing}
    claimed = {e.mapping.id for e in entries if e.mapping.id in by_id}
    pairs: list[tuple[MappingEntry[M], M | None]] = []
    for entry in entries:
        if entry.mapping.id:
            pairs.append((entry, by_id.get(entry.mapping.id)))
            continue
        source = _source(entry.mapping)
        match = next((m for m in existing if m.id not in claimed and _source(m) == source), None)
        if match is not None:
            claimed.add(match.id)
        pairs.append((entry, match))
    return pairs, [m for m in existing if m.id not in claimed]


def _new_id(kind: _Kind, entry: ConnectionEntry, mapping: ProfileMapping | EventMapping) -> str:
    """An id for a new mapping the document gives none: the same for the same connection
    and source, so a dry run shows the id the apply creates."""
    digest = hashlib.sha256(f"{entry.id}\0{_source(mapping)}".encode()).hexdigest()
    return f"{kind.id_prefix}-{digest[:10]}"


def _unlisted(connection_id: str, mapping_id: str) -> str:
    return (
        f"mapping {mapping_id!r} of connection {connection_id!r}, which the document does "
        "not mention (apply with prune to delete it)"
    )


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


def _differs(changed: list[FieldChange], name: str, old: object, new: object) -> bool:
    """Records the field when ``old`` and ``new`` differ (``None``: absent)."""
    if old == new:
        return False
    changed.append(
        FieldChange(name, "" if old is None else _json(old), "" if new is None else _json(new))
    )
    return True


def _mapping_fields(
    old: ProfileMapping | EventMapping, new: ProfileMapping | EventMapping
) -> list[FieldChange]:
    changed: list[FieldChange] = []
    if isinstance(old, ProfileMapping) and isinstance(new, ProfileMapping):
        _differs(changed, "source_attribute", old.source_attribute, new.source_attribute)
        _differs(changed, "target_attribute", old.target_attribute, new.target_attribute)
        _differs(changed, "custom", old.custom, new.custom)
        _differs(changed, "array_mode", old.array_mode or None, new.array_mode or None)
    elif isinstance(old, EventMapping) and isinstance(new, EventMapping):
        _differs(changed, "source_event", old.source_event, new.source_event)
        _differs(changed, "target_event", old.target_event, new.target_event)
        _parameter_fields(changed, old.parameters, new.parameters)
    return changed


def _parameter_fields(
    changed: list[FieldChange],
    old: Sequence[ParameterMapping],
    new: Sequence[ParameterMapping],
) -> None:
    for i in range(max(len(old), len(new))):
        name = f"parameters[{i}]"
        if i >= len(old) or i >= len(new):
            before = parameter_data(old[i]) if i < len(old) else None
            after = parameter_data(new[i]) if i < len(new) else None
            _differs(changed, name, before, after)
            continue
        for part in ("source_parameter", "target_parameter", "custom"):
            _differs(changed, f"{name}.{part}", getattr(old[i], part), getattr(new[i], part))
