"""Re-send marks follow a customer across workers (``engine.broker.marks``): an Antavo
re-send that arrives after the stream's duplicate window, at a worker that never saw the
event, is dropped as the embedded engine drops it, and an event that was never acked is
not taken for a re-send."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import replace
from pathlib import Path

from engine.app import Engine, EngineConfig
from engine.broker.cluster import LocalCluster
from plugins.insider.sandbox import RunningSandbox
from plugins.insider.sandbox.server import Fault
from tests.conftest import engine_client, eventually, insider_connection
from tests.natscluster import nats_cluster
from tests.test_broker_cluster import post, reset_broker
from tests.test_broker_log import config, one_key

__all__ = ["nats_cluster", "one_key"]

WINDOW = 1.0
"""The stream's duplicate window here: a re-send after it is stored again."""


def worker(data_dir: Path, cluster: LocalCluster) -> EngineConfig:
    cfg = config(data_dir, cluster, "all")
    assert cfg.broker is not None
    return replace(cfg, broker=replace(cfg.broker, partitions=1, duplicate_window=WINDOW))


async def first_worker_with_event(
    data_dir: Path, cluster: LocalCluster, sandbox: RunningSandbox
) -> Engine:
    """A fresh cluster's first worker, with the connection, and event e1 posted to it."""
    await reset_broker(cluster)
    engine = Engine(worker(data_dir, cluster))
    await engine.start()
    try:
        async with engine_client(engine) as client:
            await insider_connection(client, sandbox)
        assert (await post(engine, [point("e1", 1)])).status == 202
    except BaseException:
        await engine.stop()
        raise
    return engine


def point(event_id: str, points: int) -> dict[str, object]:
    return {"id": event_id, "customer": "pia", "action": "point_add", "data": {"points": points}}


async def test_a_late_resend_to_another_worker_is_dropped(
    tmp_path: Path, nats_cluster: LocalCluster, sandbox: RunningSandbox
) -> None:
    first = await first_worker_with_event(tmp_path / "first", nats_cluster, sandbox)
    try:

        async def acked() -> bool:
            return first.partitions is not None and first.partitions.acked == 1

        await eventually(acked, within=30)
    finally:
        await first.stop()  # a clean stop puts the marks of what it acked
    await asyncio.sleep(WINDOW + 0.5)  # the stream would store the re-send now
    second = Engine(worker(tmp_path / "second", nats_cluster))
    await second.start()
    try:
        # The re-send, then a new event: the new one arriving proves the re-send went by.
        assert (await post(second, [point("e1", 1)])).status == 202
        assert (await post(second, [point("e2", 2)])).status == 202

        async def second_event_arrived() -> bool:
            user = sandbox.state.lookup("uuid", "pia")
            return user is not None and any(
                e["event_params"]["custom"]["points"] == 2 for e in user.events
            )

        await eventually(second_event_arrived, within=30)
        user = sandbox.state.lookup("uuid", "pia")
        assert user is not None
        assert [e["event_params"]["custom"]["points"] for e in user.events] == [1, 2]
    finally:
        await second.stop()


async def test_an_event_never_acked_is_sent_by_the_next_worker(
    tmp_path: Path, nats_cluster: LocalCluster, sandbox: RunningSandbox
) -> None:
    """The first worker queues the event but cannot deliver it (the destination is down)
    and stops: no mark may reach the cluster, or the next owner would drop the event
    as a re-send of itself."""
    sandbox.state.faults.append(Fault(503, remaining=10**9))
    first = await first_worker_with_event(tmp_path / "first", nats_cluster, sandbox)
    try:

        async def tried() -> bool:
            return len(sandbox.state.requests) >= 2

        await eventually(tried, within=30)
        partitions = first.partitions
    finally:
        await first.stop()
    assert partitions is not None and partitions.acked == 0
    sandbox.state.faults.clear()
    second = Engine(worker(tmp_path / "second", nats_cluster))
    await second.start()
    try:

        async def delivered() -> bool:
            user = sandbox.state.lookup("uuid", "pia")
            return user is not None and len(user.events) == 1

        await eventually(delivered, within=30)
    finally:
        await second.stop()


