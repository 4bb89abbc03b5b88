"""Configuration across the cluster (``engine.broker.config_sync``): connections and
mappings made through one process's admin API reach every other process through the
``tg_config`` bucket, an event ingested right after a change is sent with it, and a
process whose secret key differs refuses to start. A real 3-node cluster; the engines run
in this process on data folders of their own, except the refused start (a real
``tidegate serve``)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import orjson
import pytest
from cryptography.fernet import Fernet
from google.protobuf.json_format import MessageToDict

from clients.client import TidegateClient
from engine.app import Engine
from engine.broker.cluster import LocalCluster
from engine.pb import connections_pb2 as cpb
from engine.state.secrets import SECRET_KEY_ENV
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import (
    API_KEY,
    engine_client,
    eventually,
    insider_connection,
)
from tests.natscluster import nats_cluster
from tests.test_broker_cli import TIDEGATE
from tests.test_broker_cluster import post, reset_broker
from tests.test_broker_log import config
from tests.test_cli_admin import engine_flags, tidegate

__all__ = ["nats_cluster"]

CONNECTION = "insider-main"


class Cluster:
    """Engines on one JetStream cluster, stopped at the end."""

    def __init__(self, tmp_path: Path, cluster: LocalCluster) -> None:
        self.tmp_path = tmp_path
        self.cluster = cluster
        self.engines: list[Engine] = []

    async def start(self, name: str, role: str) -> Engine:
        engine = Engine(config(self.tmp_path / name, self.cluster, role))
        await engine.start()
        self.engines.append(engine)
        return engine

    async def stop(self, engine: Engine) -> None:
        await engine.stop()
        self.engines.remove(engine)


@pytest.fixture
async def shared_key(monkeypatch: pytest.MonkeyPatch) -> str:
    key = Fernet.generate_key().decode()
    monkeypatch.setenv(SECRET_KEY_ENV, key)
    return key


@pytest.fixture
async def processes(
    tmp_path: Path, nats_cluster: LocalCluster, shared_key: str
) -> AsyncIterator[Cluster]:
    await reset_broker(nats_cluster)
    setup = Cluster(tmp_path, nats_cluster)
    try:
        yield setup
    finally:
        for engine in list(setup.engines):
            await engine.stop()


async def has_connection(engine: Engine, connection_id: str = CONNECTION) -> bool:
    return any(v.id == connection_id for v in engine.registry.views())


async def bucket_value(cluster: LocalCluster, connection_id: str) -> bytes | None:
    """What the ``tg_config`` bucket holds for a connection, read with a client of its own
    (the key is ``c.`` and 32 hex digits of the SHA-256 of the id, as documented)."""
    key = "c." + hashlib.sha256(connection_id.encode()).hexdigest()[:32]
    nc = await nats.connect(cluster.urls)
    try:
        kv = await nc.jetstream().key_value("tg_config")
        return (await kv.get(key)).value
    except nats.js.errors.KeyNotFoundError:
        return None
    finally:
        await nc.close()


def shown(connections: cpb.ListConnectionsResponse) -> list[dict[str, Any]]:
    """ListConnections as the API answers, less what is each process's own (its queue)."""
    rows = []
    for connection in connections.connections:
        row = MessageToDict(connection)
        for local in ("queueDepth", "deadLetterCount", "oldestPendingAgeSeconds"):
            row.pop(local, None)
        rows.append(row)
    return rows


async def mappings(client: TidegateClient, connection_id: str = CONNECTION) -> list[Any]:
    profile = await client.list_profile_mappings(connection_id)
    event = await client.list_event_mappings(connection_id)
    return [MessageToDict(profile), MessageToDict(event)]


async def sent_after(
    sandbox: RunningSandbox, before: int, marker: bytes, within: float = 30
) -> bytes:
    """The requests the sandbox got after the first ``before``, once one holds ``marker``."""

    async def arrived() -> bool:
        return marker in orjson.dumps(sandbox.state.requests[before:])

    await eventually(arrived, within=within)
    return orjson.dumps(sandbox.state.requests[before:])


