"""AuditService: the audit trail of admin changes (``engine.state.audit``)."""

from __future__ import annotations

import sqlite3

from google.protobuf.timestamp_pb2 import Timestamp

from engine.admin.errors import Context, rpc
from engine.admin.paging import MAX_CURSOR_INT, Pager, page_size
from engine.admin.tokens import timestamp
from engine.errors import InvalidInputError
from engine.pb import audit_pb2 as pb
from engine.pb import audit_pb2_grpc
from engine.state import audit
from engine.state.database import Database

PAGES = Pager[tuple[int]]("ListAuditEvents", (int,))
"""ListAuditEvents tokens: the id of the page's last (oldest) event."""
MAX_FILTER_CHARS = 200
LATEST_SECONDS = 253402300799  # 9999-12-31T23:59:59Z, the last time a Timestamp holds


def seconds(ts: Timestamp, field: str) -> float:
    if not 0 <= ts.seconds <= LATEST_SECONDS:
        raise InvalidInputError(field, "must be between 1970-01-01 and 9999-12-31")
    return ts.seconds + ts.nanos / 1e9


def event_pb(event: audit.AuditEvent) -> pb.AuditEvent:
    return pb.AuditEvent(
        id=event.seq,
        time=timestamp(event.time),
        token_name=event.token_name,
        method=event.method,
        target=event.target,
        fields=event.fields,
        outcome=event.outcome,
        peer=event.peer,
    )


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, db: Database) -> None:
        self._db = db

    @rpc
    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: Context
    ) -> pb.ListAuditEventsResponse:
        size = page_size(request.page_size)
        after = PAGES.cursor(request.page_token)
        start = (
            seconds(request.start_time, "start_time") if request.HasField("start_time") else None
        )
        end = seconds(request.end_time, "end_time") if request.HasField("end_time") else None
        if start is not None and end is not None and end <= start:
            raise InvalidInputError("end_time", "must be after start_time")
        for field in ("method", "token_name"):
            if len(getattr(request, field)) > MAX_FILTER_CHARS:
                raise InvalidInputError(field, f"is longer than {MAX_FILTER_CHARS} characters")

        def query(c: sqlite3.Connection) -> list[audit.AuditEvent]:
            return audit.list_events(
                c,
                start_time=start,
                end_time=end,
                method=request.method,
                token_name=request.token_name,
                before_seq=after[0] if after else None,
                limit=size + 1,
            )

        found = await self._db.read(query)
        page = found[:size]
        more = len(found) > size and page[-1].seq <= MAX_CURSOR_INT
        return pb.ListAuditEventsResponse(
            events=[event_pb(e) for e in page],
            next_page_token=PAGES.token((page[-1].seq,) if more else None),
        )
