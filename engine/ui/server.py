"""The outbound-log page, served by the engine process on a port of its own
(``tidegate serve --ui-port``, default 8081), on the same host and TLS files as the
other ports.

- ``GET /`` and ``GET /ui/`` serve ``index.html``; ``GET /ui/static/*`` its ES modules
  and stylesheet, from the package (nothing is downloaded, nothing built).
- ``POST /ui/session`` exchanges a token (``{"token": ...}``, any role: viewer or higher)
  for a session cookie: a random id held in this process's memory, ``HttpOnly``,
  ``SameSite=Strict``, ``Secure`` when served over TLS, expiring after ``SESSION_SECONDS``.
  The answer carries the session's CSRF token, which every later POST sends back in the
  ``X-CSRF-Token`` header. ``GET /ui/session`` says who is logged in (and the CSRF token,
  for a reloaded page); ``POST /ui/logout`` ends the session. The session re-checks its
  token on each request, so a revoked or expired token ends it.
- ``GET /ui/api/logs``, ``GET /ui/api/logs/{id}``, ``GET /ui/api/logs/stream`` (SSE): the
  outbound log through the same ``LogStore`` calls, filter checks, page tokens and JSON
  field names as ``ListLogs``/``GetLog``/``StreamLogs``. A bad filter is a JSON 400 naming
  the query parameter.
- ``GET /ui/api/customers/{id}/ledger`` and ``GET /ui/api/stats``: the customer view and
  the charts (``engine.ui.insight``).

Every answer carries ``Content-Security-Policy: default-src 'self'`` (no inline script or
style) and ``X-Content-Type-Options: nosniff``; the page renders bodies with
``textContent`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib import resources
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from aiohttp import web
from google.protobuf import json_format

from engine.admin.auth import TokenChecker
from engine.admin.logs import PAGES, entry_pb, query_from_pb
from engine.admin.paging import DEFAULT_PAGE_SIZE, page_size
from engine.errors import InvalidInputError, TidegateError
from engine.outbound_log.rows import ID_TIME_SLACK, LogQuery, LogRow, from_micros
from engine.outbound_log.store import LogStore
from engine.pb import logs_pb2 as pb

if TYPE_CHECKING:
    from engine.ui.operate import OperateViews

log = structlog.get_logger("tidegate.ui")

DEFAULT_UI_PORT = 8081
SESSION_COOKIE = "tidegate_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_SECONDS = 12 * 3600.0
"""A session ends this long after its login."""
MAX_SESSIONS = 10_000
KEEPALIVE_SECONDS = 15.0
RECHECK_SECONDS = 1.0
"""How often a live stream checks that its session (and the session's token) still holds."""
ENDED = "the session ended (logged out, or its token was revoked or expired): log in again"
REPLAY_LIMIT = 1000
"""At most this many rows logged while a stream was down are replayed on its reconnect
(the newest; the page keeps no more rows than that)."""
MAX_TOKEN_LENGTH = 200
MAX_PARAM_LENGTH = 1000
ECHO_LIMIT = 100
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self';"
    " object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
STATIC_TYPES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "app.css": "text/css",
    "operate.js": "text/javascript",
    "insight.js": "text/javascript",
}
_STATUS_RE = re.compile(r"([1-5])xx|[0-9]{1,3}")


