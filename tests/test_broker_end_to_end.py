"""Scale-out end to end with real processes: a 3-node JetStream cluster on loopback,
``tidegate serve --broker ... --role ingest``, two ``--role worker`` processes, two
``--role log`` processes (each keeps the whole outbound log) and the Insider sandbox. The
load and the checker are the fault tests' (``tests.faultload``): every acknowledged event
delivered, zero reordered per customer among first deliveries, duplicates counted; and
every settled request in the log, once, on each log service.

The kill trials run ``TIDEGATE_BROKER_TRIALS`` times each (default 1, as CI does; the long
mode runs more, e.g. ``TIDEGATE_BROKER_TRIALS=10``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import nats
import nats.js.errors
import orjson
import pytest
from cryptography.fernet import Fernet

from engine.broker import streams
from engine.broker.cluster import HOST, LocalCluster, _http_json
from engine.state.secrets import SECRET_KEY_ENV
from tests.conftest import eventually
from tests.faultload import (
    CheckReport,
    EngineProcess,
    LoadGenerator,
    SandboxControl,
    SandboxProcess,
    check_load,
    create_connection,
    list_logs,
)
from tests.natscluster import nats_cluster
from tests.test_broker_cluster import reset_broker

__all__ = ["nats_cluster"]

PARTITIONS = 8
LEASE_SECONDS = 3
TAKEOVER_WAIT = 2
TRIALS = int(os.environ.get("TIDEGATE_BROKER_TRIALS", "1"))


class BrokerEngine(EngineProcess):
    """``tidegate serve --broker`` in one role; a worker serves no ingest port."""

    def __init__(self, log_path: Path, data_dir: Path, servers: str, role: str) -> None:
        super().__init__(log_path, data_dir)
        self.name = f"engine ({role})"
        self.role = role
        self.extra_args = [
            "--broker",
            servers,
            "--role",
            role,
            "--partitions",
            str(PARTITIONS),
            "--lease-seconds",
            str(LEASE_SECONDS),
            "--takeover-wait",
            str(TAKEOVER_WAIT),
            "--broker-max-bytes",
            str(64 << 20),  # the test cluster's nodes store 256 MB each
        ]
        if role in ("worker", "log"):  # no ingest port
            self.ports = [self.grpc_port, self.metrics_port]


class ScaleOut:
    def __init__(self, tmp_path: Path, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.sandbox = SandboxProcess(tmp_path / "sandbox.out")
        self.control = SandboxControl(self.sandbox.url)
        self.ingest = BrokerEngine(
            tmp_path / "ingest.out", tmp_path / "ingest", cluster.servers, "ingest"
        )
        self.workers = [
            BrokerEngine(
                tmp_path / f"worker{i}.out", tmp_path / f"worker{i}", cluster.servers, "worker"
            )
            for i in (1, 2)
        ]
        self.log_services = [
            BrokerEngine(tmp_path / f"log{i}.out", tmp_path / f"log{i}", cluster.servers, "log")
            for i in (1, 2)
        ]

    async def start(self) -> None:
        await reset_broker(self.cluster)
        await asyncio.to_thread(self.sandbox.start)
        await asyncio.to_thread(self.ingest.start)
        for process in [*self.workers, *self.log_services]:
            await asyncio.to_thread(process.start)
        # Once, on any process: the cluster's configuration reaches the others.
        await create_connection(self.ingest.target, self.sandbox.url)

    def load(self, run_id: str) -> LoadGenerator:
        return LoadGenerator(
            self.ingest.ingest_url, customers=40, workers=4, batch=40, run_id=run_id
        )

    async def settle(self, load: LoadGenerator, within: float = 90.0) -> CheckReport:
        """Waits until every acknowledged event arrived (or ``within`` passed)."""
        deadline = time.monotonic() + within
        while True:
            report = await check_load(load, self.control)
            if report.missing == 0 or time.monotonic() > deadline:
                return report
            await asyncio.sleep(0.5)

    async def logged(self, within: float = 60.0) -> list[list[str]]:
        """The request ids in each log service's log, once the workers have forwarded
        every settled request and each log service holds them all (or ``within`` passed):
        the sandbox's count of requests is what the log must hold."""
        deadline = time.monotonic() + within
        while True:
            sent = len(await self.control.requests())
            ids = [[e.id for e in await list_logs(s.target)] for s in self.log_services]
            if all(len(i) >= sent for i in ids) or time.monotonic() > deadline:
                return ids
            await asyncio.sleep(0.5)

    def close(self) -> None:
        for process in [*self.workers, *self.log_services, self.ingest, self.sandbox]:
            process.close()

    def tails(self) -> str:
        processes = [self.ingest, *self.workers, *self.log_services]
        return "\n".join(f"== {p.name}\n{p.tail(3000)}" for p in processes)


