"""LogService: list, open and tail the outbound log."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from datetime import UTC

import grpc
import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from engine.admin.auth import bearer
from engine.admin.errors import Context, bounded, refuse_undecodable, rpc
from engine.admin.limits import check_request
from engine.admin.paging import Pager, page_size
from engine.errors import InvalidInputError, NotFoundError, TidegateError, shown
from engine.outbound_log.rows import LogQuery, LogRow, from_micros
from engine.outbound_log.store import (
    LogStore,
    StreamBehindError,
    TooManySubscribersError,
    row_bytes,
)
from engine.pb import logs_pb2 as pb
from engine.pb import logs_pb2_grpc

log = structlog.get_logger("tidegate.admin")

RECHECK_SECONDS = 1.0
"""How often a live stream checks that its token still holds: a stream outlives the check
its call passed at the start, and must end when the token is revoked or expires."""
TOKEN_ENDED = "the token of this stream was revoked or has expired: reconnect with a valid one"


def representable(cursor: tuple[int, str]) -> bool:
    """Whether a log page cursor's time (microseconds) is a datetime."""
    try:
        from_micros(cursor[0])
    except (OverflowError, ValueError):
        return False
    return True


PAGES = Pager[tuple[int, str]]("ListLogs", (int, str), representable)
"""ListLogs tokens: the time (Unix microseconds) and id of the page's last entry."""


TAG_RE = re.compile(r"[a-z0-9_-]{1,64}")
"""A tag a filter names: what the engine writes ("backfill", "replay", "erasure")."""
MAX_FILTER_TAGS = 20


def check_tags(tags: Iterable[str], field: str = "filter.tags") -> tuple[str, ...]:
    """``tags`` as a ``LogQuery`` takes them; ``InvalidInputError`` names a bad one."""
    found = tuple(dict.fromkeys(tags))
    if len(found) > MAX_FILTER_TAGS:
        raise InvalidInputError(field, f"at most {MAX_FILTER_TAGS} tags, not {len(found)}")
    for i, tag in enumerate(found):
        if TAG_RE.fullmatch(tag) is None:
            raise InvalidInputError(
                f"{field}[{i}]",
                f"{shown(tag)} is not a tag: 1-64 characters of a-z, 0-9, _ and -",
            )
    return found


def query_from_pb(f: pb.LogFilter) -> LogQuery:
    tags = check_tags(f.tags)
    for i, code in enumerate(f.status_codes):
        if not 0 <= code <= 599:
            raise InvalidInputError(f"filter.status_codes[{i}]", "must be an HTTP status (0-599)")
    start = f.start_time.ToDatetime(tzinfo=UTC) if f.HasField("start_time") else None
    end = f.end_time.ToDatetime(tzinfo=UTC) if f.HasField("end_time") else None
    if start and end and end <= start:
        raise InvalidInputError("filter.end_time", "must be after filter.start_time")
    return LogQuery(
        identifier=f.identifier,
        customer_id=f.customer_id,
        error_contains=f.error_contains,
        status_codes=tuple(f.status_codes),
        start_time=start,
        end_time=end,
        connection_id=f.connection_id,
        errors_only=f.errors_only,
        tags=tags,
    )


def entry_pb(row: LogRow) -> pb.LogEntry:
    ts = Timestamp()
    ts.FromDatetime(row.time)
    return pb.LogEntry(
        id=row.id,
        time=ts,
        connection_id=row.connection_id,
        method=row.method,
        url=row.url,
        status_code=row.status_code,
        response_time_seconds=row.response_time,
        error=row.error,
        customers=[
            pb.LogCustomer(customer_id=c.customer_id, name=c.name, outcome=c.outcome, error=c.error)
            for c in row.customers
        ],
        customer_count=row.customer_count,
        mapping_version=row.mapping_version,
        attempt=row.attempt,
        ambiguous=row.ambiguous,
        request_body=row.request_body,
        response_body=row.response_body,
        tags=[t for t in row.tags.split(",") if t],
    )


STREAM_MESSAGE_BYTES = 1024 * 1024
"""Rows per StreamLogs message at most, by ``row_bytes``: a client refuses messages past
4 MB unless told otherwise, and one commit can carry thousands of rows."""