async def test_a_connection_created_on_one_process_appears_on_the_others(
    processes: Cluster, nats_cluster: LocalCluster, sandbox: RunningSandbox
) -> None:
    a = await processes.start("a", "ingest")
    b = await processes.start("b", "worker")
    async with engine_client(a) as client:
        await insider_connection(client, sandbox)
    # The admin call returned after the put: the bucket holds it already, key encrypted.
    stored = await bucket_value(nats_cluster, CONNECTION)
    assert stored is not None and CONNECTION.encode() in stored
    assert API_KEY.encode() not in stored

    await eventually(lambda: has_connection(b), within=10)
    async with engine_client(a) as on_a, engine_client(b) as on_b:

        async def same() -> bool:
            return shown(await on_a.list_connections()) == shown(await on_b.list_connections())

        await eventually(same, within=10)
        assert await mappings(on_a) == await mappings(on_b)
        assert len((await on_b.list_event_mappings(CONNECTION)).mappings) == 2
        assert len((await on_b.list_profile_mappings(CONNECTION)).mappings) == 4
    assert b.registry.runtime(CONNECTION).api_key == API_KEY
    listed = await tidegate("connections", "list", "--output", "json", *engine_flags(b))
    assert listed.code == 0, listed.err
    assert CONNECTION in listed.out and API_KEY not in listed.out


async def test_a_mapping_added_on_one_process_is_used_by_the_next_send_of_another(
    processes: Cluster, sandbox: RunningSandbox
) -> None:
    a = await processes.start("a", "ingest")
    b = await processes.start("b", "worker")
    async with engine_client(a) as client:
        await insider_connection(client, sandbox)
        await eventually(lambda: has_connection(b), within=10)
        first = {"first_name": "Ada", "favourite_store": "north"}
        assert (
            await post(a, [{"customer": "ada", "action": "profile", "data": first}])
        ).status == 202
        assert b"north" not in await sent_after(sandbox, 0, b"Ada")
        await client.create_profile_mapping(
            CONNECTION, "favourite_store", "favourite_store", custom=True
        )

    async def mapped() -> bool:
        mappings = b.registry.runtime(CONNECTION).profile_mappings
        return any(m.source_attribute == "favourite_store" for m in mappings)

    await eventually(mapped, within=10)
    before = len(sandbox.state.requests)
    second = {"first_name": "Bea", "favourite_store": "south"}
    assert (await post(a, [{"customer": "bea", "action": "profile", "data": second}])).status == 202
    assert b"south" in await sent_after(sandbox, before, b"Bea")