@pytest.fixture
async def scale_out(
    tmp_path: Path, nats_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ScaleOut]:
    # One secret key for the cluster's processes (they share encrypted API keys); every
    # process, restarts included, inherits this environment.
    monkeypatch.setenv(SECRET_KEY_ENV, Fernet.generate_key().decode())
    setup = ScaleOut(tmp_path, nats_cluster)
    try:
        await setup.start()
        yield setup
    finally:
        setup.close()
        for node in nats_cluster.nodes:  # a trial that killed a node leaves it running again
            if not node.running:
                nats_cluster.restart(node.name)


def assert_clean(report: CheckReport, load: LoadGenerator, setup: ScaleOut) -> None:
    assert load.acknowledged_events > 0
    assert (report.missing, report.reordered, report.unexpected) == (0, 0, 0), (
        report.summary() + "\n" + report.details() + "\n" + setup.tails()
    )
    print(f"\n{report.summary()}; load {dict(load.stats.outcomes)}")


async def assert_logged(setup: ScaleOut, sent_unsettled: bool = False) -> None:
    """Every request the sandbox answered is in each log service's log, once. With
    ``sent_unsettled`` (a worker was killed) a request in flight at the kill was sent but
    never settled, so it has no row: the log may then hold fewer, never more."""

    def fits(count: int, sent: int) -> bool:
        return sent - 10 <= count <= sent if sent_unsettled else count == sent

    # Settled means every acknowledged event arrived; a worker may still be sending
    # duplicates (after a takeover wait), so the counts are compared once they hold still.
    async def counts_agree() -> bool:
        sent = len(await setup.control.requests())
        logged = await setup.logged()
        return sent == len(await setup.control.requests()) and all(
            fits(len(ids), sent) for ids in logged
        )

    with contextlib.suppress(AssertionError):  # the assertions below say what differs
        await eventually(counts_agree, within=30)
    sent = len(await setup.control.requests())
    for service, ids in zip(setup.log_services, await setup.logged(), strict=True):
        assert len(ids) == len(set(ids)), f"{service.name}: a row logged twice"
        assert fits(len(ids), sent), (service.name, len(ids), sent, setup.tails())
    first, second = await setup.logged()
    assert sorted(first) == sorted(second)
    print(f"log: {len(first)} rows on each log service, {sent} requests sent")


async def stream_leader(cluster: LocalCluster) -> str:
    nc = await nats.connect(cluster.urls)
    info = await nc.jetstream().stream_info(streams.STREAM)
    await nc.close()
    assert info.cluster is not None and info.cluster.leader
    return str(info.cluster.leader)


async def test_two_workers_deliver_every_event_in_order(scale_out: ScaleOut) -> None:
    await shared(scale_out.cluster, workers=2)  # else one worker may send it all alone
    load = scale_out.load("e2e")
    load.start()
    await load.wait_acknowledged(1500, within=60)
    await load.stop()
    report = await scale_out.settle(load)
    assert_clean(report, load, scale_out)
    assert report.acknowledged == load.acknowledged_events
    # The partitions were shared: each worker sent, with the connection the cluster gave it.
    for worker in scale_out.workers:
        async with aiohttp.ClientSession() as session, session.get(worker.metrics_url) as r:
            scraped = await r.text()
        sent = [
            line
            for line in scraped.splitlines()
            if line.startswith("tidegate_delivery_requests_total{")
            and 'code="200"' in line
            and not line.endswith(" 0.0")
        ]
        assert sent, f"{worker.name} sent nothing\n{worker.tail()}"
    await assert_logged(scale_out)


