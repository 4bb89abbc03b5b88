"""Insider sandbox: an in-process stand-in for Insider One's Unified Customer Database API.

Emulates, on one host, the endpoints Tidegate calls
(reference: /work/shared/reference/insider-ucd-api.md):

* ``POST /api/user/v1/upsert``: auth, request-level 400s, per-user validation answered
  as HTTP 200 with the ``data.successful`` / ``data.fail`` summary, and storage with
  Insider's merge semantics (scalar overwrite, array append unless ``not_append`` or
  ``append: false``, events appended, identifiers immutable).
* ``POST /api/user/v1/attribute/delete`` (whole and partial deletes, default and custom).
* ``PATCH /api/user/v1/identity`` (identifier update).
* A per-partner token bucket (429), and fault injection and read-back under ``/sandbox/``
  so tests in other processes can drive it over HTTP.

Behaviours that are inferences, not documented Insider facts:

* Wrong Content-Type, invalid JSON and oversize bodies get the Insider-wide 400 bodies
  (documented for other Insider APIs only); an oversize body is a 400, never a 413.
* More than ``max_users`` users is a 400 ``users must be at most 1000: bad request``.
  An empty ``users`` array counts as missing.
* The stricter choice everywhere: a user with any failing check (even one bad event) is
  not stored at all and counts once in ``fail.count``; event names with an upper-case
  letter fail although the documented regex allows them; empty ``attributes`` (or one
  holding only an empty ``custom``) fail; a user with neither attributes nor events fails.
* Error keys not in reference §5.2 (event timestamp, attribute email/phone/birthday,
  shape errors, unknown ``insider_id``) follow Insider's ``users.N.<path>.*.<rule>`` form.
* ``null`` attribute values are ignored (they do not clear, §3.5); appending to an array
  keeps duplicates; a user matching several profiles updates the oldest one.
* The rate limit is keyed by partner; ``Retry-After`` is sent only when configured.
  Identity updates have their own bucket (2,000/min, §1.2). Checks run in this order:
  auth, rate limit, Content-Type, size, JSON, shape.
* ``/attribute/delete`` for an unknown user, and an identity update whose old identifier
  has no user, fail (per-user fail and 404 respectively).
* A top-level ``not_append`` (Segment Audiences) is ignored unless
  ``SandboxConfig.top_level_not_append`` is set.
* Default attributes and event parameters of the wrong type (e.g. ``"age": "34"``,
  ``"gender": "female"``, ``"country": "Hungary"``) fail the user unless ``strict_types``
  is turned off; ``quantity`` is required on ``purchase`` only with
  ``require_purchase_quantity``; identical events (same name, timestamp and parameters)
  are all stored unless ``collapse_identical_events`` is set. All three are UNCONFIRMED
  behaviours of Insider and can be changed at run time through ``POST /sandbox/config``.

Sandbox-only behaviour: queued faults are served before any check (they stand for the
edge or an outage, not the application), and ``latency_ms`` delays /api answers only, so
the control endpoints stay fast.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from plugins.insider.sandbox.rules import (
    ErrorMap,
    Strictness,
    format_value,
    identifier_pairs,
    identifier_value_error,
    identity_side,
    validate_delete_user,
    validate_upsert_user,
)

ACCESS_DENIED = {
    "success": False,
    "message": "Access Denied. You do not have sufficient access to perform this action.",
}
TOO_MANY_REQUESTS = {"error": "rejected: too many requests"}
UNKNOWN_ERROR = {
    "success": False,
    "message": "The request processing has failed because of an unknown error.",
}
TOKEN_AUTH_FAILED = {"success": False, "message": "Partner token authentication failed."}
INVALID_JSON = {"success": False, "message": "Request data is not in valid JSON format."}
NO_SUCH_USER = {"error": "no such user for these identifiers: no data"}

# 502/503/504 come from Cloudflare/Envoy with no documented body, so they stay empty.
FAULT_BODIES: Mapping[int, Mapping[str, Any]] = {
    401: TOKEN_AUTH_FAILED,
    403: ACCESS_DENIED,
    429: TOO_MANY_REQUESTS,
    500: UNKNOWN_ERROR,
}

UPSERT_PATH = "/api/user/v1/upsert"
ATTRIBUTE_DELETE_PATH = "/api/user/v1/attribute/delete"
IDENTITY_PATH = "/api/user/v1/identity"


@dataclass
class SandboxConfig:
    partner_name: str = "tidegate"  # expected X-PARTNER-NAME (must be lowercase)
    api_key: str = "sandbox-key"  # expected X-REQUEST-TOKEN
    max_users: int = 1000
    max_body_bytes: int = 5_000_000
    rate_limit_per_minute: int = 25_000  # per partner, upsert + attribute/delete; 0 disables
    latency_ms: float = 0.0  # added before every /api answer
    rate_limit_retry_after: str | None = None  # Retry-After sent with a rate-limit 429
    identity_rate_limit_per_minute: int = 2_000  # PATCH /identity; 0 disables
    top_level_not_append: bool = False  # honour a top-level not_append (UNCONFIRMED)
    strict_types: bool = True  # reject default attributes/params of the wrong type
    require_purchase_quantity: bool = False  # quantity required on purchase (UNCONFIRMED)
    collapse_identical_events: bool = False  # store an identical event once (UNCONFIRMED)

    def __post_init__(self) -> None:
        if not self.partner_name or self.partner_name != self.partner_name.lower():
            raise ValueError("partner_name must be non-empty and lowercase")
        for name in ("max_users", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("rate_limit_per_minute", "identity_rate_limit_per_minute", "latency_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


# Field types accepted by POST /sandbox/config; bool is excluded from the numeric ones.
_CONFIG_TYPES: Mapping[str, tuple[type[Any], ...]] = {
    "partner_name": (str,),
    "api_key": (str,),
    "max_users": (int,),
    "max_body_bytes": (int,),
    "rate_limit_per_minute": (int,),
    "latency_ms": (int, float),
    "rate_limit_retry_after": (str, type(None)),
    "identity_rate_limit_per_minute": (int,),
    "top_level_not_append": (bool,),
    "strict_types": (bool,),
    "require_purchase_quantity": (bool,),
    "collapse_identical_events": (bool,),
}


@dataclass
class Fault:
    """A queued answer for the next ``remaining`` upsert/attribute-delete requests.

    ``status`` 0 drops the connection without answering. With ``apply`` the request is
    processed (and stored) first, which is how a lost response duplicates events.
    """

    status: int
    remaining: int = 1
    retry_after: str | None = None
    body: Any = None
    latency_ms: float = 0.0
    apply: bool = False

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class StoredUser:
    insider_id: str
    identifiers: dict[str, Any]
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TokenBucket:
    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.tokens = self.capacity
        self.refill_per_second = per_minute / 60.0
        self.updated = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        elapsed = now - self.updated
        self.tokens = min(self.capacity, self.tokens + elapsed * self.refill_per_second)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class Reply:
    status: int
    body: Any = None  # JSON-able; None means an empty body
    headers: dict[str, str] = field(default_factory=dict)


def _json_reply(status: int, body: Any, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, body, headers or {})


def _summary(successful: int, failed: int, errors: ErrorMap) -> Reply:
    # §5.1: an empty object, not a zero count, when nothing succeeded or failed.
    return _json_reply(
        200,
        {
            "data": {
                "successful": {"count": successful} if successful else {},
                "fail": {"count": failed, "errors": errors} if failed else {},
            }
        },
    )


def _bad_request(message: str) -> Reply:
    return _json_reply(400, {"error": message})


def _merge(target: dict[str, Any], source: Mapping[str, Any], append: bool) -> None:
    for key, value in source.items():
        if value is None:
            continue
        current = target.get(key)
        if append and isinstance(value, list) and isinstance(current, list):
            target[key] = current + value
        else:
            target[key] = value


class Sandbox:
    """State of one sandbox: profiles, the request log, queued faults and rate buckets."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config
        self.users: list[StoredUser] = []
        self.requests: list[dict[str, Any]] = []
        self.faults: deque[Fault] = deque()
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._ids = itertools.count(1)

    def reset(self) -> None:
        self.users.clear()
        self.requests.clear()
        self.faults.clear()
        self._buckets.clear()

    def reconfigure(self, changes: Mapping[str, Any]) -> None:
        self.config = dataclasses.replace(self.config, **changes)
        self._buckets.clear()

    def next_fault(self) -> Fault | None:
        if not self.faults:
            return None
        fault = self.faults[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            self.faults.popleft()
        return fault

    def take_token(self, partner: str, group: str, per_minute: int) -> bool:
        if per_minute <= 0:
            return True
        bucket = self._buckets.get((partner, group))
        if bucket is None:
            bucket = self._buckets[(partner, group)] = TokenBucket(per_minute)
        return bucket.take()

    def find(self, identifiers: Mapping[str, Any]) -> StoredUser | None:
        wanted = identifier_pairs(identifiers)
        for user in self.users:
            if wanted & identifier_pairs(user.identifiers):
                return user
        return None

    def find_by_insider_id(self, insider_id: object) -> StoredUser | None:
        return next((user for user in self.users if user.insider_id == insider_id), None)

    def lookup(self, key: str, value: str) -> StoredUser | None:
        if key == "insider_id":
            return self.find_by_insider_id(value)
        if key.startswith("custom."):
            return self.find({"custom": {key.removeprefix("custom."): value}})
        return self.find({key: value})

    def target_of(self, user: Mapping[str, Any]) -> StoredUser | None:
        found = self.find_by_insider_id(user.get("insider_id"))
        if found is None and user.get("identifiers"):
            found = self.find(user["identifiers"])
        return found

    def upsert(self, user: Mapping[str, Any], skip_hook: bool, default_append: bool) -> None:
        identifiers: Mapping[str, Any] = user.get("identifiers") or {}
        profile = self.target_of(user)
        if profile is None:
            profile = StoredUser(f"sandbox-{next(self._ids)}", {})
            self.users.append(profile)
        # Upsert may add identifier keys but never changes an existing value (§3.3).
        for key, value in identifiers.items():
            if key == "custom":
                custom = profile.identifiers.setdefault("custom", {})
                for name, custom_value in value.items():
                    custom.setdefault(name, custom_value)
            else:
                profile.identifiers.setdefault(key, value)
        append = default_append
        if user.get("not_append") is True:
            append = False
        if isinstance(user.get("append"), bool):
            append = user["append"]  # §3.2: append wins over not_append
        attributes: Mapping[str, Any] = user.get("attributes") or {}
        _merge(profile.attributes, {k: v for k, v in attributes.items() if k != "custom"}, append)
        if attributes.get("custom"):
            _merge(profile.attributes.setdefault("custom", {}), attributes["custom"], append)
        for event in user.get("events") or ():
            if self.config.collapse_identical_events and any(
                _same_event(event, stored) for stored in profile.events
            ):
                continue
            profile.events.append({**event, "skip_hook": skip_hook})

    def delete_attributes(self, profile: StoredUser, spec: Mapping[str, Any]) -> None:
        _delete(profile.attributes, spec)
        custom = profile.attributes.get("custom")
        if isinstance(spec.get("custom"), dict) and isinstance(custom, dict):
            _delete(custom, spec["custom"])


SANDBOX_KEY = web.AppKey("sandbox", Sandbox)


def _same_event(event: Mapping[str, Any], stored: Mapping[str, Any]) -> bool:
    return all(event.get(k) == stored.get(k) for k in ("event_name", "timestamp", "event_params"))


def _delete(attributes: dict[str, Any], spec: Mapping[str, Any]) -> None:
    for name in spec.get("whole") or ():
        if name != "custom":
            attributes.pop(name, None)
    for name, values in (spec.get("partial") or {}).items():
        current = attributes.get(name)
        if isinstance(current, list):
            attributes[name] = [item for item in current if item not in values]


# --- /api handlers -----------------------------------------------------------------


async def _read_capped(request: web.Request, cap: int) -> tuple[bytes, bool]:
    """Read at most ``cap`` + 1 bytes; the flag says the body was bigger than ``cap``."""
    chunks: list[bytes] = []
    size = 0
    while size <= cap:
        chunk = await request.content.read(cap + 1 - size)
        if not chunk:
            return b"".join(chunks), False
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), True