async def test_an_event_ingested_right_after_a_mapping_change_is_sent_with_it(
    processes: Cluster, sandbox: RunningSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's watcher is slowed by 2 s per change here: only the revision the event
    carries makes the worker wait for the mapping before it routes and sends the event."""
    a = await processes.start("a", "ingest")
    b = await processes.start("b", "worker")
    async with engine_client(a) as client:
        await insider_connection(client, sandbox)
        assert a.config_sync is not None
        made = a.config_sync.stamp()

        async def caught_up() -> bool:  # every mapping of the connection is there
            assert b.config_sync is not None
            return b.config_sync.applied >= made

        await eventually(caught_up, within=10)
        replace = b.registry.replace_from_document

        async def slowly(*args: Any, **kwargs: Any) -> None:
            await asyncio.sleep(2.0)
            await replace(*args, **kwargs)

        monkeypatch.setattr(b.registry, "replace_from_document", slowly)
        await client.create_profile_mapping(
            CONNECTION, "favourite_store", "favourite_store", custom=True
        )
    data = {"first_name": "Cy", "favourite_store": "east"}
    assert (await post(a, [{"customer": "cy", "action": "profile", "data": data}])).status == 202
    assert b"east" in await sent_after(sandbox, 0, b"Cy")


async def test_a_worker_waits_for_a_revision_a_bounded_time_then_sends_and_says_so(
    processes: Cluster,
    sandbox: RunningSandbox,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Never a stall: a change that does not arrive within the worker's wait (cut to
    0.5 s here, its watcher slowed by 8 s) lets the event go with what the worker has,
    and the log says so."""
    a = await processes.start("a", "ingest")
    b = await processes.start("b", "worker")
    assert b.config_sync is not None
    b.config_sync.revision_wait = 0.5
    async with engine_client(a) as client:
        await insider_connection(client, sandbox)
        assert a.config_sync is not None
        made = a.config_sync.stamp()

        async def caught_up() -> bool:  # every mapping of the connection is there
            assert b.config_sync is not None
            return b.config_sync.applied >= made

        await eventually(caught_up, within=10)
        replace = b.registry.replace_from_document

        async def slowly(*args: Any, **kwargs: Any) -> None:
            await asyncio.sleep(8.0)
            await replace(*args, **kwargs)

        monkeypatch.setattr(b.registry, "replace_from_document", slowly)
        await client.create_profile_mapping(
            CONNECTION, "favourite_store", "favourite_store", custom=True
        )
    data = {"first_name": "Di", "favourite_store": "west"}
    assert (await post(a, [{"customer": "di", "action": "profile", "data": data}])).status == 202
    assert b"west" not in await sent_after(sandbox, 0, b"Di")
    assert "config_revision_wait_timeout" in capsys.readouterr().out


async def test_changes_made_at_once_on_two_processes_all_land_everywhere(
    processes: Cluster, sandbox: RunningSandbox
) -> None:
    """Many admin calls at the same time, on two processes and two connections: none is
    lost, here or there (a process never takes its own earlier write back)."""
    a = await processes.start("a", "worker")
    b = await processes.start("b", "worker")
    async with engine_client(a) as on_a, engine_client(b) as on_b:
        await insider_connection(on_a, sandbox, "conn-a")
        await insider_connection(on_b, sandbox, "conn-b")
        names = [f"extra_{i}" for i in range(8)]
        await asyncio.gather(
            *(on_a.create_profile_mapping("conn-a", n, n, custom=True) for n in names),
            *(on_b.create_profile_mapping("conn-b", n, n, custom=True) for n in names),
        )

        async def complete() -> bool:
            for client in (on_a, on_b):
                for connection_id in ("conn-a", "conn-b"):
                    listed = await client.list_profile_mappings(connection_id)
                    if len(listed.mappings) != 4 + len(names):
                        return False
            return True

        await eventually(complete, within=15)
        for connection_id in ("conn-a", "conn-b"):
            assert await mappings(on_a, connection_id) == await mappings(on_b, connection_id)


async def test_a_deleted_connection_is_deleted_everywhere(
    processes: Cluster, nats_cluster: LocalCluster, sandbox: RunningSandbox
) -> None:
    a = await processes.start("a", "worker")
    b = await processes.start("b", "worker")
    async with engine_client(b) as client:
        await insider_connection(client, sandbox)
        await eventually(lambda: has_connection(a), within=10)
        await client.connections.DeleteConnection(cpb.DeleteConnectionRequest(id=CONNECTION))
    assert await bucket_value(nats_cluster, CONNECTION) is None

    async def gone() -> bool:
        return not await has_connection(a)

    await eventually(gone, within=10)
    async with engine_client(a) as client:
        assert list((await client.list_connections()).connections) == []


async def test_a_restarted_process_catches_up_before_it_serves(
    processes: Cluster, sandbox: RunningSandbox
) -> None:
    a = await processes.start("a", "ingest")
    b = await processes.start("b", "worker")
    async with engine_client(a) as client:
        await insider_connection(client, sandbox)
        await insider_connection(client, sandbox, "insider-second")
        await eventually(lambda: has_connection(b, "insider-second"), within=10)
    await processes.stop(b)
    async with engine_client(a) as client:  # while b is down
        await client.connections.UpdateConnection(
            cpb.UpdateConnectionRequest(
                connection=cpb.Connection(id=CONNECTION, display_name="Insider, renamed")
            )
        )
        await client.create_profile_mapping(CONNECTION, "city", "city", custom=False)
        await client.connections.DeleteConnection(cpb.DeleteConnectionRequest(id="insider-second"))
        await insider_connection(client, sandbox, "insider-third")
    b = await processes.start("b", "worker")  # the same data folder
    # No waiting: start returns once the cluster's configuration is applied.
    assert sorted(v.id for v in b.registry.views()) == [CONNECTION, "insider-third"]
    assert b.registry.view(CONNECTION).display_name == "Insider, renamed"
    async with engine_client(a) as on_a, engine_client(b) as on_b:
        assert shown(await on_a.list_connections()) == shown(await on_b.list_connections())
        assert await mappings(on_a) == await mappings(on_b)


def serve_worker(
    data_dir: Path, cluster: LocalCluster, env: dict[str, str]
) -> Callable[[], subprocess.CompletedProcess[str]]:
    command = [
        TIDEGATE,
        "serve",
        "--data-dir",
        str(data_dir),
        "--grpc-port",
        "0",
        "--metrics-port",
        "off",
        "--ui-port",
        "off",
        "--broker",
        cluster.servers,
        "--role",
        "worker",
        "--partitions",
        "2",
    ]
    return lambda: subprocess.run(command, capture_output=True, text=True, timeout=90, env=env)


async def test_a_process_with_another_secret_key_refuses_to_start(
    processes: Cluster,
    nats_cluster: LocalCluster,
    shared_key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await processes.start("a", "ingest")  # the first process writes the key check
    other = Fernet.generate_key().decode()
    monkeypatch.delenv(SECRET_KEY_ENV)
    base = {k: v for k, v in os.environ.items() if k != SECRET_KEY_ENV}
    attempts: list[tuple[str, dict[str, str]]] = [
        ("another key", {**base, SECRET_KEY_ENV: other}),
        ("no key: the data folder's own", base),
    ]
    for name, env in attempts:
        data_dir = tmp_path / name.split(":")[0].replace(" ", "-")
        result = await asyncio.to_thread(serve_worker(data_dir, nats_cluster, env))
        output = result.stdout + result.stderr
        assert result.returncode == 1, (name, output[-2000:])
        assert "tidegate: cannot start:" in result.stderr, (name, output[-2000:])
        assert f"set {SECRET_KEY_ENV} to the same key on every process" in result.stderr
        assert "Traceback" not in output
        for key in (shared_key, other):
            assert key not in output
        key_file = data_dir / "secret.key"
        if key_file.exists():
            assert key_file.read_text().strip() not in output


async def test_a_connection_whose_connector_is_not_installed_here_is_refused_and_the_rest_applies(
    processes: Cluster,
    nats_cluster: LocalCluster,
    sandbox: RunningSandbox,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a = await processes.start("a", "worker")
    b = await processes.start("b", "worker")
    async with engine_client(b) as client:
        await insider_connection(client, sandbox)
    await eventually(lambda: has_connection(a), within=10)
    # Another process's connection, of a connector this one lacks: its rows as stored,
    # under its own key.
    stored = await bucket_value(nats_cluster, CONNECTION)
    assert stored is not None
    document = orjson.loads(stored)
    document["connection"]["id"] = "elsewhere"
    document["connection"]["connector"] = "salesforce"
    document["profile_mappings"] = document["event_mappings"] = []
    key = "c." + hashlib.sha256(b"elsewhere").hexdigest()[:32]
    nc = await nats.connect(nats_cluster.urls)
    try:
        kv = await nc.jetstream().key_value("tg_config")
        await kv.put(key, orjson.dumps(document, option=orjson.OPT_SORT_KEYS))
    finally:
        await nc.close()
    async with engine_client(b) as client:  # a change after it still reaches a
        await client.create_profile_mapping(CONNECTION, "city", "city", custom=False)

    async def mapped() -> bool:
        mappings = a.registry.runtime(CONNECTION).profile_mappings
        return any(m.source_attribute == "city" for m in mappings)

    await eventually(mapped, within=10)
    assert not await has_connection(a, "elsewhere")
    out = capsys.readouterr().out
    assert "config_connector_missing" in out and "salesforce" in out


async def test_a_change_made_while_the_cluster_has_no_quorum_lands_once_it_has(
    processes: Cluster,
    nats_cluster: LocalCluster,
    sandbox: RunningSandbox,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The put fails (two of three servers down): the admin call still answers, the
    failure is logged, and the change is put in the background once the servers are
    back, so the other processes get it."""
    a = await processes.start("a", "ingest")
    b = await processes.start("b", "worker")
    async with engine_client(a) as client:
        await insider_connection(client, sandbox)
    await eventually(lambda: has_connection(b), within=10)
    down = [node.name for node in nats_cluster.nodes[1:]]
    try:
        for name in down:
            await asyncio.to_thread(nats_cluster.kill, name)
        async with engine_client(a) as client:
            await client.connections.UpdateConnection(
                cpb.UpdateConnectionRequest(
                    connection=cpb.Connection(id=CONNECTION, display_name="changed without quorum")
                )
            )
        assert "config_publish_failed" in capsys.readouterr().out
    finally:
        for name in down:
            await asyncio.to_thread(nats_cluster.restart, name)

    async def arrived() -> bool:
        return b.registry.view(CONNECTION).display_name == "changed without quorum"

    await eventually(arrived, within=60)
    stored = await bucket_value(nats_cluster, CONNECTION)
    assert stored is not None and b"changed without quorum" in stored
