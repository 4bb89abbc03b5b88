"""Section 8: scale-out on NATS JetStream against the embedded engine, in the same run.

Three set-ups receive the same ``events`` (the same bodies from ``bench.traffic``, in
requests of ``BATCH`` with ``IN_FLIGHT`` posts at a time) and deliver to the bench sink:

- the embedded engine, as the other sections start it (``tidegate serve``);
- JetStream: a ``LocalCluster`` of 3 ``nats-server`` nodes (R3, ``sync_interval: always``)
  under the run's scratch folder, one ``--role ingest`` process, one ``--role worker`` and
  one ``--role log`` (the outbound log, which the embedded engine writes itself);
- the same with two workers.

For each: events/s from the first post until the sink has every event, the CPU of every
tidegate process per event (and apart from it the nats-servers'), and the ingest
acknowledgement p50/p99 (post -> 202, closed loop). Each JetStream set-up starts on an
empty stream and buckets, its processes share one ``TIDEGATE_SECRET_KEY`` and get the
connection from the one made on the ingest process, with workers that hold a fair share
of the partitions;
every set-up first sends one warm-up request through to the sink, not counted. Every
process and the cluster stop at the end, also on errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import nats
import nats.js.errors
from cryptography.fernet import Fernet

from bench import processes
from bench.pipeline import post_ingest
from bench.processes import Process, start_engine, start_sink
from bench.traffic import create_connection, ingest_bodies
from engine.broker import streams
from engine.broker.cluster import LocalCluster

BATCH = 50  # events per ingest request
IN_FLIGHT = 4  # ingest posts at a time
CUSTOMERS = 100_000  # the pool the events' customers are drawn from
PARTITIONS = 8
LEASE_SECONDS = 3.0  # short, so two workers share the partitions within seconds
TAKEOVER_WAIT = 2.0
BALANCE_TIMEOUT = 40.0


@dataclass
class ScaleResult:
    label: str
    events: int
    delivered: int = 0
    seconds: float = 0.0  # first post -> last event at the sink
    tidegate_cpu: float = 0.0  # CPU seconds of every tidegate process (and its children)
    nats_cpu: float = 0.0  # CPU seconds of the nats-servers
    ack: list[float] = field(default_factory=list)  # seconds, one per request
    ingest_seconds: float = 0.0  # first post -> last 202
    ingest_retries: int = 0

    @property
    def events_per_s(self) -> float:
        return self.delivered / self.seconds if self.seconds else 0.0

    @property
    def tidegate_us(self) -> float:
        return self.tidegate_cpu / self.delivered * 1e6 if self.delivered else math.nan

    @property
    def nats_us(self) -> float:
        return self.nats_cpu / self.delivered * 1e6 if self.delivered else math.nan

    @property
    def drained(self) -> bool:
        return self.delivered >= self.events


def _bodies(events: int) -> list[bytes]:
    """The same ``events`` for every set-up: ``events / BATCH`` request bodies."""
    source: Iterator[tuple[bytes, int]] = ingest_bodies(BATCH, CUSTOMERS)
    return [next(source)[0] for _ in range(math.ceil(events / BATCH))]


WARMUP_FIRST = 100_000_000
"""The warm-up request's event numbers: far from the measured ones, so no id repeats."""


async def _warm_up(
    session: aiohttp.ClientSession, ingest_url: str, sink: Process, within: float
) -> None:
    """One request of other events, all the way to the sink, then the sink's counters
    reset: the measurement starts with connections open and consumers pulling."""
    body, count = next(ingest_bodies(BATCH, CUSTOMERS, seed=2, start=WARMUP_FIRST))
    await post_ingest(session, ingest_url, body)
    deadline = time.monotonic() + within
    while (await _sink_stats(session, sink))["events"] < count:
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the warm-up's {count} events did not reach the sink in {within:g} s"
            )
        await asyncio.sleep(0.05)
    async with session.post(sink.extra["url"] + "/bench/reset") as response:
        response.raise_for_status()


async def _sink_stats(session: aiohttp.ClientSession, sink: Process) -> dict[str, Any]:
    async with session.get(sink.extra["url"] + "/bench/stats") as response:
        stats: dict[str, Any] = await response.json()
        return stats


