"""Two connector plugins installed at once: the engine calls each only for its own
connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from engine.app import Engine, EngineConfig
from engine.connector.hookspecs import hookimpl
from engine.connector.info import ConnectorInfo
from engine.connector.records import (
    AntavoEvent,
    Connection,
    Customer,
    Delivery,
    ProfileChange,
    SendResult,
    Transport,
)
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import (
    FAST_DELIVERY,
    TEST_DESTINATIONS,
    engine_client,
    eventually,
    insider_connection,
    post_events,
)

ECHO = "echo"


class EchoConnector:
    """A minimal second connector: posts {"id", "events"} per customer to a URL. Written as
    a third party would: no check of whose connection it got, a plain ``async def send``."""

    @hookimpl
    def connector_info(self) -> ConnectorInfo:
        return ConnectorInfo(name=ECHO, max_batch_items=10, max_batch_bytes=100_000)

    @hookimpl
    def identify(self, customer: Customer) -> Mapping[str, Any]:
        return {"id": customer.id}

    @hookimpl
    def map_profile(self, change: ProfileChange) -> Mapping[str, Any]:
        return dict(change.changes)

    @hookimpl
    def map_event(self, event: AntavoEvent) -> Sequence[Mapping[str, Any]]:
        return [{"name": event.action}]

    @hookimpl
    async def send(
        self, connection: Connection, deliveries: Sequence[Delivery], transport: Transport
    ) -> SendResult:
        body = orjson.dumps([{"id": d.customer.id, "events": d.events} for d in deliveries])
        await transport.request("POST", connection.settings["url"], headers={}, body=body)
        return SendResult.of(deliveries)


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
            allowed_destinations=TEST_DESTINATIONS,
            extra_plugins=[EchoConnector()],
        )
    )
    await engine.start()
    try:
        async with engine_client(engine) as client:
            await insider_connection(client, sandbox)
            await client.create_connection(
                "echo-1", connector=ECHO, api_key="k", settings={"url": url}
            )
            await client.create_event_mapping("echo-1", "point_add", "points")
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
