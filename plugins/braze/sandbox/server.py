"""Braze sandbox: an in-process stand-in for Braze's REST user endpoints (reference
/work/shared/reference/braze-users-track.md, §12 "Sandbox").

* ``POST /users/track``: Bearer auth (401 ``Invalid API Key``, 403 for a key without the
  endpoint's permission), the object limit (75 in total, or per array with
  ``per_array_limit``; 400 ``Max Input Length Exceeded``), the 4 MB body limit (413 or
  400), per-object validation answered 201 with ``errors[{type, input_array, index}]``
  for the failed objects only, 400 ``Valid data must be provided...`` when none is valid,
  and storage: scalars overwrite, ``null`` deletes, ``inc``, arrays as sets with
  ``add``/``remove`` truncated at 25, events and purchases appended without
  de-duplication, attributes processed before events before purchases.
* ``POST /users/external_ids/rename`` and ``/remove``, ``/users/delete``,
  ``/users/identify``, ``/users/alias/new``.
* A token bucket per key (3,000 per 3 s by default) with lower-case ``x-ratelimit-*``
  headers on every non-429 answer (reset in epoch or delta seconds), and a 429 with only
  ``x-ratelimit-retry-after`` (and ``Retry-After`` when configured).
* Control under ``/sandbox/``: faults (any status, headers, body, delay, a dropped
  connection before or after the request is applied), configuration of the UNCONFIRMED
  behaviours, read-back of users, requests and deletions, and a reset.

UNCONFIRMED behaviours, switchable through ``POST /sandbox/config``:
``alias_events_create`` (``_update_existing_only: false`` with a ``user_alias`` on an event
or purchase creates the profile; default off, as the object pages say "always true"),
``accept_gender_u``, ``reset_mode`` (``epoch`` or ``delta``), ``retry_after_header``,
``oversize_status`` (413 or 400), ``success_status`` (201 or 200) and ``per_array_limit``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from plugins.braze.sandbox import rules

INVALID_KEY = {"message": "Invalid API Key"}
ACCESS_DENIED = {"message": "Access Denied"}
NO_VALID_DATA = "Valid data must be provided in the 'attributes', 'events', or 'purchases' fields."
TOO_MANY_OBJECTS = {"message": "Max Input Length Exceeded"}
TRACK = "/users/track"
PERMISSIONS = {
    TRACK: "users.track",
    "/users/identify": "users.identify",
    "/users/alias/new": "users.alias.new",
    "/users/external_ids/rename": "users.external_ids.rename",
    "/users/external_ids/remove": "users.external_ids.remove",
    "/users/delete": "users.delete",
}
ALL_PERMISSIONS = tuple(PERMISSIONS.values())


@dataclass
class SandboxConfig:
    api_key: str = "sandbox-key"
    permissions: tuple[str, ...] = ALL_PERMISSIONS
    max_objects: int = 75
    per_array_limit: bool = False  # legacy contracts: 75 per array instead of in total
    max_body_bytes: int = 4_000_000
    oversize_status: int = 413  # UNCONFIRMED: 413 or 400
    success_status: int = 201  # documented 201; mocks use 200
    rate_limit: int = 3000  # requests per rate_window seconds per key; 0 disables
    rate_window: float = 3.0
    reset_mode: str = "epoch"  # UNCONFIRMED: epoch seconds or seconds remaining
    retry_after_header: bool = False  # UNCONFIRMED: a plain Retry-After on 429 too
    alias_events_create: bool = False  # UNCONFIRMED (§3.3)
    accept_gender_u: bool = False  # UNCONFIRMED
    array_limit: int = 25
    latency_ms: float = 0.0
    blocklist: tuple[str, ...] = ()

    def check(self) -> None:
        if self.reset_mode not in ("epoch", "delta"):
            raise ValueError("reset_mode must be epoch or delta")
        if self.oversize_status not in (400, 413):
            raise ValueError("oversize_status must be 400 or 413")
        if not 200 <= self.success_status < 300:
            raise ValueError("success_status must be a 2xx")
        for name in ("max_objects", "max_body_bytes", "array_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.rate_limit < 0 or self.rate_window <= 0 or self.latency_ms < 0:
            raise ValueError("rate_limit, rate_window and latency_ms must not be negative")


@dataclass
class Profile:
    braze_id: str
    external_id: str | None = None
    deprecated_ids: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # label -> name
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    purchases: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Fault:
    status: int = 500
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_ms: float = 0.0
    drop: bool = False  # close the connection without an answer
    apply: bool = False  # process the request first (an answer lost after Braze applied it)
    path: str = TRACK
    count: int = 1


class BrazeSandbox:
    def __init__(self, config: SandboxConfig) -> None:
        config.check()
        self.config = config
        self.reset()

    def reset(self) -> None:
        self.profiles: list[Profile] = []
        self.requests: list[dict[str, Any]] = []
        self.deletions: list[dict[str, Any]] = []
        self.faults: list[Fault] = []
        self._ids = itertools.count(1)
        self._bucket: dict[str, tuple[float, float]] = {}

    # -- lookup ---------------------------------------------------------------------

    def find(self, obj: dict[str, Any]) -> Profile | None:
        external_id = obj.get("external_id")
        if external_id is not None:
            for profile in self.profiles:
                if profile.external_id == external_id or external_id in profile.deprecated_ids:
                    return profile
            return None
        alias = obj.get("user_alias")
        if alias is not None:
            label, name = alias["alias_label"], alias["alias_name"]
            return next((p for p in self.profiles if p.aliases.get(label) == name), None)
        braze_id = obj.get("braze_id")
        if braze_id is not None:
            return next((p for p in self.profiles if p.braze_id == braze_id), None)
        for key in ("email", "phone"):
            value = obj.get(key)
            if value is not None:
                matches = [p for p in self.profiles if p.attributes.get(key) == value]
                identified = [p for p in matches if p.external_id is not None]
                chosen = identified or matches
                return chosen[-1] if chosen else None
        return None

    def create(self, obj: dict[str, Any]) -> Profile:
        profile = Profile(braze_id=f"braze-{next(self._ids)}")
        if obj.get("external_id") is not None:
            profile.external_id = obj["external_id"]
        elif obj.get("user_alias") is not None:
            alias = obj["user_alias"]
            profile.aliases[alias["alias_label"]] = alias["alias_name"]
        else:
            for key in ("email", "phone"):
                if obj.get(key) is not None:
                    profile.attributes[key] = obj[key]
                    break
        self.profiles.append(profile)
        return profile

    def resolve(self, obj: dict[str, Any], array: str) -> Profile | None:
        profile = self.find(obj)
        if profile is not None:
            return profile
        flag = obj.get("_update_existing_only")
        if obj.get("user_alias") is not None:
            if array == "attributes":
                update_only = flag is not False  # aliases default to update-only
            else:
                update_only = not (self.config.alias_events_create and flag is False)
        else:
            update_only = flag is True
        return None if update_only else self.create(obj)

    # -- rate limit -----------------------------------------------------------------

    def take(self, key: str) -> tuple[bool, dict[str, str]]:
        config = self.config
        if not config.rate_limit:
            return True, {}
        now = time.time()
        tokens, start = self._bucket.get(key, (float(config.rate_limit), now))
        if now - start >= config.rate_window:
            tokens, start = float(config.rate_limit), now
        reset_at = start + config.rate_window
        if tokens < 1:
            wait = max(1, math.ceil(reset_at - now))
            headers = {"x-ratelimit-retry-after": str(wait)}
            if config.retry_after_header:
                headers["Retry-After"] = str(wait)
            return False, headers
        tokens -= 1
        self._bucket[key] = (tokens, start)
        reset = reset_at if config.reset_mode == "epoch" else max(0.0, reset_at - now)
        return True, {
            "x-ratelimit-limit": str(config.rate_limit),
            "x-ratelimit-remaining": str(int(tokens)),
            "x-ratelimit-reset": str(math.ceil(reset)),
        }

    # -- /users/track -----------------------------------------------------------------

    def track(self, body: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, dict):
            return 400, {"message": "Request body must be a JSON object"}
        arrays = {name: body.get(name) or [] for name in ("attributes", "events", "purchases")}
        if any(not isinstance(a, list) for a in arrays.values()):
            return 400, {"message": "'attributes', 'events' and 'purchases' must be arrays"}
        counts = [len(a) for a in arrays.values()]
        limit = self.config.max_objects
        if (max(counts) if self.config.per_array_limit else sum(counts)) > limit:
            return 400, dict(TOO_MANY_OBJECTS)
        errors: list[dict[str, Any]] = []
        valid: dict[str, list[dict[str, Any]]] = {name: [] for name in arrays}
        for name, objects in arrays.items():
            for index, obj in enumerate(objects):
                error = self._object_error(name, obj)
                if error is None:
                    valid[name].append(obj)
                else:
                    errors.append({"type": error, "input_array": name, "index": index})
        if not any(valid.values()):
            return 400, {"message": NO_VALID_DATA, "errors": errors}
        for obj in valid["attributes"]:
            profile = self.resolve(obj, "attributes")
            if profile is not None:
                self._set_attributes(profile, obj)
        now = time.time()
        for name in ("events", "purchases"):
            for obj in valid[name]:
                profile = self.resolve(obj, name)
                if profile is None:
                    continue
                stored = {k: v for k, v in obj.items() if k not in rules.PRIMARY}
                moment = rules.parse_time(obj["time"])
                if moment is not None and moment.timestamp() > now:
                    stored["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
                (profile.events if name == "events" else profile.purchases).append(stored)
        answer: dict[str, Any] = {"message": "success"}
        for name, objects in arrays.items():
            if objects:
                answer[f"{name}_processed"] = len(valid[name])
        if errors:
            answer["errors"] = errors
        return self.config.success_status, answer

    def _object_error(self, array: str, obj: Any) -> str | None:
        if not isinstance(obj, dict):
            return "object must be a JSON object"
        error = rules.identifier_error(obj, frozenset(self.config.blocklist))
        if error is not None:
            return error
        if array == "attributes":
            return rules.attributes_error(obj, self.config.accept_gender_u)
        if array == "events":
            return rules.event_error(obj)
        return rules.purchase_error(obj)

    def _set_attributes(self, profile: Profile, obj: dict[str, Any]) -> None:
        skip = {*rules.PRIMARY, "_update_existing_only", "_merge_objects"}
        stored = profile.attributes
        for key, value in obj.items():
            if key in skip:
                continue
            if (
                key in ("email", "phone")
                and profile.external_id is None
                and obj.get(key)
                and ("external_id" not in obj and "user_alias" not in obj)
            ):
                stored[key] = value
                continue
            if value is None:
                stored.pop(key, None)
            elif key == "country":
                country = rules.stored_country(value)
                if country is None:
                    stored.pop(key, None)  # non-matching input is stored as null
                else:
                    stored[key] = country
            elif isinstance(value, dict) and set(value) == {"inc"}:
                stored[key] = (stored.get(key) or 0) + value["inc"]
            elif isinstance(value, dict) and value and set(value) <= {"add", "remove"}:
                current = list(stored.get(key) or [])
                for added in value.get("add", []):
                    if added in current:
                        current.remove(added)
                    current.append(added)
                current = [v for v in current if v not in value.get("remove", [])]
                stored[key] = current[: self.config.array_limit]
            elif isinstance(value, list):
                unique: list[Any] = []
                for element in value:
                    if element not in unique:
                        unique.append(element)
                stored[key] = unique[: self.config.array_limit]
            else:
                stored[key] = value

    # -- identity endpoints -------------------------------------------------------------

    def rename(self, body: Any) -> tuple[int, dict[str, Any]]:
        renames = body.get("external_id_renames") if isinstance(body, dict) else None
        if not isinstance(renames, list) or not 1 <= len(renames) <= 50:
            return 400, {"message": "'external_id_renames' must hold 1 to 50 renames"}
        done: list[str] = []
        errors: list[list[Any]] = []
        for index, rename in enumerate(renames):
            current = rename.get("current_external_id") if isinstance(rename, dict) else None
            new = rename.get("new_external_id") if isinstance(rename, dict) else None
            owner = next((p for p in self.profiles if p.external_id == current), None)
            taken = any(p.external_id == new or new in p.deprecated_ids for p in self.profiles)
            if not isinstance(current, str) or not isinstance(new, str) or current == new:
                errors.append([index, "current and new external IDs must be two different IDs"])
            elif owner is None:
                errors.append([index, "current_external_id is not a primary external ID"])
            elif taken:
                errors.append([index, "new_external_id is already in use"])
            else:
                owner.deprecated_ids.append(current)
                owner.external_id = new
                done.append(new)
        return 201, {"message": "success", "external_ids": done, "rename_errors": errors}

    def remove(self, body: Any) -> tuple[int, dict[str, Any]]:
        ids = body.get("external_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not 1 <= len(ids) <= 50:
            return 400, {"message": "'external_ids' must hold 1 to 50 IDs"}
        removed, errors = [], []
        for index, external_id in enumerate(ids):
            owner = next((p for p in self.profiles if external_id in p.deprecated_ids), None)
            if owner is None:
                errors.append([index, "not a deprecated external ID"])
            else:
                owner.deprecated_ids.remove(external_id)
                removed.append(external_id)
        return 201, {"message": "success", "removed_ids": removed, "removal_errors": errors}

    def delete(self, body: Any) -> tuple[int, dict[str, Any]]:
        if not isinstance(body, dict):
            return 400, {"message": "Request body must be a JSON object"}
        kinds = [k for k in ("external_ids", "user_aliases", "braze_ids") if k in body]
        if len(kinds) != 1 or not isinstance(body[kinds[0]], list):
            return 400, {"message": "send exactly one of external_ids, user_aliases, braze_ids"}
        values = body[kinds[0]]
        if not 1 <= len(values) <= 50:
            return 400, {"message": "at most 50 identifiers per request"}
        deleted = 0
        for value in values:
            key = {"external_ids": "external_id", "user_aliases": "user_alias"}.get(
                kinds[0], "braze_id"
            )
            profile = self.find({key: value}) if value else None
            if profile is not None:
                self.profiles.remove(profile)
                self.deletions.append(profile.to_json())
                deleted += 1
        return 201, {"deleted": deleted}

    def identify(self, body: Any) -> tuple[int, dict[str, Any]]:
        items = body.get("aliases_to_identify") if isinstance(body, dict) else None
        if not isinstance(items, list) or not 1 <= len(items) <= 50:
            return 400, {"message": "'aliases_to_identify' must hold 1 to 50 items"}
        processed, errors = 0, []
        for index, item in enumerate(items):
            external_id = item.get("external_id") if isinstance(item, dict) else None
            alias = item.get("user_alias") if isinstance(item, dict) else None
            if not isinstance(external_id, str) or not isinstance(alias, dict):
                errors.append({"type": "'external_id' is required",
                               "input_array": "user_identifiers", "index": index})  # fmt: skip
                continue
            unidentified = self.find({"user_alias": alias})
            if unidentified is None:
                continue
            identified = self.find({"external_id": external_id})
            if identified is None:
                unidentified.external_id = external_id
            elif alias["alias_label"] not in identified.aliases:
                for key, value in unidentified.attributes.items():
                    identified.attributes.setdefault(key, value)
                identified.events += unidentified.events
                identified.purchases += unidentified.purchases
                identified.aliases.update(unidentified.aliases)
                self.profiles.remove(unidentified)
            processed += 1
        answer: dict[str, Any] = {"aliases_processed": processed, "message": "success"}
        if errors:
            answer["errors"] = errors
        return 201, answer

    def alias_new(self, body: Any) -> tuple[int, dict[str, Any]]:
        items = body.get("user_aliases") if isinstance(body, dict) else None
        if not isinstance(items, list) or not 1 <= len(items) <= 50:
            return 400, {"message": "'user_aliases' must hold 1 to 50 aliases"}
        processed = 0
        for item in items:
            if (
                not isinstance(item, dict)
                or not item.get("alias_name")
                or not item.get("alias_label")
            ):
                continue
            label, name = item["alias_label"], item["alias_name"]
            if item.get("external_id"):
                owner = self.find({"external_id": item["external_id"]})
                if owner is None:
                    continue
                owner.aliases[label] = name
            else:
                self.create({"user_alias": {"alias_label": label, "alias_name": name}})
            processed += 1
        return 201, {"aliases_processed": processed, "message": "success"}


SANDBOX_KEY = web.AppKey("braze_sandbox", BrazeSandbox)
Handler = Callable[[BrazeSandbox, Any], tuple[int, dict[str, Any]]]


def _reply(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def _api(path: str, handle: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def route(request: web.Request) -> web.StreamResponse:
        sandbox = request.app[SANDBOX_KEY]
        config = sandbox.config
        raw = await request.read()
        record: dict[str, Any] = {"path": path, "body": raw.decode("utf-8", "replace")}
        fault = next((f for f in sandbox.faults if f.path == path), None)
        if fault is not None:
            fault.count -= 1
            if fault.count <= 0:
                sandbox.faults.remove(fault)
            if fault.delay_ms:
                await asyncio.sleep(fault.delay_ms / 1000)
            if fault.apply:
                try:
                    handle(sandbox, orjson.loads(raw))
                except orjson.JSONDecodeError:
                    pass
            record["fault"] = fault.status if not fault.drop else "dropped"
            sandbox.requests.append(record)
            if fault.drop:
                assert request.transport is not None
                request.transport.close()
                raise asyncio.CancelledError  # aiohttp closes without an answer
            return _reply(fault.body if fault.body is not None else {}, fault.status, fault.headers)
        if config.latency_ms:
            await asyncio.sleep(config.latency_ms / 1000)
        sandbox.requests.append(record)
        authorization = request.headers.get("Authorization", "")
        if authorization != f"Bearer {config.api_key}":
            record["status"] = 401
            return _reply(INVALID_KEY, 401)
        if PERMISSIONS[path] not in config.permissions:
            record["status"] = 403
            return _reply(ACCESS_DENIED, 403)
        allowed, headers = sandbox.take(config.api_key)
        if not allowed:
            record["status"] = 429
            return _reply({"message": "Rate limit exceeded"}, 429, headers)
        if len(raw) > config.max_body_bytes:
            record["status"] = config.oversize_status
            return _reply({"message": "Request body too large"}, config.oversize_status, headers)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            record["status"] = 400
            return _reply({"message": "Invalid JSON"}, 400, headers)
        status, answer = handle(sandbox, body)
        record["status"] = status
        record["response"] = answer
        return _reply(answer, status, headers)

    return route


async def _not_found(request: web.Request) -> web.Response:
    return _reply({"message": "Not Found"}, 404)


async def _post_faults(request: web.Request) -> web.Response:
    try:
        specs = await request.json(loads=orjson.loads)
        faults = [Fault(**spec) for spec in (specs if isinstance(specs, list) else [specs])]
    except (ValueError, TypeError) as exc:
        return _reply({"error": f"faults: {exc}"}, 400)
    request.app[SANDBOX_KEY].faults.extend(faults)
    return _reply({"queued": len(request.app[SANDBOX_KEY].faults)})


async def _delete_faults(request: web.Request) -> web.Response:
    request.app[SANDBOX_KEY].faults.clear()
    return _reply({})


async def _get_config(request: web.Request) -> web.Response:
    return _reply(dataclasses.asdict(request.app[SANDBOX_KEY].config))


async def _post_config(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX_KEY]
    try:
        changes = await request.json(loads=orjson.loads)
        updated = dataclasses.replace(sandbox.config, **changes)
        if isinstance(updated.permissions, list):
            updated.permissions = tuple(updated.permissions)
        updated.check()
    except (ValueError, TypeError) as exc:
        return _reply({"error": str(exc)}, 400)
    sandbox.config = updated
    return _reply(dataclasses.asdict(updated))


async def _get_users(request: web.Request) -> web.Response:
    sandbox = request.app[SANDBOX_KEY]
    query = request.query
    profiles = sandbox.profiles
    if "external_id" in query:
        found = sandbox.find({"external_id": query["external_id"]})
        profiles = [found] if found else []
    elif "alias_name" in query:
        alias = {"alias_name": query["alias_name"], "alias_label": query.get("alias_label", "")}
        found = sandbox.find({"user_alias": alias})
        profiles = [found] if found else []
    return _reply({"users": [p.to_json() for p in profiles]})


async def _get_requests(request: web.Request) -> web.Response:
    return _reply({"requests": request.app[SANDBOX_KEY].requests})


async def _get_deletions(request: web.Request) -> web.Response:
    return _reply({"deletions": request.app[SANDBOX_KEY].deletions})


async def _delete_state(request: web.Request) -> web.Response:
    request.app[SANDBOX_KEY].reset()
    return _reply({})


def create_app(config: SandboxConfig | None = None) -> web.Application:
    sandbox = BrazeSandbox(config or SandboxConfig())
    app = web.Application(client_max_size=max(sandbox.config.max_body_bytes, 1 << 20) * 4)
    app[SANDBOX_KEY] = sandbox
    handlers: dict[str, Handler] = {
        TRACK: BrazeSandbox.track,
        "/users/external_ids/rename": BrazeSandbox.rename,
        "/users/external_ids/remove": BrazeSandbox.remove,
        "/users/delete": BrazeSandbox.delete,
        "/users/identify": BrazeSandbox.identify,
        "/users/alias/new": BrazeSandbox.alias_new,
    }
    for path, handle in handlers.items():
        app.router.add_post(path, _api(path, handle))
    app.router.add_post("/sandbox/faults", _post_faults)
    app.router.add_delete("/sandbox/faults", _delete_faults)
    app.router.add_get("/sandbox/config", _get_config)
    app.router.add_post("/sandbox/config", _post_config)
    app.router.add_get("/sandbox/users", _get_users)
    app.router.add_get("/sandbox/requests", _get_requests)
    app.router.add_get("/sandbox/deletions", _get_deletions)
    app.router.add_delete("/sandbox/state", _delete_state)
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app


@dataclass
class RunningBrazeSandbox:
    url: str
    port: int
    app: web.Application
    state: BrazeSandbox
    runner: web.AppRunner = field(repr=False)

    async def close(self) -> None:
        await self.runner.cleanup()

    async def __aenter__(self) -> RunningBrazeSandbox:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def start_sandbox(
    host: str = "127.0.0.1", port: int = 0, config: SandboxConfig | None = None
) -> RunningBrazeSandbox:
    """Serve a Braze sandbox on ``host:port`` (0 picks a free port) until ``close()``."""
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = int(runner.addresses[0][1])
    url_host = f"[{host}]" if ":" in host else host
    return RunningBrazeSandbox(f"http://{url_host}:{bound}", bound, app, app[SANDBOX_KEY], runner)


def run_sandbox(host: str, port: int, config: SandboxConfig) -> None:
    """Serve a Braze sandbox until Ctrl-C (the ``tidegate braze-sandbox`` command)."""

    async def serve() -> None:
        running = await start_sandbox(host, port, config)
        try:
            print(
                f"Braze sandbox listening on {running.url} "
                f"(Authorization: Bearer {config.api_key})",
                flush=True,
            )
            await asyncio.Event().wait()
        finally:
            await running.close()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
