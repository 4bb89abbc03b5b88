"""The same engine-level tests on both queue backends: a module that imports
``engine_config`` and ``nats_cluster`` from here runs each test that uses the engine twice,
on the embedded SQLite queue and on JetStream (a process with ``--role all`` on the
module's three-node cluster, with one partition: ingest publishes, the worker pulls, the
log service writes the outbound log from ``TG_LOG``). ``drained`` waits for the queue to
be empty on either backend."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nats
import pytest
from cryptography.fernet import Fernet

from clients.client import TidegateClient
from engine.app import Engine, EngineConfig
from engine.broker import streams
from engine.pb import connections_pb2 as cpb
from engine.state.secrets import SECRET_KEY_ENV
from tests.conftest import embedded_config, eventually
from tests.natscluster import nats_cluster
from tests.test_broker_cluster import broker_engine_config, reset_broker

__all__ = ["drained", "engine_config", "nats_cluster"]


@pytest.fixture(params=["embedded", "jetstream"])
async def engine_config(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> EngineConfig:
    if request.param == "embedded":
        return embedded_config(tmp_path)
    cluster = request.getfixturevalue("nats_cluster")
    await reset_broker(cluster)
    # Every process of a cluster decrypts the shared API keys with one key.
    monkeypatch.setenv(SECRET_KEY_ENV, Fernet.generate_key().decode())
    # One partition: a request's events reach the worker in stream order, as they reach the
    # embedded queue, so the tests can compare batches. Partitioning is the fault trials'.
    return replace(broker_engine_config(tmp_path, cluster, partitions=1), role="all")


async def drained(engine: Engine, client: TidegateClient, connection_id: str) -> cpb.Connection:
    """The connection once nothing is left to send: its queue is empty and, on JetStream,
    the stream holds no event (work-queue retention: an event leaves the stream when the
    worker acknowledges it, which it does only once the event left its local queue)."""

    async def empty() -> bool:
        if engine.config.broker is not None and await stream_messages(engine) > 0:
            return False
        return (await client.get_connection(connection_id)).queue_depth == 0

    await eventually(empty)
    return await client.get_connection(connection_id)


async def stream_messages(engine: Engine) -> int:
    assert engine.config.broker is not None
    nc = await nats.connect(list(engine.config.broker.servers))
    try:
        info = await nc.jetstream().stream_info(streams.STREAM)
        return int(info.state.messages)
    finally:
        await nc.close()
