"""Backups: a copy taken while the engine serves under load holds everything acknowledged
before it began, and an engine started from it delivers and finds all of it; a stopped
folder is copied as it is; bad destinations are refused with nothing written."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import orjson
import pytest

from clients.client import TidegateClient
from engine.app import ENGINE_FILE, Engine, EngineConfig
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import (
    FAST_DELIVERY,
    TEST_DESTINATIONS,
    engine_client,
    eventually,
    insider_connection,
    post_events,
)

BIN = Path(sys.executable).parent


def points(n: int, customer: str) -> dict[str, object]:
    """An Antavo event whose points value names it: it shows in the request body."""
    return {"customer": customer, "action": "point_add", "data": {"points": n}, "id": f"ev-{n}"}


async def delivered_points(client: TidegateClient) -> list[int]:
    """The points of every event the outbound log shows sent to Insider, from the bodies."""
    found: list[int] = []
    token = ""
    while True:
        page = await client.list_logs(page_size=200, page_token=token)
        for entry in page.logs:
            if entry.status_code != 200:
                continue
            body = orjson.loads((await client.get_log(entry.id)).request_body)
            for user in body["users"]:
                found += [e["event_params"]["custom"]["points"] for e in user.get("events", [])]
        token = page.next_page_token
        if not token:
            return found


async def log_ids(client: TidegateClient) -> list[str]:
    ids: list[str] = []
    token = ""
    while True:
        page = await client.list_logs(page_size=500, page_token=token)
        ids += [entry.id for entry in page.logs]
        token = page.next_page_token
        if not token:
            return ids


def engine_at(data_dir: Path) -> Engine:
    return Engine(
        EngineConfig(
            data_dir=data_dir,
            grpc_port=0,
            http_port=0,
            delivery=FAST_DELIVERY,
            allowed_destinations=TEST_DESTINATIONS,
        )
    )


async def test_a_backup_under_load_holds_everything_acknowledged_before_it(
    tmp_path: Path, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    engine = engine_at(tmp_path / "data")
    await engine.start()
    acknowledged: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:  # ingest goes on while the backup is taken
        n = 0
        while not stop.is_set():
            batch = [points(n + i, f"customer-{(n + i) % 7}") for i in range(20)]
            status, _ = await post_events(http, engine, {"events": batch})
            assert status == 202
            acknowledged.extend(range(n, n + 20))
            n += 20
            await asyncio.sleep(0.005)

    try:
        async with engine_client(engine) as client:
            await insider_connection(client, sandbox)
            loader = asyncio.create_task(load())
            await asyncio.sleep(0.5)
            before = list(acknowledged)  # acknowledged before the backup began
            answer = await client.create_backup(str(tmp_path / "copy"))
            await asyncio.sleep(0.2)
            stop.set()
            await loader
        assert answer.destination == str(tmp_path / "copy")
        assert answer.log_partitions >= 1 and answer.secret_key_copied
    finally:
        await engine.stop(grace=1.0)
    assert len(before) >= 40

    restored = engine_at(tmp_path / "copy")
    await restored.start()
    try:
        async with engine_client(restored) as client:
            connection = await client.get_connection("insider-main")
            assert connection.api_key_hint.endswith(API_KEY_END)

            async def drained() -> bool:
                return restored.queue.depth == 0

            await eventually(drained, within=20)  # the key in the copy still decrypts
            await restored.logs.flush()
            shown = await delivered_points(client)
            ids = await log_ids(client)
        assert set(before) <= set(shown)  # nothing acknowledged before the backup is lost
        assert len(set(ids)) == len(ids)  # and no log row twice
    finally:
        await restored.stop(grace=1.0)


API_KEY_END = "6789"  # the end of tests.conftest.API_KEY, which the hint shows


def tidegate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "tidegate"), *args], capture_output=True, text=True, timeout=120
    )


async def test_tidegate_backup_goes_through_the_engine_that_serves_the_folder(
    tmp_path: Path, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    engine = engine_at(tmp_path / "data")
    await engine.start()
    try:
        announced = json.loads((tmp_path / "data" / ENGINE_FILE).read_text())
        assert announced["grpc"] == f"127.0.0.1:{engine.grpc_port}"
        async with engine_client(engine) as client:
            await insider_connection(client, sandbox)
        await post_events(http, engine, points(1, "ana"))
        done = await asyncio.to_thread(
            tidegate, "backup", "--data-dir", str(tmp_path / "data"), "--to", str(tmp_path / "copy")
        )
        assert done.returncode == 0, done.stderr
        assert f"through the engine serving it at {announced['grpc']}" in done.stderr
        again = await asyncio.to_thread(
            tidegate, "backup", "--data-dir", str(tmp_path / "data"), "--to", str(tmp_path / "copy")
        )
        assert again.returncode == 1
        assert "the backup was refused, nothing was written" in again.stderr
        assert "exists and is not empty" in again.stderr
        assert "Traceback" not in again.stderr
    finally:
        await engine.stop(grace=1.0)
    assert not (tmp_path / "data" / ENGINE_FILE).exists()
    restored = engine_at(tmp_path / "copy")
    await restored.start()
    try:
        async with engine_client(restored) as client:
            assert [c.id for c in (await client.list_connections()).connections] == ["insider-main"]
    finally:
        await restored.stop(grace=1.0)


async def test_a_stopped_folder_is_copied_as_it_is(
    tmp_path: Path, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    engine = engine_at(tmp_path / "data")
    await engine.start()
    try:
        async with engine_client(engine) as client:
            await insider_connection(client, sandbox)
        await post_events(http, engine, {"events": [points(n, "bo") for n in range(5)]})

        async def drained() -> bool:
            return engine.queue.depth == 0

        await eventually(drained)
    finally:
        await engine.stop(grace=1.0)
    done = await asyncio.to_thread(
        tidegate, "backup", "--data-dir", str(tmp_path / "data"), "--to", str(tmp_path / "copy")
    )
    assert done.returncode == 0, done.stderr
    assert "no engine serves it: copied its files" in done.stderr
    restored = engine_at(tmp_path / "copy")
    await restored.start()
    try:
        async with engine_client(restored) as client:
            assert sorted(await delivered_points(client)) == [0, 1, 2, 3, 4]
    finally:
        await restored.stop(grace=1.0)


async def test_a_relative_destination_is_refused_and_nothing_written(tmp_path: Path) -> None:
    engine = engine_at(tmp_path / "data")
    await engine.start()
    try:
        async with engine_client(engine) as client:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.create_backup("relative/copy")
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "destination: relative/copy is not an absolute path" in (
            refused.value.details() or ""
        )
        assert not await asyncio.to_thread(Path("relative").exists)
    finally:
        await engine.stop(grace=1.0)
