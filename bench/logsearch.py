"""Section 5: ``ListLogs`` over gRPC on a generated outbound log (see ``loggen``).

The engine is started on the generated data dir and queried like the dashboard would:
one page of 50 rows per call, each filter with values sampled from the file, each call
timed at the client. The first calls of each filter warm the caches and are not counted.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from bench.loggen import SAMPLES_FILE
from bench.processes import start_engine
from clients.client import TidegateClient
from engine.outbound_log.partitions import LOG_DIR

PAGE_SIZE = 50
WARMUP_CALLS = 2
PAGES = 10  # pages followed in the time-range paging query


def _ts(ms: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.fromtimestamp(ms / 1000, UTC))
    return stamp


@dataclass
class FilterTiming:
    name: str
    description: str
    seconds: list[float] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # rows on the first page of each call


@dataclass
class SearchResult:
    rows: int
    file_bytes: int
    timings: list[FilterTiming] = field(default_factory=list)

    @property
    def mb_per_million(self) -> float:
        return self.file_bytes / 1e6 / (self.rows / 1e6)


Filter = tuple[str, str, Callable[[], dict[str, Any]]]


def _filters(samples: dict[str, Any], rng: random.Random) -> list[Filter]:
    """(name, description, a function making ``list_logs`` keyword arguments) per filter."""
    first, last = samples["first_ms"], samples["last_ms"]
    two_weeks = 14 * 24 * 3600 * 1000

    def identifier() -> dict[str, Any]:
        return {"identifier": rng.choice(samples["ids"])}

    def customer() -> dict[str, Any]:
        return {"customer_id": rng.choice(samples["customers"])}

    def combined() -> dict[str, Any]:
        return {**customer(), "status_codes": [200, 429], "start_time": _ts(last - two_weeks)}

    return [
        ("newest", "no filter: the newest page", dict),
        ("identifier", "identifier = a sampled request id", identifier),
        ("customer", "customer ID = a sampled customer", customer),
        ("error", "error text contains 'email' (3% of rows)", lambda: {"error_contains": "email"}),
        ("status", "status code 500 (1% of rows)", lambda: {"status_codes": [500]}),
        ("combined", "customer + status 200/429 + last 14 days", combined),
        ("day", "time range: one day, first page", lambda: _day(first, last, rng)),
    ]


def _day(first: int, last: int, rng: random.Random) -> dict[str, Any]:
    day = 24 * 3600 * 1000
    start = rng.randrange(first, max(first + 1, last - day))
    return {"start_time": _ts(start), "end_time": _ts(start + day)}


async def run_search(data_dir: Path, workdir: Path, calls: int, seed: int = 5) -> SearchResult:
    samples = json.loads((data_dir / SAMPLES_FILE).read_text())
    result = SearchResult(
        samples["rows"], sum(p.stat().st_size for p in (data_dir / LOG_DIR).glob("*.duckdb"))
    )
    rng = random.Random(seed)
    with start_engine(data_dir, workdir / "engine.log") as engine:
        async with TidegateClient(engine.extra["grpc"], engine.extra["token"]) as client:
            for name, description, make in _filters(samples, rng):
                timing = FilterTiming(name, description)
                for call in range(WARMUP_CALLS + calls):
                    kwargs = make()
                    t0 = time.perf_counter()
                    response = await client.list_logs(page_size=PAGE_SIZE, **kwargs)
                    if call >= WARMUP_CALLS:
                        timing.seconds.append(time.perf_counter() - t0)
                        timing.rows.append(len(response.logs))
                result.timings.append(timing)
            result.timings.append(await _paging(client, samples, rng, calls))
    return result


async def _paging(
    client: TidegateClient, samples: dict[str, Any], rng: random.Random, calls: int
) -> FilterTiming:
    """Follows ``next_page_token`` through ``PAGES`` pages of one-day windows."""
    timing = FilterTiming("paging", f"time range: one day, pages 2-{PAGES} by page_token")
    for _ in range(max(1, calls // PAGES) + 1):
        window = _day(samples["first_ms"], samples["last_ms"], rng)
        token = (await client.list_logs(page_size=PAGE_SIZE, **window)).next_page_token
        for _page in range(PAGES - 1):
            if not token:
                break
            t0 = time.perf_counter()
            response = await client.list_logs(page_size=PAGE_SIZE, page_token=token, **window)
            timing.seconds.append(time.perf_counter() - t0)
            timing.rows.append(len(response.logs))
            token = response.next_page_token
    return timing


def found_rows(timing: FilterTiming) -> str:
    """How many calls found rows: a filter that finds nothing measures nothing."""
    found = sum(1 for n in timing.rows if n)
    return f"{found}/{len(timing.rows)} calls returned rows"