@pytest.mark.long
@pytest.mark.parametrize("trial", range(TRIALS))
async def test_sigkill_of_a_worker_under_load_loses_nothing(
    scale_out: ScaleOut, trial: int
) -> None:
    load = scale_out.load(f"killw{trial}")
    load.start()
    await load.wait_acknowledged(600, within=60)
    await asyncio.to_thread(scale_out.workers[0].kill)
    await load.wait_acknowledged(800, within=60)  # the other worker takes over
    await load.stop()
    report = await scale_out.settle(load)
    assert_clean(report, load, scale_out)
    # Restarted, the killed worker forwards the log rows its outbox kept.
    await asyncio.to_thread(scale_out.workers[0].start)
    await assert_logged(scale_out, sent_unsettled=True)


@pytest.mark.long
@pytest.mark.parametrize("trial", range(TRIALS))
async def test_sigkill_of_the_stream_leader_under_load_loses_nothing(
    scale_out: ScaleOut, trial: int
) -> None:
    load = scale_out.load(f"killl{trial}")
    load.start()
    await load.wait_acknowledged(600, within=60)
    leader = await stream_leader(scale_out.cluster)
    await asyncio.to_thread(scale_out.cluster.kill, leader)
    await load.wait_acknowledged(800, within=60)  # the other two elect a leader and go on
    await asyncio.to_thread(scale_out.cluster.restart, leader)
    await load.stop()
    report = await scale_out.settle(load)
    assert_clean(report, load, scale_out)
    await assert_logged(scale_out)


async def test_workers_joining_and_leaving_under_load_send_nothing_twice(
    scale_out: ScaleOut,
) -> None:
    """A rebalance and a clean stop hand partitions back gracefully: what a worker had
    taken is delivered and acked before the next owner gets the partition."""
    first, second = scale_out.workers
    await asyncio.to_thread(second.terminate, 30.0)  # the first owns every partition
    load = scale_out.load("handback")
    load.start()
    await load.wait_acknowledged(600, within=60)
    await asyncio.to_thread(second.start)  # joins: the first gives half back under load
    deadline = time.monotonic() + 60
    while first.tail(10**7).count('"rebalancing"') < 2:
        assert time.monotonic() < deadline, "no rebalance\n" + scale_out.tails()
        await asyncio.sleep(0.2)
    await load.wait_acknowledged(load.acknowledged_events + 400, within=60)
    await asyncio.to_thread(first.terminate, 30.0)  # leaves: the second takes the rest
    await load.wait_acknowledged(load.acknowledged_events + 400, within=60)
    await load.stop()
    report = await scale_out.settle(load)
    assert_clean(report, load, scale_out)
    assert "worker stopping" in first.tail(10**7)
    assert report.duplicates == 0, report.summary() + "\n" + scale_out.tails()
    await assert_logged(scale_out)


# -- a node partitioned away (frozen), or killed and caught up ----------------------------


def connected_nodes(cluster: LocalCluster) -> dict[str, str]:
    """Which node each engine process's connection is on (``/connz``), for the report:
    a frozen node times out its own clients, its peers' clients go on."""
    where = {}
    for node in cluster.nodes:
        connz = _http_json(f"http://{HOST}:{node.http_port}/connz") or {}
        conns = connz.get("connections")
        for conn in conns if isinstance(conns, list) else []:
            name = conn.get("name", "") if isinstance(conn, dict) else ""
            if isinstance(name, str) and name.startswith("tidegate-"):
                where[name.removeprefix("tidegate-")] = node.name
    return where


async def replica_state(cluster: LocalCluster) -> dict[str, tuple[bool, int]]:
    """Each follower of the event stream: (current, lag) as its leader reports them."""
    nc = await nats.connect(cluster.urls)
    try:
        info = await nc.jetstream().stream_info(streams.STREAM)
    finally:
        await nc.close()
    assert info.cluster is not None
    return {str(p.name): (bool(p.current), int(p.lag or 0)) for p in info.cluster.replicas or []}


async def partition_trial(setup: ScaleOut, run_id: str, pick: str) -> None:
    """Freezes the stream's leader (``pick="leader"``) or a follower under load, keeps the
    load going until 800 more events are acknowledged, thaws it, and checks."""
    load = setup.load(run_id)
    load.start()
    await load.wait_acknowledged(600, within=60)
    leader = await stream_leader(setup.cluster)
    victim = (
        leader
        if pick == "leader"
        else next(n.name for n in setup.cluster.nodes if n.name != leader)
    )
    where = await asyncio.to_thread(connected_nodes, setup.cluster)
    print(f"\nfreezing {victim} ({pick}); clients are on {where}")
    await asyncio.to_thread(setup.cluster.freeze, victim)
    try:
        # Clients on the frozen node time out until they notice and reconnect elsewhere.
        await load.wait_acknowledged(800, within=120)
    finally:
        await asyncio.to_thread(setup.cluster.thaw, victim)
    await load.wait_acknowledged(300, within=60)  # and the cluster takes it back
    await load.stop()
    report = await setup.settle(load)
    assert_clean(report, load, setup)
    await assert_logged(setup)


