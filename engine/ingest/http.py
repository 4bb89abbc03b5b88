"""The ingest HTTP endpoint: ``POST /v1/events`` takes one Antavo event or
``{"events": [...]}`` and answers only after the records are committed."""

from __future__ import annotations

import hmac
import time

import orjson
from aiohttp import web

from engine.errors import BacklogFullError, InvalidInputError
from engine.ingest.ingestor import Ingestor
from engine.ingest.parse import parse_request
from engine.metrics import TRANSPORT_HTTP, IngestMetrics

MAX_BODY_BYTES = 10 * 1024 * 1024
INGEST_PATH = "/v1/events"
INGEST_TOKEN_ENV = "TIDEGATE_INGEST_TOKEN"
"""With a value, ingest requires ``Authorization: Bearer <value>``."""


def _error(status: int, code: str, message: str, field: str = "") -> web.Response:
    body: dict[str, object] = {"error": {"code": code, "message": message}}
    if field:
        body["error"]["field"] = field  # type: ignore[index]
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def create_ingest_app(
    ingestor: Ingestor, token: str = "", metrics: IngestMetrics | None = None
) -> web.Application:
    """The aiohttp application. With ``token`` set, requests need ``Authorization: Bearer``.
    Requests are counted in ``metrics`` (a private set when None)."""
    counted = metrics or IngestMetrics()

    def refuse(status: int, code: str, message: str, field: str = "") -> web.Response:
        counted.refused(TRANSPORT_HTTP, str(status))
        return _error(status, code, message, field)

    async def post_events(request: web.Request) -> web.Response:
        started = time.perf_counter()
        if token:
            supplied = request.headers.get("Authorization", "")
            if not hmac.compare_digest(supplied.encode(), f"Bearer {token}".encode()):
                return refuse(401, "unauthenticated", "missing or wrong bearer token")
        if request.content_type not in ("application/json", ""):
            return refuse(415, "unsupported_media_type", "send the events as application/json")
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return refuse(413, "too_large", f"body over {MAX_BODY_BYTES} bytes; split it")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return refuse(413, "too_large", f"body over {MAX_BODY_BYTES} bytes; split it")
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return refuse(400, "invalid_json", f"body is not valid JSON: {exc}")
        try:
            events = parse_request(payload)
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

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post(INGEST_PATH, post_events)
    app.router.add_get("/healthz", health)
    return app
