"""ConnectionService."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from engine.admin.errors import Context, rpc
from engine.admin.paging import Pager, keyset_page, page_size
from engine.connector.records import CustomerIdMapping
from engine.errors import InvalidInputError
from engine.pb import connections_pb2 as pb
from engine.pb import connections_pb2_grpc
from engine.queue.lanes import DurableQueue, QueueStats
from engine.state.connections import (
    STATE_ACTIVE,
    STATE_PAUSED,
    ConnectionRegistry,
    ConnectionUpdate,
    ConnectionView,
)

PAGES = Pager[tuple[str]]("ListConnections", (str,))
"""ListConnections tokens: the id of the page's last connection."""
UPDATABLE_FIELDS = (
    "display_name",
    "settings",
    "api_key",
    "customer_id_mapping",
    "retry_window_seconds",
)


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(datetime.fromtimestamp(seconds, UTC))
    return ts


def id_mapping_from_pb(message: pb.CustomerIdMapping) -> CustomerIdMapping:
    default = CustomerIdMapping()
    return CustomerIdMapping(
        source_attribute=message.source_attribute or default.source_attribute,
        target_identifier=message.target_identifier or default.target_identifier,
        custom=message.custom,
    )


class ConnectionServicer(connections_pb2_grpc.ConnectionServiceServicer):
    def __init__(
        self,
        registry: ConnectionRegistry,
        queue: DurableQueue,
        stats: Callable[[str], Awaitable[QueueStats]] | None = None,
    ) -> None:
        """``stats``: a connection's queued items and dead letters (default: the local
        queue's; on a broker, the cluster's: ``engine.broker.stats``)."""
        self._registry = registry
        self._queue = queue
        self._stats = queue.stats if stats is None else stats

    async def _message(self, view: ConnectionView) -> pb.Connection:
        stats = await self._stats(view.id)
        oldest = 0.0
        if stats.oldest_enqueue_time is not None:
            oldest = max(0.0, datetime.now(UTC).timestamp() - stats.oldest_enqueue_time)
        m = view.customer_id_mapping
        return pb.Connection(
            id=view.id,
            display_name=view.display_name,
            connector=view.connector,
            settings=dict(view.settings),
            api_key_hint=view.api_key_hint,
            customer_id_mapping=pb.CustomerIdMapping(
                source_attribute=m.source_attribute,
                target_identifier=m.target_identifier,
                custom=m.custom,
            ),
            state=pb.CONNECTION_STATE_PAUSED
            if view.state == STATE_PAUSED
            else pb.CONNECTION_STATE_ACTIVE,
            state_reason=view.state_reason,
            mapping_version=view.mapping_version,
            queue_depth=stats.depth,
            dead_letter_count=stats.dead_letters,
            oldest_pending_age_seconds=oldest,
            create_time=timestamp(view.create_time),
            update_time=timestamp(view.update_time),
            retry_window_seconds=int(view.retry_window_seconds),
        )

    @rpc
    async def CreateConnection(
        self, request: pb.CreateConnectionRequest, context: Context
    ) -> pb.CreateConnectionResponse:
        c = request.connection
        view = await self._registry.create(
            connection_id=c.id,
            display_name=c.display_name,
            connector=c.connector,
            settings=dict(c.settings),
            api_key=c.api_key,
            customer_id_mapping=id_mapping_from_pb(c.customer_id_mapping)
            if c.HasField("customer_id_mapping")
            else None,
            retry_window_seconds=float(c.retry_window_seconds),
        )
        return pb.CreateConnectionResponse(connection=await self._message(view))

    @rpc
    async def GetConnection(
        self, request: pb.GetConnectionRequest, context: Context
    ) -> pb.GetConnectionResponse:
        if not request.id:
            raise InvalidInputError("id", "required")
        return pb.GetConnectionResponse(
            connection=await self._message(self._registry.view(request.id))
        )

    @rpc
    async def ListConnections(
        self, request: pb.ListConnectionsRequest, context: Context
    ) -> pb.ListConnectionsResponse:
        size = page_size(request.page_size)
        after = PAGES.cursor(request.page_token)
        page, last = keyset_page(self._registry.views(), lambda v: (v.id,), size, after)
        return pb.ListConnectionsResponse(
            connections=[await self._message(v) for v in page],
            next_page_token=PAGES.token(last),
        )

    @rpc
    async def UpdateConnection(
        self, request: pb.UpdateConnectionRequest, context: Context
    ) -> pb.UpdateConnectionResponse:
        c = request.connection
        if not c.id:
            raise InvalidInputError("connection.id", "required: the connection to update")
        paths = list(request.update_mask.paths)
        for path in paths:
            if path not in UPDATABLE_FIELDS:
                raise InvalidInputError(
                    "update_mask",
                    f"cannot update {path!r}; updatable: {', '.join(UPDATABLE_FIELDS)}",
                )
        if not paths:  # no mask: every field that carries a value
            paths = [f for f in ("display_name", "api_key") if getattr(c, f)]
            if c.settings:
                paths.append("settings")
            if c.HasField("customer_id_mapping"):
                paths.append("customer_id_mapping")
            if c.retry_window_seconds:
                paths.append("retry_window_seconds")
        update = ConnectionUpdate(
            display_name=c.display_name if "display_name" in paths else None,
            settings=dict(c.settings) if "settings" in paths else None,
            api_key=c.api_key if "api_key" in paths else None,
            customer_id_mapping=id_mapping_from_pb(c.customer_id_mapping)
            if "customer_id_mapping" in paths
            else None,
            retry_window_seconds=float(c.retry_window_seconds)
            if "retry_window_seconds" in paths
            else None,
        )
        view = await self._registry.update(c.id, update)
        return pb.UpdateConnectionResponse(connection=await self._message(view))

    @rpc
    async def DeleteConnection(
        self, request: pb.DeleteConnectionRequest, context: Context
    ) -> pb.DeleteConnectionResponse:
        if not request.id:
            raise InvalidInputError("id", "required")
        await self._registry.delete(request.id)
        await self._queue.load()  # its backlog went with it
        return pb.DeleteConnectionResponse()

    @rpc
    async def ResumeConnection(
        self, request: pb.ResumeConnectionRequest, context: Context
    ) -> pb.ResumeConnectionResponse:
        if not request.id:
            raise InvalidInputError("id", "required")
        view = self._registry.view(request.id)
        if view.state == STATE_PAUSED:
            await self._registry.set_state(request.id, STATE_ACTIVE, "")
        return pb.ResumeConnectionResponse(
            connection=await self._message(self._registry.view(request.id))
        )
