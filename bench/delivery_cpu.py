"""CPU per delivered item of the delivery path alone: ``python -m bench.delivery_cpu``.

The end-to-end bench (``python -m bench``) measures the whole engine, ingest included, on
a shared machine where wall-clock figures drift. This one isolates delivery: it builds
the engine's parts in this process (state database, plugins, connection registry, queue,
outbound log, deliverer), ingests ``--items`` Antavo records of mixed kinds *before* any
timing starts, then starts the deliverer against the bench sink (``bench/sink.py``, its
own process on 127.0.0.1) and measures this process's CPU time until the queue is empty
and every log row is committed. That covers claim, render (the connector's hooks),
send, settle, the log outbox and the outbound log's writer thread. It repeats the run
and reports the median.

The mix: checkouts as ``bench.traffic`` sends them (mapped to Insider ``purchase``),
``point_add`` events (a custom-parameter event) and ``profile`` updates (default and
custom attributes), for customers drawn from a pool. Timestamps are fixed, so two
runs of the same code send byte-identical requests: ``--digest`` prints a hash of every
request body and log row, to check that a change kept the behaviour.

``--engine-src DIR`` measures the engine of another checkout (say, the commit before a
change, from ``git worktree add``): the run re-executes this file with ``DIR`` first
on the import path.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import importlib
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import structlog

import engine
from bench.processes import start_sink
from bench.sink import API_KEY, PARTNER_NAME
from bench.traffic import PARAMETERS, antavo_event
from engine.connector.destinations import Allowance
from engine.connector.records import ParameterMapping
from engine.delivery.worker import Deliverer, DeliverySettings
from engine.ingest.ingestor import Ingestor
from engine.ingest.parse import parse_request
from engine.outbound_log.outbox import LogOutbox
from engine.outbound_log.partitions import LOG_DIR, read_only
from engine.outbound_log.store import LogStore
from engine.plugins import Connectors, plugin_manager
from engine.queue.lanes import DurableQueue
from engine.state.connections import ConnectionRegistry
from engine.state.database import Database
from engine.state.secrets import SecretBox

BASE_TIME = datetime(2026, 11, 27, 8, 0, 0, tzinfo=UTC)


def mixed_events(count: int, customers: int, seed: int = 1) -> list[bytes]:
    """``count`` Antavo records (70% checkouts, 15% point_add, 15% profile updates) as
    ingest bodies of 1,000. Kept as bytes, so the garbage collector never walks them
    while delivery is measured."""
    rng = random.Random(seed)
    events = []
    for number in range(count):
        customer = f"cust-{rng.randrange(customers)}"
        # Fixed, distinct timestamps with milliseconds, so requests are reproducible.
        stamp = (BASE_TIME + timedelta(microseconds=number * 1_237)).isoformat()
        roll = rng.random()
        if roll < 0.70:
            event = antavo_event(number, customer)
        elif roll < 0.85:
            event = {
                "id": f"evt-{number}",
                "customer": customer,
                "action": "point_add",
                "data": {"points": rng.randrange(1, 500), "reason": "purchase"},
            }
        else:
            event = {
                "id": f"evt-{number}",
                "customer": customer,
                "action": "profile",
                "data": {
                    "email": f"{customer}.{number}@example.com",
                    "first_name": rng.choice(["Anna", "Bence", "Csilla", "Dávid"]),
                    "last_name": "Kovács",
                    "tier": rng.choice(["bronze", "silver", "gold"]),
                },
            }
        event["timestamp"] = stamp
        events.append(event)
    return [orjson.dumps({"events": events[i : i + 1000]}) for i in range(0, count, 1000)]


async def run_once(
    workdir: Path, sink_url: str, bodies: list[bytes], digest: bool, freeze: bool = True
) -> dict[str, Any]:
    db = Database(workdir / "state.sqlite3")
    await db.start()
    pm = plugin_manager()
    connectors = Connectors(pm, [Allowance.parse("127.0.0.1")])  # the sink, on loopback
    registry = ConnectionRegistry(db, connectors, SecretBox.for_data_dir(workdir))
    await registry.load()
    await registry.create(
        connection_id="bench",
        display_name="bench",
        connector="insider",
        settings={"partner_name": PARTNER_NAME, "base_url": sink_url},
        api_key=API_KEY,
        customer_id_mapping=None,
    )
    for source, target, custom in [
        ("email", "email", False),
        ("first_name", "name", False),
        ("last_name", "surname", False),
        ("tier", "loyalty_tier", True),
    ]:
        await registry.add_profile_mapping("bench", source, target, custom)
    await registry.add_event_mapping(
        "bench", "checkout", "purchase", tuple(ParameterMapping(*p) for p in PARAMETERS)
    )
    await registry.add_event_mapping(
        "bench",
        "point_add",
        "loyalty_points_earned",
        (ParameterMapping("points", "points", True), ParameterMapping("reason", "reason", True)),
    )
    queue = DurableQueue(db)
    outbox = LogOutbox(db)
    logs = LogStore(workdir / LOG_DIR, on_committed=outbox.forget)
    await logs.start()
    ingestor = Ingestor(db, registry, queue)
    await ingestor.load()
    if freeze:
        _settle_collector()
    for body in bodies:
        await ingestor.ingest(parse_request(orjson.loads(body)))
    queued = queue.depth

    deliverer = Deliverer(registry, queue, db, connectors, logs, DeliverySettings())
    collector = _GcClock()
    gc.callbacks.append(collector)
    threads0 = _thread_cpu()
    cpu0, thread0, wall0 = time.process_time(), time.thread_time(), time.perf_counter()
    await deliverer.start()
    while queue.depth > 0:  # noqa: ASYNC110  (the queue offers no event to wait on)
        await asyncio.sleep(0.02)
    await logs.flush()
    cpu = time.process_time() - cpu0
    main_thread = time.thread_time() - thread0
    threads = _thread_cpu()
    # Per thread name: the SQLite writer and reader, the log writer, ... (10 ms ticks).
    by_thread: dict[str, float] = {}
    for tid, (name, seconds) in threads.items():
        name = name.rstrip("_0123456789")
        by_thread[name] = by_thread.get(name, 0.0) + seconds - threads0.get(tid, ("", 0.0))[1]
    wall = time.perf_counter() - wall0
    gc.callbacks.remove(collector)
    await deliverer.stop()
    dead = (await queue.stats("bench")).dead_letters
    await logs.close()
    await outbox.drain()
    await db.close()
    gc.unfreeze()
    result = {
        "items": queued,
        "dead": dead,
        "cpu_us": cpu / queued * 1e6,
        "main_thread_us": main_thread / queued * 1e6,
        "threads_us": {k: v / queued * 1e6 for k, v in by_thread.items() if v > 0},
        "wall_s": wall,
        "gc_us": collector.seconds / queued * 1e6,
    }
    if digest:
        result["digest"] = _log_digest(workdir / LOG_DIR)
    return result


def _thread_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds of each live thread of this process, by native id (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for thread in threading.enumerate():
        try:
            stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        found[thread.native_id or 0] = (thread.name, (int(fields[11]) + int(fields[12])) / ticks)
    return found


def _settle_collector() -> None:
    """What ``tidegate serve`` does to the collector once started (``engine.gc_settings``,
    earlier ``engine.runtime``); an engine from before either module only froze its
    start-up objects. (The module is looked for beside the measured engine: the editable
    install would supply this checkout's.)"""
    import engine

    here = Path(engine.__file__).parent
    if (here / "gc_settings.py").exists():
        from engine.gc_settings import settle_collector
    elif (here / "runtime.py").exists():
        settle_collector = importlib.import_module("engine.runtime").settle_collector
    else:
        gc.freeze()
        return
    settle_collector()


class _GcClock:
    """Wall time spent in the garbage collector (on the thread that triggered it)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started


def _log_digest(folder: Path) -> str:
    """A hash of every request body and each row's customers and outcomes, in order."""
    conn = read_only(folder)
    try:
        rows = conn.execute(
            "SELECT r.status_code, r.error, r.customer_count, r.attempt, r.method,"
            " regexp_replace(r.url, '^http://[^/]*', ''), r.tags, b.request_body, b.response_body"
            " FROM log_requests r JOIN log_bodies b ON b.id = r.id ORDER BY r.id"
        ).fetchall()
        customers = conn.execute(
            "SELECT request_id, customer_id, name, outcome, error FROM log_customers"
            " ORDER BY request_id, position"
        ).fetchall()
    finally:
        conn.close()
    hasher = hashlib.sha256()
    for row in rows:
        hasher.update(repr(row).encode())
    # Request ids differ between runs; each row's customers are hashed by position.
    by_request: dict[str, list[tuple[Any, ...]]] = {}
    for request_id, *rest in customers:
        by_request.setdefault(request_id, []).append(tuple(rest))
    for request_id in sorted(by_request):
        hasher.update(repr(by_request[request_id]).encode())
    return f"{hasher.hexdigest()[:16]} ({len(rows)} requests, {len(customers)} customer rows)"


async def main_async(args: argparse.Namespace) -> None:
    bodies = mixed_events(args.items, args.customers)
    print(f"engine from {Path(engine.__file__).parent.parent}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="delivery-cpu-") as tmp:
        with start_sink(Path(tmp) / "sink.log") as sink:
            # A short unmeasured run first: imports, caches and the sink's connections warm up.
            warm = Path(tmp) / "warm-up"
            warm.mkdir()
            await run_once(warm, sink.extra["url"], bodies[:5], False)
            for n in range(args.repeats):
                workdir = Path(tmp) / f"run-{n}"
                workdir.mkdir()
                result = await run_once(
                    workdir, sink.extra["url"], bodies, args.digest, not args.no_freeze
                )
                results.append(result)
                print(
                    f"run {n + 1}: {result['items']} items, {result['dead']} dead, "
                    f"{result['cpu_us']:.1f} us CPU per item "
                    f"(main thread {result['main_thread_us']:.1f}, garbage collector "
                    f"{result['gc_us']:.1f}), {result['wall_s']:.1f} s"
                    + (f", digest {result['digest']}" if args.digest else ""),
                    flush=True,
                )
                threads = sorted(result["threads_us"].items(), key=lambda kv: -kv[1])
                print("  by thread: " + ", ".join(f"{k} {v:.1f}" for k, v in threads), flush=True)
    cpu = statistics.median(r["cpu_us"] for r in results)
    main = statistics.median(r["main_thread_us"] for r in results)
    collected = statistics.median(r["gc_us"] for r in results)
    print(
        f"median: {cpu:.1f} us process CPU per delivered item "
        f"(main thread {main:.1f}, garbage collector {collected:.1f})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.delivery_cpu", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--items", type=int, default=100_000, help="records ingested per run")
    parser.add_argument("--customers", type=int, default=100_000, help="customer pool size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--digest", action="store_true", help="hash requests and log rows")
    parser.add_argument(
        "--no-freeze",
        action="store_true",
        help="leave the garbage collector as it starts (as serve did before 90438cb)",
    )
    parser.add_argument("--engine-src", type=Path, help="checkout whose engine to measure")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.engine_src is not None:
        # Run this file again as a script with the other checkout first on the import
        # path, ahead of the editable install; that checkout's bench.sink and
        # bench.traffic serve as well as this one's.
        src = args.engine_src.resolve()
        argv = [a for a in sys.argv[1:] if a != "--engine-src" and a != str(args.engine_src)]
        path = os.pathsep.join(p for p in (str(src), os.environ.get("PYTHONPATH")) if p)
        command = [sys.executable, str(Path(__file__).resolve()), *argv]
        raise SystemExit(subprocess.call(command, cwd=src, env={**os.environ, "PYTHONPATH": path}))
    # One log line per request is the engine's; here it would only bury the figures.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
