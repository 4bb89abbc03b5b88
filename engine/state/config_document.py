"""The configuration as one YAML document: its model, how it is read and how it is
written (``tidegate config export`` / ``apply`` and ``ConfigService``).

The document lists connections. Each has its connector, display name, retry window,
settings, customer-ID mapping and profile and event mappings, and names the environment
variable that holds its API key (``api_key_env``): a key is never in the document.
Reading checks the document's shape and types and names a bad field by its path in the
document (``connections[1].event_mappings[0].target_event``); what a connector allows,
and how the document meets the engine's configuration, is checked when it is applied
(``config_apply``). A field left out, or written empty (null), has its default.

YAML is read with PyYAML's safe loader, made stricter: a key written twice (PyYAML would
keep the last one silently) and aliases (``*name``) are refused. It is written with the
safe dumper in a fixed key order, connections by id and settings by name, so two
exports of one configuration are the same text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, Generic, TypeVar

import yaml

from engine.connector.records import (
    Connection,
    CustomerIdMapping,
    EventMapping,
    ParameterMapping,
    ProfileMapping,
)
from engine.errors import InvalidInputError

FORMAT_VERSION = 1
"""The document format this engine reads and writes (the document's ``version``)."""
KEY_ENV_PREFIX = "TIDEGATE_API_KEY_"
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ARRAY_MODES = ("append", "replace")
HEADER = """\
# Tidegate configuration. Apply it with `tidegate config apply -f FILE` (--dry-run shows
# the changes first). API keys are never in this file: api_key_env names the environment
# variable that holds a connection's key; leave it out to keep the stored key.
"""
M = TypeVar("M", ProfileMapping, EventMapping)


@dataclass(frozen=True)
class MappingEntry(Generic[M]):
    """A mapping as the document writes it, with its path there. Its ``id`` is ``""``
    when the document gives none."""

    path: str
    mapping: M


@dataclass(frozen=True)
class ConnectionEntry:
    """A connection as the document writes it. ``connector`` and ``api_key_env`` are
    ``""`` when left out."""

    path: str
    id: str
    connector: str
    display_name: str
    api_key_env: str
    retry_window_seconds: int
    settings: Mapping[str, str]
    customer_id_mapping: CustomerIdMapping
    profile_mappings: tuple[MappingEntry[ProfileMapping], ...]
    event_mappings: tuple[MappingEntry[EventMapping], ...]


@dataclass(frozen=True)
class Document:
    connections: tuple[ConnectionEntry, ...]


def default_key_env(connection_id: str) -> str:
    """The variable an export names for a connection's key: ``TIDEGATE_API_KEY_`` and
    the id in upper case with dashes as underscores."""
    return KEY_ENV_PREFIX + connection_id.upper().replace("-", "_")


# -- reading ---------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases and keys written twice."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            alias = self.peek_event()  # type: ignore[no-untyped-call]  # untyped in the stubs
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed: write the value out", alias.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is written twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> object:
    """The document's data. ``InvalidInputError`` (field ``document``) says where YAML
    found a problem, by line and column, without quoting the text."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "cannot be read"
        raise InvalidInputError("document", f"not valid YAML{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise InvalidInputError("document", f"not valid YAML: {type(exc).__name__}") from None
    if data is None:
        raise InvalidInputError(
            "document", "empty: write at least `connections: []` (see the README)"
        )
    return data


def parse_document(text: str) -> Document:
    """Reads a document. Raises ``InvalidInputError`` naming the first bad field by its
    path in the document."""
    top = _Object(load_yaml(text), "", ("version", "connections"))
    version = top.whole("version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise InvalidInputError(
            "version", f"this Tidegate reads version {FORMAT_VERSION} documents, not {version}"
        )
    if not top.has("connections"):
        raise InvalidInputError(
            "connections", "required: the list of connections (`connections: []` for none)"
        )
    return Document(tuple(_connection(path, value) for path, value in top.items("connections")))


def key_env_names(text: str) -> list[str]:
    """The ``api_key_env`` names a document gives, read leniently (nothing when it cannot
    be read: applying it then reports the problem)."""
    try:
        data = load_yaml(text)
    except InvalidInputError:
        return []
    connections = data.get("connections") if isinstance(data, dict) else None
    if not isinstance(connections, list):
        return []
    names = [c.get("api_key_env") for c in connections if isinstance(c, dict)]
    return [n for n in names if isinstance(n, str) and n]


CONNECTION_FIELDS = (
    "id",
    "connector",
    "display_name",
    "api_key_env",
    "retry_window_seconds",
    "settings",
    "customer_id_mapping",
    "profile_mappings",
    "event_mappings",
)
ID_MAPPING_FIELDS = ("source_attribute", "target_identifier", "custom")
PROFILE_FIELDS = ("id", "source_attribute", "target_attribute", "custom", "array_mode")
EVENT_FIELDS = ("id", "source_event", "target_event", "parameters")
PARAMETER_FIELDS = ("source_parameter", "target_parameter", "custom")


def _connection(path: str, value: object) -> ConnectionEntry:
    entry = _Object(value, path, CONNECTION_FIELDS)
    key_env = entry.string("api_key_env")
    if key_env and not ENV_NAME_RE.fullmatch(key_env):
        raise InvalidInputError(
            f"{path}.api_key_env",
            f"{key_env!r} is not an environment variable name: letters, digits and _, "
            "not starting with a digit",
        )
    settings = entry.child("settings", None)
    id_mapping = entry.child("customer_id_mapping", ID_MAPPING_FIELDS)
    default = CustomerIdMapping()
    return ConnectionEntry(
        path=path,
        id=entry.string("id", required=True),
        connector=entry.string("connector"),
        display_name=entry.string("display_name"),
        api_key_env=key_env,
        retry_window_seconds=entry.whole("retry_window_seconds", 0),
        settings={name: settings.string(name) for name in settings.keys()},
        customer_id_mapping=CustomerIdMapping(
            id_mapping.string("source_attribute") or default.source_attribute,
            id_mapping.string("target_identifier") or default.target_identifier,
            id_mapping.boolean("custom"),
        ),
        profile_mappings=entry.entries("profile_mappings", _profile_mapping),
        event_mappings=entry.entries("event_mappings", _event_mapping),
    )


def _profile_mapping(path: str, value: object) -> MappingEntry[ProfileMapping]:
    m = _Object(value, path, PROFILE_FIELDS)
    array_mode = m.string("array_mode")
    if array_mode and array_mode not in ARRAY_MODES:
        raise InvalidInputError(
            f"{path}.array_mode",
            f"{array_mode!r} is not allowed; use append or replace, or leave it out for the "
            "connection's array_mode setting",
        )
    mapping = ProfileMapping(
        m.string("id"),
        m.string("source_attribute", required=True),
        m.string("target_attribute", required=True),
        m.boolean("custom"),
        array_mode,
    )
    return MappingEntry(path, mapping)


def _event_mapping(path: str, value: object) -> MappingEntry[EventMapping]:
    m = _Object(value, path, EVENT_FIELDS)
    parameters = []
    for p_path, p_value in m.items("parameters"):
        p = _Object(p_value, p_path, PARAMETER_FIELDS)
        parameters.append(
            ParameterMapping(
                p.string("source_parameter", required=True),
                p.string("target_parameter", required=True),
                p.boolean("custom"),
            )
        )
    mapping = EventMapping(
        m.string("id"),
        m.string("source_event", required=True),
        m.string("target_event", required=True),
        tuple(parameters),
    )
    return MappingEntry(path, mapping)


class _Object:
    """A mapping of the document at ``path``, with typed access to its fields. A field
    left out or written empty (null) reads as its default."""

    def __init__(self, value: object, path: str, allowed: Sequence[str] | None) -> None:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise InvalidInputError(path or "document", f"must be a mapping, not {_kind(value)}")
        for key in value:
            if not isinstance(key, str):
                raise InvalidInputError(
                    _join(path, str(key)), f"a field name must be a string, not {_kind(key)}"
                )
            if key == "api_key" and allowed is CONNECTION_FIELDS:
                raise InvalidInputError(
                    _join(path, key),
                    "a key is never written in the file: put it in an environment variable "
                    "and name that variable with api_key_env",
                )
            if allowed is not None and key not in allowed:
                raise InvalidInputError(
                    _join(path, key), f"unknown field; the fields here are {', '.join(allowed)}"
                )
        self._value: dict[str, object] = value
        self.path = path

    def has(self, key: str) -> bool:
        return key in self._value

    def keys(self) -> list[str]:
        return list(self._value)

    def _get(self, key: str) -> object:
        return self._value.get(key)

    def string(self, key: str, required: bool = False) -> str:
        value = self._get(key)
        if value is None or value == "":
            if required:
                raise InvalidInputError(_join(self.path, key), "required")
            return ""
        if not isinstance(value, str):
            hint = "quote it"
            if isinstance(value, bool):
                hint = "YAML reads unquoted true/false/yes/no/on/off as booleans: quote it"
            raise InvalidInputError(
                _join(self.path, key), f"must be a string, not {_kind(value)}; {hint}"
            )
        return value

    def boolean(self, key: str) -> bool:
        value = self._get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise InvalidInputError(
                _join(self.path, key), f"must be true or false, not {_kind(value)}"
            )
        return value

    def whole(self, key: str, default: int) -> int:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInputError(
                _join(self.path, key), f"must be a whole number, not {_kind(value)}"
            )
        return value

    def child(self, key: str, allowed: Sequence[str] | None) -> _Object:
        return _Object(self._get(key), _join(self.path, key), allowed)

    def items(self, key: str) -> list[tuple[str, object]]:
        value = self._get(key)
        if value is None:
            return []
        path = _join(self.path, key)
        if not isinstance(value, list):
            raise InvalidInputError(path, f"must be a list, not {_kind(value)}")
        return [(f"{path}[{i}]", item) for i, item in enumerate(value)]

    def entries(
        self, key: str, read: Callable[[str, object], MappingEntry[M]]
    ) -> tuple[MappingEntry[M], ...]:
        return tuple(read(path, value) for path, value in self.items(key))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: object) -> str:
    """What a value is, for an error message; scalars are shown (a document holds no
    secret), text is not."""
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, date):
        return f"a date ({value.isoformat()})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


# -- writing ---------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """The safe dumper, indenting list items under their key."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def render_document(connections: Iterable[Connection]) -> str:
    """The document for ``connections``: every field written, in a fixed order; no key."""
    body = {
        "version": FORMAT_VERSION,
        "connections": [_connection_data(c) for c in sorted(connections, key=lambda c: c.id)],
    }
    text = yaml.dump(
        body,
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=1_000_000,  # no folded lines: one field, one line, for clean diffs
    )
    return HEADER + text


def _connection_data(c: Connection) -> dict[str, object]:
    data: dict[str, object] = {
        "id": c.id,
        "connector": c.connector,
        "display_name": c.display_name,
    }
    if c.api_key:
        data["api_key_env"] = default_key_env(c.id)
    data["retry_window_seconds"] = int(c.retry_window_seconds)
    data["settings"] = {name: c.settings[name] for name in sorted(c.settings)}
    data["customer_id_mapping"] = {
        "source_attribute": c.customer_id_mapping.source_attribute,
        "target_identifier": c.customer_id_mapping.target_identifier,
        "custom": c.customer_id_mapping.custom,
    }
    data["profile_mappings"] = [profile_data(m) for m in c.profile_mappings]
    data["event_mappings"] = [event_data(m) for m in c.event_mappings]
    return data


def profile_data(m: ProfileMapping) -> dict[str, object]:
    """A profile mapping as the document writes it (``array_mode`` only when set)."""
    data: dict[str, object] = {
        "id": m.id,
        "source_attribute": m.source_attribute,
        "target_attribute": m.target_attribute,
        "custom": m.custom,
    }
    if m.array_mode:
        data["array_mode"] = m.array_mode
    return data


def event_data(m: EventMapping) -> dict[str, object]:
    """An event mapping as the document writes it."""
    return {
        "id": m.id,
        "source_event": m.source_event,
        "target_event": m.target_event,
        "parameters": [parameter_data(p) for p in m.parameters],
    }


def parameter_data(p: ParameterMapping) -> dict[str, object]:
    return {
        "source_parameter": p.source_parameter,
        "target_parameter": p.target_parameter,
        "custom": p.custom,
    }
