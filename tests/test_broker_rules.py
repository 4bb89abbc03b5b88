"""Delivery rules across the cluster: a 401 one worker gets pauses the connection on every
worker (``engine.broker.config_sync``: the pause is a change of the connection's row), a
resume on any process resumes them all, and a 429 with ``Retry-After`` one worker gets
holds the others too (``engine.broker.pacing``). A real 3-node cluster; an ingest engine
and two workers in this process, each on a data folder of its own, and the in-process
Insider sandbox with its fault controls."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from engine.app import Engine
from engine.pb import connections_pb2 as cpb
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import API_KEY, engine_client, eventually, insider_connection
from tests.natscluster import nats_cluster
from tests.test_broker_cluster import post
from tests.test_broker_config import CONNECTION, Cluster, processes, shared_key
from tests.test_delivery_rules import configure, inject

__all__ = ["nats_cluster", "processes", "shared_key"]

CUSTOMERS = [f"rule-{i}" for i in range(12)]


@dataclass
class Sent:
    worker: int
    time: float
    status: int


@dataclass
class Setup:
    ingest: Engine
    workers: list[Engine]


@pytest.fixture
async def setup(processes: Cluster, sandbox: RunningSandbox) -> AsyncIterator[Setup]:
    """An ingest process that makes the connection, then two workers sharing the two
    partitions, each of which has sent requests of its own."""
    ingest = await processes.start("ingest", "ingest")
    async with engine_client(ingest) as client:
        await insider_connection(client, sandbox)
    workers = [await processes.start(f"worker{i}", "worker") for i in (1, 2)]

    async def shared() -> bool:
        return all(w.partitions is not None and len(w.partitions.owned) == 1 for w in workers)

    await eventually(shared, within=30)
    REQUESTS.sent.clear()
    REQUESTS.start(workers)
    batch = 0

    async def both_sent() -> bool:
        nonlocal batch
        batch += 1
        await send(ingest, batch)
        await asyncio.sleep(0.3)
        return all([bool(await sent_by(w, i)) for i, w in enumerate(workers)])

    try:
        await eventually(both_sent, within=30)
        yield Setup(ingest, workers)
    finally:
        await REQUESTS.stop()


async def send(ingest: Engine, batch: int) -> None:
    """One point_add for every customer, ``points`` = ``batch`` (the sandbox keeps it)."""
    events = [
        {"customer": c, "action": "point_add", "id": f"{c}-{batch}", "data": {"points": batch}}
        for c in CUSTOMERS
    ]
    assert (await post(ingest, events)).status == 202


class Requests:
    """Each worker's requests to the destination as its ``/metrics`` counts them
    (``tidegate_delivery_requests_total`` by code), read every 20 ms: a request shows at
    the read after its answer came. (A worker keeps no outbound log of its own: its rows
    go to the log processes, which do not say which worker sent a request.)"""

    def __init__(self) -> None:
        self.sent: dict[int, list[Sent]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self, workers: list[Engine]) -> None:
        self._task = asyncio.create_task(self._watch(workers))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self, workers: list[Engine]) -> None:
        seen: dict[tuple[int, int], int] = {}
        while True:
            now = time.time()
            for number, worker in enumerate(workers):
                for code, count in _request_counts(worker).items():
                    new = count - seen.get((number, code), 0)
                    seen[(number, code)] = count
                    self.sent.setdefault(id(worker), []).extend(
                        Sent(number, now, code) for _ in range(new)
                    )
            await asyncio.sleep(0.02)


def _request_counts(engine: Engine) -> dict[int, int]:
    counts: dict[int, int] = {}
    for metric in engine.metrics.registry.collect():
        if metric.name != "tidegate_delivery_requests":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels["connection"] == CONNECTION:
                counts[int(sample.labels["code"])] = int(sample.value)
    return counts


REQUESTS = Requests()


async def sent_by(worker: Engine, number: int) -> list[Sent]:
    """The requests a worker sent (``Requests``)."""
    return list(REQUESTS.sent.get(id(worker), []))


def paused(worker: Engine) -> bool:
    return worker.registry.view(CONNECTION).state == "paused"


async def requests_now(sandbox: RunningSandbox) -> int:
    return len(sandbox.state.requests)


async def test_a_401_on_one_worker_pauses_every_worker_and_a_resume_on_another_resumes_all(
    setup: Setup, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await inject(http, sandbox, status=401, count=1)
    await send(setup.ingest, 100)

    async def everywhere() -> bool:
        return all(paused(w) for w in [setup.ingest, *setup.workers])

    await eventually(everywhere, within=15)
    got_401: list[int] = []

    async def logged() -> bool:  # the outbound log commits its rows a moment later
        rows = [await sent_by(w, i) for i, w in enumerate(setup.workers)]
        got_401[:] = [i for i, mine in enumerate(rows) if any(s.status == 401 for s in mine)]
        return bool(got_401)

    await eventually(logged, within=10)
    assert len(got_401) == 1, got_401
    other = setup.workers[1 - got_401[0]]
    reasons = {w.registry.view(CONNECTION).state_reason for w in setup.workers}
    assert len(reasons) == 1 and reasons != {""}, reasons  # the one reason, everywhere

    # Paused everywhere: new events for every customer (both partitions) go nowhere.
    before = await requests_now(sandbox)
    await send(setup.ingest, 101)
    await asyncio.sleep(3.0)
    assert await requests_now(sandbox) == before, "a worker sent while the pause held"

    resumed = time.time()  # before the call: its own lanes resume before it answers
    async with engine_client(other) as client:  # not the worker that got the 401
        await client.connections.ResumeConnection(cpb.ResumeConnectionRequest(id=CONNECTION))

    async def active_everywhere() -> bool:
        return not any(paused(w) for w in [setup.ingest, *setup.workers])

    await eventually(active_everywhere, within=15)

    async def delivered() -> bool:
        queued = sum(w.queue.depth for w in setup.workers)
        rows = [await sent_by(w, i) for i, w in enumerate(setup.workers)]
        return queued == 0 and all(
            any(s.status == 200 and s.time >= resumed for s in mine) for mine in rows
        )

    await eventually(delivered, within=30)  # both workers' lanes run again
    points = _points(sandbox)
    for customer in CUSTOMERS:
        assert {100, 101} <= points.get(customer, set()), customer


async def test_new_credentials_given_to_one_process_resume_a_paused_connection_everywhere(
    setup: Setup, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await inject(http, sandbox, status=403, count=1)
    await send(setup.ingest, 200)

    async def everywhere() -> bool:
        return all(paused(w) for w in setup.workers)

    await eventually(everywhere, within=15)
    versions = {w.registry.runtime(CONNECTION).credentials_version for w in setup.workers}
    async with engine_client(setup.ingest) as client:
        await client.connections.UpdateConnection(
            cpb.UpdateConnectionRequest(connection=cpb.Connection(id=CONNECTION, api_key=API_KEY))
        )

    async def renewed() -> bool:
        return all(
            not paused(w) and w.registry.runtime(CONNECTION).credentials_version > max(versions)
            for w in setup.workers
        )

    await eventually(renewed, within=15)

    async def delivered() -> bool:
        return sum(w.queue.depth for w in setup.workers) == 0

    await eventually(delivered, within=30)
    points = _points(sandbox)
    for customer in CUSTOMERS:
        assert 200 in points.get(customer, set()), customer


async def test_a_401_to_old_credentials_does_not_undo_new_ones_given_on_another_process(
    setup: Setup,
    sandbox: RunningSandbox,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The workers retry with the old key while the new one reaches them (slowed here by
    2 s): the 401 they get pauses each locally, but that pause was decided on the old
    credentials and must not replace the new ones in the cluster."""
    new_key = "ucd-secret-key-rotated-9876543210"
    await inject(http, sandbox, status=503, count=100000)  # everything waits, retrying
    await send(setup.ingest, 400)
    for worker in setup.workers:
        replace = worker.registry.replace_from_document

        async def slowly(*args: Any, replace: Any = replace, **kwargs: Any) -> None:
            await asyncio.sleep(2.0)
            await replace(*args, **kwargs)

        monkeypatch.setattr(worker.registry, "replace_from_document", slowly)
    old = setup.ingest.registry.runtime(CONNECTION).credentials_version
    states: list[str] = []  # the connection's state on the ingest process, at every change
    setup.ingest.registry.on_change(
        lambda _: states.append(setup.ingest.registry.view(CONNECTION).state)
    )
    async with engine_client(setup.ingest) as client:
        await client.connections.UpdateConnection(
            cpb.UpdateConnectionRequest(connection=cpb.Connection(id=CONNECTION, api_key=new_key))
        )
    await configure(http, sandbox, api_key=new_key)
    async with http.delete(f"{sandbox.url}/sandbox/faults") as r:
        assert r.status == 200

    async def refused() -> bool:  # the old key went out and was refused
        rows = [s for i, w in enumerate(setup.workers) for s in await sent_by(w, i)]
        return any(s.status in (401, 403) for s in rows)

    await eventually(refused, within=10)

    async def delivered() -> bool:
        return 400 in set.intersection(*(_points(sandbox).get(c, set()) for c in CUSTOMERS))

    await eventually(delivered, within=30)
    assert "paused" not in states, states  # a stale pause never reached the cluster
    for engine in [setup.ingest, *setup.workers]:
        assert not paused(engine)
        connection = engine.registry.runtime(CONNECTION)
        assert connection.api_key == new_key and connection.credentials_version == old + 1


