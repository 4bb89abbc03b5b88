"""ConfigService: the whole configuration exported and applied as one YAML document."""

from __future__ import annotations

import asyncio

from engine.admin.errors import Context, rpc
from engine.errors import InvalidInputError
from engine.pb import config_pb2 as pb
from engine.pb import config_pb2_grpc
from engine.plugins import Connectors
from engine.queue.lanes import DurableQueue
from engine.state.config_apply import (
    CONNECTION,
    CREATE,
    DELETE,
    EVENT_MAPPING,
    PROFILE_MAPPING,
    UPDATE,
    Change,
    ObjectRef,
    plan_apply,
)
from engine.state.config_document import render_document
from engine.state.connections import ConnectionRegistry

ACTIONS = {
    CREATE: pb.CHANGE_ACTION_CREATE,
    UPDATE: pb.CHANGE_ACTION_UPDATE,
    DELETE: pb.CHANGE_ACTION_DELETE,
}
KINDS = {
    CONNECTION: pb.CONFIG_OBJECT_KIND_CONNECTION,
    PROFILE_MAPPING: pb.CONFIG_OBJECT_KIND_PROFILE_MAPPING,
    EVENT_MAPPING: pb.CONFIG_OBJECT_KIND_EVENT_MAPPING,
}


def object_pb(ref: ObjectRef) -> pb.ConfigObject:
    return pb.ConfigObject(
        kind=KINDS[ref.kind], connection_id=ref.connection_id, mapping_id=ref.mapping_id
    )


def change_pb(change: Change) -> pb.ConfigChange:
    return pb.ConfigChange(
        action=ACTIONS[change.action],
        object=object_pb(change.object),
        fields=[
            pb.FieldChange(field=f.field, old_value=f.old, new_value=f.new) for f in change.fields
        ],
    )


class ConfigServicer(config_pb2_grpc.ConfigServiceServicer):
    def __init__(
        self, registry: ConnectionRegistry, connectors: Connectors, queue: DurableQueue
    ) -> None:
        self._registry = registry
        self._connectors = connectors
        self._queue = queue
        self._applying = asyncio.Lock()
        """One apply at a time: a second one plans on what the first one wrote."""

    @rpc
    async def ExportConfig(
        self, request: pb.ExportConfigRequest, context: Context
    ) -> pb.ExportConfigResponse:
        return pb.ExportConfigResponse(document=render_document(self._registry.runtimes()))

    @rpc
    async def ApplyConfig(
        self, request: pb.ApplyConfigRequest, context: Context
    ) -> pb.ApplyConfigResponse:
        if not request.document.strip():
            raise InvalidInputError("document", "required: the YAML document to apply")
        async with self._applying:
            try:
                plan = plan_apply(
                    self._registry,
                    self._connectors,
                    request.document,
                    dict(request.api_keys),
                    request.prune,
                )
            except RecursionError:  # YAML's reader recurses once per level of nesting
                raise InvalidInputError(
                    "document", "nested too deeply: a configuration is a few levels deep"
                ) from None
            applied = bool(plan.changes) and not request.dry_run
            if applied:
                await self._registry.write_batch(plan.batch)
                if plan.batch.deletes:
                    await self._queue.load()  # their backlog went with them
        return pb.ApplyConfigResponse(
            changes=[change_pb(c) for c in plan.changes],
            unmentioned=[object_pb(ref) for ref in plan.unmentioned],
            applied=applied,
        )
