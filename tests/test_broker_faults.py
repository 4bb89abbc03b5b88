"""Faults around the broker: nats-server nodes the harness started die with the process
that started them, a client leaves a frozen server for a live one, and a new partition
owner waits out an earlier owner that still had events out."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

from engine.app import Engine
from engine.broker import streams
from engine.broker.cluster import LocalCluster
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import engine_client, eventually
from tests.conftest import insider_connection as make_connection
from tests.faultload import SandboxControl
from tests.natscluster import nats_cluster
from tests.test_broker_cluster import post, reset_broker
from tests.test_broker_log import config, one_key

__all__ = ["nats_cluster", "one_key"]

ROOT = Path(__file__).resolve().parent.parent

CLUSTER_IN_A_CHILD = """
import asyncio, sys, time
from pathlib import Path
from engine.broker.cluster import LocalCluster

cluster = LocalCluster(Path(sys.argv[1]), size=3, max_file_store="64MB")
# As `tidegate demo --broker` does: started from a worker thread of a loop that then ends.
asyncio.run(asyncio.to_thread(cluster.start))
time.sleep(0.5)
print(" ".join(str(n.process.pid) for n in cluster.nodes if n.running), flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    """The process exists and is no zombie (a reparented child may wait to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_nodes_die_with_a_sigkilled_parent(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CLUSTER_IN_A_CHILD, str(tmp_path / "nats")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    pids: list[int] = []
    try:
        assert child.stdout is not None
        pids = [int(p) for p in child.stdout.readline().split()]
        assert len(pids) == 3, f"the child started {pids}"
        # The thread that started them has ended; the nodes run on with their parent.
        assert all(alive(pid) for pid in pids)
        child.send_signal(signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in pids if alive(pid)] == []
    finally:
        child.kill()
        child.communicate()
        for pid in pids:  # never leave one behind, whatever failed
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_a_client_leaves_a_frozen_server_for_a_live_one(
    nats_cluster: LocalCluster,
) -> None:
    """A frozen node keeps its sockets open; the client must notice by its pings (the
    client library's default waits minutes) and reconnect to another node."""
    # nats-py drops the stale connection's StreamWriter unclosed (its transport is closed);
    # its ResourceWarning, whenever the collector meets it, is expected here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        settings = streams.BrokerSettings(servers=tuple(nats_cluster.urls))
        nc = await streams.connect(settings, "frozen-server-test")
        frozen = None
        try:
            assert nc.connected_url is not None
            port = nc.connected_url.port
            frozen = next(n.name for n in nats_cluster.nodes if n.client_port == port)
            await asyncio.to_thread(nats_cluster.freeze, frozen)
            deadline = time.monotonic() + 30
            while nc.connected_url is None or nc.connected_url.port == port or not nc.is_connected:
                assert time.monotonic() < deadline, f"still on the frozen node {frozen} after 30 s"
                await asyncio.sleep(0.1)
            # And the new connection answers (once the meta group has a leader: the
            # frozen node may have been it).
            await streams.retrying(nc.jetstream().account_info, "account info", 30.0)
        finally:
            if frozen is not None:
                await asyncio.to_thread(nats_cluster.thaw, frozen)
            await nc.close()
            gc.collect()


async def start_worker(
    data_dir: Path,
    cluster: LocalCluster,
    sandbox: RunningSandbox,
    takeover_wait: float,
    connect: bool = True,
) -> Engine:
    cfg = config(data_dir, cluster, "all")
    assert cfg.broker is not None
    engine = Engine(
        replace(cfg, broker=replace(cfg.broker, partitions=1), takeover_wait=takeover_wait)
    )
    await engine.start()
    if connect:  # once per cluster: the next worker gets it from the configuration bucket
        async with engine_client(engine) as client:
            await make_connection(client, sandbox)
    return engine


async def test_a_new_owner_waits_out_an_earlier_owner_that_had_events_out(
    tmp_path: Path, nats_cluster: LocalCluster, sandbox: RunningSandbox
) -> None:
    """The earlier owner's consumer still has an event out (its sends fail and retry):
    the next owner must not pull before ``takeover_wait``, in case a send is in flight."""
    await reset_broker(nats_cluster)
    control = SandboxControl(sandbox.url)
    await control.fault(500, count=1000)
    first = await start_worker(tmp_path / "a", nats_cluster, sandbox, takeover_wait=0.3)
    try:
        event: dict[str, object] = {
            "customer": "wes",
            "action": "point_add",
            "id": "wes-1",
            "data": {"points": 1},
        }
        assert (await post(first, [event])).status == 202

        async def failed_once() -> bool:
            return await control.answered(500) >= 1

        await eventually(failed_once, within=30)
    finally:
        await first.stop()
    await control.clear_faults()
    second = await start_worker(
        tmp_path / "b", nats_cluster, sandbox, takeover_wait=60, connect=False
    )
    try:

        async def claimed() -> bool:
            return second.partitions is not None and 0 in second.partitions.owned

        await eventually(claimed, within=30)
        await asyncio.sleep(3)  # time enough to pull and send, were it not waiting
        assert second.partitions is not None and not second.partitions.pending
        assert await control.answered(200) == 0
    finally:
        await second.stop()


async def publish_point(js: object, seq: int, stall: bool = False) -> None:
    """Event ``seq`` of customer pia, published as ingest does; ``stall``: stamped with a
    configuration revision no process has, so the worker taking it waits 5 s first."""
    from datetime import UTC, datetime

    from engine.broker.publish import REVISION_HEADER, encode_event
    from engine.connector.records import AntavoEvent

    event = AntavoEvent(
        id=f"pia-{seq}",
        customer="pia",
        action="point_add",
        data={"points": seq},
        timestamp=datetime.now(UTC),
    )
    headers = {"Nats-Msg-Id": event.id}
    if stall:
        headers[REVISION_HEADER] = str(10**9)
    await js.publish(streams.event_subject("pia"), encode_event(event), headers=headers)  # type: ignore[attr-defined]


@pytest.mark.parametrize("later_event", [True, False])
async def test_deliveries_lost_on_their_way_to_the_worker_are_pulled_again(
    later_event: bool, tmp_path: Path, nats_cluster: LocalCluster, sandbox: RunningSandbox
) -> None:
    """Deliveries the server sent to a connection that was lost (a frozen or cut-off
    server) stay pending for the hour of the ack wait. Here another client takes them
    from the worker's consumer while the worker is busy, and drops them. The worker sees
    the gap in the consumer's delivery sequence (with a later event), or the server's
    count of deliveries past its own (idle), and pulls them again through a new
    consumer: every event arrives, in order."""
    import nats

    await reset_broker(nats_cluster)
    engine = await start_worker(tmp_path / "worker", nats_cluster, sandbox, takeover_wait=0.5)
    nc = await nats.connect(nats_cluster.urls)
    try:
        js = nc.jetstream()
        await publish_point(js, 1, stall=True)
        partitions = engine.partitions
        assert partitions is not None
        await asyncio.sleep(1.0)  # the worker has event 1 and waits for the revision
        assert not partitions.pending, "the worker was not held by the revision wait"
        consumer = max(partitions.owned[0].consumers, key=lambda c: int(c.split("-")[1]))
        thief = await js.pull_subscribe_bind(consumer, stream=streams.STREAM)
        await publish_point(js, 2)
        await publish_point(js, 3)
        stolen = await thief.fetch(2, timeout=3)
        assert [m.metadata.sequence.stream for m in stolen] == [2, 3]  # never acked
        if later_event:
            await publish_point(js, 4)
        expected = [1, 2, 3, 4] if later_event else [1, 2, 3]

        async def all_arrived() -> bool:
            user = sandbox.state.lookup("uuid", "pia")
            return user is not None and len(user.events) >= len(expected)

        await eventually(all_arrived, within=30)
        user = sandbox.state.lookup("uuid", "pia")
        assert user is not None
        assert [e["event_params"]["custom"]["points"] for e in user.events] == expected
    finally:
        await nc.close()
        await engine.stop()


async def test_a_worker_cut_off_from_the_cluster_fences_before_its_leases_expire(
    tmp_path: Path, nats_cluster: LocalCluster, sandbox: RunningSandbox
) -> None:
    """Every server frozen: the lease round's calls hang until their timeouts, longer
    than the lease TTL. The worker must stop its partitions within 0.6 of the TTL all
    the same, before another worker could take them."""
    await reset_broker(nats_cluster)
    engine = await start_worker(tmp_path / "worker", nats_cluster, sandbox, takeover_wait=0.5)
    partitions = engine.partitions
    assert partitions is not None and engine.config.broker is not None
    ttl = engine.config.broker.lease_ttl
    try:

        async def owns() -> bool:
            return bool(partitions.owned)

        await eventually(owns, within=10)
        frozen_at = time.monotonic()
        for node in nats_cluster.nodes:
            nats_cluster.freeze(node.name)
        try:

            async def fenced() -> bool:
                return not partitions.owned

            await eventually(fenced, within=ttl * 3)
            took = time.monotonic() - frozen_at
        finally:
            for node in nats_cluster.nodes:
                node.process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
                node.frozen = False
            nats_cluster.wait_ready(30)
        assert took < ttl, f"fenced {took:.1f} s after the last renewal could be; TTL {ttl} s"
    finally:
        await engine.stop()
