"""Maps Tidegate errors to gRPC status codes, so every RPC fails with a message a person
can act on and never with a stack trace."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf.message import DecodeError

from engine.admin.limits import check_request
from engine.errors import BacklogFullError, InvalidInputError, NotFoundError, TidegateError

log = structlog.get_logger("tidegate.admin")
Context = grpc.aio.ServicerContext[Any, Any]
"""The servicer context of any admin RPC."""
R = TypeVar("R")
MAX_MESSAGE_BYTES = 900
"""UTF-8 bytes of an error message sent to a client at most: gRPC carries it in a
trailer, and a client refuses trailers past its metadata limit."""


def bounded(message: str) -> str:
    """``message`` cut to ``MAX_MESSAGE_BYTES`` of UTF-8, saying how much was cut."""
    encoded = message.encode()
    if len(encoded) <= MAX_MESSAGE_BYTES:
        return message
    kept = encoded[: MAX_MESSAGE_BYTES - 60].decode(errors="ignore")
    return f"{kept}... ({len(message) - len(kept)} more characters)"


def status_of(exc: TidegateError) -> grpc.StatusCode:
    """The status an error the engine raised on purpose answers with."""
    if isinstance(exc, InvalidInputError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, BacklogFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.FAILED_PRECONDITION


class UndecodableRequest:
    """What a request that protobuf cannot decode arrives as (see ``DecodeGuard``)."""

    def __init__(self, type_name: str) -> None:
        self.message = (
            f"request: not a valid {type_name} message; a message nests at most 100 levels "
            "deep (each level of a Struct takes two) and strings are UTF-8"
        )


def _guarded(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    type_name = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    name = type_name.full_name if type_name is not None else "request"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return UndecodableRequest(name)

    return deserialize


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Hands a request protobuf cannot decode (too deeply nested, invalid UTF-8) to the
    RPC as an ``UndecodableRequest``, which ``rpc`` answers with ``INVALID_ARGUMENT``;
    without it gRPC answers ``UNKNOWN`` with Python's exception text."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        deserializer = getattr(handler, "request_deserializer", None)
        if deserializer is None:
            return handler
        return handler._replace(request_deserializer=_guarded(deserializer))  # type: ignore[union-attr,no-any-return]


async def refuse_undecodable(request: Any, context: Context) -> None:
    """Aborts with ``INVALID_ARGUMENT`` when ``request`` could not be decoded."""
    if isinstance(request, UndecodableRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)


def rpc(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Wraps a unary servicer method so its errors become gRPC statuses, checked in this
    order:

    - ``InvalidInputError`` -> ``INVALID_ARGUMENT``, the message starting with the field;
    - ``NotFoundError`` -> ``NOT_FOUND``;
    - ``BacklogFullError`` -> ``RESOURCE_EXHAUSTED`` (ingest refused; retry later);
    - any other ``TidegateError`` -> ``FAILED_PRECONDITION`` (e.g. the log store stopped);
    - any other exception -> ``INTERNAL`` with "internal error; see the engine log", the
      stack trace logged as ``rpc_failed`` and never sent to the client.

    Before the method runs, the request is checked against the limits of
    ``engine.admin.limits`` (``INVALID_ARGUMENT`` past one). Every message is cut to
    ``MAX_MESSAGE_BYTES``. An abort the method made itself (``context.abort``)
    passes through unchanged."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> R:
        await refuse_undecodable(request, context)
        try:
            check_request(request)
            return await method(self, request, context)
        except TidegateError as exc:
            await context.abort(status_of(exc), bounded(str(exc)))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("rpc_failed", method=method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the engine log")
        raise AssertionError("unreachable")

    return wrapper
