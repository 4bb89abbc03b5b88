"""CatalogService: the Antavo names a mapping can read, the destination names it can
write, and a preview of what a connection would send for a sample event."""

from __future__ import annotations

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from engine.admin.errors import Context, rpc
from engine.admin.ingest import event_dict, whole_numbers
from engine.admin.paging import Pager, keyset_page, offset_page, page_size
from engine.delivery.preview import preview_delivery
from engine.errors import InvalidInputError
from engine.ingest.ingestor import Ingestor
from engine.ingest.parse import parse_event
from engine.ingest.source_catalog import (
    CATALOG_ATTRIBUTE,
    CATALOG_EVENT,
    CATALOG_PARAMETER,
    source_catalog,
)
from engine.pb import catalog_pb2 as pb
from engine.pb import catalog_pb2_grpc
from engine.plugins import Connectors
from engine.state.connections import ConnectionRegistry

SOURCE_PAGES = Pager[tuple[str, str, str]]("ListSourceCatalog", (str, str, str))
"""ListSourceCatalog tokens: the kind, event and name of the page's last entry (the
catalog is sorted by them; names seen in traffic join it anywhere)."""
DESTINATION_PAGES = Pager[tuple[int]]("ListDestinationCatalog", (int,))
"""ListDestinationCatalog tokens: the offset of the next page (a connector's catalog is
fixed while the engine runs)."""

SOURCE_KINDS = {
    CATALOG_ATTRIBUTE: pb.CATALOG_KIND_ATTRIBUTE,
    CATALOG_EVENT: pb.CATALOG_KIND_EVENT,
    CATALOG_PARAMETER: pb.CATALOG_KIND_EVENT_PARAMETER,
}
DESTINATION_KINDS = {
    "identifier": pb.CATALOG_KIND_IDENTIFIER,
    "attribute": pb.CATALOG_KIND_ATTRIBUTE,
    "event": pb.CATALOG_KIND_EVENT,
    "event_parameter": pb.CATALOG_KIND_EVENT_PARAMETER,
}


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(
        self,
        registry: ConnectionRegistry,
        connectors: Connectors,
        ingestor: Ingestor,
    ) -> None:
        self._registry = registry
        self._connectors = connectors
        self._ingestor = ingestor

    @rpc
    async def ListSourceCatalog(
        self, request: pb.ListSourceCatalogRequest, context: Context
    ) -> pb.ListSourceCatalogResponse:
        entries = [
            e
            for e in source_catalog(await self._ingestor.seen_names())
            if request.kind in (pb.CATALOG_KIND_UNSPECIFIED, SOURCE_KINDS[e.kind])
        ]
        selected, last = keyset_page(
            entries,
            lambda e: (e.kind, e.event, e.name),
            page_size(request.page_size),
            SOURCE_PAGES.cursor(request.page_token),
        )
        messages = []
        for e in selected:
            message = pb.SourceCatalogEntry(
                kind=SOURCE_KINDS[e.kind],
                name=e.name,
                event=e.event,
                type=e.type,
                description=e.description,
                built_in=e.built_in,
                read_only=e.read_only,
                seen=e.seen,
            )
            if e.first_seen is not None:
                first_seen = Timestamp()
                first_seen.FromNanoseconds(int(e.first_seen * 1e9))
                message.first_seen_time.CopyFrom(first_seen)
            messages.append(message)
        return pb.ListSourceCatalogResponse(
            entries=messages, next_page_token=SOURCE_PAGES.token(last)
        )

    @rpc
    async def ListDestinationCatalog(
        self, request: pb.ListDestinationCatalogRequest, context: Context
    ) -> pb.ListDestinationCatalogResponse:
        if not request.connection_id:
            raise InvalidInputError("connection_id", "required")
        connector = self._registry.runtime(request.connection_id).connector
        entries = [
            e
            for e in self._connectors.info(connector).catalog
            if request.kind in (pb.CATALOG_KIND_UNSPECIFIED, DESTINATION_KINDS.get(e.kind))
        ]
        selected, after = offset_page(
            entries,
            page_size(request.page_size),
            DESTINATION_PAGES.cursor(request.page_token),
        )
        return pb.ListDestinationCatalogResponse(
            connector=connector,
            entries=[
                pb.DestinationCatalogEntry(
                    kind=DESTINATION_KINDS.get(e.kind, pb.CATALOG_KIND_UNSPECIFIED),
                    name=e.name,
                    type=e.type,
                    format=e.format,
                    description=e.description,
                    required_for_events=list(e.required_for),
                )
                for e in selected
            ],
            next_page_token=DESTINATION_PAGES.token(after),
        )

    @rpc
    async def PreviewDelivery(
        self, request: pb.PreviewDeliveryRequest, context: Context
    ) -> pb.PreviewDeliveryResponse:
        if not request.connection_id:
            raise InvalidInputError("connection_id", "required")
        connection = self._registry.runtime(request.connection_id)
        if not request.HasField("event"):
            raise InvalidInputError("event", "required: a sample Antavo event")
        event = parse_event(event_dict(request.event), "event")
        profile = whole_numbers(json_format.MessageToDict(request.profile))
        result = await preview_delivery(self._connectors.hooks(connection), event, profile)
        return pb.PreviewDeliveryResponse(
            requests=[
                pb.PreviewedRequest(method=r.method, url=r.url, body=r.body, tags=list(r.tags))
                for r in result.requests
            ],
            problems=[pb.PreviewProblem(stage=p.stage, message=p.message) for p in result.problems],
            mapping_version=connection.mapping_version,
        )
