"""CPU of sharing re-send marks on JetStream: ``python -m bench.marks_cost``.

A worker puts the marks of the customers it acked events of every minute, and reads a
customer's marks the first time it meets the customer in an ownership
(``engine.broker.marks``). This measures both against a local three-node cluster (R3,
``sync_interval: always``, as the tests and the demo run it): ``--customers`` customers
with one new mark each, flushed twice (the first flush creates the keys, the second
updates them), then read back as a worker reads them; it reports this process's CPU and
the three nats-servers' CPU per customer, and the wall time. Compare with section 8 of
``python -m bench`` (CPU per event through JetStream) on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import nats

from engine.broker.cluster import LocalCluster
from engine.broker.marks import CONCURRENCY, MarkShare
from engine.broker.streams import marks_bucket
from engine.ingest.ingestor import ID_DEDUP_WINDOW
from engine.state.database import Database


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU of ``pids`` so far, from /proc."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


async def measure(customers: int) -> list[str]:
    folder = Path(tempfile.mkdtemp(prefix="tidegate-marks-"))
    cluster = LocalCluster(folder / "nats", size=3, max_file_store="256MB")
    cluster.start()
    lines = []
    try:
        servers = [node.process.pid for node in cluster.nodes if node.process is not None]
        nc = await nats.connect(cluster.urls)
        kv = await marks_bucket(nc.jetstream(), 3, ID_DEDUP_WINDOW)
        db = Database(folder / "state.db")
        await db.start()
        share = MarkShare(kv, db)
        names = [f"customer-{i}" for i in range(customers)]

        async def timed(what: str, work: object) -> None:
            cpu, server_cpu, wall = time.process_time(), cpu_seconds(servers), time.monotonic()
            await work  # type: ignore[misc]
            cpu = time.process_time() - cpu
            server_cpu = cpu_seconds(servers) - server_cpu
            wall = time.monotonic() - wall
            lines.append(
                f"{what}: {customers:,} customers in {wall:.2f} s; this process"
                f" {1e6 * cpu / customers:.0f} us per customer, nats-servers"
                f" {1e6 * server_cpu / customers:.0f} us"
            )

        for round_ in ("flush, creating the keys", "flush, updating them"):
            now = time.time()
            for name in names:
                share.note(name, [f"{round_}-{name}"], now)
            before = share.flushed
            await timed(round_, share.flush())
            if share.flushed - before != customers:  # a measure of failures is no measure
                raise SystemExit(f"{round_}: {share.flushed - before} of {customers} written")
        loaded: list[dict[str, float]] = []

        async def load() -> None:
            for start in range(0, customers, CONCURRENCY):
                chunk = names[start : start + CONCURRENCY]
                loaded.extend(await asyncio.gather(*(share.load(n) for n in chunk)))

        await timed(f"load, {CONCURRENCY} at a time", load())
        if sorted(len(marks) for marks in loaded) != [2] * customers:
            raise SystemExit("load: the customers' two marks did not come back")
        await db.close()
        await nc.close()
    finally:
        cluster.stop()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.marks_cost", description=__doc__)
    parser.add_argument("--customers", type=int, default=5000)
    args = parser.parse_args()
    for line in asyncio.run(measure(args.customers)):
        print(line)


if __name__ == "__main__":
    main()
