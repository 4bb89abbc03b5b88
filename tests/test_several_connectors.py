"""Two connector plugins installed at once: each answers only for its own connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from clients.client import TidegateClient
from engine.app import Engine, EngineConfig
from engine.connectors import ConnectorInfo
from engine.hookspecs import hookimpl
from engine.records import (
    AntavoEvent,
    Connection,
    Customer,
    Delivery,
    ProfileChange,
    SendResult,
    Transport,
)
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import FAST_DELIVERY, eventually, insider_connection, post_events

ECHO = "echo"


def echo_plugin() -> SimpleNamespace:
    """A minimal second connector: posts {"id", "events"} per customer to a URL."""

    @hookimpl
    def connector_info() -> ConnectorInfo:
        return ConnectorInfo(name=ECHO, max_batch_items=10, max_batch_bytes=100_000)

    @hookimpl
    def identify(connection: Connection, customer: Customer) -> Mapping[str, Any] | None:
        return {"id": customer.id} if connection.connector == ECHO else None

    @hookimpl
    def map_profile(
        connection: Connection, customer: Customer, change: ProfileChange
    ) -> Mapping[str, Any] | None:
        return dict(change.changes) if connection.connector == ECHO else None

    @hookimpl
    def map_event(
        connection: Connection, customer: Customer, event: AntavoEvent
    ) -> Sequence[Mapping[str, Any]] | None:
        return [{"name": event.action}] if connection.connector == ECHO else None

    async def post(deliveries: Sequence[Delivery], url: str, transport: Transport) -> SendResult:
        body = orjson.dumps([{"id": d.customer.id, "events": d.events} for d in deliveries])
        await transport.request("POST", url, headers={}, body=body)
        return SendResult()

    @hookimpl
    def send(
        connection: Connection, deliveries: Sequence[Delivery], transport: Transport
    ) -> Awaitable[SendResult] | None:
        if connection.connector != ECHO:
            return None
        return post(deliveries, connection.settings["url"], transport)

    return SimpleNamespace(
        connector_info=connector_info,
        identify=identify,
        map_profile=map_profile,
        map_event=map_event,
        send=send,
    )


@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[str, list[Any]]]:
    received: list[Any] = []

    async def handle(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/hook", received
    await runner.cleanup()


async def test_each_connector_delivers_only_its_own_connections(
    tmp_path: Path,
    sandbox: RunningSandbox,
    echo_server: tuple[str, list[Any]],
    http: aiohttp.ClientSession,
) -> None:
    url, received = echo_server
    engine = Engine(
        EngineConfig(
            data_dir=tmp_path,
            grpc_port=0,
            http_port=0,
            delivery=FAST_DELIVERY,
            extra_plugins=[echo_plugin()],
        )
    )
    await engine.start()
    try:
        async with TidegateClient(f"127.0.0.1:{engine.grpc_port}") as client:
            await insider_connection(client, sandbox)
            await client.create_connection(
                "echo-1", connector=ECHO, api_key="k", settings={"url": url}
            )
            await client.add_event_mapping("echo-1", "point_add", "points")
            status, body = await post_events(
                http, engine, {"customer": "c1", "action": "point_add", "data": {"points": 5}}
            )
            assert (status, body["deliveries_queued"]) == (202, 2)

            async def both_delivered() -> bool:
                return bool(received) and sandbox.state.lookup("uuid", "c1") is not None

            await eventually(both_delivered)
            await asyncio.sleep(0.1)
            assert received == [[{"id": "c1", "events": [{"name": "point_add"}]}]]
            insider_user = sandbox.state.lookup("uuid", "c1")
            assert insider_user is not None
            assert [e["event_name"] for e in insider_user.events] == ["loyalty_points_earned"]
            assert len(sandbox.state.requests) == 1
    finally:
        await engine.stop()
