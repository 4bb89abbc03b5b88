"""Maps Tidegate errors to gRPC status codes, so every RPC fails with a message a person
can act on and never with a stack trace."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog

from engine.errors import BacklogFullError, InvalidInputError, NotFoundError, TidegateError

log = structlog.get_logger("tidegate.admin")
Context = grpc.aio.ServicerContext[Any, Any]
"""The servicer context of any admin RPC."""
R = TypeVar("R")


def rpc(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Wraps a unary servicer method so its errors become gRPC statuses, checked in this
    order:

    - ``InvalidInputError`` -> ``INVALID_ARGUMENT``, the message starting with the field;
    - ``NotFoundError`` -> ``NOT_FOUND``;
    - ``BacklogFullError`` -> ``RESOURCE_EXHAUSTED`` (ingest refused; retry later);
    - any other ``TidegateError`` -> ``FAILED_PRECONDITION`` (e.g. the log store stopped);
    - any other exception -> ``INTERNAL`` with "internal error; see the engine log", the
      stack trace logged as ``rpc_failed`` and never sent to the client.

    An abort the method made itself (``context.abort``) passes through unchanged."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: Context) -> R:
        try:
            return await method(self, request, context)
        except InvalidInputError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except NotFoundError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except BacklogFullError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except TidegateError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("rpc_failed", method=method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the engine log")
        raise AssertionError("unreachable")

    return wrapper
