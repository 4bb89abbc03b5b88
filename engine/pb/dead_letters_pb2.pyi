import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReplayMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLAY_MODE_UNSPECIFIED: _ClassVar[ReplayMode]
    REPLAY_MODE_RERENDER: _ClassVar[ReplayMode]
    REPLAY_MODE_STORED_REQUEST: _ClassVar[ReplayMode]
REPLAY_MODE_UNSPECIFIED: ReplayMode
REPLAY_MODE_RERENDER: ReplayMode
REPLAY_MODE_STORED_REQUEST: ReplayMode

class DeadLetter(_message.Message):
    __slots__ = ("id", "connection_id", "customer_id", "kind", "event_id", "stage", "error", "attempts", "request_id", "enqueue_time", "fail_time", "record_json", "rendered_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENQUEUE_TIME_FIELD_NUMBER: _ClassVar[int]
    FAIL_TIME_FIELD_NUMBER: _ClassVar[int]
    RECORD_JSON_FIELD_NUMBER: _ClassVar[int]
    RENDERED_JSON_FIELD_NUMBER: _ClassVar[int]
    id: int
    connection_id: str
    customer_id: str
    kind: str
    event_id: str
    stage: str
    error: str
    attempts: int
    request_id: str
    enqueue_time: _timestamp_pb2.Timestamp
    fail_time: _timestamp_pb2.Timestamp
    record_json: str
    rendered_json: str
    def __init__(self, id: _Optional[int] = ..., connection_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., kind: _Optional[str] = ..., event_id: _Optional[str] = ..., stage: _Optional[str] = ..., error: _Optional[str] = ..., attempts: _Optional[int] = ..., request_id: _Optional[str] = ..., enqueue_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., fail_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., record_json: _Optional[str] = ..., rendered_json: _Optional[str] = ...) -> None: ...

class DeadLetterFilter(_message.Message):
    __slots__ = ("connection_id", "customer_id", "stage", "error_contains", "start_time", "end_time")
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_CONTAINS_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    customer_id: str
    stage: str
    error_contains: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, connection_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., stage: _Optional[str] = ..., error_contains: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListDeadLettersRequest(_message.Message):
    __slots__ = ("filter", "page_size", "page_token")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    filter: DeadLetterFilter
    page_size: int
    page_token: str
    def __init__(self, filter: _Optional[_Union[DeadLetterFilter, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDeadLettersResponse(_message.Message):
    __slots__ = ("dead_letters", "next_page_token")
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    dead_letters: _containers.RepeatedCompositeFieldContainer[DeadLetter]
    next_page_token: str
    def __init__(self, dead_letters: _Optional[_Iterable[_Union[DeadLetter, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ReplayDeadLettersRequest(_message.Message):
    __slots__ = ("ids", "filter", "mode", "dry_run")
    IDS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    filter: DeadLetterFilter
    mode: ReplayMode
    dry_run: bool
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., filter: _Optional[_Union[DeadLetterFilter, _Mapping]] = ..., mode: _Optional[_Union[ReplayMode, str]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ReplayDeadLettersResponse(_message.Message):
    __slots__ = ("matched", "replayed", "skipped")
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    matched: int
    replayed: int
    skipped: int
    def __init__(self, matched: _Optional[int] = ..., replayed: _Optional[int] = ..., skipped: _Optional[int] = ...) -> None: ...
