"""The ingest HTTP endpoint: ``POST /v1/events`` takes one Antavo event or
``{"events": [...]}`` and answers only after the records are committed.

Before a body is read, the request must carry the configured credential
(``engine.ingest.auth``), a JSON body (``Content-Type: application/json``, or none) and no
``Content-Encoding``; the body must arrive within ``IngestLimits.body_timeout`` and fit
``max_body_bytes``. Every refusal is a JSON error naming what to fix.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from engine.errors import BacklogFullError, InvalidInputError
from engine.ingest.auth import TOKEN_ENV, IngestAuth, IngestVerifier
from engine.ingest.ingestor import Ingestor
from engine.ingest.limits import echo
from engine.ingest.parse import parse_request
from engine.ingest.settings import IngestSettings
from engine.metrics import TRANSPORT_HTTP, IngestMetrics

log = structlog.get_logger("tidegate.ingest")

INGEST_PATH = "/v1/events"
INGEST_TOKEN_ENV = TOKEN_ENV
"""With a value (and no other ``--ingest-auth``), ingest requires ``Authorization:
Bearer <value>``."""
UNAUTHENTICATED = orjson.dumps(
    {"error": {"code": "unauthenticated", "message": "missing or wrong ingest credential"}}
)


def _error(status: int, code: str, message: str, field: str = "") -> web.Response:
    body: dict[str, object] = {"error": {"code": code, "message": message}}
    if field:
        body["error"]["field"] = field  # type: ignore[index]
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


class ServerLog(logging.Logger):
    """aiohttp's server logger for the ingest port. A request its parser refused (a
    malformed header, a bad method, a broken chunk) was answered 400 by aiohttp: that is
    one warning line with the reason cut to 100 characters, not a traceback. Anything
    else goes to ``aiohttp.server`` with its traceback: it is a bug to fix."""

    def __init__(self) -> None:
        super().__init__("tidegate.ingest.server")
        self._aiohttp = logging.getLogger("aiohttp.server")

    def exception(
        self,
        msg: object,
        *args: object,
        exc_info: Any = True,
        stack_info: bool = False,
        stacklevel: int = 1,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError):
            log.warning(
                "ingest_bad_request",
                peer=str(args[0]) if args else "",
                error=echo(str(exc).replace("\n", " ")),
            )
            return
        self._aiohttp.exception(msg, *args, exc_info=exc_info, extra=extra)

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        self._aiohttp.debug(msg, *args, **kwargs)


def runner_options(settings: IngestSettings) -> dict[str, Any]:
    """Keyword arguments for the ``web.AppRunner`` that serves the ingest app.

    ``keepalive_timeout``: aiohttp closes a connection whose next request's headers are
    not complete this long after it opened or last answered, so one timer bounds idle
    keep-alive connections and slow headers. ``auto_decompress`` off: a compressed body
    reaches the handler as sent, which refuses it with a clear 415 (aiohttp's own
    decoding would fail a plain body labelled gzip with a bare error).
    """
    return {
        "logger": ServerLog(),
        "access_log": None,
        "keepalive_timeout": settings.limits.idle_timeout,
        "auto_decompress": False,
    }


def create_ingest_runner(
    ingestor: Ingestor, settings: IngestSettings, metrics: IngestMetrics | None = None
) -> web.AppRunner:
    """The ingest app in a runner with ``runner_options``; call ``setup`` on it."""
    app = create_ingest_app(ingestor, settings, metrics)
    return web.AppRunner(app, handle_signals=False, **runner_options(settings))


def create_ingest_app(
    ingestor: Ingestor,
    settings: IngestSettings | str | None = None,
    metrics: IngestMetrics | None = None,
) -> web.Application:
    """The aiohttp application. ``settings`` as a string is a bearer token (none when
    empty). Requests are counted in ``metrics`` (a private set when None)."""
    if not isinstance(settings, IngestSettings):
        settings = IngestSettings(IngestAuth.bearer(settings or ""))
    settings.check()
    counted = metrics or IngestMetrics()
    verifier = IngestVerifier(settings.auth)
    limits = settings.limits
    max_body = limits.max_body_bytes
    too_large = f"body over {max_body} bytes (the limit); split it into smaller requests"

    def refuse(status: int, code: str, message: str, field: str = "") -> web.Response:
        counted.refused(TRANSPORT_HTTP, str(status))
        return _error(status, code, message, field)

    def unauthenticated() -> web.Response:
        counted.refused(TRANSPORT_HTTP, "401")
        return web.Response(
            status=401,
            body=UNAUTHENTICATED,
            content_type="application/json",
            headers={"WWW-Authenticate": verifier.challenge},
        )

    async def post_events(request: web.Request) -> web.Response:
        started = time.perf_counter()
        headers = request.headers
        if verifier.configured and not verifier.check(headers.get("Authorization")):
            return unauthenticated()
        encoding = headers.get("Content-Encoding")
        if encoding is not None and encoding.strip().lower() not in ("", "identity"):
            return refuse(
                415,
                "unsupported_encoding",
                f"Content-Encoding {echo(encoding)!r} is not accepted; send the body uncompressed",
            )
        declared = headers.get("Content-Type")
        if (
            declared is not None
            and declared != "application/json"  # as senders write it: no parsing needed
            and request.content_type != "application/json"
        ):
            return refuse(
                415,
                "unsupported_media_type",
                f"Content-Type {echo(request.content_type)!r} is not accepted; send the"
                " events as application/json",
            )
        if request.content_length is not None and request.content_length > max_body:
            return refuse(413, "too_large", too_large)
        try:
            if request.content.is_eof():  # all of it arrived with the headers: no wait
                raw = await request.read()
            else:
                async with asyncio.timeout(limits.body_timeout):
                    raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return refuse(413, "too_large", too_large)
        except TimeoutError:
            response = refuse(
                408,
                "body_timeout",
                f"the body did not arrive within {limits.body_timeout:g} seconds (the limit)",
            )
            response.force_close()
            return response
        except ConnectionError as exc:  # the client went away mid-body: nobody to answer
            log.warning(
                "ingest_upload_aborted",
                peer=request.remote,
                expected_bytes=request.content_length,
                error=type(exc).__name__,
            )
            return refuse(400, "upload_aborted", "the connection closed before the body ended")
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return refuse(400, "invalid_json", f"body is not valid JSON: {echo(str(exc))}")
        try:
            events = parse_request(payload, limits)
        except InvalidInputError as exc:
            return refuse(400, "invalid_event", str(exc), exc.field)
        try:
            result = await ingestor.ingest(events)
        except BacklogFullError as exc:
            response = refuse(503, "backlog_full", str(exc))
            response.headers["Retry-After"] = str(exc.retry_after)
            return response
        counted.acknowledged(
            TRANSPORT_HTTP,
            result.accepted,
            result.duplicates,
            result.deliveries_queued,
            time.perf_counter() - started,
        )
        return web.Response(
            status=202,
            body=orjson.dumps(
                {
                    "accepted": result.accepted,
                    "duplicates": result.duplicates,
                    "deliveries_queued": result.deliveries_queued,
                }
            ),
            content_type="application/json",
        )

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=max_body)
    app.router.add_post(INGEST_PATH, post_events)
    app.router.add_get("/healthz", health)
    return app