def _parse_json(raw: bytes) -> tuple[bool, Any]:
    try:
        return True, orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False, None


@dataclass
class _ApiRequest:
    request: web.Request
    raw: bytes
    oversize: bool


Handler = Callable[[Sandbox, _ApiRequest], Reply]


def _gate(sandbox: Sandbox, api: _ApiRequest, group: str, per_minute: int) -> Reply | None:
    """Auth, rate limit, content type and size: the checks every /api endpoint shares."""
    config = sandbox.config
    headers = api.request.headers
    partner = headers.get("X-PARTNER-NAME")
    if partner != config.partner_name or headers.get("X-REQUEST-TOKEN") != config.api_key:
        return _json_reply(403, ACCESS_DENIED)
    if not sandbox.take_token(config.partner_name, group, per_minute):
        retry = config.rate_limit_retry_after
        return _json_reply(429, TOO_MANY_REQUESTS, {"Retry-After": retry} if retry else None)
    if api.request.content_type != "application/json":
        return _bad_request("content type must be application/json")
    if api.oversize:
        return _bad_request(
            f"request body is bigger than maximum allowed size {config.max_body_bytes:,} bytes"
        )
    return None


def _users_of(sandbox: Sandbox, api: _ApiRequest) -> Reply | tuple[dict[str, Any], list[Any]]:
    config = sandbox.config
    rejected = _gate(sandbox, api, "upsert", config.rate_limit_per_minute)
    if rejected is not None:
        return rejected
    valid, body = _parse_json(api.raw)
    if not valid:
        return _json_reply(400, INVALID_JSON)
    users = body.get("users") if isinstance(body, dict) else None
    if not isinstance(users, list) or not users:
        return _bad_request("users must be defined: bad request")
    if len(users) > config.max_users:
        # Inference: §4 gives the limit but not the error; worded like the documented 400s.
        return _bad_request(f"users must be at most {config.max_users}: bad request")
    return body, users


