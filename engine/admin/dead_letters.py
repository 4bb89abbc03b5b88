"""DeadLetterService: list dead letters and queue them again."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC
from typing import Protocol

import orjson
from google.protobuf.timestamp_pb2 import Timestamp

from engine.admin.connections import timestamp
from engine.admin.errors import Context, rpc
from engine.admin.paging import Pager, page_size
from engine.errors import InvalidInputError, TidegateError
from engine.pb import dead_letters_pb2 as pb
from engine.pb import dead_letters_pb2_grpc
from engine.queue.dead_letters import DeadLetterQuery, ReplayResult, StoredDeadLetter
from engine.queue.lanes import DurableQueue


class Replayer(Protocol):
    """What queues dead letters again: the local queue (``DurableQueue.replay``), or on
    a broker worker the event stream (``engine.broker.replay.StreamReplay``)."""

    async def replay(self, query: DeadLetterQuery, stored: bool, dry_run: bool) -> ReplayResult: ...


PAGES = Pager[tuple[int]]("ListDeadLetters", (int,))
"""ListDeadLetters tokens: the id of the page's last dead letter."""


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


class DeadLetterServicer(dead_letters_pb2_grpc.DeadLetterServiceServicer):
    def __init__(
        self,
        queue: DurableQueue,
        on_replayed: Callable[[set[str]], None],
        replayer: Replayer | None = None,
        elsewhere: str | None = None,
    ) -> None:
        """``on_replayed`` wakes delivery for the connections a replay queued items of;
        ``replayer``: what replays (default ``queue``). ``elsewhere``: this process keeps
        no dead letters; every call is refused with this text (FAILED_PRECONDITION)."""
        self._queue = queue
        self._on_replayed = on_replayed
        self._replayer: Replayer = queue if replayer is None else replayer
        self._elsewhere = elsewhere

    def _here(self) -> None:
        if self._elsewhere is not None:
            raise TidegateError(self._elsewhere)

    @rpc
    async def ListDeadLetters(
        self, request: pb.ListDeadLettersRequest, context: Context
    ) -> pb.ListDeadLettersResponse:
        self._here()
        size = page_size(request.page_size)
        after = PAGES.cursor(request.page_token)
        found = await self._queue.dead_letters(
            query_from_pb(request.filter), size + 1, after[0] if after else 0
        )
        page = found[:size]
        return pb.ListDeadLettersResponse(
            dead_letters=[dead_letter_pb(d) for d in page],
            next_page_token=PAGES.token((page[-1].id,) if len(found) > size else None),
        )

    @rpc
    async def ReplayDeadLetters(
        self, request: pb.ReplayDeadLettersRequest, context: Context
    ) -> pb.ReplayDeadLettersResponse:
        self._here()
        query = query_from_pb(request.filter, tuple(request.ids))
        if query == DeadLetterQuery():
            raise InvalidInputError(
                "ids", "give dead-letter ids or a filter (replaying everything needs a filter)"
            )
        stored = request.mode == pb.REPLAY_MODE_STORED_REQUEST
        result = await self._replayer.replay(query, stored=stored, dry_run=request.dry_run)
        if result.replayed and not request.dry_run:
            self._on_replayed(set(result.connections))
        return pb.ReplayDeadLettersResponse(
            matched=result.matched, replayed=result.replayed, skipped=result.without_stored_request
        )
