"""Profiles follow a partition to its next owner: a worker that meets a customer for the
first time reads the profile the earlier owner wrote to the ``tg_profiles`` bucket, so
it syncs only what changed, as the embedded engine does."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from cryptography.fernet import Fernet

from engine.app import Engine, EngineConfig
from engine.broker.cluster import LocalCluster
from engine.state.secrets import SECRET_KEY_ENV
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import engine_client, eventually
from tests.conftest import insider_connection as make_connection
from tests.natscluster import nats_cluster
from tests.test_broker_cluster import post, reset_broker
from tests.test_broker_log import config

__all__ = ["nats_cluster"]


def worker_config(data_dir: Path, cluster: LocalCluster) -> EngineConfig:
    return config(data_dir, cluster, "all")


async def settled(engine: Engine, acked: int) -> None:
    async def all_acked() -> bool:
        worker = engine.partitions
        return worker is not None and worker.acked >= acked and not worker.pending

    await eventually(all_acked, within=30)


async def start_owner(
    data_dir: Path, cluster: LocalCluster, sandbox: RunningSandbox, create: bool = True
) -> Engine:
    """A worker; ``create``: it creates the connection (a later one gets it from the
    cluster's configuration)."""
    engine = Engine(worker_config(data_dir, cluster))
    await engine.start()
    if create:
        async with engine_client(engine) as client:
            await make_connection(client, sandbox)
    return engine


async def test_the_next_owner_syncs_only_what_changed_since_the_last_owner(
    tmp_path: Path,
    nats_cluster: LocalCluster,
    sandbox: RunningSandbox,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SECRET_KEY_ENV, Fernet.generate_key().decode())  # one for the cluster
    await reset_broker(nats_cluster)
    first = await start_owner(tmp_path / "a", nats_cluster, sandbox)
    try:
        profile = {"tier": "gold", "first_name": "Pia"}
        event = {"customer": "pia", "action": "profile", "data": profile}
        assert (await post(first, [event])).status == 202
        await settled(first, 1)
        assert b"gold" in orjson.dumps(sandbox.state.requests)
    finally:
        await first.stop()
    second = await start_owner(tmp_path / "b", nats_cluster, sandbox, create=False)
    try:
        before = len(sandbox.state.requests)
        change = {"tier": "gold", "first_name": "Pina"}
        event = {"customer": "pia", "action": "profile", "data": change}
        assert (await post(second, [event])).status == 202
        await settled(second, 1)
        sent = orjson.dumps(sandbox.state.requests[before:])
        assert b"Pina" in sent
        # The tier did not change: a worker without the bucket's profile would send it.
        assert b"gold" not in sent
    finally:
        await second.stop()
