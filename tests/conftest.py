"""Shared fixtures: a real engine (gRPC and HTTP on port 0, files on tmp_path) and a real
Insider sandbox over loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from clients.client import TidegateClient, read_token
from engine.app import Engine, EngineConfig
from engine.connector.destinations import Allowance
from engine.delivery.worker import DeliverySettings
from plugins.insider.sandbox import RunningSandbox, SandboxConfig, start_sandbox
from tests.faultload import Harness

PARTNER = "acme"
API_KEY = "ucd-secret-key-0123456789"
FAST_DELIVERY = DeliverySettings(
    linger=0.01, base_backoff=0.05, max_backoff=0.2, request_timeout=5.0
)
TEST_DESTINATIONS = (Allowance.parse("127.0.0.1"), Allowance.parse("insider.test"))
"""What test engines allow besides Insider's hosts: the loopback sandbox, and a name that
tests store but never send to (``serve --allow-destination``)."""


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    """Real ``tidegate sandbox`` and ``tidegate serve`` processes for the fault tests."""
    h = Harness(tmp_path)
    try:
        h.start()
        yield h
    finally:
        h.close()


@pytest.fixture
async def sandbox() -> AsyncIterator[RunningSandbox]:
    running = await start_sandbox(config=SandboxConfig(partner_name=PARTNER, api_key=API_KEY))
    yield running
    await running.close()


def embedded_config(tmp_path: Path) -> EngineConfig:
    """A test engine's configuration: ports chosen by the system, fast retries."""
    return EngineConfig(
        data_dir=tmp_path / "data",
        grpc_port=0,
        http_port=0,
        delivery=FAST_DELIVERY,
        allowed_destinations=TEST_DESTINATIONS,
    )


@pytest.fixture
def engine_config(tmp_path: Path) -> EngineConfig:
    return embedded_config(tmp_path)


@pytest.fixture
async def engine(engine_config: EngineConfig) -> AsyncIterator[Engine]:
    running = Engine(engine_config)
    await running.start()
    yield running
    await running.stop(grace=1.0)


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[TidegateClient]:
    async with engine_client(engine) as c:
        yield c


def engine_client(engine: Engine) -> TidegateClient:
    """A client of an in-process engine with the admin token its first start wrote."""
    return TidegateClient(f"127.0.0.1:{engine.grpc_port}", read_token(engine.config.data_dir))


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post_events(
    http: aiohttp.ClientSession, engine: Engine, body: Any, **kwargs: Any
) -> tuple[int, Any]:
    async with http.post(
        f"http://127.0.0.1:{engine.http_port}/v1/events", json=body, **kwargs
    ) as r:
        return r.status, await r.json()


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """Waits until ``check`` holds; fails the test with a clear message otherwise."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s: {check.__name__}")
        await asyncio.sleep(0.02)


async def insider_connection(
    client: TidegateClient,
    sandbox: RunningSandbox,
    connection_id: str = "insider-main",
    **kwargs: Any,
) -> None:
    """A connection to the sandbox mapping a typical set of attributes and events."""
    await client.create_connection(
        connection_id,
        api_key=kwargs.pop("api_key", API_KEY),
        settings={"partner_name": PARTNER, "base_url": sandbox.url},
        **kwargs,
    )
    for source, target, custom in [
        ("email", "email", False),
        ("first_name", "name", False),
        ("last_name", "surname", False),
        ("tier", "loyalty_tier", True),
    ]:
        await client.create_profile_mapping(connection_id, source, target, custom=custom)
    await client.create_event_mapping(
        connection_id,
        "checkout",
        "purchase",
        [
            ("transaction_id", "event_group_id", False),
            ("total", "unit_sale_price", False),
            ("currency", "currency", False),
            ("channel", "sales_channel", True),
        ],
    )
    await client.create_event_mapping(
        connection_id, "point_add", "loyalty_points_earned", [("points", "points", True)]
    )