async def test_a_429_with_retry_after_on_one_worker_holds_the_other(
    setup: Setup, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    hold = 5.0
    slack = 1.0  # the hold reaching the other worker, and a request already going out
    stop = asyncio.Event()

    async def load() -> None:
        batch = 300
        while not stop.is_set():
            await send(setup.ingest, batch)
            batch += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)

    running = asyncio.create_task(load())
    try:
        await asyncio.sleep(1.0)
        await inject(http, sandbox, status=429, count=1, retry_after=str(int(hold)))

        async def throttled() -> list[Sent]:
            rows = [s for i, w in enumerate(setup.workers) for s in await sent_by(w, i)]
            return [s for s in rows if s.status == 429]

        async def seen() -> bool:
            return bool(await throttled())

        await eventually(seen, within=15)
        first = (await throttled())[0]
        await asyncio.sleep(max(0.0, first.time + hold + 2.0 - time.time()))
    finally:
        stop.set()
        await running
    rows = [s for i, w in enumerate(setup.workers) for s in await sent_by(w, i)]
    during = [s for s in rows if first.time + slack < s.time < first.time + hold - 0.1]
    assert during == [], (
        f"{len(during)} sent during the hold of a 429 at {first.time}: {during[:3]}"
    )
    for i in (0, 1):  # both were sending before, and both send again after the hold
        assert any(s.worker == i and s.time < first.time for s in rows), i
        assert any(s.worker == i and s.time >= first.time + hold - 0.1 for s in rows), i


def _points(sandbox: RunningSandbox) -> dict[str, set[int]]:
    """Each customer's ``points`` values the sandbox stored (from the requests it got)."""
    points: dict[str, set[int]] = {}
    for request in sandbox.state.requests:
        body: Any = request.get("body") or {}
        if request.get("status") != 200:
            continue
        for user in body.get("users", []):
            customer = (user.get("identifiers") or {}).get("uuid")
            for event in user.get("events", []):
                value = (event.get("event_params") or {}).get("custom", {}).get("points")
                if customer and value is not None:
                    points.setdefault(customer, set()).add(int(value))
    return points
