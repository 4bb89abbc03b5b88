"""A bench-only stand-in for Insider's upsert endpoint and Braze's ``/users/track``:
``python -m bench.sink --port 0``.

The Insider sandbox (``tidegate sandbox``) keeps every request body in memory, looks
users up with a linear scan and rate-limits at 25,000 requests a minute: right for tests,
wrong for a throughput run. This sink does only what a fast destination must do: it
checks the two auth headers, parses and shape-checks the JSON body (a non-empty
``users`` array of at most 1,000 objects with ``identifiers``), and answers Insider's
success body. It keeps counters, and for events that carry a custom ``bench_id``
parameter it records the arrival time (``time.monotonic()``, which on Linux is one clock
for every process) and the number of the request that carried it.

Braze mode (``POST /users/track``): it checks ``Authorization: Bearer sandbox-key``, the
body's shape and Braze's 75 objects per request, counts every event and purchase object
as an event and every distinct identifier as a user, and answers 201 with Braze's
success body, as Braze does.

Read-back: ``GET /bench/stats``, ``GET /bench/arrivals``, ``POST /bench/reset``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import orjson
from aiohttp import web

UPSERT_PATH = "/api/user/v1/upsert"
TRACK_PATH = "/users/track"
MAX_BRAZE_OBJECTS = 75
PARTNER_NAME = "tidegate"
API_KEY = "sandbox-key"
MAX_USERS = 1000


class SinkState:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.users = 0
        self.events = 0
        self.bytes = 0
        self.rejected = 0
        self.first_time: float | None = None
        self.last_time: float | None = None
        # bench_id -> (arrival time, request number)
        self.arrivals: dict[str, tuple[float, int]] = {}

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "users": self.users,
            "events": self.events,
            "bytes": self.bytes,
            "rejected": self.rejected,
            "first_time": self.first_time,
            "last_time": self.last_time,
        }


STATE_KEY = web.AppKey("state", SinkState)


def _reject(state: SinkState, status: int, message: str) -> web.Response:
    state.rejected += 1
    return web.Response(
        status=status, body=orjson.dumps({"error": message}), content_type="application/json"
    )


async def upsert(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    headers = request.headers
    if headers.get("X-PARTNER-NAME") != PARTNER_NAME or headers.get("X-REQUEST-TOKEN") != API_KEY:
        return _reject(state, 403, "Access Denied.")
    raw = await request.read()
    now = time.monotonic()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _reject(state, 400, "Request data is not in valid JSON format.")
    users = body.get("users") if isinstance(body, dict) else None
    if not isinstance(users, list) or not users or len(users) > MAX_USERS:
        return _reject(state, 400, "users must be defined: bad request")
    events = 0
    state.requests += 1
    number = state.requests
    for user in users:
        if not isinstance(user, dict) or not isinstance(user.get("identifiers"), dict):
            state.requests -= 1
            return _reject(state, 400, "users.*.identifiers must be an object")
        for event in user.get("events") or ():
            events += 1
            bench_id = ((event.get("event_params") or {}).get("custom") or {}).get("bench_id")
            if bench_id is not None:
                state.arrivals[str(bench_id)] = (now, number)
    state.users += len(users)
    state.events += events
    state.bytes += len(raw)
    if state.first_time is None:
        state.first_time = now
    state.last_time = now
    answer = {"data": {"successful": {"count": len(users)}, "fail": {}}}
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


async def track(request: web.Request) -> web.Response:
    """Braze's ``/users/track``: 201 with ``message: success`` and the processed counts."""
    state = request.app[STATE_KEY]
    if request.headers.get("Authorization") != f"Bearer {API_KEY}":
        return _reject(state, 401, "Invalid API Key")
    raw = await request.read()
    now = time.monotonic()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _reject(state, 400, "Invalid JSON")
    if not isinstance(body, dict):
        return _reject(state, 400, "Invalid body")
    arrays = [body.get(name) or [] for name in ("attributes", "events", "purchases")]
    if not all(isinstance(a, list) for a in arrays) or not any(arrays):
        return _reject(state, 400, "Valid data must be provided")
    if sum(len(a) for a in arrays) > MAX_BRAZE_OBJECTS:
        return _reject(state, 400, "Max Input Length Exceeded")
    state.requests += 1
    number = state.requests
    users: set[str] = set()
    answer: dict[str, Any] = {"message": "success"}
    for name, objects in zip(("attributes", "events", "purchases"), arrays, strict=True):
        for obj in objects:
            if not isinstance(obj, dict):
                state.requests -= 1
                return _reject(state, 400, f"{name} must hold objects")
            users.add(str(obj.get("external_id") or obj.get("user_alias")))
            if name != "attributes":
                state.events += 1
                bench_id = (obj.get("properties") or {}).get("bench_id")
                if bench_id is not None:
                    state.arrivals[str(bench_id)] = (now, number)
        if objects:
            answer[f"{name}_processed"] = len(objects)
    state.users += len(users)
    state.bytes += len(raw)
    if state.first_time is None:
        state.first_time = now
    state.last_time = now
    return web.Response(status=201, body=orjson.dumps(answer), content_type="application/json")


async def stats(request: web.Request) -> web.Response:
    return web.Response(
        body=orjson.dumps(request.app[STATE_KEY].stats()), content_type="application/json"
    )


async def arrivals(request: web.Request) -> web.Response:
    return web.Response(
        body=orjson.dumps(request.app[STATE_KEY].arrivals), content_type="application/json"
    )


async def reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset()
    return web.Response(body=b"{}", content_type="application/json")


def create_app() -> web.Application:
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[STATE_KEY] = SinkState()
    app.router.add_post(UPSERT_PATH, upsert)
    app.router.add_post(TRACK_PATH, track)
    app.router.add_get("/bench/stats", stats)
    app.router.add_get("/bench/arrivals", arrivals)
    app.router.add_post("/bench/reset", reset)
    return app


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(create_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    print(f"sink listening on http://{host}:{runner.addresses[0][1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
