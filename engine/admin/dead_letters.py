"""DeadLetterService: list dead letters and queue them again."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from datetime import UTC

import orjson
from google.protobuf.timestamp_pb2 import Timestamp

from engine.admin.connections import timestamp
from engine.admin.errors import Context, rpc
from engine.errors import InvalidInputError
from engine.pb import dead_letters_pb2 as pb
from engine.pb import dead_letters_pb2_grpc
from engine.queue.dead_letters import DeadLetterQuery, StoredDeadLetter
from engine.queue.lanes import DurableQueue

MAX_PAGE_SIZE = 1000


def query_from_pb(f: pb.DeadLetterFilter, ids: tuple[int, ...] = ()) -> DeadLetterQuery:
    def seconds(ts: Timestamp) -> float:
        return ts.ToDatetime(tzinfo=UTC).timestamp()

    start = seconds(f.start_time) if f.HasField("start_time") else None
    end = seconds(f.end_time) if f.HasField("end_time") else None
    if start is not None and end is not None and end <= start:
        raise InvalidInputError("filter.end_time", "must be after filter.start_time")
    return DeadLetterQuery(
        connection_id=f.connection_id,
        customer_id=f.customer_id,
        stage=f.stage,
        error_contains=f.error_contains,
        start_time=start,
        end_time=end,
        ids=ids,
    )


def dead_letter_pb(d: StoredDeadLetter) -> pb.DeadLetter:
    return pb.DeadLetter(
        id=d.id,
        connection_id=d.connection_id,
        customer_id=d.customer_id,
        kind=d.kind,
        event_id=d.event_id,
        stage=d.stage,
        error=d.error,
        attempts=d.attempts,
        request_id=d.request_id,
        enqueue_time=timestamp(d.enqueue_time),
        fail_time=timestamp(d.fail_time),
        record_json=orjson.dumps(d.payload).decode(),
        rendered_json="" if d.rendered is None else orjson.dumps(d.rendered).decode(),
    )


def _page_token(last_id: int) -> str:
    return base64.urlsafe_b64encode(str(last_id).encode()).decode()


def _after_id(token: str) -> int:
    if not token:
        return 0
    try:
        return int(base64.urlsafe_b64decode(token.encode()).decode())
    except (ValueError, binascii.Error):
        raise InvalidInputError("page_token", "not a token from a previous response") from None


class DeadLetterServicer(dead_letters_pb2_grpc.DeadLetterServiceServicer):
    def __init__(self, queue: DurableQueue, on_replayed: Callable[[set[str]], None]) -> None:
        self._queue = queue
        self._on_replayed = on_replayed

    @rpc
    async def ListDeadLetters(
        self, request: pb.ListDeadLettersRequest, context: Context
    ) -> pb.ListDeadLettersResponse:
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise InvalidInputError("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
        size = request.page_size or 50
        found = await self._queue.dead_letters(
            query_from_pb(request.filter), size + 1, _after_id(request.page_token)
        )
        page = found[:size]
        token = _page_token(page[-1].id) if len(found) > size else ""
        return pb.ListDeadLettersResponse(
            dead_letters=[dead_letter_pb(d) for d in page], next_page_token=token
        )

    @rpc
    async def ReplayDeadLetters(
        self, request: pb.ReplayDeadLettersRequest, context: Context
    ) -> pb.ReplayDeadLettersResponse:
        query = query_from_pb(request.filter, tuple(request.ids))
        if query == DeadLetterQuery():
            raise InvalidInputError(
                "ids", "give dead-letter ids or a filter (replaying everything needs a filter)"
            )
        stored = request.mode == pb.REPLAY_MODE_STORED_REQUEST
        result = await self._queue.replay(query, stored=stored, dry_run=request.dry_run)
        if result.replayed and not request.dry_run:
            self._on_replayed(set(result.connections))
        return pb.ReplayDeadLettersResponse(
            matched=result.matched, replayed=result.replayed, skipped=result.without_stored_request
        )