def _nats_cpu(cluster: LocalCluster | None) -> float:
    if cluster is None:
        return 0.0
    return sum(
        processes.cpu_seconds(node.process.pid, children=False)
        for node in cluster.nodes
        if node.process is not None
    )


async def _drive(
    result: ScaleResult,
    bodies: list[bytes],
    ingest_url: str,
    sink: Process,
    tidegate: list[Process],
    cluster: LocalCluster | None,
    drain_timeout: float,
) -> None:
    """Posts ``bodies`` (``IN_FLIGHT`` at a time), waits until the sink has every event,
    and fills in ``result``."""
    queue = list(reversed(bodies))
    async with aiohttp.ClientSession() as session:
        await _warm_up(session, ingest_url, sink, drain_timeout)

        async def poster() -> None:
            while queue:
                body = queue.pop()
                sent = time.monotonic()
                result.ingest_retries += await post_ingest(session, ingest_url, body)
                result.ack.append(time.monotonic() - sent)

        cpu0 = sum(p.cpu() for p in tidegate)
        nats0 = _nats_cpu(cluster)
        t0 = time.monotonic()
        await asyncio.gather(*(poster() for _ in range(IN_FLIGHT)))
        result.ingest_seconds = time.monotonic() - t0
        deadline = time.monotonic() + drain_timeout
        while True:
            stats = await _sink_stats(session, sink)
            if stats["events"] >= result.events or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        result.tidegate_cpu = sum(p.cpu() for p in tidegate) - cpu0
        result.nats_cpu = _nats_cpu(cluster) - nats0
    result.delivered = int(stats["events"])
    result.seconds = (stats["last_time"] or time.monotonic()) - t0


async def run_embedded(work: Path, events: int, drain_timeout: float) -> ScaleResult:
    result = ScaleResult("embedded", events)
    bodies = _bodies(events)
    with (
        start_sink(work / "sink.log") as sink,
        start_engine(work / "data", work / "engine.log") as engine,
    ):
        await create_connection(
            engine.extra["grpc"], sink.extra["url"], token=engine.extra["token"]
        )
        await _drive(result, bodies, engine.extra["ingest"], sink, [engine], None, drain_timeout)
    return result


def _start_role(data_dir: Path, log_path: Path, servers: str, role: str) -> Process:
    """``tidegate serve --broker ... --role`` from ``ENGINE_SRC`` on free loopback ports
    (a worker serves no ingest port; its serving line names one all the same)."""
    argv = [
        sys.executable, "-m", "engine.cli", "--log-format", "json",
        "serve", "--grpc-port", "0", "--http-port", "0", "--data-dir", str(data_dir),
        "--allow-destination", "127.0.0.1", "--metrics-port", "0", "--ui-port", "0",
        "--broker", servers, "--role", role, "--partitions", str(PARTITIONS),
        "--lease-seconds", str(LEASE_SECONDS), "--takeover-wait", str(TAKEOVER_WAIT),
        # Both streams (events and log rows) reserve this on each node's 1 GB store.
        "--broker-max-bytes", str(256 << 20),
        *processes.ENGINE_ARGS,
    ]  # fmt: skip
    process = processes._spawn(f"engine ({role})", argv, log_path, processes.ENGINE_SRC)
    match = processes._wait_for(process, processes.SERVING)
    process.extra["grpc"] = f"127.0.0.1:{match.group(1)}"
    process.extra["ingest"] = f"http://127.0.0.1:{match.group(2)}/v1/events"
    token_file = data_dir / "admin-token"
    process.extra["token"] = token_file.read_text().strip() if token_file.exists() else ""
    return process


async def _create_unless_there(worker: Process, sink: Process) -> None:
    try:
        await create_connection(
            worker.extra["grpc"], sink.extra["url"], token=worker.extra["token"]
        )
    except grpc.aio.AioRpcError as exc:
        if "already exists" not in (exc.details() or ""):
            raise


