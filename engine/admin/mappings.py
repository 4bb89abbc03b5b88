"""MappingService."""

from __future__ import annotations

from engine.admin.errors import Context, rpc
from engine.admin.paging import Pager, offset_page, page_size
from engine.connector.records import EventMapping, ParameterMapping, ProfileMapping
from engine.errors import InvalidInputError
from engine.pb import mappings_pb2 as pb
from engine.pb import mappings_pb2_grpc
from engine.state.connections import ConnectionRegistry

PROFILE_PAGES = Pager[tuple[int]]("ListProfileMappings", (int,))
EVENT_PAGES = Pager[tuple[int]]("ListEventMappings", (int,))
"""Mapping list tokens: the offset of the next page. A connection's mappings are listed
in the order they were created and new ones join at the end, so a page never repeats
one; a mapping deleted between two pages moves the later ones up, and the next page
misses one of them."""

ARRAY_MODES: dict[int, str] = {pb.ARRAY_MODE_APPEND: "append", pb.ARRAY_MODE_REPLACE: "replace"}
"""ArrayMode values as ProfileMapping.array_mode holds them (unspecified: "")."""


def array_mode_from_pb(value: int) -> str:
    if value == pb.ARRAY_MODE_UNSPECIFIED:
        return ""
    if value not in ARRAY_MODES:
        raise InvalidInputError(
            "mapping.array_mode", "use ARRAY_MODE_APPEND, ARRAY_MODE_REPLACE or leave it unset"
        )
    return ARRAY_MODES[value]


def array_mode_pb(value: str) -> pb.ArrayMode.ValueType:
    for number, name in ARRAY_MODES.items():
        if name == value:
            return pb.ArrayMode.ValueType(number)
    return pb.ARRAY_MODE_UNSPECIFIED


def profile_pb(connection_id: str, m: ProfileMapping) -> pb.ProfileMapping:
    return pb.ProfileMapping(
        id=m.id,
        connection_id=connection_id,
        source_attribute=m.source_attribute,
        target_attribute=m.target_attribute,
        custom=m.custom,
        array_mode=array_mode_pb(m.array_mode),
    )


def event_pb(connection_id: str, m: EventMapping) -> pb.EventMapping:
    return pb.EventMapping(
        id=m.id,
        connection_id=connection_id,
        source_event=m.source_event,
        target_event=m.target_event,
        parameters=[
            pb.ParameterMapping(
                source_parameter=p.source_parameter,
                target_parameter=p.target_parameter,
                custom=p.custom,
            )
            for p in m.parameters
        ],
    )


def parameters_from_pb(message: pb.EventMapping) -> tuple[ParameterMapping, ...]:
    params = []
    for i, p in enumerate(message.parameters):
        if not p.source_parameter:
            raise InvalidInputError(f"mapping.parameters[{i}].source_parameter", "required")
        params.append(ParameterMapping(p.source_parameter, p.target_parameter, p.custom))
    return tuple(params)


def required(value: str, field: str) -> str:
    if not value:
        raise InvalidInputError(field, "required")
    return value


class MappingServicer(mappings_pb2_grpc.MappingServiceServicer):
    def __init__(self, registry: ConnectionRegistry) -> None:
        self._registry = registry

    @rpc
    async def CreateProfileMapping(
        self, request: pb.CreateProfileMappingRequest, context: Context
    ) -> pb.CreateProfileMappingResponse:
        m = request.mapping
        connection_id = required(m.connection_id, "mapping.connection_id")
        self._registry.view(connection_id)
        mapping, version = await self._registry.add_profile_mapping(
            connection_id,
            required(m.source_attribute, "mapping.source_attribute"),
            required(m.target_attribute, "mapping.target_attribute"),
            m.custom,
            m.id,
            array_mode_from_pb(m.array_mode),
        )
        return pb.CreateProfileMappingResponse(
            mapping=profile_pb(connection_id, mapping), mapping_version=version
        )

    @rpc
    async def ListProfileMappings(
        self, request: pb.ListProfileMappingsRequest, context: Context
    ) -> pb.ListProfileMappingsResponse:
        connection = self._registry.runtime(required(request.connection_id, "connection_id"))
        mappings, after = offset_page(
            connection.profile_mappings,
            page_size(request.page_size),
            PROFILE_PAGES.cursor(request.page_token),
        )
        return pb.ListProfileMappingsResponse(
            mappings=[profile_pb(connection.id, m) for m in mappings],
            mapping_version=connection.mapping_version,
            next_page_token=PROFILE_PAGES.token(after),
        )

    @rpc
    async def UpdateProfileMapping(
        self, request: pb.UpdateProfileMappingRequest, context: Context
    ) -> pb.UpdateProfileMappingResponse:
        m = request.mapping
        mapping, connection_id, version = await self._registry.update_profile_mapping(
            required(m.id, "mapping.id"),
            required(m.source_attribute, "mapping.source_attribute"),
            required(m.target_attribute, "mapping.target_attribute"),
            m.custom,
            array_mode_from_pb(m.array_mode),
        )
        return pb.UpdateProfileMappingResponse(
            mapping=profile_pb(connection_id, mapping), mapping_version=version
        )

    @rpc
    async def DeleteProfileMapping(
        self, request: pb.DeleteProfileMappingRequest, context: Context
    ) -> pb.DeleteProfileMappingResponse:
        version = await self._registry.remove_mapping(required(request.id, "id"), "profile")
        return pb.DeleteProfileMappingResponse(mapping_version=version)

    @rpc
    async def CreateEventMapping(
        self, request: pb.CreateEventMappingRequest, context: Context
    ) -> pb.CreateEventMappingResponse:
        m = request.mapping
        connection_id = required(m.connection_id, "mapping.connection_id")
        self._registry.view(connection_id)
        mapping, version = await self._registry.add_event_mapping(
            connection_id,
            required(m.source_event, "mapping.source_event"),
            required(m.target_event, "mapping.target_event"),
            parameters_from_pb(m),
            m.id,
        )
        return pb.CreateEventMappingResponse(
            mapping=event_pb(connection_id, mapping), mapping_version=version
        )

    @rpc
    async def ListEventMappings(
        self, request: pb.ListEventMappingsRequest, context: Context
    ) -> pb.ListEventMappingsResponse:
        connection = self._registry.runtime(required(request.connection_id, "connection_id"))
        mappings, after = offset_page(
            connection.event_mappings,
            page_size(request.page_size),
            EVENT_PAGES.cursor(request.page_token),
        )
        return pb.ListEventMappingsResponse(
            mappings=[event_pb(connection.id, m) for m in mappings],
            mapping_version=connection.mapping_version,
            next_page_token=EVENT_PAGES.token(after),
        )

    @rpc
    async def UpdateEventMapping(
        self, request: pb.UpdateEventMappingRequest, context: Context
    ) -> pb.UpdateEventMappingResponse:
        m = request.mapping
        mapping, connection_id, version = await self._registry.update_event_mapping(
            required(m.id, "mapping.id"),
            required(m.source_event, "mapping.source_event"),
            required(m.target_event, "mapping.target_event"),
            parameters_from_pb(m),
        )
        return pb.UpdateEventMappingResponse(
            mapping=event_pb(connection_id, mapping), mapping_version=version
        )

    @rpc
    async def DeleteEventMapping(
        self, request: pb.DeleteEventMappingRequest, context: Context
    ) -> pb.DeleteEventMappingResponse:
        version = await self._registry.remove_mapping(required(request.id, "id"), "event")
        return pb.DeleteEventMappingResponse(mapping_version=version)
