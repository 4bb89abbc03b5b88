"""The outbound log on JetStream (engine/broker/logs.py), on a real 3-node cluster: a
worker's settled rows leave its outbox only once ``TG_LOG`` stored them, a log service
inserts each row once whatever was redelivered or re-published, a worker or ingest
process refuses log reads with where to ask, and ``--role log`` serves the log."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import nats
import pytest
from cryptography.fernet import Fernet

from engine.app import Engine, EngineConfig
from engine.broker import logs as broker_logs
from engine.broker import streams
from engine.broker.cluster import LocalCluster
from engine.outbound_log import outbox
from engine.outbound_log.rows import LogRow, new_request_id
from engine.outbound_log.store import LogStore
from engine.pb import dead_letters_pb2 as dpb
from engine.pb import dead_letters_pb2_grpc
from engine.state.secrets import SECRET_KEY_ENV
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import FAST_DELIVERY, TEST_DESTINATIONS, engine_client, eventually
from tests.conftest import insider_connection as make_connection
from tests.natscluster import nats_cluster
from tests.test_broker_cluster import post, reset_broker
from tests.test_log_outbox import sample_row

__all__ = ["nats_cluster"]


def settings(cluster: LocalCluster) -> streams.BrokerSettings:
    return streams.BrokerSettings(
        servers=tuple(cluster.urls), partitions=2, lease_ttl=2.0, max_bytes=64 << 20
    )


def config(data_dir: Path, cluster: LocalCluster, role: str) -> EngineConfig:
    return EngineConfig(
        data_dir=data_dir,
        grpc_port=0,
        http_port=0,
        delivery=FAST_DELIVERY,
        allowed_destinations=TEST_DESTINATIONS,
        broker=settings(cluster),
        role=role,
        takeover_wait=0.5,
    )


def rows_at(at: datetime, count: int) -> list[LogRow]:
    base = sample_row()
    return [
        LogRow(**{**base.__dict__, "id": new_request_id(at=at), "time": at}) for _ in range(count)
    ]


async def publish(cluster: LocalCluster, rows: list[LogRow]) -> None:
    nc = await nats.connect(cluster.urls)
    js = nc.jetstream()
    for row in rows:
        request_id, blob = outbox.encode(row)
        await js.publish(broker_logs.LOG_SUBJECT, blob, headers={"Nats-Msg-Id": request_id})
    await nc.close()


async def store_ids(store: LogStore) -> list[str]:
    def ids(cur: object, partitions: list[object]) -> list[str]:
        found: list[str] = []
        for partition in partitions:
            cur.execute(f"USE {partition.name}")  # type: ignore[attr-defined]
            found += [r[0] for r in cur.execute("SELECT id FROM log_requests").fetchall()]  # type: ignore[attr-defined]
        return found

    await store.flush()
    return await store.scan(ids)  # type: ignore[arg-type]


def counts(
    writer: broker_logs.LogWriter, expected: int, what: str = "read"
) -> Callable[[], Awaitable[bool]]:
    """A check for ``eventually``: the writer has written (or skipped as duplicates, or
    both: read) ``expected`` rows."""

    async def check() -> bool:
        values = {
            "written": writer.written,
            "duplicates": writer.duplicates,
            "read": writer.written + writer.duplicates,
        }
        return values[what] == expected

    check.__name__ = f"{what} == {expected}"
    return check


@pytest.fixture(autouse=True)
def one_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The processes of a cluster share one secret key (they share encrypted API keys)."""
    monkeypatch.setenv(SECRET_KEY_ENV, Fernet.generate_key().decode())


@pytest.fixture
async def log_stream(nats_cluster: LocalCluster) -> LocalCluster:
    await reset_broker(nats_cluster)
    nc = await nats.connect(nats_cluster.urls)
    await broker_logs.ensure_log_stream(nc.jetstream(), settings(nats_cluster), 3, 1.0)
    await nc.close()
    return nats_cluster


