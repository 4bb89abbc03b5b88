"""Authentication, roles and the audit trail of the admin API, as one gRPC server
interceptor.

Every RPC but gRPC health and reflection needs ``authorization: Bearer <token>``
metadata (``engine.state.tokens``). ``ACCESS`` maps each RPC's full method name to the
role it needs and whether it is a change (audited); an RPC missing from it is refused to
every token, and ``tests/test_admin_auth.py`` fails when any RPC of the generated
descriptors has no entry. A missing, malformed, wrong, revoked or expired token is
``UNAUTHENTICATED``; a token of a weaker role ``PERMISSION_DENIED``; both with a fixed
message that says nothing about the token. Each refusal logs one ``admin_call_denied``
line (method, peer, reason class), never the token.

``IngestEvents`` also accepts the ingest credential, when the engine is given a check for
it (``ingest_credential``: the ``authorization`` value -> accepted).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from google.protobuf import json_format
from google.protobuf.message import Message

from engine.state import audit, tokens
from engine.state.database import Database
from engine.state.tokens import Role

log = structlog.get_logger("tidegate.admin.auth")

UNAUTHENTICATED_MESSAGE = (
    "missing or invalid credentials: send `authorization: Bearer <token>` metadata with a"
    " token from `tidegate token create` (the first start writes one to"
    " <data-dir>/admin-token)"
)
PERMISSION_DENIED_MESSAGE = "this token's role does not allow this call"
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
"""Methods every caller may use without a token: health checks and reflection."""
REMEMBER_SECONDS = 1.0
"""How long a token found good is used without reading the database again."""
MAX_REMEMBERED = 1000
INGEST_METHOD = "/tidegate.admin.v1.IngestService/IngestEvents"
INGEST_CREDENTIAL = "ingest-credential"
"""The principal an ``IngestEvents`` call has when the ingest credential let it in."""


@dataclass(frozen=True)
class Access:
    """What calling a method takes: ``role``, and ``change``: whether it changes anything
    (such a call is recorded in the audit trail)."""

    role: Role
    change: bool = False


_P = "/tidegate.admin.v1."
VIEW = Access(Role.VIEWER)
ACCESS: Mapping[str, Access] = {
    # Read only.
    f"{_P}ConnectionService/GetConnection": VIEW,
    f"{_P}ConnectionService/ListConnections": VIEW,
    f"{_P}MappingService/ListProfileMappings": VIEW,
    f"{_P}MappingService/ListEventMappings": VIEW,
    f"{_P}CatalogService/ListSourceCatalog": VIEW,
    f"{_P}CatalogService/ListDestinationCatalog": VIEW,
    f"{_P}CatalogService/PreviewDelivery": VIEW,  # renders a sample, sends nothing
    f"{_P}LogService/ListLogs": VIEW,
    f"{_P}LogService/GetLog": VIEW,
    f"{_P}LogService/StreamLogs": VIEW,
    f"{_P}DeadLetterService/ListDeadLetters": VIEW,
    f"{_P}ConfigService/ExportConfig": VIEW,  # what the Get/List RPCs show, no API keys
    # Operating the pipeline. Ingest is traffic, not an admin change: it is counted in
    # the metrics, not written to the audit trail (a row per ingest request would cost
    # a write per request).
    f"{_P}IngestService/IngestEvents": Access(Role.OPERATOR),
    f"{_P}DeadLetterService/ReplayDeadLetters": Access(Role.OPERATOR, change=True),
    f"{_P}ConnectionService/ResumeConnection": Access(Role.OPERATOR, change=True),
    # Administering: connections and their API keys, mappings, configuration, backups,
    # tokens and the audit trail.
    f"{_P}ConnectionService/CreateConnection": Access(Role.ADMIN, change=True),
    f"{_P}ConnectionService/UpdateConnection": Access(Role.ADMIN, change=True),
    f"{_P}ConnectionService/DeleteConnection": Access(Role.ADMIN, change=True),
    f"{_P}MappingService/CreateProfileMapping": Access(Role.ADMIN, change=True),
    f"{_P}MappingService/UpdateProfileMapping": Access(Role.ADMIN, change=True),
    f"{_P}MappingService/DeleteProfileMapping": Access(Role.ADMIN, change=True),
    f"{_P}MappingService/CreateEventMapping": Access(Role.ADMIN, change=True),
    f"{_P}MappingService/UpdateEventMapping": Access(Role.ADMIN, change=True),
    f"{_P}MappingService/DeleteEventMapping": Access(Role.ADMIN, change=True),
    f"{_P}ConfigService/ApplyConfig": Access(Role.ADMIN, change=True),
    f"{_P}BackupService/CreateBackup": Access(Role.ADMIN, change=True),
    f"{_P}TokenService/CreateToken": Access(Role.ADMIN, change=True),
    f"{_P}TokenService/ListTokens": Access(Role.ADMIN),
    f"{_P}TokenService/RevokeToken": Access(Role.ADMIN, change=True),
    f"{_P}AuditService/ListAuditEvents": Access(Role.ADMIN),
    f"{_P}PrivacyService/EraseCustomer": Access(Role.ADMIN, change=True),
}
TARGET_NOUNS = {
    "ConnectionService": "connection",
    "MappingService": "mapping",
    "DeadLetterService": "dead letters",
    "ConfigService": "configuration",
    "BackupService": "backup",
    "TokenService": "token",
    "PrivacyService": "customer",
}
UNRECORDED_SERVICES = frozenset({"PrivacyService"})
"""Services whose requests name a person who asked to be forgotten: their audit events
record who erased a customer and when, not which customer."""


@dataclass(frozen=True)
class Principal:
    """Who makes a call: the token's name and role."""

    name: str
    role: Role


