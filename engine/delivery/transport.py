"""The HTTP transport handed to ``send`` hooks: one aiohttp session, timeouts, and a
record of every exchange for the outbound log."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp

from engine.connector.records import HttpResponse
from engine.errors import RetryableError
from engine.outbound_log.rows import new_request_id

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


def _logged(body: bytes) -> str:
    if len(body) <= MAX_LOGGED_BODY_BYTES:
        return body.decode("utf-8", errors="replace")
    cut = len(body) - MAX_LOGGED_BODY_BYTES
    return body[:MAX_LOGGED_BODY_BYTES].decode("utf-8", errors="replace") + f"...[{cut} bytes cut]"


class RecordingTransport:
    """Implements ``engine.connector.Transport`` for one send; ``exchanges`` lists what went out."""

    def __init__(
        self, session: aiohttp.ClientSession, timeout: float, tags: tuple[str, ...] = ()
    ) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self.tags = tags
        self.exchanges: list[Exchange] = []

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

        def record(status: int, response: bytes, error: str, ambiguous: bool) -> None:
            self.exchanges.append(
                Exchange(
                    request_id,
                    sent_at,
                    method,
                    url,
                    status,
                    time.perf_counter() - started,
                    _logged(body),
                    _logged(response),
                    error,
                    ambiguous,
                    tuple(tags) + self.tags,
                )
            )

        try:
            async with self._session.request(
                method, url, headers=dict(headers), data=body, timeout=self._timeout
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
            message = f"cannot connect: {exc.strerror or exc.__class__.__name__}"
            record(0, b"", message, False)
            raise RetryableError(message) from None
        except (aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
            message = (
                f"connection lost before the answer ({exc.__class__.__name__}; "
                "the request may have been applied)"
            )
            record(0, b"", message, True)
            raise RetryableError(message) from None
        record(answer.status, answer.body, "", False)
        return answer
