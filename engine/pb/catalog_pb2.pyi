import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from engine.pb import ingest_pb2 as _ingest_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CatalogKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CATALOG_KIND_UNSPECIFIED: _ClassVar[CatalogKind]
    CATALOG_KIND_IDENTIFIER: _ClassVar[CatalogKind]
    CATALOG_KIND_ATTRIBUTE: _ClassVar[CatalogKind]
    CATALOG_KIND_EVENT: _ClassVar[CatalogKind]
    CATALOG_KIND_EVENT_PARAMETER: _ClassVar[CatalogKind]
CATALOG_KIND_UNSPECIFIED: CatalogKind
CATALOG_KIND_IDENTIFIER: CatalogKind
CATALOG_KIND_ATTRIBUTE: CatalogKind
CATALOG_KIND_EVENT: CatalogKind
CATALOG_KIND_EVENT_PARAMETER: CatalogKind

class SourceCatalogEntry(_message.Message):
    __slots__ = ("kind", "name", "event", "type", "description", "built_in", "read_only", "seen", "first_seen_time")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    BUILT_IN_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    SEEN_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_TIME_FIELD_NUMBER: _ClassVar[int]
    kind: CatalogKind
    name: str
    event: str
    type: str
    description: str
    built_in: bool
    read_only: bool
    seen: bool
    first_seen_time: _timestamp_pb2.Timestamp
    def __init__(self, kind: _Optional[_Union[CatalogKind, str]] = ..., name: _Optional[str] = ..., event: _Optional[str] = ..., type: _Optional[str] = ..., description: _Optional[str] = ..., built_in: _Optional[bool] = ..., read_only: _Optional[bool] = ..., seen: _Optional[bool] = ..., first_seen_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListSourceCatalogRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "kind")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    kind: CatalogKind
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., kind: _Optional[_Union[CatalogKind, str]] = ...) -> None: ...

class ListSourceCatalogResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[SourceCatalogEntry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[SourceCatalogEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DestinationCatalogEntry(_message.Message):
    __slots__ = ("kind", "name", "type", "format", "description", "required_for_events")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FOR_EVENTS_FIELD_NUMBER: _ClassVar[int]
    kind: CatalogKind
    name: str
    type: str
    format: str
    description: str
    required_for_events: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kind: _Optional[_Union[CatalogKind, str]] = ..., name: _Optional[str] = ..., type: _Optional[str] = ..., format: _Optional[str] = ..., description: _Optional[str] = ..., required_for_events: _Optional[_Iterable[str]] = ...) -> None: ...

class ListDestinationCatalogRequest(_message.Message):
    __slots__ = ("connection_id", "page_size", "page_token", "kind")
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    page_size: int
    page_token: str
    kind: CatalogKind
    def __init__(self, connection_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., kind: _Optional[_Union[CatalogKind, str]] = ...) -> None: ...

class ListDestinationCatalogResponse(_message.Message):
    __slots__ = ("connector", "entries", "next_page_token")
    CONNECTOR_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    connector: str
    entries: _containers.RepeatedCompositeFieldContainer[DestinationCatalogEntry]
    next_page_token: str
    def __init__(self, connector: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[DestinationCatalogEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class PreviewDeliveryRequest(_message.Message):
    __slots__ = ("connection_id", "event", "profile")
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    event: _ingest_pb2.AntavoEvent
    profile: _struct_pb2.Struct
    def __init__(self, connection_id: _Optional[str] = ..., event: _Optional[_Union[_ingest_pb2.AntavoEvent, _Mapping]] = ..., profile: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class PreviewedRequest(_message.Message):
    __slots__ = ("method", "url", "body", "tags")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    method: str
    url: str
    body: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, method: _Optional[str] = ..., url: _Optional[str] = ..., body: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class PreviewProblem(_message.Message):
    __slots__ = ("stage", "message")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    stage: str
    message: str
    def __init__(self, stage: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class PreviewDeliveryResponse(_message.Message):
    __slots__ = ("requests", "problems", "mapping_version")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    MAPPING_VERSION_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[PreviewedRequest]
    problems: _containers.RepeatedCompositeFieldContainer[PreviewProblem]
    mapping_version: int
    def __init__(self, requests: _Optional[_Iterable[_Union[PreviewedRequest, _Mapping]]] = ..., problems: _Optional[_Iterable[_Union[PreviewProblem, _Mapping]]] = ..., mapping_version: _Optional[int] = ...) -> None: ...