async def test_a_partition_handed_back_takes_its_marks_along(
    tmp_path: Path, nats_cluster: LocalCluster, sandbox: RunningSandbox
) -> None:
    """A rebalance, well before the first worker's periodic put: the partition it gives
    back reaches the second worker with the marks of what the first one acked."""
    await reset_broker(nats_cluster)

    def two_partitions(data_dir: Path) -> EngineConfig:
        cfg = worker(data_dir, nats_cluster)
        assert cfg.broker is not None
        return replace(cfg, broker=replace(cfg.broker, partitions=2))

    customers = [f"c{n}" for n in range(12)]

    def points(event: str, value: int) -> list[dict[str, object]]:
        return [
            {"id": f"{event}-{c}", "customer": c, "action": "point_add", "data": {"points": value}}
            for c in customers
        ]

    first = Engine(two_partitions(tmp_path / "first"))
    second = Engine(two_partitions(tmp_path / "second"))
    await first.start()
    started = [first]
    try:
        async with engine_client(first) as client:
            await insider_connection(client, sandbox)
        assert (await post(first, points("e1", 1))).status == 202

        async def acked() -> bool:
            return first.partitions is not None and first.partitions.acked == len(customers)

        await eventually(acked, within=30)
        await second.start()
        started.append(second)

        async def shared() -> bool:
            return all(e.partitions and len(e.partitions.owned) == 1 for e in (first, second))

        await eventually(shared, within=30)
        await asyncio.sleep(WINDOW + 0.5)  # the stream stores the re-sends now
        assert (await post(first, points("e1", 1))).status == 202  # every one a re-send
        assert (await post(first, points("e2", 2))).status == 202

        async def all_second_events() -> bool:
            users = [sandbox.state.lookup("uuid", c) for c in customers]
            return all(u is not None and len(u.events) >= 2 for u in users)

        await eventually(all_second_events, within=30)
        await asyncio.sleep(0.5)  # a late duplicate would show now
        got = {
            c: [
                e["event_params"]["custom"]["points"]
                for e in sandbox.state.lookup("uuid", c).events
            ]  # type: ignore[union-attr]
            for c in customers
        }
        assert got == {c: [1, 2] for c in customers}
    finally:
        for engine in started:
            await engine.stop()


async def test_a_flush_on_a_stop_gives_up_on_a_cluster_that_does_not_answer(
    tmp_path: Path, nats_cluster: LocalCluster
) -> None:
    """Every server frozen: a flush with a time limit starts no chunk after it (each
    chunk waits out its requests' timeouts), and keeps every mark for later."""
    import nats

    from engine.broker.marks import CONCURRENCY, MarkShare
    from engine.broker.streams import marks_bucket
    from engine.ingest.ingestor import ID_DEDUP_WINDOW
    from engine.state.database import Database

    await reset_broker(nats_cluster)
    nc = await nats.connect(nats_cluster.urls)
    db = Database(tmp_path / "state.db")
    await db.start()
    share = MarkShare(await marks_bucket(nc.jetstream(), 3, ID_DEDUP_WINDOW), db)
    customers = 4 * CONCURRENCY  # four chunks
    for n in range(customers):
        share.note(f"c{n}", [f"e{n}"], 0.0)
    for node in nats_cluster.nodes:
        nats_cluster.freeze(node.name)
    try:
        started = asyncio.get_running_loop().time()
        await share.flush(within=1.0)
        took = asyncio.get_running_loop().time() - started
    finally:
        for node in nats_cluster.nodes:
            node.process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
            node.frozen = False
        nats_cluster.wait_ready(30)
        await nc.close()
        await db.close()
    assert share.waiting == customers and share.flushed == 0
    # One chunk (its reads time out after 5 s), not four.
    assert took < 2 * 5.0 + 1.0, f"the flush took {took:.1f} s"
