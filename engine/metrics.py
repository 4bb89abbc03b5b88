"""What the engine counts as it works, for Prometheus: every counter and histogram that
ingest and delivery update, defined in this one place, with the names and HELP texts
``GET /metrics`` shows.

Each ``Engine`` counts into a ``CollectorRegistry`` of its own (tests run several
engines in one process); a stage built without one counts into a private registry that
nobody reads, so the code path is the same with the endpoint on or off. The hot paths
count per request and per batch with counts they already have, and resolve their
labelled children once (per transport, per connection), never per item.

The ingest worker is a process of its own. ``tidegate serve`` starts it with
``PROMETHEUS_MULTIPROC_DIR`` set to ``<data-dir>/metrics`` (``multiprocess_env``), so
prometheus_client's multiprocess mode keeps the worker's counts in files there, which
the engine process reads at each scrape and adds to its own (``engine.metrics_server``).
The engine process itself counts in memory.

The gauges (queue depth, paused state, the log writer's buffer, file sizes) are worked
out at scrape time by the engine process: see ``engine.metrics_server``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus_client reads it when it is imported: set it for a process before it starts."""
MULTIPROC_DIR_NAME = "metrics"
"""The ingest worker's metric files, under the data directory."""

TRANSPORT_HTTP = "http"
TRANSPORT_GRPC = "grpc"

ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds. Acknowledgement p99 is a few ms at 2,000 events/s (the bench's goal: 20 ms)."""
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds, up to the delivery request timeout (30 s)."""


def multiprocess_dir(data_dir: Path) -> Path:
    return data_dir / MULTIPROC_DIR_NAME


def reset_multiprocess_dir(path: Path) -> None:
    """Empties (or creates) the directory of the worker's metric files. Called at start,
    before the first worker: files of an earlier run would add its counts to this one's."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def multiprocess_env(path: Path | None) -> dict[str, str]:
    """The environment of a worker process: its metrics in files under ``path``, or (for
    None) in its memory, where nobody reads them."""
    env = {k: v for k, v in os.environ.items() if k.upper() != MULTIPROC_ENV}
    if path is not None:
        env[MULTIPROC_ENV] = str(path)
    return env


def inherited_multiprocess_dir_problem() -> str | None:
    """What is wrong with a ``PROMETHEUS_MULTIPROC_DIR`` this process was started with,
    if anything. prometheus_client read it on import: this process then counts in files
    there, which must be a folder (``tidegate serve`` needs none: it sets the variable
    for its ingest worker itself)."""
    path = os.environ.get(MULTIPROC_ENV)
    if path is None or os.path.isdir(path):
        return None
    return f"{MULTIPROC_ENV}={path} is not a folder; unset it (tidegate serve needs none)"


class EngineMetrics:
    """The counters of one engine process, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ingest = IngestMetrics(self.registry)
        self.delivery = DeliveryMetrics(self.registry)


class IngestMetrics:
    """Ingest requests, the events they carried and how long their acknowledgement took,
    per transport: ``http`` (``POST /v1/events``) or ``grpc`` (``IngestEvents``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = CollectorRegistry() if registry is None else registry
        self.requests = Counter(
            "tidegate_ingest_requests",
            "Ingest requests answered, by transport (http: POST /v1/events, grpc:"
            " IngestEvents) and code (the HTTP status, or the gRPC status name).",
            ["transport", "code"],
            registry=registry,
        )
        self.events = Counter(
            "tidegate_ingest_events",
            "Antavo events in acknowledged ingest requests, by outcome: accepted (stored and"
            " routed) or duplicate (a re-send of an event already stored, dropped).",
            ["transport", "outcome"],
            registry=registry,
        )
        self.items_queued = Counter(
            "tidegate_ingest_items_queued",
            "Delivery items ingest queued: one per accepted event or profile change for each"
            " connection that maps it.",
            ["transport"],
            registry=registry,
        )
        self.ack_seconds = Histogram(
            "tidegate_ingest_ack_seconds",
            "Seconds from an ingest request's arrival to its acknowledgement (HTTP 202 or"
            " gRPC OK), which comes after the commit.",
            ["transport"],
            buckets=ACK_BUCKETS,
            registry=registry,
        )
        self._acks = {t: _IngestAck(self, t) for t in (TRANSPORT_HTTP, TRANSPORT_GRPC)}

    def acknowledged(
        self, transport: str, accepted: int, duplicates: int, queued: int, seconds: float
    ) -> None:
        """Counts one acknowledged request (``code`` 202 over HTTP, OK over gRPC)."""
        self._acks[transport].count(accepted, duplicates, queued, seconds)

    def refused(self, transport: str, code: str) -> None:
        """Counts one request answered with an error ``code``."""
        self.requests.labels(transport, code).inc()


class _IngestAck:
    """The labelled children one transport's acknowledgements update, resolved once."""

    def __init__(self, metrics: IngestMetrics, transport: str) -> None:
        ok = "202" if transport == TRANSPORT_HTTP else "OK"
        self._requests = metrics.requests.labels(transport, ok)
        self._accepted = metrics.events.labels(transport, "accepted")
        self._duplicates = metrics.events.labels(transport, "duplicate")
        self._queued = metrics.items_queued.labels(transport)
        self._seconds = metrics.ack_seconds.labels(transport)

    def count(self, accepted: int, duplicates: int, queued: int, seconds: float) -> None:
        # In the worker each update writes a file (multiprocess mode): skip the zeros.
        self._requests.inc()
        if accepted:
            self._accepted.inc(accepted)
        if duplicates:
            self._duplicates.inc(duplicates)
        if queued:
            self._queued.inc(queued)
        self._seconds.observe(seconds)


class DeliveryMetrics:
    """What delivery did, per connection: items settled, and the requests they took."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = CollectorRegistry() if registry is None else registry
        labels = ["connection"]
        self.delivered = Counter(
            "tidegate_items_delivered",
            "Items the destination accepted.",
            labels,
            registry=registry,
        )
        self.skipped = Counter(
            "tidegate_items_skipped",
            "Items that left the queue with nothing to send (their mapping was removed).",
            labels,
            registry=registry,
        )
        self.failed = Counter(
            "tidegate_items_failed",
            "Items a send did not deliver: the destination refused them, or the request"
            " failed or got no answer. Each is then retried, dead-lettered, or kept queued"
            " (a paused connection, or a batch resent in halves).",
            labels,
            registry=registry,
        )
        self.retried = Counter(
            "tidegate_items_retried",
            "Item attempts that failed transiently (429, 5xx, timeout, connection error)"
            " and were scheduled for another attempt.",
            labels,
            registry=registry,
        )
        self.dead_lettered = Counter(
            "tidegate_items_dead_lettered",
            "Items that became dead letters, by the stage that failed, as ListDeadLetters"
            " names it: identify, map_profile, map_event, map, send (the request failed for"
            " good, or retries ran out), destination (refused for that customer).",
            ["connection", "stage"],
            registry=registry,
        )
        self.requests = Counter(
            "tidegate_delivery_requests",
            "Requests sent to the destination, by code: the HTTP status, 0 when no answer"
            " came back (timeout, connection error, cut by shutdown).",
            ["connection", "code"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "tidegate_delivery_request_seconds",
            "Seconds from sending a request to the destination to its answer (or failure).",
            labels,
            buckets=REQUEST_BUCKETS,
            registry=registry,
        )
        self._connections: dict[str, ConnectionMetrics] = {}

    def connection(self, connection_id: str) -> ConnectionMetrics:
        """The connection's children (made on first use, then reused)."""
        found = self._connections.get(connection_id)
        if found is None:
            found = self._connections[connection_id] = ConnectionMetrics(self, connection_id)
        return found


class ConnectionMetrics:
    """One connection's labelled children; its worker counts through them per batch."""

    def __init__(self, metrics: DeliveryMetrics, connection_id: str) -> None:
        self._metrics = metrics
        self._id = connection_id
        self._delivered = metrics.delivered.labels(connection_id)
        self._skipped = metrics.skipped.labels(connection_id)
        self._failed = metrics.failed.labels(connection_id)
        self._retried = metrics.retried.labels(connection_id)
        self._seconds = metrics.request_seconds.labels(connection_id)
        self._dead: dict[str, Counter] = {}
        self._requests: dict[int, Counter] = {}

    def request(self, status: int, seconds: float) -> None:
        """Counts one request to the destination (``status`` 0: no answer)."""
        child = self._requests.get(status)
        if child is None:
            child = self._requests[status] = self._metrics.requests.labels(self._id, str(status))
        child.inc()
        self._seconds.observe(seconds)

    def settled(
        self,
        *,
        delivered: int = 0,
        skipped: int = 0,
        failed: int = 0,
        retried: int = 0,
        dead: Mapping[str, int] | None = None,
    ) -> None:
        """Counts what one send (or one render with nothing to send) settled."""
        if delivered:
            self._delivered.inc(delivered)
        if skipped:
            self._skipped.inc(skipped)
        if failed:
            self._failed.inc(failed)
        if retried:
            self._retried.inc(retried)
        for stage, count in (dead or {}).items():
            child = self._dead.get(stage)
            if child is None:
                child = self._dead[stage] = self._metrics.dead_lettered.labels(self._id, stage)
            child.inc(count)