def handle_upsert(sandbox: Sandbox, api: _ApiRequest) -> Reply:
    parsed = _users_of(sandbox, api)
    if isinstance(parsed, Reply):
        return parsed
    body, users = parsed
    skip_hook = body.get("skip_hook") is True
    default_append = not (sandbox.config.top_level_not_append and body.get("not_append") is True)
    strictness = Strictness(
        strict_types=sandbox.config.strict_types,
        require_purchase_quantity=sandbox.config.require_purchase_quantity,
    )
    successful, failed = 0, 0
    errors: ErrorMap = {}
    for index, user in enumerate(users):
        user_errors = validate_upsert_user(index, user, strictness)
        if not user_errors and not user.get("identifiers") and sandbox.target_of(user) is None:
            user_errors = {
                f"users.{index}.insider_id.exists": [
                    f"no user has this insider_id: {format_value(user['insider_id'])}"
                ]
            }
        if user_errors:
            failed += 1
            errors.update(user_errors)
            continue
        sandbox.upsert(user, skip_hook, default_append)
        successful += 1
    return _summary(successful, failed, errors)


def handle_attribute_delete(sandbox: Sandbox, api: _ApiRequest) -> Reply:
    parsed = _users_of(sandbox, api)
    if isinstance(parsed, Reply):
        return parsed
    _, users = parsed
    successful, failed = 0, 0
    errors: ErrorMap = {}
    for index, user in enumerate(users):
        user_errors = validate_delete_user(index, user)
        profile = None if user_errors else sandbox.target_of(user)
        if not user_errors and profile is None:
            user_errors = {
                f"users.{index}.identifiers.exists": ["no such user for these identifiers"]
            }
        if user_errors or profile is None:
            failed += 1
            errors.update(user_errors)
            continue
        sandbox.delete_attributes(profile, user)
        successful += 1
    return _summary(successful, failed, errors)


