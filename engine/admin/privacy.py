"""PrivacyService: erasing one customer on request (``engine.delivery.erasure``)."""

from __future__ import annotations

from engine.admin.errors import Context, rpc
from engine.delivery.erasure import CustomerEraser
from engine.pb import privacy_pb2 as pb
from engine.pb import privacy_pb2_grpc


class PrivacyServicer(privacy_pb2_grpc.PrivacyServiceServicer):
    def __init__(self, eraser: CustomerEraser) -> None:
        self._eraser = eraser

    @rpc
    async def EraseCustomer(
        self, request: pb.EraseCustomerRequest, context: Context
    ) -> pb.EraseCustomerResponse:
        erased = await self._eraser.erase(request.customer_id, request.at_destinations)
        state, log = erased.state, erased.log
        return pb.EraseCustomerResponse(
            profile_deleted=state.profile,
            external_ids_deleted=state.external_ids,
            queued_items_deleted=state.queued_items,
            dead_letters_deleted=state.dead_letters,
            resend_marks_deleted=state.resend_marks,
            log_requests_redacted=log.requests,
            log_customer_rows_erased=log.customer_rows,
            index_entries_deleted=log.index_entries,
            destinations=[
                pb.DestinationErasure(
                    connection_id=d.connection_id, outcome=d.outcome, message=d.message
                )
                for d in erased.destinations
            ],
        )
