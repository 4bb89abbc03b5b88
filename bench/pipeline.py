"""Section 3: Tidegate end to end. Antavo events are posted to ingest in bulk, delivered
to the sink, and logged; the engine runs as ``tidegate serve`` in its own process.

The load generator keeps posting for a fixed time, holding at most ``backlog_cap``
events ingested but not yet delivered (so the queue stays the size a healthy engine
sees), then waits for the queue to drain. After the engine stops, the log file is opened
to check that every request and customer was logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.processes import Process, start_engine, start_sink
from bench.profiling import Profiler
from bench.traffic import create_braze_connection, create_connection, ingest_bodies
from engine.outbound_log.partitions import LOG_DIR, read_only


@dataclass
class PipelineResult:
    accepted: int = 0
    delivered: int = 0  # events that reached the sink
    requests: int = 0  # upserts that reached the sink
    users: int = 0
    offer_seconds: float = 0.0
    total_seconds: float = 0.0  # first ingest post -> last delivery at the sink
    steady_rate: float = 0.0  # events/s delivered once warmed up, while load was offered
    engine_cpu: float = 0.0  # CPU seconds the engine used from first post to drained
    engine_main_cpu: float = 0.0  # of which its main process (delivery, log); the rest: ingest
    sink_cpu: float = 0.0
    client_cpu: float = 0.0
    logged_requests: int = 0
    logged_customers: int = 0
    drained: bool = False
    ingest_retries: int = 0  # 503 backlog_full answers
    samples: list[tuple[float, int]] = field(default_factory=list)

    @property
    def events_per_s(self) -> float:
        return self.delivered / self.total_seconds if self.total_seconds else 0.0

    @property
    def cpu_us_per_event(self) -> float:
        return self.engine_cpu / self.delivered * 1e6 if self.delivered else 0.0

    @property
    def users_per_request(self) -> float:
        return self.users / self.requests if self.requests else 0.0


async def _sink_stats(session: aiohttp.ClientSession, sink: Process) -> dict[str, Any]:
    async with session.get(sink.extra["url"] + "/bench/stats") as response:
        stats: dict[str, Any] = await response.json()
        return stats


async def post_ingest(session: aiohttp.ClientSession, url: str, body: bytes) -> int:
    """Posts one ingest body, waiting out 503 backlog_full answers; returns the retries."""
    retries = 0
    while True:
        async with session.post(
            url, data=body, headers={"Content-Type": "application/json"}
        ) as response:
            answer = await response.read()
            if response.status == 202:
                return retries
            if response.status != 503:
                raise RuntimeError(f"ingest answered {response.status}: {answer[:300]!r}")
            retries += 1
        await asyncio.sleep(min(float(response.headers.get("Retry-After", "1")), 1.0))


async def run_pipeline(
    workdir: Path,
    seconds: float,
    *,
    batch: int = 1000,
    in_flight: int = 2,
    customers: int = 100_000,
    backlog_cap: int = 60_000,
    drain_timeout: float = 120.0,
    profile_to: Path | None = None,
    connector: str = "insider",
) -> PipelineResult:
    """``connector``: ``insider`` (upserts of up to 1,000 users) or ``braze``
    (``/users/track`` requests of up to 75 objects), both answered by the bench sink."""
    result = PipelineResult()
    with (
        start_sink(workdir / "sink.log") as sink,
        start_engine(workdir / "data", workdir / "engine.log") as engine,
    ):
        token = engine.extra["token"]
        if connector == "braze":
            await create_braze_connection(engine.extra["grpc"], sink.extra["url"], token=token)
        else:
            await create_connection(engine.extra["grpc"], sink.extra["url"], token=token)
        bodies = ingest_bodies(batch, customers)
        async with aiohttp.ClientSession() as session:
            delivered = [0]
            offered, drained, stop_monitor = asyncio.Event(), asyncio.Event(), asyncio.Event()

            async def monitor() -> None:
                while not stop_monitor.is_set():
                    stats = await _sink_stats(session, sink)
                    delivered[0] = stats["events"]
                    result.samples.append((time.monotonic(), stats["events"]))
                    if offered.is_set() and delivered[0] >= result.accepted:
                        drained.set()
                    await asyncio.sleep(0.05 if offered.is_set() else 0.2)

            async def poster(until: float) -> None:
                while time.monotonic() < until:
                    if result.accepted - delivered[0] >= backlog_cap:
                        await asyncio.sleep(0.02)
                        continue
                    body, count = next(bodies)
                    result.accepted += count  # counted first, so the cap holds with posts in flight
                    result.ingest_retries += await post_ingest(
                        session, engine.extra["ingest"], body
                    )

            profiler = Profiler.start(engine.pid, seconds, profile_to) if profile_to else None
            watcher = asyncio.create_task(monitor())
            cpu0, sink0, client0 = engine.cpu(), sink.cpu(), time.process_time()
            main0 = engine.cpu(children=False)
            t0 = time.monotonic()
            await asyncio.gather(*(poster(t0 + seconds) for _ in range(in_flight)))
            t_offered = time.monotonic()
            result.offer_seconds = t_offered - t0
            offered.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drained.wait(), drain_timeout)
            result.engine_cpu = engine.cpu() - cpu0
            result.engine_main_cpu = engine.cpu(children=False) - main0
            result.sink_cpu = sink.cpu() - sink0
            result.client_cpu = time.process_time() - client0
            stop_monitor.set()
            await watcher
            stats = await _sink_stats(session, sink)
            if profiler is not None:
                profiler.wait()
    result.drained = stats["events"] >= result.accepted
    result.delivered, result.requests, result.users = (
        stats["events"],
        stats["requests"],
        stats["users"],
    )
    result.total_seconds = (stats["last_time"] or t_offered) - t0
    result.steady_rate = _steady_rate(result.samples, t0, t_offered)
    result.logged_requests, result.logged_customers = logged_counts(workdir / "data" / LOG_DIR)
    return result


def _steady_rate(samples: list[tuple[float, int]], start: float, end: float) -> float:
    """Delivery rate between the end of warm-up (a fifth of the run, at most 3 s) and the
    end of the offered load."""
    warm = start + min(3.0, (end - start) / 5)
    window = [(t, n) for t, n in samples if warm <= t <= end]
    if len(window) < 2 or window[-1][0] <= window[0][0]:
        return 0.0
    (t1, n1), (t2, n2) = window[0], window[-1]
    return (n2 - n1) / (t2 - t1)


def logged_counts(folder: Path) -> tuple[int, int]:
    """(requests, customers) in the outbound log; the engine must have stopped."""
    with read_only(folder) as conn:
        requests, customers = conn.execute(
            "SELECT count(*), coalesce(sum(customer_count), 0) FROM log_requests"
        ).fetchone() or (0, 0)
        return int(requests), int(customers)
