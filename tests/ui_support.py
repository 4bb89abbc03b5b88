"""Shared by the outbound-log page tests: an engine with the page on a free port, log rows
written to its real store, and a logged-in HTTP session."""

from __future__ import annotations

from datetime import UTC, datetime

import aiohttp

from engine.app import Engine
from engine.outbound_log.rows import LogCustomer, LogRow, new_request_id
from engine.state import tokens


def row(
    customer: str = "c-1",
    status: int = 200,
    error: str = "",
    connection: str = "insider-main",
    response_body: str = '{"data":{"successful":{"count":1}}}',
    request_body: str = '{"users":[{"identifiers":{"uuid":"c-1"}}]}',
    at: datetime | None = None,
    name: str = "Ada Lovelace",
    tags: str = "",
) -> LogRow:
    when = at or datetime.now(UTC)
    return LogRow(
        id=new_request_id(when),
        time=when,
        connection_id=connection,
        method="POST",
        url="https://unification.useinsider.com/api/user/v1/upsert",
        status_code=status,
        response_time=0.123,
        error=error,
        customers=(LogCustomer(customer, name, "failed" if error else "delivered", error),),
        mapping_version=3,
        attempt=2 if error else 1,
        request_body=request_body,
        response_body=response_body,
        tags=tags,
    )


async def write(engine: Engine, *rows: LogRow) -> None:
    for r in rows:
        await engine.logs.append(r)
    await engine.logs.flush()


async def make_token(engine: Engine, role: tokens.Role, name: str) -> str:
    return await engine.db.write(lambda c: tokens.create_token(c, name, role)[0])


def base(engine: Engine) -> str:
    return f"http://127.0.0.1:{engine.ui_port}"


async def login(http: aiohttp.ClientSession, engine: Engine, token: str) -> str:
    """Logs ``http`` in; returns the session's CSRF token."""
    async with http.post(f"{base(engine)}/ui/session", json={"token": token}) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["csrfToken"])


def session() -> aiohttp.ClientSession:
    """A client session that keeps cookies of 127.0.0.1 (aiohttp's default jar drops
    cookies of IP addresses)."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