def handle_identity(sandbox: Sandbox, api: _ApiRequest) -> Reply:
    config = sandbox.config
    rejected = _gate(sandbox, api, "identity", config.identity_rate_limit_per_minute)
    if rejected is not None:
        return rejected
    valid, body = _parse_json(api.raw)
    if not valid:
        return _json_reply(400, INVALID_JSON)
    if not isinstance(body, dict):
        body = {}
    old = identity_side(body.get("old_identifier"))
    new = identity_side(body.get("new_identifier"))
    if old is None or new is None:
        return _bad_request(
            "there must be exactly 1 entry for both new and old identifiers: bad request"
        )
    (old_key, old_value), (new_key, new_value) = old, new
    if old_key != new_key:
        return _bad_request("identifier types must be the same: bad request")  # inference
    if old_value == new_value:
        return _bad_request("identifier values are the same: bad request")
    if old_key.startswith("custom."):
        if not (isinstance(new_value, str) and new_value):
            return _bad_request(f"custom identifier must be a non-empty string: {old_key}")
    elif old_key not in ("email", "phone_number", "uuid"):
        return _bad_request("key must be one of phone_number(pn), email(em) or uuid: bad request")
    elif (problem := identifier_value_error(new_key, new_value)) is not None:
        return _bad_request(f"{problem[1]}: bad request")  # inference
    if not isinstance(old_value, str):
        return _json_reply(404, NO_SUCH_USER)
    profile = sandbox.lookup(old_key, old_value)
    if profile is None:
        return _json_reply(404, NO_SUCH_USER)
    if sandbox.lookup(new_key, new_value) is not None:
        return _bad_request("new identifier already has a user assigned to it: bad request")
    if old_key.startswith("custom."):
        profile.identifiers.setdefault("custom", {})[old_key.removeprefix("custom.")] = new_value
    else:
        profile.identifiers[old_key] = new_value
    return _json_reply(200, {})