def bearer(metadata: Any) -> tuple[str, str]:
    """The ``authorization`` value and the token it carries ("" when absent or not a
    Bearer credential)."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value if isinstance(value, str) else ""
            scheme, _, credential = text.partition(" ")
            if scheme.lower() == "bearer":
                return text, credential.strip()
            return text, ""
    return "", ""


class TokenChecker:
    """Checks tokens against the state database, on a read-only connection of its own,
    on the event loop (one row by primary key).

    A token found good is remembered for ``remember`` seconds (keyed by its SHA-256), so
    a busy client costs one hash per call, not a database read; its expiry is still
    checked at each call. ``forget`` drops what is remembered (``RevokeToken`` calls it,
    so a revocation through the API counts at once); a token revoked by ``tidegate
    token revoke`` in another process stops working within ``remember`` seconds. A
    token's last-used time is written at most once a minute, through ``db``, in the
    background."""

    def __init__(
        self,
        db: Database,
        touch_every: float = tokens.LAST_USED_EVERY,
        remember: float = REMEMBER_SECONDS,
    ) -> None:
        self._db = db
        self._touch_every = touch_every
        self._remember = remember
        self._conn = _read_connection(db.path)
        self._known: dict[bytes, tuple[tokens.TokenInfo, float]] = {}
        self._written: dict[str, float] = {}
        self._pending: set[asyncio.Task[Any]] = set()

    def check(self, token: str) -> Principal | None:
        if not token:
            return None
        now = time.time()
        digest = tokens.token_hash(token)
        known = self._known.get(digest)
        if known is not None and now - known[1] < self._remember:
            info = known[0]
        else:
            found = tokens.verify(self._conn, token, now)
            if found is None:
                self._known.pop(digest, None)
                return None
            if len(self._known) >= MAX_REMEMBERED:
                self._known.clear()
            self._known[digest] = (found, now)
            info = found
        if not info.usable(now):
            return None
        if now - self._written.get(info.id, 0.0) >= self._touch_every:
            self._written[info.id] = now
            used = {info.id: now}
            task = asyncio.ensure_future(self._db.write(lambda c: tokens.touch(c, used)))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        return Principal(info.name, info.role)

    def forget(self) -> None:
        self._known.clear()

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        self._conn.close()


def _read_connection(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA query_only=ON")
    return conn


if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through when its token's role suffices; records changes in the audit
    trail. ``ingest_credential``: the ingest credential's check, consulted only for
    ``IngestEvents`` (the call is let in when it accepts the ``authorization`` value)."""

    def __init__(
        self,
        checker: TokenChecker,
        db: Database,
        ingest_credential: Callable[[str], bool] | None = None,
    ) -> None:
        self._checker = checker
        self._db = db
        self._ingest_credential = ingest_credential

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method: str = details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED
        authorization, token = bearer(details.invocation_metadata)
        principal = self._checker.check(token)
        if (
            principal is None
            and method == INGEST_METHOD
            and self._ingest_credential is not None
            and authorization
            and self._ingest_credential(authorization)
        ):
            principal = Principal(INGEST_CREDENTIAL, Role.OPERATOR)
        if principal is None:
            reason = "missing" if not authorization else "invalid"
            return _refusal(handler, method, grpc.StatusCode.UNAUTHENTICATED, reason, None)
        access = ACCESS.get(method)
        if access is None or principal.role < access.role:
            refusal = _refusal(
                handler, method, grpc.StatusCode.PERMISSION_DENIED, "role", principal.name
            )
            if access is not None and access.change:
                return self._audited(refusal, method, principal)
            return refusal
        if access.change:
            return self._audited(handler, method, principal)
        return handler

    def _audited(self, handler: Handler, method: str, principal: Principal) -> Handler:
        """``handler`` with its outcome recorded in the audit trail before the caller
        gets its answer (an abort sends the status at once, so its record is written
        first, by the context's ``abort``)."""
        inner = handler.unary_unary
        assert inner is not None, f"{method} is not unary: it cannot be audited"
        db = self._db

        async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            recorder = _Recorder(db, principal.name, method, request, context.peer() or "")
            try:
                response = await inner(request, _AuditedContext(context, recorder))  # type: ignore[arg-type]
            except grpc.aio.AbortError:
                code = context.code()
                name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
                await recorder.record(f"{name}: {context.details() or ''}")
                raise
            except BaseException as exc:
                await recorder.record(f"INTERNAL: {type(exc).__name__}")
                raise
            await recorder.record("OK")
            return response

        return grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


