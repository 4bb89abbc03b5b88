"""The engine's Prometheus endpoint: ``GET /metrics`` on a port of its own
(``--metrics-port``), in the text exposition format (OpenMetrics to a scraper that asks
for it).

One scrape covers both engine processes:

- the engine process's counters and histograms (``engine.metrics``: delivery, and ingest
  over gRPC or with ``--ingest-in-process``), kept in its memory;
- the ingest worker's, which prometheus_client's multiprocess mode keeps in files under
  ``<data-dir>/metrics``, read with its ``MultiProcessCollector`` and added to the
  engine's sample by sample (the same names and labels: ``tidegate_ingest_*`` has a
  ``transport`` label, and a worker restarted after a crash adds a file, so its counts
  go on from where the last one stopped);
- gauges worked out at scrape time: the queue per connection (depth, oldest item's age,
  dead letters) read from SQLite on a connection of its own, off the event loop; the
  paused state from the connection registry; the outbound log writer's backlog; and the
  sizes of the state and log files.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.samples import Sample

from engine.outbound_log.store import LogStore
from engine.state.connections import STATE_PAUSED, ConnectionRegistry

log = structlog.get_logger("tidegate.metrics")

METRICS_PATH = "/metrics"

QueueFigures = dict[str, tuple[int, float | None, int]]
"""Per connection id: queued items, the oldest one's enqueue time, dead letters."""


class BothProcesses:
    """The engine process's counters and histograms with the ingest worker's added."""

    def __init__(self, own: CollectorRegistry, worker_dir: Path | None) -> None:
        self._own = own
        # MultiProcessCollector and its collect() carry no type annotations (0.26.0).
        self._worker: MultiProcessCollector | None = None
        if worker_dir is not None:
            self._worker = MultiProcessCollector(None, str(worker_dir))  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        sources: list[Iterable[Metric]] = [self._own.collect()]
        if self._worker is not None:
            sources.append(self._worker.collect())  # type: ignore[no-untyped-call]
        for source in sources:
            for family in source:
                if family.name not in families:
                    families[family.name] = Metric(family.name, family.documentation, family.type)
                    values[family.name] = {}
                merged = values[family.name]
                for sample in family.samples:
                    # Multiprocess mode keeps no creation times: leave them out everywhere,
                    # so the output does not depend on which process served a request.
                    if sample.name.endswith("_created"):
                        continue
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    merged[key] = merged.get(key, 0.0) + sample.value
        for name, family in families.items():
            family.samples = [
                Sample(sample, dict(labels), value)
                for (sample, labels), value in values[name].items()
            ]
        return families.values()


