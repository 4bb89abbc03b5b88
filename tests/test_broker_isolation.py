"""One connection down does not stop the others on JetStream either: the embedded engine
keeps delivering to a healthy connection while another one's destination is down (its
items wait in their lanes), and so must a worker, though every event it pulled stays
unacknowledged until the down connection got it too."""

from __future__ import annotations

from pathlib import Path

from engine.app import Engine
from engine.broker.cluster import LocalCluster
from engine.pb import dead_letters_pb2 as dpb
from engine.pb import dead_letters_pb2_grpc
from plugins.insider.sandbox import RunningSandbox, SandboxConfig, start_sandbox
from plugins.insider.sandbox.server import Fault
from tests.conftest import API_KEY, PARTNER, engine_client, eventually, insider_connection
from tests.natscluster import nats_cluster
from tests.test_broker_cluster import post, reset_broker
from tests.test_broker_log import config, one_key

__all__ = ["nats_cluster", "one_key"]

EVENTS = 3000
CONNECTION = "insider-main"


async def test_a_down_destination_does_not_hold_back_another_connection(
    tmp_path: Path, nats_cluster: LocalCluster, sandbox: RunningSandbox
) -> None:
    await reset_broker(nats_cluster)
    healthy = await start_sandbox(config=SandboxConfig(partner_name=PARTNER, api_key=API_KEY))
    engine = Engine(config(tmp_path / "all", nats_cluster, "all"))
    await engine.start()
    try:
        async with engine_client(engine) as client:
            await insider_connection(client, sandbox, "insider-down")
            await insider_connection(client, healthy, "insider-up")
        sandbox.state.faults.append(Fault(503, remaining=10**9))
        for start in range(0, EVENTS, 100):
            batch = [
                {
                    "id": f"e{n}",
                    "customer": f"c{n % 40}",
                    "action": "point_add",
                    "data": {"points": n},
                }
                for n in range(start, start + 100)
            ]
            assert (await post(engine, batch)).status == 202

        async def all_arrived() -> bool:
            return sum(len(u.events) for u in healthy.state.users) == EVENTS

        all_arrived.__name__ = f"all {EVENTS} events at the healthy destination"
        await eventually(all_arrived, within=90)
        assert not sandbox.state.users  # the down one got nothing, and holds it all
    finally:
        await engine.stop()
        await healthy.close()


async def test_a_replayed_dead_letter_survives_a_worker_restart(
    tmp_path: Path, nats_cluster: LocalCluster, sandbox: RunningSandbox
) -> None:
    """A replay goes through the stream (``engine.broker.replay``): a worker stopped while
    the replayed item waits for a down destination, and started again, sends it."""
    await reset_broker(nats_cluster)
    engine = Engine(config(tmp_path / "all", nats_cluster, "all"))
    await engine.start()
    try:
        async with engine_client(engine) as client:
            await insider_connection(client, sandbox)
        sandbox.state.faults.append(Fault(400, remaining=1))
        event = {"id": "e1", "customer": "pia", "action": "point_add", "data": {"points": 5}}
        assert (await post(engine, [event])).status == 202

        async def dead_lettered() -> bool:
            async with engine_client(engine) as client:
                stub = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)
                listed = await stub.ListDeadLetters(dpb.ListDeadLettersRequest(page_size=10))
            return len(listed.dead_letters) == 1

        await eventually(dead_lettered, within=30)

        async def acked() -> bool:  # settled by its dead letter: the stream is done with it
            return engine.partitions is not None and engine.partitions.acked == 1

        await eventually(acked, within=10)
        sandbox.state.faults.append(Fault(503, remaining=10**9))  # the replay is held
        async with engine_client(engine) as client:
            stub = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)
            replayed = await stub.ReplayDeadLetters(
                dpb.ReplayDeadLettersRequest(filter=dpb.DeadLetterFilter(customer_id="pia"))
            )
        assert replayed.replayed == 1
    finally:
        await engine.stop()
    sandbox.state.faults.clear()
    engine = Engine(config(tmp_path / "all", nats_cluster, "all"))
    await engine.start()
    try:

        async def delivered() -> bool:
            return any(u.events for u in sandbox.state.users)

        await eventually(delivered, within=30)
    finally:
        await engine.stop()


async def test_a_dead_letter_replayed_on_one_worker_is_sent_by_the_customers_owner(
    tmp_path: Path, nats_cluster: LocalCluster, sandbox: RunningSandbox
) -> None:
    """Dead letters are the worker's that made them, but their customers' partitions move:
    the replay is published to the stream, so the customer's current owner sends it,
    after that customer's queued events, and the worker that replayed can stop at once."""
    await reset_broker(nats_cluster)
    first = Engine(config(tmp_path / "first", nats_cluster, "all"))
    second = Engine(config(tmp_path / "second", nats_cluster, "all"))
    await first.start()
    started = []
    try:
        async with engine_client(first) as client:
            await insider_connection(client, sandbox)
        sandbox.state.faults.append(Fault(400, remaining=10**9))
        customers = [f"c{n}" for n in range(20)]
        events = [
            {"id": f"e-{c}", "customer": c, "action": "point_add", "data": {"points": 1}}
            for c in customers
        ]
        assert (await post(first, events)).status == 202

        async def all_dead_and_acked() -> bool:
            return first.partitions is not None and first.partitions.acked == len(customers)

        await eventually(all_dead_and_acked, within=30)
        sandbox.state.faults.clear()
        await second.start()
        started.append(second)

        async def shared() -> bool:  # two partitions: one each
            return all(e.partitions and len(e.partitions.owned) == 1 for e in (first, second))

        await eventually(shared, within=30)
        async with engine_client(first) as client:
            stub = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)
            replayed = await stub.ReplayDeadLetters(
                dpb.ReplayDeadLettersRequest(filter=dpb.DeadLetterFilter(connection_id=CONNECTION))
            )
            assert replayed.replayed == len(customers)
            left = await stub.ListDeadLetters(dpb.ListDeadLettersRequest(page_size=100))
            assert list(left.dead_letters) == []
        await first.stop()

        async def delivered() -> bool:
            return all(sandbox.state.lookup("uuid", c) is not None for c in customers)

        await eventually(delivered, within=30)
        # Each once, and the second worker sent some: it owns half the partitions and
        # never had these customers' events (it started after they were settled).
        assert [len(sandbox.state.lookup("uuid", c).events) for c in customers] == [1] * 20  # type: ignore[union-attr]
        sent_by_second = second.metrics.registry.get_sample_value(
            "tidegate_items_delivered_total", {"connection": CONNECTION}
        )
        assert sent_by_second, "the worker that replayed sent every replay itself"
    finally:
        await first.stop()
        for engine in started:
            await engine.stop()