def message_chunks(rows: list[LogRow]) -> Iterator[list[LogRow]]:
    """``rows`` in runs of at most ``STREAM_MESSAGE_BYTES`` (a longer row goes alone)."""
    chunk: list[LogRow] = []
    size = 0
    for row in rows:
        estimate = row_bytes(row)
        if chunk and size + estimate > STREAM_MESSAGE_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(row)
        size += estimate
    if chunk:
        yield chunk


class LogServicer(logs_pb2_grpc.LogServiceServicer):
    def __init__(
        self,
        logs: LogStore,
        token_holds: Callable[[str], bool] | None = None,
        elsewhere: str | None = None,
    ) -> None:
        """``token_holds``: whether a token still admits its caller (None: no recheck).
        ``elsewhere``: this process keeps no outbound log; every call is refused with
        this text (FAILED_PRECONDITION), which says where the log is."""
        self._logs = logs
        self._token_holds = token_holds
        self._elsewhere = elsewhere

    def _here(self) -> None:
        if self._elsewhere is not None:
            raise TidegateError(self._elsewhere)

    @rpc
    async def ListLogs(self, request: pb.ListLogsRequest, context: Context) -> pb.ListLogsResponse:
        self._here()
        size = page_size(request.page_size)
        after = PAGES.cursor(request.page_token)
        rows, last = await self._logs.page(query_from_pb(request.filter), size, after)
        return pb.ListLogsResponse(
            logs=[entry_pb(r) for r in rows], next_page_token=PAGES.token(last)
        )

    @rpc
    async def GetLog(self, request: pb.GetLogRequest, context: Context) -> pb.GetLogResponse:
        self._here()
        if not request.id:
            raise InvalidInputError("id", "required: a request identifier")
        row = await self._logs.get(request.id)
        if row is None:
            raise NotFoundError(f"no log entry with id {shown(request.id)}")
        return pb.GetLogResponse(log=entry_pb(row))

    async def StreamLogs(
        self, request: pb.StreamLogsRequest, context: Context
    ) -> AsyncIterator[pb.StreamLogsResponse]:
        await refuse_undecodable(request, context)
        if self._elsewhere is not None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, self._elsewhere)
        try:
            check_request(request)
            query = query_from_pb(request.filter)
        except InvalidInputError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bounded(str(exc)))
        try:
            subscription = self._logs.subscribe(query)
        except TooManySubscribersError as exc:
            log.warning("log_stream_refused", peer=context.peer(), reason=str(exc))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except TidegateError as exc:  # the log store is stopping
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        token = bearer(context.invocation_metadata())[1]
        holds = self._token_holds
        rows: list[LogRow] = []
        chunk: list[LogRow] = []
        cut = ""
        ended = False
        next_rows: asyncio.Future[list[LogRow]] | None = None
        try:
            # Headers go out at once so a client knows the stream is live before rows arrive.
            await context.send_initial_metadata(())
            while True:
                if next_rows is None:
                    next_rows = asyncio.ensure_future(anext(subscription))
                done, _ = await asyncio.wait({next_rows}, timeout=RECHECK_SECONDS)
                if holds is not None and not holds(token):
                    ended = True
                    break
                if not done:
                    continue
                task, next_rows = next_rows, None
                try:
                    rows = task.result()
                except StopAsyncIteration:
                    break  # the store closed
                for chunk in message_chunks(rows):
                    yield pb.StreamLogsResponse(logs=[entry_pb(r) for r in chunk])
        except StreamBehindError as exc:
            cut = str(exc)
        finally:
            subscription.close()  # its unread rows go at once, whoever ended the stream
            if next_rows is not None:
                next_rows.cancel()
                with contextlib.suppress(BaseException):
                    await next_rows
        # Aborted outside the handler, with nothing in hand: gRPC may keep the abort's
        # traceback, and with it this frame, for a while after the call.
        rows = chunk = []
        next_rows = None
        if ended:
            log.warning("log_stream_ended", peer=context.peer(), reason="token no longer valid")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, TOKEN_ENDED)
        if cut:
            log.warning("log_stream_cut", peer=context.peer(), reason=cut)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, cut)
