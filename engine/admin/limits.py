"""Limits every admin request is checked against before its RPC runs, whatever the RPC:
one walk over the fields the request sets, so a field added to a proto later is covered
without a line here.

- Strings: ids (a field named ``id`` or ending in ``_id``, and ``ids``) at most
  ``MAX_ID_LENGTH`` characters, the YAML ``document`` of ``ApplyConfig`` at most
  ``MAX_DOCUMENT_LENGTH``, any other string at most ``MAX_STRING_LENGTH``.
- Repeated fields: at most ``MAX_REPLAY_IDS`` ids in ``ReplayDeadLetters``, at most
  ``MAX_REPEATED`` entries in any other list (``IngestEvents`` has its own, lower limit);
  maps at most ``MAX_MAP_ENTRIES`` entries.
- ``google.protobuf.Timestamp``: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z,
  nanos 0 .. 999,999,999 (what the Timestamp type defines).
- ``google.protobuf.Struct`` / ``Value`` / ``ListValue``: at most ``MAX_STRUCT_DEPTH``
  levels and ``MAX_STRUCT_NODES`` values, keys and strings within the string limit.

A request past a limit is ``INVALID_ARGUMENT`` naming the field and the limit. Errors
echo at most ``engine.errors.MAX_ECHO`` characters of what the client sent (``shown``).
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from engine.errors import InvalidInputError, shown

MAX_ID_LENGTH = 256
MAX_STRING_LENGTH = 65_536
MAX_DOCUMENT_LENGTH = 4 * 1024 * 1024  # gRPC's default message limit is 4 MB anyway
MAX_REPEATED = 10_000
MAX_REPLAY_IDS = 10_000
MAX_MAP_ENTRIES = 1_000
MAX_STRUCT_DEPTH = 32
MAX_STRUCT_NODES = 100_000
MIN_TIMESTAMP_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z
MAX_TIMESTAMP_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z

_STRUCT_TYPES = {
    "google.protobuf.Struct",
    "google.protobuf.Value",
    "google.protobuf.ListValue",
}


def check_request(request: Message) -> None:
    """Raises ``InvalidInputError`` naming the first field of ``request`` past a limit."""
    _check_message(request, "")


def _path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_id(name: str) -> bool:
    return name in ("id", "ids") or name.endswith("_id")


def _owner(field: FieldDescriptor) -> str:
    owner = field.containing_type
    return owner.name if owner is not None else ""


def _string_limit(field: FieldDescriptor) -> int:
    if _is_id(field.name):
        return MAX_ID_LENGTH
    if field.name == "document" and _owner(field) == "ApplyConfigRequest":
        return MAX_DOCUMENT_LENGTH
    return MAX_STRING_LENGTH


def _check_string(value: str, limit: int, path: str) -> None:
    if len(value) > limit:
        raise InvalidInputError(path, f"is {len(value)} characters long; the limit is {limit}")


def _check_message(message: Message, prefix: str) -> None:
    full_name = message.DESCRIPTOR.full_name
    if full_name == "google.protobuf.Timestamp":
        _check_timestamp(message, prefix)
        return
    if full_name in _STRUCT_TYPES:
        _check_struct(message, prefix)
        return
    for field, value in message.ListFields():
        path = _path(prefix, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            _check_map(field, value, path)
        elif field.is_repeated:
            _check_repeated(field, value, path)
        else:
            _check_value(field, value, path)


def _check_value(field: FieldDescriptor, value: object, path: str) -> None:
    if field.type == FieldDescriptor.TYPE_STRING:
        assert isinstance(value, str)
        _check_string(value, _string_limit(field), path)
    elif field.type == FieldDescriptor.TYPE_BYTES:
        assert isinstance(value, bytes)
        if len(value) > MAX_STRING_LENGTH:
            raise InvalidInputError(
                path, f"is {len(value)} bytes long; the limit is {MAX_STRING_LENGTH}"
            )
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        assert isinstance(value, Message)
        _check_message(value, path)


def _check_repeated(field: FieldDescriptor, values: list[object], path: str) -> None:
    if field.name == "ids" and _owner(field) == "ReplayDeadLettersRequest":
        if len(values) > MAX_REPLAY_IDS:
            raise InvalidInputError(
                path,
                f"{len(values)} ids; at most {MAX_REPLAY_IDS} per request: replay the rest "
                "in further requests, or select them with a filter",
            )
    elif len(values) > MAX_REPEATED:
        raise InvalidInputError(
            path, f"has {len(values)} entries; the limit is {MAX_REPEATED} per request"
        )
    for i, value in enumerate(values):
        _check_value(field, value, f"{path}[{i}]")


def _check_map(field: FieldDescriptor, entries: dict[object, object], path: str) -> None:
    if len(entries) > MAX_MAP_ENTRIES:
        raise InvalidInputError(path, f"has {len(entries)} entries; the limit is {MAX_MAP_ENTRIES}")
    entry = field.message_type
    assert entry is not None  # a map field's entries are messages
    value_field = entry.fields_by_name["value"]
    for key, value in entries.items():
        if isinstance(key, str):
            _check_string(key, MAX_ID_LENGTH, f"{path} key {shown(key)}")
        _check_value(value_field, value, f"{path}[{shown(key)}]")


def _check_timestamp(message: Message, path: str) -> None:
    seconds = getattr(message, "seconds")  # noqa: B009 - Timestamp, typed as Message
    nanos = getattr(message, "nanos")  # noqa: B009
    if not MIN_TIMESTAMP_SECONDS <= seconds <= MAX_TIMESTAMP_SECONDS:
        raise InvalidInputError(
            path,
            f"seconds {seconds} is out of range: a Timestamp lies between "
            "0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z",
        )
    if not 0 <= nanos <= 999_999_999:
        raise InvalidInputError(path, f"nanos {nanos} is out of range: 0 to 999999999")


def _check_struct(message: Message, path: str) -> None:
    """Walks a Struct, Value or ListValue without recursion, so the depth check itself
    cannot overflow the stack."""
    nodes = 0
    stack: list[tuple[Message, int]] = [(message, 1)]
    while stack:
        current, depth = stack.pop()
        nodes += 1
        if nodes > MAX_STRUCT_NODES:
            raise InvalidInputError(
                path, f"holds more than {MAX_STRUCT_NODES} values; the limit is {MAX_STRUCT_NODES}"
            )
        if depth > MAX_STRUCT_DEPTH:
            raise InvalidInputError(
                path,
                f"is nested deeper than {MAX_STRUCT_DEPTH} levels; the limit is {MAX_STRUCT_DEPTH}",
            )
        kind = current.DESCRIPTOR.full_name
        if kind == "google.protobuf.Struct":
            for key, value in getattr(current, "fields").items():  # noqa: B009
                _check_string(key, MAX_STRING_LENGTH, f"{path} key {shown(key)}")
                stack.append((value, depth + 1))
        elif kind == "google.protobuf.ListValue":
            stack.extend((value, depth + 1) for value in getattr(current, "values"))  # noqa: B009
        else:  # Value
            which = current.WhichOneof("kind")
            if which == "string_value":
                _check_string(getattr(current, "string_value"), MAX_STRING_LENGTH, path)  # noqa: B009
            elif which in ("struct_value", "list_value"):
                stack.append((getattr(current, which), depth))
