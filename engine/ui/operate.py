"""The page's operator views: connections and dead letters (``UiServer`` registers these
routes when the engine hands it an ``OperateViews``).

- ``GET /ui/api/connections`` (``page_token``), ``GET /ui/api/connections/{id}``: what
  ``ListConnections``/``GetConnection`` answer (no API key, only its hint), plus each
  connection's last success and last error from the outbound log (``RECENT``).
- ``POST /ui/api/connections/{id}/resume``: ``ResumeConnection``.
- ``GET /ui/api/dead-letters`` (``connection``, ``customer``, ``stage``, ``error``,
  ``start``, ``end``, ``page_size``, ``page_token``): ``ListDeadLetters``.
- ``POST /ui/api/dead-letters/replay``, a JSON body with ``ids`` and/or the same filter
  keys, ``dry_run`` and ``mode`` (``rerender`` or ``stored``): ``ReplayDeadLetters``.

Each endpoint calls the admin servicer's own method (``engine.admin``), so the page gets
the same store calls, limits (``engine.admin.limits``) and validation as gRPC; a refusal
is JSON 400/403/404 naming the page's field, never a traceback. The two changes need an
operator session (checked again on each request, whatever the page showed) and the
session's CSRF token, and are written to the audit trail as the gRPC call would be: the
same method name, target and fields, the session's token name, and the peer as
``ui:<address>``; a viewer's refused attempt is recorded too, as gRPC records it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn, cast

import grpc
import orjson
import structlog
from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import Message

from engine.admin.auth import PERMISSION_DENIED_MESSAGE, describe
from engine.admin.connections import ConnectionServicer
from engine.admin.dead_letters import DeadLetterServicer
from engine.admin.errors import Context
from engine.admin.paging import MAX_PAGE_SIZE
from engine.outbound_log.rows import LogQuery, LogRow
from engine.outbound_log.store import LogStore
from engine.pb import connections_pb2 as cpb
from engine.pb import dead_letters_pb2 as dpb
from engine.state import audit
from engine.state.database import Database
from engine.state.tokens import Role
from engine.ui.server import MAX_PARAM_LENGTH, BadParameter, Refusal, _json, _parse_time, cut

if TYPE_CHECKING:
    from engine.ui.server import Session, UiServer

log = structlog.get_logger("tidegate.ui")

_P = "/tidegate.admin.v1."
RESUME_METHOD = f"{_P}ConnectionService/ResumeConnection"
REPLAY_METHOD = f"{_P}DeadLetterService/ReplayDeadLetters"
STAGES = ("identify", "map_profile", "map_event", "map", "prepare", "send", "destination")
"""Where a dead letter failed (``DeadLetter.stage`` in proto/.../dead_letters.proto)."""
FILTER_FIELDS = {
    # the page's name -> the DeadLetterFilter field
    "connection": "connection_id",
    "customer": "customer_id",
    "stage": "stage",
    "error": "error_contains",
}
FIELD_NAMES = {
    # a servicer's field name -> the page's
    "filter.connection_id": "connection",
    "filter.customer_id": "customer",
    "filter.stage": "stage",
    "filter.error_contains": "error",
    "filter.start_time": "start",
    "filter.end_time": "end",
}
MODES = {"rerender": dpb.REPLAY_MODE_RERENDER, "stored": dpb.REPLAY_MODE_STORED_REQUEST}
MAX_BODY_BYTES = 256 * 1024
"""A replay body: 10,000 ids (``engine.admin.limits.MAX_REPLAY_IDS``) fit."""
RECENT = timedelta(hours=24)
"""How far back the outbound log is read for a connection's last success and last error
(a bounded read: the page never scans the whole log)."""
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
}


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _PageContext:
    """What an admin servicer method uses of its gRPC context, for a call from the page:
    ``abort`` raises ``_Aborted`` (turned into a JSON answer), ``peer`` names the page."""

    def __init__(self, peer: str) -> None:
        self._peer = peer

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, details: str = "", *args: Any) -> NoReturn:
        raise _Aborted(code, details)


def _refusal(exc: _Aborted) -> Exception:
    """The page's answer to a servicer's refusal: 400 naming the page's field, 404..."""
    status = HTTP_STATUS.get(exc.code, 500)
    if status == 500:
        return Refusal(500, "internal error; the engine's log has the details")
    if status == 400:
        field, _, message = exc.details.partition(": ")
        return BadParameter(FIELD_NAMES.get(field, field), message)
    return Refusal(status, exc.details)