def cut(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` as an error message may echo it: at most ``limit`` characters."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


@dataclass
class Session:
    token: str
    name: str
    role: str
    csrf: str
    expires: float


class Refusal(Exception):
    """An answer other than success: ``status`` and a message for the JSON body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BadParameter(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _bad(field: str, message: str) -> web.Response:
    return _json({"error": f"{field}: {message}", "field": field}, status=400)


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(value), status=status, content_type="application/json")


def _parse_time(field: str, text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise BadParameter(
            field, f"{cut(text)!r} is not a time; use ISO 8601, e.g. 2026-12-06T18:00:00Z"
        ) from None
    if value.utcoffset() is None:
        raise BadParameter(field, "needs a time zone, e.g. 2026-12-06T18:00:00Z or +01:00")
    return value.astimezone(UTC)


json_response = _json
parse_time = _parse_time


def parse_status(text: str) -> list[int]:
    """``status``: codes and classes separated by commas, e.g. ``4xx,503,0``."""
    codes: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        match = _STATUS_RE.fullmatch(part.lower())
        if match is None:
            raise BadParameter(
                "status",
                f"{cut(part)!r} is neither an HTTP status (0-599) nor a class such as 4xx",
            )
        if match.group(1):
            base = int(match.group(1)) * 100
            codes.extend(range(base, base + 100))
        else:
            code = int(part)
            if code > 599:
                raise BadParameter("status", f"{code} is not an HTTP status (0-599)")
            codes.append(code)
    return sorted(set(codes))


FILTER_PARAMS = (
    "customer_id", "identifier", "error", "status", "connection", "start", "end", "tag",
)  # fmt: skip


def page_size_param(params: Any) -> int:
    """``page_size`` (default ``DEFAULT_PAGE_SIZE``), checked as the List RPCs check it."""
    size_text = params.get("page_size", "")
    try:
        return page_size(int(size_text)) if size_text else DEFAULT_PAGE_SIZE
    except ValueError:
        raise BadParameter("page_size", f"{cut(size_text)!r} is not a number") from None
    except InvalidInputError as exc:
        raise BadParameter("page_size", exc.message) from None


def filter_from_params(params: Any) -> pb.LogFilter:
    """The ``LogFilter`` a request's query parameters describe (``BadParameter`` names
    the parameter when one is wrong)."""
    for key in params:
        if len(params[key]) > MAX_PARAM_LENGTH:
            raise BadParameter(cut(key), f"longer than {MAX_PARAM_LENGTH} characters")
    f = pb.LogFilter(
        identifier=params.get("identifier", "").strip(),
        customer_id=params.get("customer_id", "").strip(),
        error_contains=params.get("error", "").strip(),
        connection_id=params.get("connection", "").strip(),
        errors_only=params.get("errors_only", "") in ("1", "true"),
    )
    f.status_codes.extend(parse_status(params.get("status", "")))
    f.tags.extend(t for t in (p.strip() for p in params.get("tag", "").split(",")) if t)
    for field, target in (("start", f.start_time), ("end", f.end_time)):
        text = params.get(field, "").strip()
        if text:
            target.FromDatetime(_parse_time(field, text))
    return f


def query_from_params(params: Any) -> LogQuery:
    f = filter_from_params(params)
    try:
        return query_from_pb(f)
    except InvalidInputError as exc:
        names = {"filter.end_time": "end", "filter.start_time": "start"}
        prefixes = {"filter.status": "status", "filter.tags": "tag"}
        field = names.get(exc.field) or next(
            (v for k, v in prefixes.items() if exc.field.startswith(k)), ""
        )
        raise BadParameter(field or exc.field, exc.message) from None


def entry_json(row: LogRow) -> dict[str, Any]:
    """A log entry as the proto's JSON mapping (camelCase names), every field present."""
    return json_format.MessageToDict(entry_pb(row), always_print_fields_with_no_presence=True)


def _event(rows: list[LogRow]) -> bytes:
    """One SSE ``logs`` event: its id is the last row's, which a reconnect sends back."""
    data = orjson.dumps({"logs": [entry_json(r) for r in rows]})
    return b"event: logs\nid: %s\ndata: %s\n\n" % (rows[-1].id.encode(), data)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class UiServer:
    """The page and its endpoints on ``host:port``; ``start`` returns the bound port."""

    def __init__(
        self,
        host: str,
        port: int,
        logs: LogStore,
        checker: TokenChecker,
        tls: ssl.SSLContext | None = None,
        keepalive: float = KEEPALIVE_SECONDS,
        session_seconds: float = SESSION_SECONDS,
        operate: OperateViews | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._logs = logs
        self._checker = checker
        self._tls = tls
        self._keepalive = keepalive
        self._session_seconds = session_seconds
        self._sessions: dict[str, Session] = {}
        self._closing = asyncio.Event()
        self._streams: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._operate = operate  # the connections and dead-letter views (engine.ui.operate)

    async def start(self) -> int:
        app = web.Application(middlewares=[self._headers], client_max_size=64 * 1024)
        app.router.add_get("/", self._index)
        app.router.add_get("/ui/", self._index)
        app.router.add_get("/ui/static/{name}", self._static)
        app.router.add_post("/ui/session", self._login)
        app.router.add_get("/ui/session", self._whoami)
        app.router.add_post("/ui/logout", self._logout)
        app.router.add_get("/ui/api/logs", self._list)
        app.router.add_get("/ui/api/logs/stream", self._stream)
        app.router.add_get("/ui/api/logs/{id}", self._get)
        if self._operate is not None:
            self._operate.register(app, self)
        from engine.ui.insight import InsightViews  # it imports this module

        InsightViews(self._logs, self._viewer).routes(app)
        app.on_shutdown.append(self._on_shutdown)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port, ssl_context=self._tls).start()
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._sessions.clear()

    async def _on_shutdown(self, app: web.Application) -> None:
        # Open streams would otherwise hold the graceful shutdown (they wait on rows).
        self._closing.set()

    # -- plumbing --------------------------------------------------------------------

    @web.middleware
    async def _headers(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # the router's 404 and 405
            response = _json({"error": exc.reason}, status=exc.status)
        except Refusal as exc:
            response = _json({"error": exc.message}, status=exc.status)
        except BadParameter as exc:
            response = _bad(exc.field, exc.message)
        except Exception:
            log.exception("ui_request_failed", path=cut(request.path))
            response = _json({"error": "internal error; the engine's log has the details"}, 500)
        if not response.prepared:
            self._secure(response)
        return response

    def _secure(self, response: web.StreamResponse) -> None:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers.setdefault("Cache-Control", "no-store")

    def _session(self, request: web.Request) -> Session | None:
        return self._session_of(request.cookies.get(SESSION_COOKIE, ""))

    def _session_of(self, sid: str) -> Session | None:
        """The live session ``sid`` names: None once it expired, was logged out, or its
        token was revoked or expired (checked at each call)."""
        session = self._sessions.get(sid) if sid else None
        if session is None:
            return None
        if session.expires <= time.time() or self._checker.check(session.token) is None:
            self._sessions.pop(sid, None)
            return None
        return session

    def _viewer(self, request: web.Request) -> Session:
        session = self._session(request)
        if session is None:
            raise Refusal(401, "not logged in: POST /ui/session with a token, or open the page")
        return session

    def _csrf(self, request: web.Request, session: Session) -> None:
        sent = request.headers.get(CSRF_HEADER, "")
        if not secrets.compare_digest(sent.encode(), session.csrf.encode()):
            raise Refusal(403, f"missing or wrong {CSRF_HEADER} header: reload the page")

    # -- the page --------------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return self._asset("index.html")

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in STATIC_TYPES or name == "index.html":
            raise Refusal(404, "no such file")
        return self._asset(name)

    def _asset(self, name: str) -> web.Response:
        body = resources.files("engine.ui").joinpath("static", name).read_bytes()
        response = web.Response(body=body, content_type=STATIC_TYPES[name], charset="utf-8")
        response.headers["Cache-Control"] = "no-cache"
        return response

    # -- sessions --------------------------------------------------------------------

    async def _login(self, request: web.Request) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is not None and origin.split("://", 1)[-1] != request.host:
            raise Refusal(403, "login from another origin is refused")
        if request.content_type != "application/json":
            raise BadParameter("body", 'send JSON: {"token": "<token>"}')
        try:
            body = await request.json(loads=orjson.loads)
        except ValueError:
            raise BadParameter("body", 'not JSON; send {"token": "<token>"}') from None
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token.strip():
            raise BadParameter("token", "required: a token from `tidegate token create`")
        token = token.strip()
        principal = None if len(token) > MAX_TOKEN_LENGTH else self._checker.check(token)
        if principal is None:
            log.warning("ui_login_denied", peer=request.remote)
            raise Refusal(
                401,
                "that token is not valid (wrong, revoked or expired): use one from"
                " `tidegate token create` or <data-dir>/admin-token",
            )
        now = time.time()
        if len(self._sessions) >= MAX_SESSIONS:
            for sid in [s for s, v in self._sessions.items() if v.expires <= now]:
                del self._sessions[sid]
            if len(self._sessions) >= MAX_SESSIONS:  # the oldest goes
                del self._sessions[next(iter(self._sessions))]
        sid = secrets.token_urlsafe(32)
        session = Session(
            token=token,
            name=principal.name,
            role=principal.role.label,
            csrf=secrets.token_urlsafe(32),
            expires=now + self._session_seconds,
        )
        self._sessions[sid] = session
        log.info("ui_login", token_name=cut(principal.name), peer=request.remote)
        response = _json(self._describe(session))
        response.set_cookie(
            SESSION_COOKIE,
            sid,
            max_age=int(self._session_seconds),
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self._tls is not None,
        )
        return response

    def _describe(self, session: Session) -> dict[str, Any]:
        return {
            "name": session.name,
            "role": session.role,
            "csrfToken": session.csrf,
            "expires": datetime.fromtimestamp(session.expires, UTC).isoformat(),
        }

    async def _whoami(self, request: web.Request) -> web.StreamResponse:
        return _json(self._describe(self._viewer(request)))

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        session = self._viewer(request)
        self._csrf(request, session)
        self._sessions.pop(request.cookies.get(SESSION_COOKIE, ""), None)
        response = _json({"loggedOut": True})
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    # -- the log ---------------------------------------------------------------------

    async def _list(self, request: web.Request) -> web.StreamResponse:
        self._viewer(request)
        params = request.query
        query = query_from_params(params)
        size = page_size_param(params)
        try:
            after = PAGES.cursor(params.get("page_token", ""))
        except InvalidInputError as exc:
            raise BadParameter("page_token", exc.message) from None
        rows, last = await self._logs.page(query, size, after)
        return _json({"logs": [entry_json(r) for r in rows], "nextPageToken": PAGES.token(last)})

    async def _get(self, request: web.Request) -> web.StreamResponse:
        self._viewer(request)
        request_id = request.match_info["id"]
        row = await self._logs.get(request_id)
        if row is None:
            return _json({"error": f"no log entry with id {cut(request_id)!r}"}, status=404)
        return _json({"log": entry_json(row)})

    async def _missed(self, query: LogQuery, last_id: str) -> list[LogRow]:
        """The rows matching ``query`` logged after ``last_id`` (the ``Last-Event-ID`` a
        reconnecting browser sends, or ``?after=``), oldest first: what the stream missed
        while it was down. Nothing for a missing or malformed id."""
        try:
            parsed = uuid.UUID(last_id)
        except ValueError:
            return []
        if parsed.version != 7 or str(parsed) != last_id:
            return []
        # A row's time lies within ID_TIME_SLACK of its id's: rows with later ids are
        # no older than this.
        since = from_micros((parsed.int >> 80) * 1000) - ID_TIME_SLACK
        start = since if query.start_time is None else max(since, query.start_time)
        bounded = replace(query, start_time=start)
        found: list[LogRow] = []
        after = None
        while len(found) < REPLAY_LIMIT:
            rows, after = await self._logs.page(bounded, 200, after)
            found.extend(r for r in rows if r.id > last_id)
            if after is None:
                break
        found.sort(key=lambda r: (r.time, r.id))
        return found[-REPLAY_LIMIT:]

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        session = self._viewer(request)
        sid = request.cookies.get(SESSION_COOKIE, "")
        query = query_from_params(request.query)
        try:
            subscription = self._logs.subscribe(query)
        except TidegateError as exc:
            return _json({"error": str(exc)}, status=503)
        try:
            last_id = request.headers.get("Last-Event-ID") or request.query.get("after", "")
            missed = await self._missed(query, last_id)
        except BaseException:
            subscription.close()
            raise
        replayed = {r.id for r in missed}
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        response.headers["Cache-Control"] = "no-cache"
        self._secure(response)
        next_rows: asyncio.Task[list[LogRow]] | None = None
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await response.prepare(request)
            await response.write(b"retry: 1000\n: connected\n\n")
            if missed:
                await response.write(_event(missed))
            wrote = time.monotonic()
            while not self._closing.is_set():
                if next_rows is None:
                    next_rows = asyncio.ensure_future(anext(subscription))
                done, _ = await asyncio.wait(
                    {next_rows, closing},
                    timeout=min(self._keepalive, RECHECK_SECONDS),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if closing in done:
                    break
                transport = request.transport
                if transport is None or transport.is_closing():  # the browser went away
                    break
                if self._session_of(sid) is not session:  # logged out, revoked or expired
                    await response.write(b"event: ended\ndata: " + orjson.dumps(ENDED) + b"\n\n")
                    break
                if next_rows not in done:
                    if time.monotonic() - wrote >= self._keepalive:
                        await response.write(b": keepalive\n\n")
                        wrote = time.monotonic()
                    continue
                task, next_rows = next_rows, None
                try:
                    rows = task.result()
                except StopAsyncIteration:
                    break  # the store closed
                except TidegateError as exc:  # fell behind: the browser reconnects
                    await response.write(b"event: error\ndata: " + orjson.dumps(str(exc)) + b"\n\n")
                    break
                if replayed:  # committed between the subscription and the replay's read
                    rows = [r for r in rows if r.id not in replayed]
                if rows:
                    await response.write(_event(rows))
                    wrote = time.monotonic()
        except ConnectionResetError:
            return response  # the browser went away
        finally:
            subscription.close()
            closing.cancel()
            if next_rows is not None:
                next_rows.cancel()
                with contextlib.suppress(BaseException):
                    await next_rows
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response
