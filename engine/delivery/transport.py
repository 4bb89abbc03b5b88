"""The HTTP transport handed to ``send`` hooks: one aiohttp session, timeouts, and a
record of every exchange for the outbound log.

Every request's URL is checked before it goes out (``check_url``: the connector's
``destination_hosts`` and the operator's allowed destinations); a refused one raises
``DestinationRefusedError``, which pauses the connection. Redirects are not followed (a
redirect would carry the key's headers to a host nobody checked). The session's
resolver (``GuardedResolver``) refuses to connect to a host name that resolves only to
loopback, private or link-local addresses unless the operator allowed that host (DNS
rebinding). The connection's secrets are taken out of the logged bodies and errors.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import structlog
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from engine.connector.destinations import DestinationError, address_problem, echo
from engine.connector.records import HttpResponse
from engine.errors import AuthError, RetryableError
from engine.outbound_log.rows import new_request_id

log = structlog.get_logger("tidegate.delivery")

MAX_LOGGED_BODY_BYTES = 2_000_000
"""Bodies longer than this are cut in the log (Insider accepts up to 5 MB per request)."""


@dataclass(frozen=True)
class Exchange:
    """One request as the outbound log records it. Headers are not recorded at all, so
    secrets carried in headers never reach the log."""

    request_id: str
    time: datetime
    method: str
    url: str
    status: int
    elapsed: float
    request_body: str
    response_body: str
    error: str
    ambiguous: bool
    tags: tuple[str, ...] = ()


REDACTED = "[redacted]"


class DestinationRefusedError(AuthError):
    """A request's URL is not a destination its connection may send to. Like a refused
    key, it pauses the connection and keeps its backlog: the operator fixes the setting
    (or allows the destination at start-up) and resumes."""


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``[redacted]``."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _logged(body: bytes, secrets: tuple[str, ...] = ()) -> str:
    if len(body) <= MAX_LOGGED_BODY_BYTES:
        text = body.decode("utf-8", errors="replace")
    else:
        cut = len(body) - MAX_LOGGED_BODY_BYTES
        text = (
            body[:MAX_LOGGED_BODY_BYTES].decode("utf-8", errors="replace") + f"...[{cut} bytes cut]"
        )
    return redact(text, secrets) if secrets else text


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, then drops loopback, private,
    link-local and other non-public addresses, unless the operator allowed the host by
    name (``allowed_hosts``). A name left with no address is refused as a connection
    error, so a name that passed the destination check cannot be turned to an internal
    address by its DNS answer (DNS rebinding). IP literals never reach a resolver: the
    destination check judges them."""

    def __init__(self, allowed_hosts: Iterable[str] = (), inner: AbstractResolver | None = None):
        self._allowed = frozenset(h.lower() for h in allowed_hosts)
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if host.lower().rstrip(".") in self._allowed:
            return results
        public = [r for r in results if not _internal(r["host"])]
        if not public:
            raise OSError(
                f"{echo(host)} resolves only to non-public addresses "
                f"({', '.join(sorted({str(r['host']) for r in results})[:4])}); "
                "not connecting (allow it with --allow-destination if it is meant to be)"
            )
        return public

    async def close(self) -> None:
        await self._inner.close()


def _internal(address: str) -> bool:
    try:
        return bool(address_problem(ipaddress.ip_address(address.split("%", 1)[0])))
    except ValueError:
        return True


def guarded_session(allowed_hosts: Iterable[str]) -> aiohttp.ClientSession:
    """The delivery session: the guarded resolver, no proxies from the environment."""
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(allowed_hosts))
    return aiohttp.ClientSession(connector=connector, trust_env=False)


def _never_refused(_: str) -> None:
    return None


class RecordingTransport:
    """Implements ``engine.connector.Transport`` for one send; ``exchanges`` lists what went
    out. ``check_url`` raises ``DestinationError`` for a URL the connection may not send
    to; ``secrets`` are taken out of what is recorded."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        timeout: float,
        tags: tuple[str, ...] = (),
        check_url: Callable[[str], Any] = _never_refused,
        secrets: tuple[str, ...] = (),
    ) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self.tags = tags
        self.exchanges: list[Exchange] = []
        self._check_url = check_url
        self._secrets = secrets

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        tags: Collection[str] = (),
    ) -> HttpResponse:
        request_id = new_request_id()
        sent_at = datetime.now(UTC)
        started = time.perf_counter()

        secrets = self._secrets

        def record(status: int, response: bytes, error: str, ambiguous: bool) -> None:
            self.exchanges.append(
                Exchange(
                    request_id,
                    sent_at,
                    method,
                    redact(url, secrets),
                    status,
                    time.perf_counter() - started,
                    _logged(body, secrets),
                    _logged(response, secrets),
                    redact(error, secrets),
                    ambiguous,
                    tuple(tags) + self.tags,
                )
            )

        try:
            self._check_url(url)
        except DestinationError as exc:
            message = f"destination refused, nothing sent: {exc}"
            record(0, b"", message, False)
            raise DestinationRefusedError(redact(message, secrets)) from None
        try:
            async with self._session.request(
                method,
                url,
                headers=dict(headers),
                data=body,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                payload = await response.read()
                answer = HttpResponse(
                    response.status, response.headers, payload, time.perf_counter() - started
                )
        except asyncio.CancelledError:
            # Shutdown cut the request: it may have been applied, and the log must say so.
            record(
                0,
                b"",
                "cut by shutdown before the answer (the request may have been applied)",
                True,
            )
            raise
        except TimeoutError:
            message = (
                f"no answer within {self._timeout.total:g} s (the request may have been applied)"
            )
            record(0, b"", message, True)
            raise RetryableError(message) from None
        except aiohttp.ClientConnectorError as exc:
            reason = exc.strerror or str(exc.os_error) or exc.__class__.__name__
            message = f"cannot connect: {reason}"
            record(0, b"", message, False)
            raise RetryableError(message) from None
        except (aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
            message = (
                f"connection lost before the answer ({exc.__class__.__name__}; "
                "the request may have been applied)"
            )
            record(0, b"", message, True)
            raise RetryableError(message) from None
        except Exception as exc:
            # Anything else (aiohttp refusing a header value, say) is a failed attempt
            # like a connection error: logged, counted, retried within the retry window.
            # A value error is raised while the request is built, before anything is sent.
            built = isinstance(exc, ValueError | TypeError)
            detail = redact(f"{exc.__class__.__name__}: {exc}", secrets)
            message = f"the request could not be sent: {detail[:300]}"
            if not built:
                message += " (the request may have been applied)"
            log.warning("delivery_request_failed", url=redact(url, secrets)[:200], error=message)
            record(0, b"", message, not built)
            raise RetryableError(message) from None
        record(answer.status, answer.body, "", False)
        return answer