def _dict(message: Message) -> dict[str, Any]:
    """A response as the proto's JSON mapping (camelCase names, int64 values as strings),
    every field present."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def _connection(message: Message) -> dict[str, Any]:
    """A connection as the page shows it: ``apiKey`` is input only (always empty in an
    answer), so it is left out; ``apiKeyHint`` stays."""
    found = _dict(message)
    found.pop("apiKey", None)
    return found


def _row_summary(row: LogRow | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {
        "id": row.id,
        "time": row.time.isoformat(),
        "statusCode": row.status_code,
        "error": row.error,
    }


class OperateViews:
    """The connections and dead-letter endpoints; ``register`` adds them to the page's
    app, on the servicers the gRPC server has (the engine's)."""

    def __init__(
        self,
        connections: ConnectionServicer,
        dead_letters: DeadLetterServicer,
        logs: LogStore,
        db: Database,
    ) -> None:
        self._connections = connections
        self._dead_letters = dead_letters
        self._logs = logs
        self._db = db
        self._ui: UiServer | None = None

    def register(self, app: web.Application, ui: UiServer) -> None:
        self._ui = ui
        app.router.add_get("/ui/api/connections", self._list_connections)
        app.router.add_get("/ui/api/connections/{id}", self._get_connection)
        app.router.add_post("/ui/api/connections/{id}/resume", self._resume)
        app.router.add_get("/ui/api/dead-letters", self._list_dead_letters)
        app.router.add_post("/ui/api/dead-letters/replay", self._replay)

    # -- plumbing --------------------------------------------------------------------

    @property
    def ui(self) -> UiServer:
        assert self._ui is not None, "register() first"
        return self._ui

    async def _call(
        self,
        method: Callable[[Any, Context], Awaitable[Any]],
        request: Message,
        peer: str,
        audited: tuple[str, Session] | None = None,
    ) -> Any:
        """Runs a servicer method on ``request``; ``audited``: the gRPC method name and
        the session whose change the audit trail records, with its outcome."""
        try:
            response = await method(request, cast(Context, _PageContext(peer)))
        except _Aborted as exc:
            if audited is not None:
                await self._audit(audited[0], audited[1], request, peer, exc.code.name, exc.details)
            raise _refusal(exc) from None
        except BaseException as exc:
            if audited is not None:
                await self._audit(
                    audited[0], audited[1], request, peer, "INTERNAL", type(exc).__name__
                )
            raise
        if audited is not None:
            await self._audit(audited[0], audited[1], request, peer, "OK", "")
        return response

    async def _audit(
        self,
        method: str,
        session: Session,
        request: Message,
        peer: str,
        code: str,
        details: str,
    ) -> None:
        target, fields = describe(method, request)
        outcome = code if code == "OK" else f"{code}: {details}"

        def write(c: sqlite3.Connection) -> None:
            audit.record(
                c,
                token_name=session.name,
                method=method,
                target=target,
                fields=fields,
                outcome=outcome,
                peer=peer,
            )

        try:
            await self._db.write(write)
        except Exception:  # the change stands; its record is what failed
            log.exception("audit_write_failed", method=method)

    def _changer(self, request: web.Request) -> Session:
        """The session of a change: logged in (401) and the CSRF header (403)."""
        session = self.ui._viewer(request)
        self.ui._csrf(request, session)
        return session

    async def _operator(
        self, request: web.Request, session: Session, method: str, message: Message
    ) -> None:
        """Refuses (403, audited as gRPC audits it) unless the session's token has the
        operator role or higher, read again now."""
        principal = self.ui._checker.check(session.token)
        if principal is None:  # revoked in between
            raise Refusal(401, "not logged in: POST /ui/session with a token, or open the page")
        if principal.role < Role.OPERATOR:
            log.warning(
                "ui_call_denied",
                method=method,
                peer=request.remote,
                reason="role",
                token_name=cut(session.name),
            )
            await self._audit(
                method,
                session,
                message,
                _peer(request),
                "PERMISSION_DENIED",
                PERMISSION_DENIED_MESSAGE,
            )
            raise Refusal(
                403, "this token's role does not allow this: resume and replay need an operator"
            )

    # -- connections -----------------------------------------------------------------

    async def _with_recent(self, connection: dict[str, Any]) -> dict[str, Any]:
        """``connection`` with ``lastSuccess`` and ``lastError``: the newest log rows of
        the last ``RECENT`` with a 2xx status, and with an error (None when none)."""
        since = datetime.now(UTC) - RECENT
        cid = connection["id"]
        ok, _ = await self._logs.page(
            LogQuery(connection_id=cid, status_codes=tuple(range(200, 300)), start_time=since), 1
        )
        bad, _ = await self._logs.page(
            LogQuery(connection_id=cid, errors_only=True, start_time=since), 1
        )
        connection["lastSuccess"] = _row_summary(ok[0] if ok else None)
        connection["lastError"] = _row_summary(bad[0] if bad else None)
        return connection

    async def _list_connections(self, request: web.Request) -> web.StreamResponse:
        self.ui._viewer(request)
        token = _param(request, "page_token")
        response = await self._call(
            self._connections.ListConnections,
            cpb.ListConnectionsRequest(page_size=MAX_PAGE_SIZE, page_token=token),
            _peer(request),
        )
        return _json(
            {
                "connections": [
                    await self._with_recent(_connection(c)) for c in response.connections
                ],
                "nextPageToken": response.next_page_token,
                "recentHours": RECENT.total_seconds() / 3600,
            }
        )

    async def _get_connection(self, request: web.Request) -> web.StreamResponse:
        self.ui._viewer(request)
        response = await self._call(
            self._connections.GetConnection,
            cpb.GetConnectionRequest(id=request.match_info["id"]),
            _peer(request),
        )
        return _json({"connection": await self._with_recent(_connection(response.connection))})

    async def _resume(self, request: web.Request) -> web.StreamResponse:
        session = self._changer(request)
        message = cpb.ResumeConnectionRequest(id=request.match_info["id"])
        await self._operator(request, session, RESUME_METHOD, message)
        response = await self._call(
            self._connections.ResumeConnection,
            message,
            _peer(request),
            audited=(RESUME_METHOD, session),
        )
        log.info("ui_connection_resumed", connection=cut(message.id), token_name=session.name)
        return _json({"connection": await self._with_recent(_connection(response.connection))})

    # -- dead letters ----------------------------------------------------------------

    async def _list_dead_letters(self, request: web.Request) -> web.StreamResponse:
        self.ui._viewer(request)
        params = {key: _param(request, key) for key in request.query}
        size_text = params.get("page_size", "")
        try:
            size = int(size_text) if size_text else 0
        except ValueError:
            raise BadParameter("page_size", f"{cut(size_text)!r} is not a number") from None
        message = dpb.ListDeadLettersRequest(
            filter=_filter(params), page_size=size, page_token=params.get("page_token", "")
        )
        response = await self._call(self._dead_letters.ListDeadLetters, message, _peer(request))
        return _json(_dict(response))

    async def _replay(self, request: web.Request) -> web.StreamResponse:
        # The session and CSRF come first: an anonymous body is never read. A viewer is
        # refused (403) whatever the body holds, as gRPC refuses it.
        session = self._changer(request)
        bad: BadParameter | None = None
        try:
            message = _replay_request(await _json_body(request))
        except BadParameter as exc:
            message, bad = dpb.ReplayDeadLettersRequest(), exc
        await self._operator(request, session, REPLAY_METHOD, message)
        if bad is not None:
            raise bad
        response = await self._call(
            self._dead_letters.ReplayDeadLetters,
            message,
            _peer(request),
            audited=(REPLAY_METHOD, session),
        )
        result = _dict(response)
        result["dryRun"] = message.dry_run
        if not message.dry_run:
            log.info(
                "ui_dead_letters_replayed",
                replayed=response.replayed,
                token_name=session.name,
            )
        return _json(result)


def _peer(request: web.Request) -> str:
    return f"ui:{request.remote or 'unknown'}"


def _param(request: web.Request, key: str) -> str:
    value = request.query.get(key, "")
    if len(value) > MAX_PARAM_LENGTH:
        raise BadParameter(cut(key), f"longer than {MAX_PARAM_LENGTH} characters")
    return value.strip()


def _filter(values: dict[str, Any]) -> dpb.DeadLetterFilter:
    """The ``DeadLetterFilter`` of the page's filter keys (query parameters, or a replay
    body's keys)."""
    f = dpb.DeadLetterFilter()
    for key, field in FILTER_FIELDS.items():
        value = values.get(key, "")
        if not isinstance(value, str):
            raise BadParameter(key, "must be a string")
        value = value.strip()
        if key == "stage" and value and value not in STAGES:
            raise BadParameter(
                "stage", f"{cut(value)!r} is not a stage; use one of {', '.join(STAGES)}"
            )
        setattr(f, field, value)
    for key, target in (("start", f.start_time), ("end", f.end_time)):
        text = values.get(key, "")
        if not isinstance(text, str):
            raise BadParameter(key, "must be a string: an ISO 8601 time")
        if text.strip():
            target.FromDatetime(_parse_time(key, text.strip()))
    return f


async def _json_body(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise BadParameter("body", "send JSON (Content-Type: application/json)")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise BadParameter("body", f"larger than {MAX_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_BODY_BYTES:  # a chunked body states no length
            raise BadParameter("body", f"larger than {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    try:
        body = orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError:
        raise BadParameter("body", "not JSON") from None
    if not isinstance(body, dict):
        raise BadParameter("body", 'a JSON object, e.g. {"ids": [12], "dry_run": true}')
    return body


def _replay_request(body: dict[str, Any]) -> dpb.ReplayDeadLettersRequest:
    ids = body.get("ids", [])
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**63 for i in ids
    ):
        raise BadParameter("ids", "a list of dead-letter ids (positive whole numbers)")
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise BadParameter("dry_run", "true or false")
    mode = body.get("mode")
    if mode is not None and mode not in MODES:
        raise BadParameter("mode", f"{cut(str(mode))!r}: use rerender or stored")
    return dpb.ReplayDeadLettersRequest(
        ids=ids,
        filter=_filter(body),
        # Unset unless given, as a gRPC caller leaves it: the same request, the same audit.
        mode=dpb.REPLAY_MODE_UNSPECIFIED if mode is None else MODES[mode],
        dry_run=dry_run,
    )
