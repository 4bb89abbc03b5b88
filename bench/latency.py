"""Section 4: latency at a steady offered load.

The load is open-loop: request ``k`` is due at ``start + k * interval`` whether or not
earlier requests were answered, and every latency is measured from that due time, so a
stalled engine shows up as latency instead of silently lowering the load. The generator
keeps up to ``MAX_CONNECTIONS`` requests in flight, like a webhook sender's pool, and
the first ``WARMUP_SECONDS`` are not counted.

Each event carries a ``bench_id`` parameter that the connection maps to a custom Insider
event parameter, and has a customer of its own (``lat-<bench_id>``). The sink records
when each ``bench_id`` arrived and in which request; a ``StreamLogs`` subscription records
when each request became visible (a streamed row names its customers, so its first
customer identifies the sink request, and with it every event that request carried).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import orjson

from bench.pipeline import post_ingest
from bench.processes import Process, start_engine, start_sink
from bench.profiling import Profiler
from bench.traffic import CONNECTION_ID, antavo_event, create_connection
from clients.client import TidegateClient
from engine.pb import logs_pb2, logs_pb2_grpc

CUSTOMER_PREFIX = "lat-"
MAX_CONNECTIONS = 256
WARMUP_SECONDS = 1.0
"""Events due in the first second (a fifth of a short run) are sent but not counted: the
generator is still opening its connections."""


@dataclass
class LatencyResult:
    rate: float  # events/s offered
    events_per_request: int
    seconds: float
    sent: int = 0
    achieved_rate: float = 0.0  # events/s the generator put on the wire
    ack: list[float] = field(default_factory=list)
    delivered: list[float] = field(default_factory=list)
    visible: list[float] = field(default_factory=list)
    missing_delivered: int = 0
    missing_visible: int = 0
    measured_from: float = 0.0  # due times before this are warm-up and not counted
    engine_cores: float = 0.0  # CPU the engine used while the load ran, in cores
    client_cores: float = 0.0


class _Tail:
    """A StreamLogs subscription noting when each row's first customer was first seen."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.seen: dict[str, float] = {}
        self._stub = logs_pb2_grpc.LogServiceStub(channel)
        self._ready = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        request = logs_pb2.StreamLogsRequest(filter=logs_pb2.LogFilter(connection_id=CONNECTION_ID))
        call = self._stub.StreamLogs(request)
        await call.initial_metadata()
        self._ready.set()
        async for response in call:
            now = time.monotonic()
            for entry in response.logs:
                if entry.customers:
                    self.seen.setdefault(entry.customers[0].customer_id, now)

    async def ready(self) -> None:
        await asyncio.wait_for(self._ready.wait(), 10)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def run_latency(
    workdir: Path,
    rate: float,
    events_per_request: int,
    seconds: float,
    settle: float = 10.0,
    profile_to: Path | None = None,
) -> LatencyResult:
    result = LatencyResult(rate, events_per_request, seconds)
    with (
        start_sink(workdir / "sink.log") as sink,
        start_engine(workdir / "data", workdir / "engine.log") as engine,
    ):
        await create_connection(
            engine.extra["grpc"], sink.extra["url"], token=engine.extra["token"]
        )
        async with TidegateClient(engine.extra["grpc"], engine.extra["token"]) as admin:
            tail = _Tail(admin.channel)
            await tail.ready()
            connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS)
            async with aiohttp.ClientSession(connector=connector) as session:
                profiler = Profiler.start(engine.pid, seconds, profile_to) if profile_to else None
                due = await _offer(session, engine, result)
                if profiler is not None:
                    profiler.wait()
                arrivals = await _arrivals(session, sink, len(due), settle)
            visible = await _visible(tail.seen, arrivals, settle)
            await tail.close()
    for bench_id, at in due.items():
        if at < result.measured_from:
            continue
        arrival = arrivals.get(bench_id)
        if arrival is None:
            result.missing_delivered += 1
            continue
        arrived, request_number = arrival
        result.delivered.append(arrived - at)
        seen = visible.get(request_number)
        if seen is None:
            result.missing_visible += 1
        else:
            result.visible.append(seen - at)
    return result