async def test_rows_a_killed_log_service_wrote_but_never_acked_are_not_written_twice(
    tmp_path: Path, log_stream: LocalCluster
) -> None:
    """A log service commits a batch, then dies before its acknowledgement: its next
    start reads the batch again, and inserts none of it twice."""
    rows = rows_at(datetime.now(UTC), 5)
    await publish(log_stream, rows)
    store = LogStore(tmp_path / "log")
    await store.start()
    nc = await nats.connect(log_stream.urls)
    js = nc.jetstream()
    name = broker_logs.consumer_name(tmp_path)
    # What the killed process did: its consumer delivered the five rows, it committed
    # three of them, and no acknowledgement left.
    writer = broker_logs.LogWriter(js, store, name, settings(log_stream))
    await js.add_consumer(broker_logs.LOG_STREAM, writer._config(1))
    sub = await js.pull_subscribe_bind(name, stream=broker_logs.LOG_STREAM)
    delivered = await sub.fetch(5, timeout=5)
    assert len(delivered) == 5
    for msg in delivered[:3]:
        await store.append(outbox.decode(msg.data))
    await store.flush()
    await sub.unsubscribe()

    writer.start()
    try:
        await eventually(counts(writer, 5), within=20)
        assert sorted(await store_ids(store)) == sorted(r.id for r in rows)
        assert (writer.written, writer.duplicates) == (2, 3)
        # A row re-published after the duplicate window (a worker's outbox, long after)
        # reaches the stream again, and the log still holds it once.
        late = rows_at(datetime.now(UTC) - timedelta(hours=1), 1)
        await publish(log_stream, late)
        await publish(log_stream, late)  # within the window: the stream stores it once
        await eventually(counts(writer, 3, "written"), within=20)
        nc2 = await nats.connect(log_stream.urls)
        await nc2.jetstream().publish(
            broker_logs.LOG_SUBJECT, outbox.encode(late[0])[1], headers={"Nats-Msg-Id": "other"}
        )
        await nc2.close()
        await eventually(counts(writer, 4, "duplicates"), within=20)
        assert len(await store_ids(store)) == 6
    finally:
        await writer.stop()
        await store.close()
        await nc.close()


async def test_a_restarted_log_service_does_not_wait_for_rows_it_had_been_given(
    tmp_path: Path, log_stream: LocalCluster
) -> None:
    """Rows delivered to a log service that died unacknowledged come back at its next
    start at once, not after the consumer's ack wait (two minutes)."""
    rows = rows_at(datetime.now(UTC), 4)
    await publish(log_stream, rows)
    nc = await nats.connect(log_stream.urls)
    js = nc.jetstream()
    store = LogStore(tmp_path / "log")
    await store.start()
    name = broker_logs.consumer_name(tmp_path)
    writer = broker_logs.LogWriter(js, store, name, settings(log_stream))
    await js.add_consumer(broker_logs.LOG_STREAM, writer._config(1))
    sub = await js.pull_subscribe_bind(name, stream=broker_logs.LOG_STREAM)
    assert len(await sub.fetch(4, timeout=5)) == 4  # delivered, never acked: then a kill
    await sub.unsubscribe()
    writer.start()
    try:
        await eventually(counts(writer, 4, "written"), within=15)
    finally:
        await writer.stop()
        await store.close()
        await nc.close()


async def test_a_workers_rows_reach_the_log_service_and_leave_its_outbox(
    tmp_path: Path, log_stream: LocalCluster, sandbox: RunningSandbox
) -> None:
    ingest = Engine(config(tmp_path / "ingest", log_stream, "ingest"))
    worker = Engine(config(tmp_path / "worker", log_stream, "worker"))
    service = Engine(config(tmp_path / "log", log_stream, "log"))
    try:
        for engine in (ingest, worker, service):
            await engine.start()
        async with engine_client(worker) as client:
            await make_connection(client, sandbox)
        for i in range(3):
            batch = [{"id": f"e{i}", "customer": f"c{i}", "action": "point_add", "data": {}}]
            assert (await post(ingest, batch)).status == 202

        async def logged() -> list[str]:
            async with engine_client(service) as client:
                return [e.id for e in (await client.list_logs(page_size=100)).logs]

        async def all_logged() -> bool:
            sent = len(sandbox.state.requests)
            return sent > 0 and len(await logged()) == sent

        async def outbox_empty() -> bool:
            count = await worker.db.read(
                lambda c: c.execute("SELECT count(*) FROM log_outbox").fetchone()[0]
            )
            return int(count) == 0

        await eventually(all_logged, within=30)
        await eventually(outbox_empty, within=10)
        assert worker.forwarder is not None
        assert worker.forwarder.forwarded == len(sandbox.state.requests)
        # The worker and the ingest process keep no log: LogService says where to ask.
        for elsewhere in (worker, ingest):
            async with engine_client(elsewhere) as client:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await client.list_logs(page_size=10)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--role log" in str(refused.value.details())
        # The log service and the ingest process keep no dead letters: the workers do.
        for elsewhere in (service, ingest):
            async with engine_client(elsewhere) as client:
                stub = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.ListDeadLetters(dpb.ListDeadLettersRequest(page_size=10))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "ask the workers" in str(refused.value.details())
        async with engine_client(worker) as client:
            stub = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)
            listed = await stub.ListDeadLetters(dpb.ListDeadLettersRequest(page_size=10))
            assert list(listed.dead_letters) == []
    finally:
        for engine in (ingest, worker, service):
            await engine.stop()


async def test_erase_customer_is_refused_on_a_broker_rather_than_done_in_one_process(
    tmp_path: Path, log_stream: LocalCluster
) -> None:
    engine = Engine(config(tmp_path / "all", log_stream, "all"))
    await engine.start()
    try:
        async with engine_client(engine) as client:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.erase_customer("pia")
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not available with --broker" in str(refused.value.details())
    finally:
        await engine.stop()