class ScrapeGauges:
    """Gauges read when scraped. ``refresh`` (awaited first) reads the queue figures from
    SQLite in a thread; ``collect`` then reports them with what memory and the file
    system say."""

    def __init__(
        self,
        connections: ConnectionRegistry,
        logs: LogStore,
        state_file: Path,
        log_folder: Path,
    ) -> None:
        self._connections = connections
        self._logs = logs
        self._state_file = state_file
        self._log_folder = log_folder
        self._db: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        self._queue: QueueFigures | None = None

    async def open(self) -> None:
        self._db = await asyncio.to_thread(self._connect)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._state_file, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("PRAGMA query_only=ON")
        return db

    async def close(self) -> None:
        async with self._lock:
            if self._db is not None:
                await asyncio.to_thread(self._db.close)
                self._db = None

    async def refresh(self) -> None:
        async with self._lock:  # one thread at a time on the connection
            self._queue = None
            if self._db is None:
                return
            try:
                self._queue = await asyncio.to_thread(_queue_figures, self._db)
            except sqlite3.Error as exc:
                # The scrape goes on without the queue figures (absent, not stale).
                log.warning("metrics_queue_read_failed", error=str(exc))

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        paused = {view.id: view.state == STATE_PAUSED for view in self._connections.views()}
        queue = self._queue or {}
        # Without the figures (the read failed), no queue samples rather than zeros.
        ids = [] if self._queue is None else sorted(set(paused) | set(queue))
        depth = _gauge("tidegate_queue_items", "Items queued for delivery.")
        age = _gauge(
            "tidegate_queue_oldest_item_age_seconds",
            "Seconds the oldest queued item has waited since it was queued (0: none queued).",
        )
        dead = _gauge(
            "tidegate_dead_letters",
            "Dead letters kept (a replay takes them back into the queue).",
        )
        for connection_id in ids:
            items, oldest, letters = queue.get(connection_id, (0, None, 0))
            depth.add_metric([connection_id], items)
            age.add_metric([connection_id], 0.0 if oldest is None else max(0.0, now - oldest))
            dead.add_metric([connection_id], letters)
        yield from (depth, age, dead)
        states = _gauge(
            "tidegate_connection_paused",
            "1 while the connection is paused (the destination refused its credentials, or"
            " its connector cannot run), else 0.",
        )
        for connection_id, is_paused in sorted(paused.items()):
            states.add_metric([connection_id], 1.0 if is_paused else 0.0)
        yield states
        pending, waited = self._logs.backlog()
        yield GaugeMetricFamily(
            "tidegate_log_writer_pending_rows",
            "Outbound-log rows handed to the log writer and not yet committed to DuckDB.",
            value=pending,
        )
        yield GaugeMetricFamily(
            "tidegate_log_writer_lag_seconds",
            "Seconds the oldest row in the log writer's buffer has waited to be written"
            " (0 when the buffer is empty).",
            value=waited,
        )
        sizes = GaugeMetricFamily(
            "tidegate_data_file_bytes",
            "Size of the engine's files in its data directory: the state database"
            " (state.sqlite3 and its -wal) and the outbound log's weekly partitions"
            " (outbound-log/YYYY-MM-DD.duckdb and their .wal).",
            labels=["file"],
        )
        state = self._state_file
        logs = sorted(self._log_folder.glob("*.duckdb*"))
        for path in [state, state.with_name(state.name + "-wal"), *logs]:
            name = path.name if path.parent == state.parent else f"{path.parent.name}/{path.name}"
            try:
                sizes.add_metric([name], os.stat(path).st_size)
            except FileNotFoundError:  # a partition retention has just deleted
                continue
        yield sizes


def _gauge(name: str, documentation: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=["connection"])


def _queue_figures(db: sqlite3.Connection) -> QueueFigures:
    """One read transaction. The counts walk the (connection_id, seq) indexes, not the
    rows; the oldest item is the head of the connection's index (seq follows the time
    an item was queued)."""
    db.execute("BEGIN")
    try:
        depth = dict(db.execute("SELECT connection_id, COUNT(*) FROM queue GROUP BY connection_id"))
        dead = dict(
            db.execute("SELECT connection_id, COUNT(*) FROM dead_letters GROUP BY connection_id")
        )
        figures: QueueFigures = {}
        for connection_id in sorted(set(depth) | set(dead)):
            head = db.execute(
                "SELECT enqueue_time FROM queue WHERE connection_id = ? ORDER BY seq LIMIT 1",
                (connection_id,),
            ).fetchone()
            figures[connection_id] = (
                int(depth.get(connection_id, 0)),
                None if head is None else float(head[0]),
                int(dead.get(connection_id, 0)),
            )
        return figures
    finally:
        db.execute("COMMIT")


class MetricsServer:
    """``GET /metrics`` on ``host:port``; ``start`` returns the bound port (any free
    one for port 0)."""

    def __init__(self, host: str, port: int, counted: BothProcesses, gauges: ScrapeGauges) -> None:
        self._host = host
        self._port = port
        self._gauges = gauges
        self._registry = CollectorRegistry()
        self._registry.register(counted)
        self._registry.register(gauges)
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        await self._gauges.open()
        export = make_aiohttp_handler(self._registry)

        async def metrics(request: web.Request) -> web.StreamResponse:
            await self._gauges.refresh()
            return await export(request)

        app = web.Application()
        app.router.add_get(METRICS_PATH, metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._gauges.close()
