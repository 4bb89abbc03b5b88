"""StreamLogs resource limits: at most ``max_subscribers`` live streams (more are
RESOURCE_EXHAUSTED), and a subscriber that leaves more than its limit of rows or bytes
unread is cut off with RESOURCE_EXHAUSTED saying why, its rows released at once. The
store, the gRPC API of an in-process engine, and the memory of a real ``tidegate serve``
process with clients that never read."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from clients.client import read_token
from engine.app import Engine, EngineConfig
from engine.outbound_log.rows import LogCustomer, LogQuery, LogRow, new_request_id
from engine.outbound_log.sql import listed
from engine.outbound_log.store import (
    LogStore,
    StreamBehindError,
    TooManySubscribersError,
    row_bytes,
)
from engine.pb import logs_pb2, logs_pb2_grpc
from tests.conftest import FAST_DELIVERY, engine_client
from tests.faultload import (
    API_KEY,
    DATA_DIRS,
    PARTNER,
    SOURCE_EVENT,
    TARGET_EVENT,
    Harness,
    admin_client,
)

HOSTILE = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 65536)]
"""A client that never grows its receive window: the engine, not the client, holds
what it does not read."""


# --- the store -----------------------------------------------------------------------------


def big_row(n: int, customers: int = 100) -> LogRow:
    return LogRow(
        id=new_request_id(),
        time=datetime.now(UTC),
        connection_id="c",
        method="POST",
        url="https://unification.useinsider.com/api/user/v1/upsert",
        status_code=400,
        response_time=0.01,
        error="refused",
        customers=tuple(
            LogCustomer(f"customer-{n}-{i}", "user", "dead_letter", "e" * 200)
            for i in range(customers)
        ),
        mapping_version=1,
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[LogStore]:
    log_store = LogStore(tmp_path / "log", max_subscribers=3)
    await log_store.start()
    yield log_store
    await log_store.close()


async def append_all(store: LogStore, rows: list[LogRow]) -> None:
    for row in rows:
        await store.append(row)
    await store.flush()


async def test_a_subscriber_past_its_byte_limit_is_cut_and_released(store: LogStore) -> None:
    rows = [big_row(n) for n in range(40)]
    one_row = row_bytes(listed(rows[0], ""))
    assert one_row > 100 * 200  # 100 customers with 200-character errors
    idle = store.subscribe(LogQuery(), max_pending_bytes=10 * one_row)
    reader = store.subscribe(LogQuery())
    for start in range(0, 40, 4):
        await append_all(store, rows[start : start + 4])
    with pytest.raises(StreamBehindError) as behind:
        while True:
            await asyncio.wait_for(anext(idle), 5)
    message = str(behind.value)
    assert "KiB of rows" in message and "reconnect" in message
    assert f"the limit is {10 * one_row // 1024} KiB" in message
    assert store.subscribers == 1  # the idle one is gone; its rows with it
    await store.close()
    assert [r async for batch in reader for r in batch] == [listed(r, "") for r in rows]


async def test_a_subscriber_within_its_byte_limit_gets_every_row(store: LogStore) -> None:
    rows = [big_row(n) for n in range(10)]
    slow = store.subscribe(LogQuery(), max_pending_bytes=20 * row_bytes(listed(rows[0], "")))
    await append_all(store, rows)
    await store.close()
    assert [r async for batch in slow for r in batch] == [listed(r, "") for r in rows]


async def test_subscribers_past_the_limit_are_refused_until_one_leaves(store: LogStore) -> None:
    subscriptions = [store.subscribe(LogQuery()) for _ in range(3)]
    with pytest.raises(TooManySubscribersError, match="3 log streams are open"):
        store.subscribe(LogQuery())
    subscriptions[0].close()
    assert store.subscribers == 2
    store.subscribe(LogQuery())
    assert store.subscribers == 3


# --- the gRPC API --------------------------------------------------------------------------


async def test_stream_logs_past_the_limit_is_resource_exhausted(tmp_path: Path) -> None:
    engine = Engine(
        EngineConfig(
            data_dir=tmp_path / "data",
            grpc_port=0,
            http_port=0,
            delivery=FAST_DELIVERY,
            max_log_streams=2,
        )
    )
    await engine.start()
    try:
        async with engine_client(engine) as client:
            request = logs_pb2.StreamLogsRequest()
            first = client.logs.StreamLogs(request)
            second = client.logs.StreamLogs(request)
            await first.initial_metadata()
            await second.initial_metadata()
            third = client.logs.StreamLogs(request)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in third:
                    pass
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "2 log streams are open" in (refused.value.details() or "")
            first.cancel()

            async def released() -> bool:
                return engine.logs.subscribers == 1

            deadline = time.monotonic() + 10
            while not await released():
                assert time.monotonic() < deadline, "a cancelled stream kept its subscription"
                await asyncio.sleep(0.02)
            fourth = client.logs.StreamLogs(request)
            await fourth.initial_metadata()
            assert engine.logs.subscribers == 2
            second.cancel()
            fourth.cancel()
    finally:
        await engine.stop(grace=0.5)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The admin token as call metadata, for the raw channels these tests open."""
    return (("authorization", f"Bearer {token}"),)


