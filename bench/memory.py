"""Section 6: the engine's memory with the destination down and a large backlog queued.

The connection points at a loopback port nothing listens on, so every send fails with
"connection refused" and the items stay queued (the connection backs off between
attempts). Ingest runs as fast as the engine accepts, which also gives the cost of
ingest alone: with delivery backing off, nearly all of the engine's CPU is ingest.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench.pipeline import post_ingest
from bench.processes import free_port, memory_kib, start_engine
from bench.traffic import create_connection, ingest_bodies
from engine.state.database import STATE_FILE

CHURN_SECONDS = 3.0  # how long the backlog sits (with failing retries) before the reading


@dataclass
class MemoryResult:
    events: int
    queued: int = 0
    ingest_seconds: float = 0.0
    engine_cpu: float = 0.0  # during ingest
    rss_start_kib: int = 0
    rss_end_kib: int = 0
    peak_kib: int = 0  # VmHWM: the largest resident set the engine ever had
    state_bytes: int = 0  # SQLite file plus its WAL

    @property
    def ingest_rate(self) -> float:
        return self.events / self.ingest_seconds if self.ingest_seconds else 0.0

    @property
    def ingest_cpu_us_per_event(self) -> float:
        return self.engine_cpu / self.events * 1e6 if self.events else 0.0


async def run_memory(
    workdir: Path, events: int, batch: int = 1000, in_flight: int = 2
) -> MemoryResult:
    result = MemoryResult(events)
    data_dir = workdir / "data"
    with start_engine(data_dir, workdir / "engine.log") as engine:
        await create_connection(
            engine.extra["grpc"], f"http://127.0.0.1:{free_port()}", token=engine.extra["token"]
        )
        result.rss_start_kib = memory_kib(engine.pid)["VmRSS"]
        bodies = ingest_bodies(batch, customers=100_000, seed=6)
        remaining = [events // batch]
        async with aiohttp.ClientSession() as session:

            async def poster() -> None:
                while remaining[0] > 0:
                    remaining[0] -= 1
                    body, _ = next(bodies)
                    await post_ingest(session, engine.extra["ingest"], body)

            cpu0, t0 = engine.cpu(), time.monotonic()
            await asyncio.gather(*(poster() for _ in range(in_flight)))
            result.ingest_seconds = time.monotonic() - t0
            result.engine_cpu = engine.cpu() - cpu0
        result.events = events // batch * batch
        await asyncio.sleep(CHURN_SECONDS)
        memory = memory_kib(engine.pid)
        result.rss_end_kib, result.peak_kib = memory["VmRSS"], memory["VmHWM"]
        result.queued = _queued(data_dir / STATE_FILE)
        result.state_bytes = sum(p.stat().st_size for p in data_dir.glob(STATE_FILE + "*"))
    return result


def _queued(path: Path) -> int:
    """Items in the queue, read beside the running engine (WAL lets readers in)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM queue").fetchone()[0])
    finally:
        conn.close()
