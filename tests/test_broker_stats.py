"""A connection's backlog and dead letters as any process of a cluster reports them: the
sum of what every running worker holds (``engine.broker.stats``), not the asking
process's own database, which on a log process holds neither."""

from __future__ import annotations

from pathlib import Path

from engine.app import Engine
from engine.broker.cluster import LocalCluster
from plugins.insider.sandbox import RunningSandbox
from plugins.insider.sandbox.server import Fault
from tests.conftest import engine_client, eventually, insider_connection
from tests.natscluster import nats_cluster
from tests.test_broker_cluster import post, reset_broker
from tests.test_broker_log import config, one_key

__all__ = ["nats_cluster", "one_key"]

CONNECTION = "insider-main"
CUSTOMERS = 40


async def test_a_log_process_reports_the_workers_backlog_and_dead_letters(
    tmp_path: Path, nats_cluster: LocalCluster, sandbox: RunningSandbox
) -> None:
    await reset_broker(nats_cluster)
    first = Engine(config(tmp_path / "first", nats_cluster, "all"))
    second = Engine(config(tmp_path / "second", nats_cluster, "worker"))
    service = Engine(config(tmp_path / "log", nats_cluster, "log"))
    started: list[Engine] = []
    try:
        for engine in (first, second, service):
            await engine.start()
            started.append(engine)
        async with engine_client(first) as client:
            await insider_connection(client, sandbox)

        async def shared() -> bool:  # two partitions: one each
            return all(e.partitions and len(e.partitions.owned) == 1 for e in (first, second))

        await eventually(shared, within=30)
        sandbox.state.faults.append(Fault(503, remaining=10**9))  # everything stays queued
        events = [
            {"id": f"e{n}", "customer": f"c{n}", "action": "point_add", "data": {"points": n}}
            for n in range(CUSTOMERS)
        ]
        assert (await post(first, events)).status == 202

        async def local(engine: Engine) -> tuple[int, int]:
            stats = await engine.queue.stats(CONNECTION)
            return stats.depth, stats.dead_letters

        async def reported() -> tuple[int, int]:
            async with engine_client(service) as client:
                connection = await client.get_connection(CONNECTION)
            return connection.queue_depth, connection.dead_letter_count

        async def all_queued() -> bool:
            return (await local(first))[0] + (await local(second))[0] == CUSTOMERS

        await eventually(all_queued, within=30)
        assert (await local(service)) == (0, 0)  # the log process holds none of it
        assert (await local(first))[0] > 0 and (await local(second))[0] > 0

        async def backlog_reported() -> bool:
            return await reported() == (CUSTOMERS, 0)

        await eventually(backlog_reported, within=15)

        sandbox.state.faults.clear()
        sandbox.state.faults.append(Fault(400, remaining=10**9))  # now they fail for good

        async def dead_reported() -> bool:
            return await reported() == (0, CUSTOMERS)

        await eventually(dead_reported, within=30)
        held_by_first = (await local(first))[1]
        assert 0 < held_by_first < CUSTOMERS

        # A stopped worker's counts leave with it (it deletes its entry).
        await second.stop()

        async def only_first() -> bool:
            return await reported() == (0, held_by_first)

        await eventually(only_first, within=15)
    finally:
        for engine in started:
            await engine.stop()