@pytest.mark.long
@pytest.mark.parametrize("trial", range(TRIALS))
async def test_sigkill_of_a_log_service_under_load_loses_no_row(
    scale_out: ScaleOut, trial: int
) -> None:
    """The other log service keeps logging; the killed one, restarted, catches up from
    its own consumer and inserts what it had written but not acknowledged only once."""
    load = scale_out.load(f"killlog{trial}")
    load.start()
    await load.wait_acknowledged(600, within=60)
    await asyncio.to_thread(scale_out.log_services[0].kill)
    await load.wait_acknowledged(1400, within=60)
    await asyncio.to_thread(scale_out.log_services[0].start)
    await load.wait_acknowledged(1800, within=60)
    await load.stop()
    report = await scale_out.settle(load)
    assert_clean(report, load, scale_out)
    await assert_logged(scale_out)


@pytest.mark.long
@pytest.mark.parametrize("trial", range(TRIALS))
@pytest.mark.parametrize("pick", ["leader", "follower"])
async def test_a_node_stopped_and_restarted_under_load_loses_nothing(
    scale_out: ScaleOut, pick: str, trial: int
) -> None:
    await partition_trial(scale_out, f"freeze-{pick}{trial}", pick)


@pytest.mark.long
@pytest.mark.parametrize("trial", range(TRIALS))
async def test_a_killed_follower_catches_up_after_the_load_moved_on(
    scale_out: ScaleOut, trial: int
) -> None:
    """SIGKILL a follower, let 800 events go by without it, restart it: it must catch up
    (a current replica, lag 0), and then carry the quorum when the leader is killed."""
    setup = scale_out
    load = setup.load(f"catchup{trial}")
    load.start()
    await load.wait_acknowledged(600, within=60)
    leader = await stream_leader(setup.cluster)
    follower = next(n.name for n in setup.cluster.nodes if n.name != leader)
    await asyncio.to_thread(setup.cluster.kill, follower)
    await load.wait_acknowledged(800, within=90)
    await asyncio.to_thread(setup.cluster.restart, follower)
    deadline = time.monotonic() + 60
    while (state := await replica_state(setup.cluster)).get(follower) != (True, 0):
        assert time.monotonic() < deadline, f"{follower} did not catch up: {state}"
        await asyncio.sleep(0.5)
    # Now the quorum needs the restarted node: kill the leader, the load must go on.
    leader = await stream_leader(setup.cluster)
    other = (
        leader
        if leader != follower
        else next(n.name for n in setup.cluster.nodes if n.name != follower)
    )
    await asyncio.to_thread(setup.cluster.kill, other)
    try:
        await load.wait_acknowledged(600, within=90)
    finally:
        await asyncio.to_thread(setup.cluster.restart, other)
    await load.stop()
    report = await setup.settle(load)
    print(f"\nkilled {follower}, caught up; then killed {other}")
    if not report.ok:  # what the sandbox got, in order, for a look afterwards
        dump = setup.sandbox.log_path.with_name("sandbox-requests.json")
        dump.write_bytes(orjson.dumps(await setup.control.requests()))
    assert_clean(report, load, setup)
    await assert_logged(setup)


async def shared(cluster: LocalCluster, workers: int, within: float = 60.0) -> None:
    """Until ``workers`` workers hold leases (the partitions are shared): a worker
    claims its partitions at once, the next one gets one per lease round."""
    nc = await nats.connect(cluster.urls)
    owners: set[bytes] = set()
    try:
        deadline = time.monotonic() + within
        while len(owners) < workers:
            assert time.monotonic() < deadline, f"partitions held by {owners} after {within} s"
            await asyncio.sleep(0.25)
            kv = await nc.jetstream().key_value(streams.LEASES_BUCKET)
            owners = set()
            for n in range(PARTITIONS):
                try:
                    entry = await kv.get(f"p.{n}")
                except nats.js.errors.KeyNotFoundError:
                    continue
                if entry.value:
                    owners.add(entry.value)
    finally:
        await nc.close()
