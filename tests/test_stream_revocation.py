"""A live stream outlives the token check its call passed at the start: StreamLogs over
gRPC and the page's SSE stream end when their token is revoked (through the API or with
``tidegate token revoke`` on the data folder) or when the page session logs out, and keep
running while the token holds."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import pytest

from clients.client import TidegateClient
from engine.app import Engine, EngineConfig
from engine.cli import main
from engine.pb import logs_pb2, logs_pb2_grpc, tokens_pb2_grpc
from engine.pb import tokens_pb2 as tpb
from engine.state import tokens
from tests.test_ui_server import read_event
from tests.ui_support import base, login, make_token, row, session, write


@pytest.fixture
def engine_config(engine_config: EngineConfig) -> EngineConfig:
    engine_config.ui_port = 0
    return engine_config


def open_stream(engine: Engine, channel: grpc.aio.Channel, token: str) -> object:
    return logs_pb2_grpc.LogServiceStub(channel).StreamLogs(
        logs_pb2.StreamLogsRequest(), metadata=(("authorization", f"Bearer {token}"),)
    )


async def next_rows(call: object, within: float = 10.0) -> list[str]:
    async with asyncio.timeout(within):
        got = await call.read()  # type: ignore[attr-defined]
    return [entry.id for entry in got.logs]


async def ended_with(call: object, within: float = 10.0) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        async with asyncio.timeout(within):
            while True:
                await next_rows(call, within)
    return ended.value


async def test_a_grpc_stream_ends_when_its_token_is_revoked_through_the_api(
    engine: Engine, client: TidegateClient
) -> None:
    viewer = await make_token(engine, tokens.Role.VIEWER, "dashboard")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.grpc_port}") as channel:
        call = open_stream(engine, channel, viewer)
        await call.initial_metadata()  # type: ignore[attr-defined]
        await asyncio.sleep(2.5)  # past two rechecks: a good token keeps its stream
        first = row("ada")
        await write(engine, first)
        assert await next_rows(call) == [first.id]
        await tokens_pb2_grpc.TokenServiceStub(client.channel).RevokeToken(
            tpb.RevokeTokenRequest(name="dashboard")
        )
        ended = await ended_with(call)
    assert ended.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked or has expired" in (ended.details() or "")
    assert viewer not in (ended.details() or "")
    assert engine.logs.subscribers == 0


async def test_a_grpc_stream_ends_when_its_token_is_revoked_on_the_data_folder(
    engine: Engine,
) -> None:
    await make_token(engine, tokens.Role.VIEWER, "wallboard")
    viewer = await make_token(engine, tokens.Role.VIEWER, "wallboard-2")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.grpc_port}") as channel:
        call = open_stream(engine, channel, viewer)
        await call.initial_metadata()  # type: ignore[attr-defined]
        # Another process's revocation: the engine learns it from the database.
        code = await asyncio.to_thread(
            main,
            ["token", "revoke", "--name", "wallboard-2", "--data-dir", str(engine.config.data_dir)],
        )
        assert code == 0
        ended = await ended_with(call)
    assert ended.code() == grpc.StatusCode.UNAUTHENTICATED


async def read_until_ended(stream: aiohttp.StreamReader, within: float = 10.0) -> list[str]:
    while True:
        event = await read_event(stream, within)
        if event[0] == "event: ended":
            return event


async def test_the_page_stream_ends_when_its_token_is_revoked(engine: Engine) -> None:
    token = await make_token(engine, tokens.Role.VIEWER, "page")
    async with session() as http:
        await login(http, engine, token)
        async with http.get(f"{base(engine)}/ui/api/logs/stream") as r:
            assert await read_event(r.content) == ["retry: 1000"]
            await asyncio.sleep(2.5)  # past two rechecks: the session holds
            first = row("bo")
            await write(engine, first)
            event = await read_event(r.content)
            assert event[:2] == ["event: logs", f"id: {first.id}"]
            await engine.db.write(lambda c: tokens.revoke_token(c, "page"))
            ended = await read_until_ended(r.content)
            assert "log in again" in ended[1]
            assert await asyncio.wait_for(r.content.read(), 5) == b""  # closed
        async with http.get(f"{base(engine)}/ui/api/logs") as r:
            assert r.status == 401  # the session went with its token


async def test_the_page_stream_ends_at_log_out(engine: Engine) -> None:
    token = await make_token(engine, tokens.Role.VIEWER, "page")
    async with session() as http, session() as other:
        csrf = await login(http, engine, token)
        await login(other, engine, token)  # the same token in another browser
        async with (
            http.get(f"{base(engine)}/ui/api/logs/stream") as mine,
            other.get(f"{base(engine)}/ui/api/logs/stream") as theirs,
        ):
            assert await read_event(mine.content) == ["retry: 1000"]
            assert await read_event(theirs.content) == ["retry: 1000"]
            async with http.post(f"{base(engine)}/ui/logout", headers={"X-CSRF-Token": csrf}) as r:
                assert r.status in (200, 204)
            await read_until_ended(mine.content)
            second = row("cy")
            await write(engine, second)
            event = await read_event(theirs.content)  # the other session carries on
            assert event[:2] == ["event: logs", f"id: {second.id}"]