@contextlib.contextmanager
def _shared_secret_key() -> Iterator[None]:
    """``TIDEGATE_SECRET_KEY`` for the processes started meanwhile (unless it is set)."""
    if os.environ.get("TIDEGATE_SECRET_KEY"):
        yield
        return
    os.environ["TIDEGATE_SECRET_KEY"] = Fernet.generate_key().decode()
    try:
        yield
    finally:
        os.environ.pop("TIDEGATE_SECRET_KEY", None)


async def _reset_broker(cluster: LocalCluster) -> None:
    """Empty streams and buckets for the next set-up."""
    nc = await nats.connect(cluster.urls)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():  # events, log rows, buckets
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(info.config.name)
    finally:
        await nc.close()


async def _wait_balanced(cluster: LocalCluster, workers: int) -> None:
    """Until every partition has an owner and ``workers`` workers hold a fair share each
    (at most ``ceil(P / workers)``), so the run measures the set-up, not a rebalance."""
    share = math.ceil(PARTITIONS / workers)
    deadline = time.monotonic() + BALANCE_TIMEOUT
    owners: dict[str, int] = {}
    nc = await nats.connect(cluster.urls)
    try:
        while time.monotonic() < deadline:
            owners = {}
            with contextlib.suppress(Exception):  # the bucket may not exist yet
                kv = await nc.jetstream().key_value(streams.LEASES_BUCKET)
                for n in range(PARTITIONS):
                    with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                        entry = await kv.get(f"p.{n}")
                        if entry.value:
                            owner = entry.value.decode()
                            owners[owner] = owners.get(owner, 0) + 1
            if (
                sum(owners.values()) == PARTITIONS
                and len(owners) == workers
                and max(owners.values()) <= share
            ):
                return
            await asyncio.sleep(0.25)
    finally:
        await nc.close()
    raise RuntimeError(
        f"{workers} worker(s) did not share the {PARTITIONS} partitions within"
        f" {BALANCE_TIMEOUT:g} s (owners: {owners})"
    )


async def run_jetstream(
    work: Path, cluster: LocalCluster, workers: int, events: int, drain_timeout: float
) -> ScaleResult:
    label = f"JetStream R3, 1 ingest + {workers} worker{'s' if workers > 1 else ''} + 1 log"
    result = ScaleResult(label, events)
    bodies = _bodies(events)
    await _reset_broker(cluster)
    with contextlib.ExitStack() as stack:
        # The processes of a cluster share one secret key (the configuration they share
        # carries the API keys encrypted).
        stack.enter_context(_shared_secret_key())
        sink = stack.enter_context(start_sink(work / "sink.log"))
        ingest = stack.enter_context(
            _start_role(work / "ingest", work / "ingest.log", cluster.servers, "ingest")
        )
        await create_connection(
            ingest.extra["grpc"], sink.extra["url"], token=ingest.extra["token"]
        )
        started = [
            stack.enter_context(_start_role(work / "log", work / "log.log", cluster.servers, "log"))
        ]
        for i in range(1, workers + 1):
            worker = stack.enter_context(
                _start_role(work / f"worker{i}", work / f"worker{i}.log", cluster.servers, "worker")
            )
            # The worker has the connection from the cluster; an engine from before the
            # shared configuration (--engine-src) routes by its own: make it there too.
            await _create_unless_there(worker, sink)
            started.append(worker)
        await _wait_balanced(cluster, workers)
        await _drive(
            result, bodies, ingest.extra["ingest"], sink, [ingest, *started], cluster,
            drain_timeout,
        )  # fmt: skip
    return result


async def run_scaleout(
    work: Path, events: int, drain_timeout: float
) -> tuple[ScaleResult, list[ScaleResult]]:
    """The embedded run, then JetStream with 1 and 2 workers on one local cluster."""
    embedded = await run_embedded(work / "embedded", events, drain_timeout)
    cluster = LocalCluster(work / "nats", size=3, max_file_store="1GB")
    runs = []
    try:
        await asyncio.to_thread(cluster.start)
        for workers in (1, 2):
            runs.append(
                await run_jetstream(
                    work / f"jetstream-{workers}", cluster, workers, events, drain_timeout
                )
            )
    finally:
        await asyncio.to_thread(cluster.stop)
    return embedded, runs
