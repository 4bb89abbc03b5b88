from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ArrayMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARRAY_MODE_UNSPECIFIED: _ClassVar[ArrayMode]
    ARRAY_MODE_APPEND: _ClassVar[ArrayMode]
    ARRAY_MODE_REPLACE: _ClassVar[ArrayMode]
ARRAY_MODE_UNSPECIFIED: ArrayMode
ARRAY_MODE_APPEND: ArrayMode
ARRAY_MODE_REPLACE: ArrayMode

class ProfileMapping(_message.Message):
    __slots__ = ("id", "connection_id", "source_attribute", "target_attribute", "custom", "array_mode")
    ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    TARGET_ATTRIBUTE_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_FIELD_NUMBER: _ClassVar[int]
    ARRAY_MODE_FIELD_NUMBER: _ClassVar[int]
    id: str
    connection_id: str
    source_attribute: str
    target_attribute: str
    custom: bool
    array_mode: ArrayMode
    def __init__(self, id: _Optional[str] = ..., connection_id: _Optional[str] = ..., source_attribute: _Optional[str] = ..., target_attribute: _Optional[str] = ..., custom: _Optional[bool] = ..., array_mode: _Optional[_Union[ArrayMode, str]] = ...) -> None: ...

class ParameterMapping(_message.Message):
    __slots__ = ("source_parameter", "target_parameter", "custom")
    SOURCE_PARAMETER_FIELD_NUMBER: _ClassVar[int]
    TARGET_PARAMETER_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_FIELD_NUMBER: _ClassVar[int]
    source_parameter: str
    target_parameter: str
    custom: bool
    def __init__(self, source_parameter: _Optional[str] = ..., target_parameter: _Optional[str] = ..., custom: _Optional[bool] = ...) -> None: ...

class EventMapping(_message.Message):
    __slots__ = ("id", "connection_id", "source_event", "target_event", "parameters")
    ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_EVENT_FIELD_NUMBER: _ClassVar[int]
    TARGET_EVENT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    id: str
    connection_id: str
    source_event: str
    target_event: str
    parameters: _containers.RepeatedCompositeFieldContainer[ParameterMapping]
    def __init__(self, id: _Optional[str] = ..., connection_id: _Optional[str] = ..., source_event: _Optional[str] = ..., target_event: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[ParameterMapping, _Mapping]]] = ...) -> None: ...

class AddProfileMappingRequest(_message.Message):
    __slots__ = ("mapping",)
    MAPPING_FIELD_NUMBER: _ClassVar[int]
    mapping: ProfileMapping
    def __init__(self, mapping: _Optional[_Union[ProfileMapping, _Mapping]] = ...) -> None: ...

class AddProfileMappingResponse(_message.Message):
    __slots__ = ("mapping", "mapping_version")
    MAPPING_FIELD_NUMBER: _ClassVar[int]
    MAPPING_VERSION_FIELD_NUMBER: _ClassVar[int]
    mapping: ProfileMapping
    mapping_version: int
    def __init__(self, mapping: _Optional[_Union[ProfileMapping, _Mapping]] = ..., mapping_version: _Optional[int] = ...) -> None: ...

class ListProfileMappingsRequest(_message.Message):
    __slots__ = ("connection_id",)
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    def __init__(self, connection_id: _Optional[str] = ...) -> None: ...

class ListProfileMappingsResponse(_message.Message):
    __slots__ = ("mappings", "mapping_version")
    MAPPINGS_FIELD_NUMBER: _ClassVar[int]
    MAPPING_VERSION_FIELD_NUMBER: _ClassVar[int]
    mappings: _containers.RepeatedCompositeFieldContainer[ProfileMapping]
    mapping_version: int
    def __init__(self, mappings: _Optional[_Iterable[_Union[ProfileMapping, _Mapping]]] = ..., mapping_version: _Optional[int] = ...) -> None: ...

class UpdateProfileMappingRequest(_message.Message):
    __slots__ = ("mapping",)
    MAPPING_FIELD_NUMBER: _ClassVar[int]
    mapping: ProfileMapping
    def __init__(self, mapping: _Optional[_Union[ProfileMapping, _Mapping]] = ...) -> None: ...

class UpdateProfileMappingResponse(_message.Message):
    __slots__ = ("mapping", "mapping_version")
    MAPPING_FIELD_NUMBER: _ClassVar[int]
    MAPPING_VERSION_FIELD_NUMBER: _ClassVar[int]
    mapping: ProfileMapping
    mapping_version: int
    def __init__(self, mapping: _Optional[_Union[ProfileMapping, _Mapping]] = ..., mapping_version: _Optional[int] = ...) -> None: ...

class RemoveProfileMappingRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RemoveProfileMappingResponse(_message.Message):
    __slots__ = ("mapping_version",)
    MAPPING_VERSION_FIELD_NUMBER: _ClassVar[int]
    mapping_version: int
    def __init__(self, mapping_version: _Optional[int] = ...) -> None: ...

class AddEventMappingRequest(_message.Message):
    __slots__ = ("mapping",)
    MAPPING_FIELD_NUMBER: _ClassVar[int]
    mapping: EventMapping
    def __init__(self, mapping: _Optional[_Union[EventMapping, _Mapping]] = ...) -> None: ...

class AddEventMappingResponse(_message.Message):
    __slots__ = ("mapping", "mapping_version")
    MAPPING_FIELD_NUMBER: _ClassVar[int]
    MAPPING_VERSION_FIELD_NUMBER: _ClassVar[int]
    mapping: EventMapping
    mapping_version: int
    def __init__(self, mapping: _Optional[_Union[EventMapping, _Mapping]] = ..., mapping_version: _Optional[int] = ...) -> None: ...

class ListEventMappingsRequest(_message.Message):
    __slots__ = ("connection_id",)
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    def __init__(self, connection_id: _Optional[str] = ...) -> None: ...

class ListEventMappingsResponse(_message.Message):
    __slots__ = ("mappings", "mapping_version")
    MAPPINGS_FIELD_NUMBER: _ClassVar[int]
    MAPPING_VERSION_FIELD_NUMBER: _ClassVar[int]
    mappings: _containers.RepeatedCompositeFieldContainer[EventMapping]
    mapping_version: int
    def __init__(self, mappings: _Optional[_Iterable[_Union[EventMapping, _Mapping]]] = ..., mapping_version: _Optional[int] = ...) -> None: ...

class UpdateEventMappingRequest(_message.Message):
    __slots__ = ("mapping",)
    MAPPING_FIELD_NUMBER: _ClassVar[int]
    mapping: EventMapping
    def __init__(self, mapping: _Optional[_Union[EventMapping, _Mapping]] = ...) -> None: ...

class UpdateEventMappingResponse(_message.Message):
    __slots__ = ("mapping", "mapping_version")
    MAPPING_FIELD_NUMBER: _ClassVar[int]
    MAPPING_VERSION_FIELD_NUMBER: _ClassVar[int]
    mapping: EventMapping
    mapping_version: int
    def __init__(self, mapping: _Optional[_Union[EventMapping, _Mapping]] = ..., mapping_version: _Optional[int] = ...) -> None: ...

class RemoveEventMappingRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RemoveEventMappingResponse(_message.Message):
    __slots__ = ("mapping_version",)
    MAPPING_VERSION_FIELD_NUMBER: _ClassVar[int]
    mapping_version: int
    def __init__(self, mapping_version: _Optional[int] = ...) -> None: ...