class _Recorder:
    """Writes one call's audit event, once."""

    def __init__(self, db: Database, token_name: str, method: str, request: Any, peer: str):
        self._db = db
        self._token_name = token_name
        self._method = method
        self._request = request
        self._peer = peer
        self._done = False

    async def record(self, outcome: str) -> None:
        if self._done:
            return
        self._done = True
        target, fields = describe(self._method, self._request)

        def write(c: sqlite3.Connection) -> None:
            audit.record(
                c,
                token_name=self._token_name,
                method=self._method,
                target=target,
                fields=fields,
                outcome=outcome,
                peer=self._peer,
            )

        try:
            await self._db.write(write)
        except Exception:  # the change stands; its record is what failed
            log.exception("audit_write_failed", method=self._method)


class _AuditedContext:
    """The servicer context of an audited call: ``abort`` records the refusal first."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any], recorder: _Recorder):
        self._context = context
        self._recorder = recorder

    async def abort(self, code: grpc.StatusCode, details: str = "", *args: Any) -> Any:
        await self._recorder.record(f"{code.name}: {details}")
        return await self._context.abort(code, details, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _refusal(
    handler: Handler,
    method: str,
    code: grpc.StatusCode,
    reason: str,
    token_name: str | None,
) -> Handler:
    """A handler that refuses the call. Its request is parsed only when the refusal is
    audited (a known token of a weaker role); an anonymous caller's is never read."""
    message = (
        UNAUTHENTICATED_MESSAGE
        if code == grpc.StatusCode.UNAUTHENTICATED
        else PERMISSION_DENIED_MESSAGE
    )

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        log.warning(
            "admin_call_denied",
            method=audit.cut(method, 200),
            peer=context.peer(),
            reason=reason,
            **({"token_name": token_name} if token_name else {}),
        )
        await context.abort(code, message)

    deserializer = handler.request_deserializer if token_name else None
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            refuse,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.unary_unary_rpc_method_handler(
        refuse,
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )


def describe(method: str, request: Any) -> tuple[str, dict[str, str]]:
    """The audit target and fields of a change request: e.g. ("connection insider-main",
    {"connection.display_name": "Insider", "connection.api_key": "(secret)"})."""
    service = method.rsplit("/", 2)[-2].rsplit(".", 1)[-1] if method.count("/") >= 2 else ""
    noun = TARGET_NOUNS.get(service, service)
    if not isinstance(request, Message) or service in UNRECORDED_SERVICES:
        return noun, {}
    try:
        values = json_format.MessageToDict(request, preserving_proto_field_name=True)
    except (json_format.SerializeToJsonError, ValueError, TypeError):
        # A value JSON cannot show (a Timestamp out of range): the RPC refuses it itself.
        return noun, {"request": "(not recorded: a field value is out of range)"}
    name = ""
    for path in ("connection.id", "mapping.id", "id", "name", "destination"):
        value: Any = values
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, str) and value:
            name = value
            break
    target = f"{noun} {audit.cut(name, 200)}" if name else noun
    fields = audit.flatten(values)
    mask = getattr(request, "update_mask", None)
    if mask is not None and request.HasField("update_mask"):
        fields["update_mask"] = audit.cut(",".join(mask.paths))  # as sent, not camelCase
    return target, fields