def _redacted_headers(request: web.Request) -> dict[str, str]:
    # str() because header names are multidict istr, which orjson refuses as keys.
    return {
        str(name): "***" if name.lower() == "x-request-token" else value
        for name, value in request.headers.items()
    }


def _fault_reply(fault: Fault) -> Reply:
    body = fault.body if fault.body is not None else FAULT_BODIES.get(fault.status)
    headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
    return Reply(fault.status, body, headers)


def _api_route(
    handler: Handler, faultable: bool
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def route(request: web.Request) -> web.StreamResponse:
        sandbox = request.app[SANDBOX_KEY]
        raw, oversize = await _read_capped(request, sandbox.config.max_body_bytes)
        record: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "status": 0,
            "headers": _redacted_headers(request),
            "body": None if oversize else _parse_json(raw)[1],
        }
        sandbox.requests.append(record)
        fault = sandbox.next_fault() if faultable else None
        api = _ApiRequest(request, raw, oversize)
        if fault is not None and fault.apply:
            handler(sandbox, api)
        reply = handler(sandbox, api) if fault is None else _fault_reply(fault)
        delay_ms = sandbox.config.latency_ms + (fault.latency_ms if fault else 0.0)
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        record["status"] = reply.status
        if reply.status == 0:
            # Closing the transport makes aiohttp's write fail, so nothing is answered.
            if request.transport is not None:
                request.transport.close()
            return web.Response()
        return _to_response(reply)

    return route


def _to_response(reply: Reply) -> web.Response:
    if reply.body is None:
        return web.Response(status=reply.status, headers=reply.headers)
    return web.Response(
        status=reply.status,
        body=orjson.dumps(reply.body),
        content_type="application/json",
        headers=reply.headers,
    )


def _unknown_api(sandbox: Sandbox, api: _ApiRequest) -> Reply:
    return _json_reply(404, {"error": "not found"})


# --- /sandbox control and read-back handlers ----------------------------------------


async def _control_json(request: web.Request) -> Any:
    valid, body = _parse_json(await request.read())
    if not valid or not isinstance(body, dict):
        raise web.HTTPBadRequest(
            body=orjson.dumps({"error": "body must be a JSON object"}),
            content_type="application/json",
        )
    return body


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _parse_fault(body: Mapping[str, Any]) -> Fault | str:
    status = body.get("status")
    count = body.get("count", 1)
    retry_after = body.get("retry_after")
    latency_ms = body.get("latency_ms", 0)
    if not (isinstance(status, int) and not isinstance(status, bool)):
        return "status must be an integer"
    if status != 0 and not 200 <= status <= 599:
        return "status must be 0 (drop the connection) or an HTTP status from 200 to 599"
    if not (isinstance(count, int) and not isinstance(count, bool) and count >= 1):
        return "count must be a positive integer"
    if retry_after is not None and not (isinstance(retry_after, str) or _is_number(retry_after)):
        return "retry_after must be a string or a number"
    if not (_is_number(latency_ms) and latency_ms >= 0):
        return "latency_ms must be a non-negative number"
    return Fault(
        status=status,
        remaining=count,
        retry_after=None if retry_after is None else format_value(retry_after),
        body=body.get("body"),
        latency_ms=float(latency_ms),
        apply=body.get("apply") is True,
    )


