"""Sections 1 and 2: what a bare aiohttp client gets through to the sink.

The ceiling posts one pre-built upsert body over and over, with 1 and with 4 requests in
flight, at 1, 100 and 1,000 users per request. The naive baseline is how a simple
integration sends: for each event, build a one-user body and post it, one at a time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp
import orjson

from bench.processes import Process
from bench.traffic import UPSERT_HEADERS, insider_user, upsert_body

BATCH_SIZES = (1, 100, 1000)
IN_FLIGHT = (1, 4)


@dataclass(frozen=True)
class Throughput:
    users: int  # per request
    in_flight: int
    requests: int
    seconds: float
    client_cpu: float  # share of one core used by this process
    sink_cpu: float

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def users_per_s(self) -> float:
        return self.requests * self.users / self.seconds


async def _post_until(
    session: aiohttp.ClientSession, url: str, body: bytes, until: float, done: list[int]
) -> None:
    while time.monotonic() < until:
        async with session.post(url, data=body, headers=UPSERT_HEADERS) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"sink answered {response.status}")
        done[0] += 1


async def ceiling(
    sink: Process, users: int, in_flight: int, seconds: float, warmup: float
) -> Throughput:
    """Requests of ``users`` users each, ``in_flight`` at a time, for ``seconds``."""
    url = sink.extra["url"] + "/api/user/v1/upsert"
    body = upsert_body(users)
    connector = aiohttp.TCPConnector(limit=in_flight)
    async with aiohttp.ClientSession(connector=connector) as session:
        scratch = [0]
        warm_until = time.monotonic() + warmup
        await asyncio.gather(
            *(_post_until(session, url, body, warm_until, scratch) for _ in range(in_flight))
        )
        done = [0]
        cpu0, sink0, t0 = time.process_time(), sink.cpu(), time.monotonic()
        until = t0 + seconds
        await asyncio.gather(
            *(_post_until(session, url, body, until, done) for _ in range(in_flight))
        )
        elapsed = time.monotonic() - t0
        return Throughput(
            users,
            in_flight,
            done[0],
            elapsed,
            (time.process_time() - cpu0) / elapsed,
            (sink.cpu() - sink0) / elapsed,
        )


async def naive(sink: Process, seconds: float, warmup: float) -> Throughput:
    """One request per event, one at a time, each body built when its event comes."""
    url = sink.extra["url"] + "/api/user/v1/upsert"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:

        async def send(number: int) -> None:
            body = orjson.dumps({"users": [insider_user(number)]})
            async with session.post(url, data=body, headers=UPSERT_HEADERS) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"sink answered {response.status}")

        number = 0
        warm_until = time.monotonic() + warmup
        while time.monotonic() < warm_until:
            await send(number)
            number += 1
        cpu0, sink0, t0 = time.process_time(), sink.cpu(), time.monotonic()
        sent = 0
        while time.monotonic() - t0 < seconds:
            await send(number)
            number += 1
            sent += 1
        elapsed = time.monotonic() - t0
        return Throughput(
            1,
            1,
            sent,
            elapsed,
            (time.process_time() - cpu0) / elapsed,
            (sink.cpu() - sink0) / elapsed,
        )