async def run_ack_only(
    workdir: Path, rate: float, events_per_request: int, seconds: float
) -> LatencyResult:
    """The same load into a paused connection: the sink refuses the API key, the engine
    pauses the connection after the first request and keeps queueing, so the
    acknowledgement latency is that of ingest with no delivery work beside it. The
    difference to ``run_latency`` is what delivery costs ingest."""
    result = LatencyResult(rate, events_per_request, seconds)
    with (
        start_sink(workdir / "sink.log") as sink,
        start_engine(workdir / "data", workdir / "engine.log") as engine,
    ):
        await create_connection(
            engine.extra["grpc"], sink.extra["url"], api_key="refused", token=engine.extra["token"]
        )
        connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS)
        async with aiohttp.ClientSession(connector=connector) as session:
            await _offer(session, engine, result)
    return result


async def _offer(
    session: aiohttp.ClientSession, engine: Process, result: LatencyResult
) -> dict[str, float]:
    """Sends the load; returns each bench_id's due time once every request is answered."""
    due: dict[str, float] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def send(body: bytes, at: float) -> None:
        await post_ingest(session, engine.extra["ingest"], body)
        if at >= result.measured_from:
            result.ack.append(time.monotonic() - at)

    per_request = result.events_per_request
    interval = per_request / result.rate
    # The generator's own collector pauses would count as ingest latency (the schedule is
    # open loop): keep the objects made so far out of its full passes.
    gc.freeze()
    cpu0, client0 = engine.cpu(), time.process_time()
    start = time.monotonic() + 0.05
    result.measured_from = start + min(WARMUP_SECONDS, result.seconds / 5)
    number = 0
    for k in range(max(1, round(result.seconds / interval))):
        at = start + k * interval
        delay = at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        events = []
        for _ in range(per_request):
            due[str(number)] = at
            events.append(antavo_event(number, f"{CUSTOMER_PREFIX}{number}", str(number)))
            number += 1
        body = orjson.dumps(events[0] if per_request == 1 else {"events": events})
        task = asyncio.create_task(send(body, at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    elapsed = time.monotonic() - start
    result.sent = number
    result.achieved_rate = number / elapsed
    result.engine_cores = (engine.cpu() - cpu0) / elapsed
    result.client_cores = (time.process_time() - client0) / elapsed
    if tasks:
        await asyncio.gather(*tasks)
    gc.unfreeze()
    return due


async def _arrivals(
    session: aiohttp.ClientSession, sink: Process, expected: int, settle: float
) -> dict[str, tuple[float, int]]:
    """bench_id -> (arrival time, sink request number), once all arrived or ``settle`` s."""
    deadline = time.monotonic() + settle
    while True:
        async with session.get(sink.extra["url"] + "/bench/arrivals") as response:
            raw = orjson.loads(await response.read())
        if len(raw) >= expected or time.monotonic() > deadline:
            return {k: (float(v[0]), int(v[1])) for k, v in raw.items()}
        await asyncio.sleep(0.1)


async def _visible(
    seen: dict[str, float], arrivals: dict[str, tuple[float, int]], settle: float
) -> dict[int, float]:
    """Sink request number -> when its log row was first seen on the stream."""
    wanted = {number for _, number in arrivals.values()}
    deadline = time.monotonic() + settle
    while True:
        by_request: dict[int, float] = {}
        for customer, at in list(seen.items()):
            arrival = arrivals.get(customer.removeprefix(CUSTOMER_PREFIX))
            if arrival is not None:
                number = arrival[1]
                by_request[number] = min(at, by_request.get(number, at))
        if wanted <= by_request.keys() or time.monotonic() > deadline:
            return by_request
        await asyncio.sleep(0.1)