def _reply(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def _post_faults(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX_KEY]
    fault = _parse_fault(await _control_json(request))
    if isinstance(fault, str):
        return _reply({"error": fault}, 400)
    sandbox.faults.append(fault)
    return _reply({"faults": [f.to_json() for f in sandbox.faults]})


async def _get_faults(request: web.Request) -> web.Response:
    return _reply({"faults": [f.to_json() for f in request.app[SANDBOX_KEY].faults]})


async def _delete_faults(request: web.Request) -> web.Response:
    request.app[SANDBOX_KEY].faults.clear()
    return _reply({"faults": []})


async def _get_config(request: web.Request) -> web.Response:
    return _reply(dataclasses.asdict(request.app[SANDBOX_KEY].config))


async def _post_config(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX_KEY]
    changes = await _control_json(request)
    for name, value in changes.items():
        types = _CONFIG_TYPES.get(name)
        if types is None:
            return _reply({"error": f"unknown setting: {name}"}, 400)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return _reply({"error": f"wrong type for {name}"}, 400)
    try:
        sandbox.reconfigure(changes)
    except ValueError as exc:
        return _reply({"error": str(exc)}, 400)
    return _reply(dataclasses.asdict(sandbox.config))


async def _get_users(request: web.Request) -> web.Response:
    return _reply({"users": [user.to_json() for user in request.app[SANDBOX_KEY].users]})


async def _lookup_user(request: web.Request) -> web.Response:
    key = request.query.get("key")
    value = request.query.get("value")
    if not key or value is None:
        return _reply({"error": "key and value query parameters are required"}, 400)
    user = request.app[SANDBOX_KEY].lookup(key, value)
    if user is None:
        return _reply(NO_SUCH_USER, 404)
    return _reply(user.to_json())


async def _get_requests(request: web.Request) -> web.Response:
    return _reply({"requests": request.app[SANDBOX_KEY].requests})


async def _delete_state(request: web.Request) -> web.Response:
    request.app[SANDBOX_KEY].reset()
    return _reply({})


def create_app(config: SandboxConfig | None = None) -> web.Application:
    sandbox = Sandbox(config or SandboxConfig())
    # Bodies are read with our own cap (a 400, as Insider does), so aiohttp's 413 must
    # never fire first; the margin also leaves room for raising max_body_bytes at run time.
    app = web.Application(client_max_size=max(sandbox.config.max_body_bytes, 1 << 20) * 4)
    app[SANDBOX_KEY] = sandbox
    app.router.add_post(UPSERT_PATH, _api_route(handle_upsert, faultable=True))
    app.router.add_post(ATTRIBUTE_DELETE_PATH, _api_route(handle_attribute_delete, faultable=True))
    app.router.add_patch(IDENTITY_PATH, _api_route(handle_identity, faultable=False))
    app.router.add_route("*", "/api/{tail:.*}", _api_route(_unknown_api, faultable=False))
    app.router.add_get("/sandbox/faults", _get_faults)
    app.router.add_post("/sandbox/faults", _post_faults)
    app.router.add_delete("/sandbox/faults", _delete_faults)
    app.router.add_get("/sandbox/config", _get_config)
    app.router.add_post("/sandbox/config", _post_config)
    app.router.add_get("/sandbox/users", _get_users)
    app.router.add_get("/sandbox/users/lookup", _lookup_user)
    app.router.add_get("/sandbox/requests", _get_requests)
    app.router.add_delete("/sandbox/state", _delete_state)
    return app


@dataclass
class RunningSandbox:
    url: str
    port: int
    app: web.Application
    state: Sandbox
    runner: web.AppRunner = field(repr=False)

    async def close(self) -> None:
        await self.runner.cleanup()

    async def __aenter__(self) -> RunningSandbox:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def start_sandbox(
    host: str = "127.0.0.1", port: int = 0, config: SandboxConfig | None = None
) -> RunningSandbox:
    """Serve a sandbox on ``host:port`` (0 picks a free port) until ``close()``."""
    app = create_app(config)
    # A short shutdown so close() does not wait out injected latency.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = int(runner.addresses[0][1])
    url_host = f"[{host}]" if ":" in host else host
    return RunningSandbox(
        url=f"http://{url_host}:{bound_port}",
        port=bound_port,
        app=app,
        state=app[SANDBOX_KEY],
        runner=runner,
    )


def run_sandbox(host: str, port: int, config: SandboxConfig) -> None:
    """Serve a sandbox until Ctrl-C (the ``tidegate sandbox`` command)."""

    async def serve() -> None:
        running = await start_sandbox(host, port, config)
        try:
            print(
                f"Insider sandbox listening on {running.url} "
                f"(X-PARTNER-NAME: {config.partner_name}, X-REQUEST-TOKEN: {config.api_key})",
                flush=True,
            )
            await asyncio.Event().wait()
        finally:
            await running.close()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