async def test_a_client_that_never_reads_is_cut_off_over_grpc(tmp_path: Path) -> None:
    engine = Engine(EngineConfig(data_dir=tmp_path / "data", grpc_port=0, http_port=0))
    await engine.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{engine.grpc_port}", options=HOSTILE)
    token = bearer(read_token(tmp_path / "data"))
    try:
        call = logs_pb2_grpc.LogServiceStub(channel).StreamLogs(
            logs_pb2.StreamLogsRequest(), metadata=token
        )
        await call.initial_metadata()
        assert engine.logs.subscribers == 1
        subscription = weakref.ref(next(iter(engine.logs._subscribers)))
        appended = 0
        while engine.logs.subscribers:  # cut off: the store let it go
            assert appended < 20_000, "a client that never reads was never cut off"
            for _ in range(100):
                await engine.logs.append(big_row(appended))
                appended += 1
            await engine.logs.flush()
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            async with asyncio.timeout(30):
                async for _ in call:  # what gRPC had buffered, then the status
                    pass
        assert cut.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = cut.value.details() or ""
        assert "fell behind" in details and "the limit is 2048 KiB" in details
        gc.collect()
        left = subscription()  # gRPC may still hold the abort's traceback, and it
        assert left is None or (left._pending_rows, left._pending_bytes) == (0, 0)
    finally:
        await channel.close()
        await engine.stop(grace=0.5)


# --- a real engine's memory ------------------------------------------------------------------

CONNECTIONS = 8
IDLE_STREAMS = 31  # and one more: the default limit of 32
OBSERVE_SECONDS = 40
GROWTH_BOUND_MB = 250
"""32 idle subscribers hold at most 2 MiB (estimated) of unread rows each in the engine,
about 64 MB, plus a message in gRPC's hands per stream, on top of what the load alone
adds (with or without streams, measured side by side; not given back at once after it
stops). So the test bounds the growth
during and after; that a stream's rows go when it ends is checked in process."""


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def cut_streams(log_path: Path) -> int:
    return log_path.read_text(errors="replace").count('"event": "log_stream_cut"')


@pytest.mark.long
async def test_clients_that_never_read_do_not_grow_a_real_engine(tmp_path: Path) -> None:
    harness = Harness(tmp_path)
    await asyncio.to_thread(harness.start)
    channels: list[grpc.aio.Channel] = []
    try:
        async with admin_client(harness.engine.target) as client:
            for i in range(CONNECTIONS):
                await client.create_connection(
                    f"c{i}",
                    api_key=API_KEY,
                    settings={"partner_name": PARTNER, "base_url": harness.sandbox.url},
                )
                await client.create_event_mapping(
                    f"c{i}", SOURCE_EVENT, TARGET_EVENT, [("points", "points", True)]
                )
        assert harness.engine.process is not None
        pid = harness.engine.process.pid
        # Long customer ids (within the 256 allowed) make each row, and what it costs a
        # subscriber, big: the limit is reached sooner on a busy machine.
        # The load is kept moderate: the engine's memory grows with the events it takes
        # (about 6 KB each on the shared test machine, streams or not), which would drown
        # what the streams hold.
        load = harness.load(customers=2000, workers=2, batch=50, pause=0.5, run_id="r" * 230)
        load.start()
        await asyncio.sleep(5)
        before = rss_mb(pid)
        token = bearer(read_token(DATA_DIRS[harness.engine.target]))
        idle = []
        for _ in range(IDLE_STREAMS + 1):
            channel = grpc.aio.insecure_channel(harness.engine.target, options=HOSTILE)
            channels.append(channel)
            call = logs_pb2_grpc.LogServiceStub(channel).StreamLogs(
                logs_pb2.StreamLogsRequest(), metadata=token
            )
            idle.append(call)
        for call in idle:
            await call.initial_metadata()
        extra = grpc.aio.insecure_channel(harness.engine.target)
        channels.append(extra)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in logs_pb2_grpc.LogServiceStub(extra).StreamLogs(
                logs_pb2.StreamLogsRequest(), metadata=token
            ):
                pass
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The engine's memory, sampled each second while the idle streams hold what they
        # do not read (each is cut off once it holds its limit).
        peak = before
        started = time.monotonic()
        while time.monotonic() - started < OBSERVE_SECONDS:
            await asyncio.sleep(1)
            peak = max(peak, rss_mb(pid))
        cut = cut_streams(harness.engine.log_path)
        for call in idle:
            call.cancel()
        await load.stop()
        await asyncio.sleep(3)
        after = rss_mb(pid)
        report = (
            f"RSS before {before:.0f} MB, peak {peak:.0f} MB, after {after:.0f} MB;"
            f" {cut} of {len(idle)} idle streams cut off, {load.acknowledged_events} events"
        )
        print(report)
        assert peak - before < GROWTH_BOUND_MB, report
        assert after - before < GROWTH_BOUND_MB, report
    finally:
        for channel in channels:
            await channel.close()
        await asyncio.to_thread(harness.close)
