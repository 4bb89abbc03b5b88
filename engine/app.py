"""The engine: state database, plugins, ingest, delivery, outbound log and admin API,
started and stopped together."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
from aiohttp import web
from nats.aio.client import Client as NATS

from engine.admin.auth import TokenChecker
from engine.admin.connections import ConnectionServicer
from engine.admin.dead_letters import DeadLetterServicer
from engine.admin.server import start_grpc_server
from engine.broker.config_sync import ConfigSync
from engine.broker.logs import (
    DEFAULT_LOG_STREAM_DAYS,
    LogForwarder,
    LogWriter,
    consumer_name,
    ensure_log_stream,
)
from engine.broker.pacing import PaceSync
from engine.broker.publish import BrokerIngestor
from engine.broker.replay import StreamReplay
from engine.broker.stats import ClusterStats
from engine.broker.streams import BrokerSettings, connect, ensure_stream, replicas_for
from engine.broker.worker import PartitionWorker, clear_local_queue
from engine.connector.destinations import Allowance
from engine.delivery.erasure import CustomerEraser
from engine.delivery.worker import Deliverer, DeliverySettings
from engine.ingest.dedupe_sweep import SWEEP_INTERVAL, SWEEP_START_DELAY, dedupe_sweeper
from engine.ingest.http import create_ingest_runner
from engine.ingest.ingestor import DEFAULT_MAX_BACKLOG, Ingestor
from engine.ingest.settings import IngestSettings
from engine.ingest.worker import IngestWorker
from engine.metrics import EngineMetrics, multiprocess_dir, reset_multiprocess_dir
from engine.metrics_server import BothProcesses, MetricsServer, ScrapeGauges
from engine.outbound_log.outbox import LogOutbox
from engine.outbound_log.partitions import LOG_DIR
from engine.outbound_log.retention import (
    LOG_RETENTION_DAYS,
    LOG_RETENTION_INTERVAL,
    LOG_RETENTION_START_DELAY,
    log_retention,
)
from engine.outbound_log.store import MAX_SUBSCRIBERS, LogStore
from engine.periodic import Periodic
from engine.plugins import Connectors, plugin_manager
from engine.queue.lanes import DurableQueue
from engine.queue.retention import DAY, DEFAULT_RETENTION_DAYS, dead_letter_sweeper
from engine.queue.retention import RETENTION_INTERVAL as DEAD_LETTER_SWEEP_INTERVAL
from engine.queue.retention import RETENTION_START_DELAY as DEAD_LETTER_SWEEP_DELAY
from engine.security import TlsFiles
from engine.state import tokens
from engine.state.audit import AUDIT_RETENTION_DAYS, audit_retention
from engine.state.audit import DAY as AUDIT_DAY
from engine.state.connections import ConnectionRegistry
from engine.state.database import STATE_FILE, Database
from engine.state.secrets import SecretBox, secure_data_dir
from engine.ui.operate import OperateViews
from engine.ui.server import UiServer
from engine.upgrade import prepare

log = structlog.get_logger("tidegate.engine")

DEFAULT_GRPC_PORT = 50051
DEFAULT_HTTP_PORT = 8080
DEFAULT_METRICS_PORT = 9464
DEFAULT_DATA_DIR = Path("tidegate-data")
ENGINE_FILE = "engine.json"
"""In the data folder while an engine serves it: its process id and admin address."""
ADMIN_TOKEN_FILE = tokens.ADMIN_TOKEN_FILE
ERASE_ON_BROKER = (
    "EraseCustomer is not available with --broker yet: the customer's data is spread over"
    " the workers, the log processes and the cluster's streams, and erasing it in this"
    " process alone would leave the rest while answering that it was erased"
)
LOG_ELSEWHERE = (
    "this process (--role {role}) keeps no outbound log: ask a process started with"
    " --role log (or all), which keeps every worker's rows"
)

DEAD_LETTERS_ELSEWHERE = (
    "this process (--role {role}) keeps no dead letters: each worker keeps the ones it"
    " made; ask the workers (--role worker or all)"
)


@dataclass
class EngineConfig:
    data_dir: Path = DEFAULT_DATA_DIR
    host: str = "127.0.0.1"
    grpc_port: int = DEFAULT_GRPC_PORT
    http_port: int = DEFAULT_HTTP_PORT
    ingest_token: str = ""
    """A bearer token ingest requires; ``ingest`` (when set) takes its place."""
    ingest: IngestSettings | None = None
    """Ingest credential and limits (``tidegate serve``'s ``--ingest-*`` flags)."""
    max_backlog: int = DEFAULT_MAX_BACKLOG
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    extra_plugins: Iterable[object] = ()
    ingest_worker: bool = False
    """Serve ingest HTTP from a worker process of its own (``tidegate serve`` does, unless
    ``--ingest-in-process``): ingest and delivery then run on two cores. The worker loads
    installed plugins only, not ``extra_plugins``."""
    log_format: str = "json"
    log_level: str = "info"
    """How the ingest worker logs (``tidegate serve`` passes its own settings)."""
    metrics_port: int | None = None
    """Port of ``GET /metrics`` (Prometheus); None serves no endpoint (the engine still
    counts). ``tidegate serve`` passes ``--metrics-port`` (default 9464)."""
    dedupe_sweep_delay: float = SWEEP_START_DELAY
    dedupe_sweep_interval: float = SWEEP_INTERVAL
    """When re-send marks past their window are first deleted, and how often after."""
    migrate: bool = True
    """Migrate the data folder's stores at start; False (``serve --no-migrate``) refuses
    to start when a migration step is pending."""
    dead_letter_retention: float = DEFAULT_RETENTION_DAYS * DAY
    dead_letter_sweep_delay: float = DEAD_LETTER_SWEEP_DELAY
    dead_letter_sweep_interval: float = DEAD_LETTER_SWEEP_INTERVAL
    """Dead letters are deleted ``dead_letter_retention`` seconds after they failed, first
    ``dead_letter_sweep_delay`` seconds after start, then every ``..._interval``."""
    log_retention_days: float = LOG_RETENTION_DAYS
    """Outbound-log partitions whose rows are all older are deleted; 0 keeps them."""
    log_max_bytes: int | None = None
    """If set, the oldest partitions are deleted while the log takes more on disk."""
    log_retention_delay: float = LOG_RETENTION_START_DELAY
    log_retention_interval: float = LOG_RETENTION_INTERVAL
    allowed_destinations: tuple[Allowance, ...] = ()
    """Destinations connections may send to besides their connectors' own hosts
    (``serve --allow-destination``): the only way to loopback, private addresses or http."""
    tls: TlsFiles | None = None
    """Serve the gRPC and ingest ports over TLS with these files."""
    audit_retention_days: float = AUDIT_RETENTION_DAYS
    """Audit events are deleted this long after they were recorded."""
    max_log_streams: int = MAX_SUBSCRIBERS
    """StreamLogs calls served at a time (``serve --max-log-streams``)."""
    ui_port: int | None = None
    """Port of the outbound-log page (``engine.ui``); None serves no page. ``tidegate
    serve`` passes ``--ui-port`` (default 8081)."""
    broker: BrokerSettings | None = None
    """``serve --broker``: ingest publishes to JetStream, and workers pull partitions into
    this engine (``engine.broker``). None: the embedded engine alone."""
    role: str = "all"
    """With a broker: ``ingest`` (publish only), ``worker`` (own partitions, deliver; no
    ingest HTTP port) or ``all``."""
    takeover_wait: float | None = None
    """With a broker: seconds before pulling a partition an earlier owner had events
    pending in; None: the lease TTL plus the request timeout."""
    log_stream_days: float = DEFAULT_LOG_STREAM_DAYS
    """With a broker: how long ``TG_LOG`` keeps rows for a log service that is down."""

    def has(self, role: str) -> bool:
        """Whether this process plays ``role`` (ingest, worker or log): the embedded
        engine plays all three."""
        return self.broker is None or self.role in (role, "all")


class Engine:
    """Call ``start`` then ``stop``; ``grpc_port``/``http_port`` are the bound ports."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.grpc_port = 0
        self.http_port = 0
        self.metrics_port = 0
        self.ui_port = 0
        self._ui: UiServer | None = None
        self.metrics = EngineMetrics()
        self._metrics_server: MetricsServer | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: web.AppRunner | None = None
        self._worker: IngestWorker | None = None
        self._listener: socket.socket | None = None
        self._db: Database | None = None
        self._logs: LogStore | None = None
        self._deliverer: Deliverer | None = None
        self._jobs: list[Periodic] = []
        self._checker: TokenChecker | None = None
        self._nc: NATS | None = None
        self.partitions: PartitionWorker | None = None
        self.forwarder: LogForwarder | None = None
        self.log_writer: LogWriter | None = None
        self.config_sync: ConfigSync | None = None
        self.pace_sync: PaceSync | None = None
        self.cluster_stats: ClusterStats | None = None
        self.admin_token_file: Path | None = None
        """Set when this start wrote a new admin token to ``<data-dir>/admin-token``."""

    async def start(self) -> None:
        """Starts every part; on failure (a busy port, say) stops what had started."""
        try:
            await self._start()
        except BaseException:
            await self.stop(grace=0.5)
            raise

    async def _start(self) -> None:
        cfg = self.config
        secure_data_dir(cfg.data_dir)  # 0700/0600, and umask 077 for what comes next
        await asyncio.to_thread(prepare, cfg.data_dir, migrate_now=cfg.migrate)
        self.db = self._db = Database(cfg.data_dir / STATE_FILE)
        await self.db.start()
        await self._bootstrap_token()
        self.pm = plugin_manager(cfg.extra_plugins)
        self.connectors = Connectors(self.pm, cfg.allowed_destinations)
        for allowance in cfg.allowed_destinations:
            log.info("destination_allowed", destination=str(allowance))
        self.registry = ConnectionRegistry(
            self.db, self.connectors, SecretBox.for_data_dir(cfg.data_dir)
        )
        await self.registry.load()
        self.queue = DurableQueue(self.db)
        self.outbox = LogOutbox(self.db)
        self.logs = self._logs = LogStore(
            cfg.data_dir / LOG_DIR,
            # On a broker the outbox's rows go to the log service (``LogForwarder``).
            on_committed=self.outbox.forget if cfg.broker is None else None,
            max_subscribers=cfg.max_log_streams,
        )
        await self.logs.start()
        if cfg.broker is None:
            recovered = await self.outbox.recover(self.logs)
            if recovered:
                log.info("log_rows_recovered", rows=recovered)
        else:
            await self._connect()
        self.deliverer = self._deliverer = Deliverer(
            self.registry,
            self.queue,
            self.db,
            self.connectors,
            self.forwarder or self.logs,
            cfg.delivery,
            self.metrics.delivery,
        )
        self.registry.on_change(self.deliverer.connection_changed)
        await self.queue.load()
        self.ingestor = Ingestor(
            self.db, self.registry, self.queue, self.deliverer.wake, cfg.max_backlog
        )
        await self.ingestor.load()
        front = await self._connect_broker()
        await self.deliverer.start()
        await self._start_partitions()
        if self.forwarder is not None:
            self.forwarder.start()
        if self.log_writer is not None:
            self.log_writer.start()
        self._jobs = [
            dedupe_sweeper(self.db, cfg.dedupe_sweep_interval, cfg.dedupe_sweep_delay),
            dead_letter_sweeper(
                self.db,
                cfg.dead_letter_retention,
                cfg.dead_letter_sweep_interval,
                cfg.dead_letter_sweep_delay,
            ),
            audit_retention(self.db, cfg.audit_retention_days * AUDIT_DAY),
            log_retention(
                self.logs,
                cfg.log_retention_days,
                cfg.log_max_bytes,
                interval=cfg.log_retention_interval,
                start_delay=cfg.log_retention_delay,
            ),
        ]
        for job in self._jobs:
            job.start()
        if cfg.ingest_worker:
            await self._start_worker()
        elif cfg.has("ingest"):
            self._http = create_ingest_runner(front, self.ingest_settings, self.metrics.ingest)
            await self._http.setup()
            site = web.TCPSite(
                self._http,
                cfg.host,
                cfg.http_port,
                ssl_context=None if cfg.tls is None else cfg.tls.server_context(),
            )
            await site.start()
            self.http_port = self._http.addresses[0][1]
        dead_letters = self._dead_letter_service()
        connections = ConnectionServicer(
            self.registry,
            self.queue,
            None if self.cluster_stats is None else self.cluster_stats.stats,
        )
        self._grpc, self.grpc_port, self._checker = await start_grpc_server(
            cfg.host,
            cfg.grpc_port,
            self.registry,
            self.queue,
            self.logs,
            front,
            connections,
            dead_letters,
            self.connectors,
            cfg.data_dir,
            self.db,
            CustomerEraser(
                self.db,
                self.queue,
                self.logs,
                self.outbox,
                self.deliverer,
                self.registry,
                self.connectors,
                refusal=None if cfg.broker is None else ERASE_ON_BROKER,
            ),
            self.metrics.ingest,
            cfg.tls,
            self.ingest_settings,
            log_elsewhere=None if cfg.has("log") else LOG_ELSEWHERE.format(role=cfg.role),
        )
        self._announce()
        await self._start_metrics()
        if cfg.ui_port is not None and not cfg.has("log"):
            log.info("ui_not_served", role=cfg.role, reason="the log service serves the page")
        elif cfg.ui_port is not None:
            self._ui = UiServer(
                cfg.host,
                cfg.ui_port,
                self.logs,
                self._checker,
                tls=None if cfg.tls is None else cfg.tls.server_context(),
                operate=OperateViews(connections, dead_letters, self.logs, self.db),
            )
            self.ui_port = await self._ui.start()

    def _dead_letter_service(self) -> DeadLetterServicer:
        """Embedded: the local queue's dead letters, replayed into it. On a broker, a
        worker's own dead letters, replayed through the event stream to the customer's
        current owner (``engine.broker.replay``); a process without the worker role has
        none and says where they are."""
        cfg = self.config
        if cfg.broker is None or self._nc is None:
            return DeadLetterServicer(self.queue, self.deliverer.wake)
        if not cfg.has("worker"):
            return DeadLetterServicer(
                self.queue,
                self.deliverer.wake,
                elsewhere=DEAD_LETTERS_ELSEWHERE.format(role=cfg.role),
            )
        replayer = StreamReplay(self.db, self._nc.jetstream(), cfg.broker)
        return DeadLetterServicer(self.queue, self.deliverer.wake, replayer)

    async def _connect(self) -> None:
        """With ``--broker``: connects and creates the streams; a worker gets the
        forwarder of its log rows, a log service the writer of its outbound log."""
        cfg = self.config
        assert cfg.broker is not None
        self._nc = await connect(cfg.broker, f"tidegate-{cfg.role}-{os.getpid()}")
        js = self._nc.jetstream()
        replicas = replicas_for(self._nc, cfg.broker)
        await ensure_stream(js, cfg.broker, replicas)
        # Connections and mappings from the cluster before anything routes or sends.
        self.config_sync = ConfigSync(self._nc, self.registry, replicas)
        await self.config_sync.start()
        await ensure_log_stream(js, cfg.broker, replicas, cfg.log_stream_days)
        if cfg.has("worker"):
            self.forwarder = LogForwarder(self.db, js)
        if cfg.has("log"):
            self.log_writer = LogWriter(
                js,
                self.logs,
                consumer_name(cfg.data_dir),
                cfg.broker,
                cfg.log_stream_days,
            )

    async def _connect_broker(self) -> Ingestor:
        """With ``--broker``: the ingest that publishes to the event stream; a worker
        first empties its local queue (``clear_local_queue``). Without: the local
        ingestor."""
        cfg = self.config
        if cfg.broker is None or self._nc is None:
            return self.ingestor
        js = self._nc.jetstream()
        replicas = replicas_for(self._nc, cfg.broker)
        # Backlog and dead-letter counts: a worker shares its own, every process adds them up.
        self.cluster_stats = ClusterStats(
            self._nc, self.db, self.queue, replicas, share=cfg.has("worker")
        )
        await self.cluster_stats.start()
        if cfg.has("worker"):  # 429 pacing shared with the other workers
            self.pace_sync = PaceSync(self._nc, self.deliverer, self.registry, replicas)
            await self.pace_sync.start()
            cleared = await clear_local_queue(self.db, self.queue)
            if cleared:
                log.info("broker_local_queue_cleared", items=cleared)
        assert self.config_sync is not None  # started by _connect
        return BrokerIngestor(
            self.db, self.registry, self.queue, js, cfg.broker, self.config_sync.stamp
        )

    async def _start_partitions(self) -> None:
        cfg = self.config
        if cfg.broker is None or self._nc is None or not cfg.has("worker"):
            return
        wait = cfg.takeover_wait
        if wait is None:
            wait = cfg.broker.lease_ttl + cfg.delivery.request_timeout
        self.partitions = PartitionWorker(
            self._nc,
            cfg.broker,
            self.ingestor,
            self.db,
            self.queue,
            wait,
            settled=self.deliverer.settled,
            hand_back_wait=cfg.delivery.request_timeout,
            config_applied=None if self.config_sync is None else self.config_sync.wait_for,
        )
        await self.partitions.start()

    async def _bootstrap_token(self) -> None:
        """On a data folder that has never had a token, makes an admin token and writes
        it to ``<data-dir>/admin-token`` (0600), so the first call has one to use. The
        token itself is never logged."""

        def make(c: sqlite3.Connection) -> str | None:
            if tokens.has_any_token(c):
                return None
            return tokens.create_token(c, tokens.BOOTSTRAP_NAME, tokens.Role.ADMIN)[0]

        token = await self.db.write(make)
        if token is None:
            return
        path = self.config.data_dir / ADMIN_TOKEN_FILE
        write_private(path, token + "\n")
        self.admin_token_file = path
        log.info("admin_token_written", path=str(path), name=tokens.BOOTSTRAP_NAME)

    def _announce(self) -> None:
        """Writes ``engine.json`` (this process and its admin address) in the data folder,
        so ``tidegate backup`` finds the engine that serves it."""
        cfg = self.config
        host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
        address = {"pid": os.getpid(), "grpc": f"{host}:{self.grpc_port}"}
        (cfg.data_dir / ENGINE_FILE).write_text(json.dumps(address) + "\n")

    @property
    def ingest_settings(self) -> IngestSettings:
        """What ingest requires and allows: ``config.ingest``, else ``ingest_token``."""
        cfg = self.config
        return cfg.ingest or IngestSettings.bearer(cfg.ingest_token)

    async def _start_worker(self) -> None:
        cfg = self.config
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        # The engine keeps the listening socket: a restarted worker serves the same one.
        self._listener = socket.create_server((cfg.host, cfg.http_port), family=family)
        self.http_port = self._listener.getsockname()[1]
        self._worker = IngestWorker(
            tls=cfg.tls,
            data_dir=cfg.data_dir,
            listener=self._listener,
            settings=self.ingest_settings,
            max_backlog=cfg.max_backlog,
            queue=self.queue,
            wake=self.deliverer.wake,
            every_connection=lambda: [c.id for c in self.registry.runtimes()],
            log_format=cfg.log_format,
            log_level=cfg.log_level,
            metrics_dir=self._worker_metrics_dir(),
        )
        await self._worker.start()
        self.registry.on_change(self._worker.refresh)

    def _worker_metrics_dir(self) -> Path | None:
        """Where the ingest worker keeps its metrics for the endpoint to read, emptied of
        an earlier run's (the log store is open by now: no other engine uses this data
        directory). None without the endpoint."""
        if self.config.metrics_port is None:
            return None
        path = multiprocess_dir(self.config.data_dir)
        reset_multiprocess_dir(path)
        return path

    async def _start_metrics(self) -> None:
        cfg = self.config
        if cfg.metrics_port is None:
            return
        worker_dir = multiprocess_dir(cfg.data_dir) if cfg.ingest_worker else None
        self._metrics_server = MetricsServer(
            cfg.host,
            cfg.metrics_port,
            BothProcesses(self.metrics.registry, worker_dir),
            ScrapeGauges(self.registry, self.logs, self.db.path, cfg.data_dir / LOG_DIR),
        )
        self.metrics_port = await self._metrics_server.start()

    async def stop(self, grace: float = 5.0) -> None:
        """Stops taking requests, lets in-flight deliveries finish, and closes the stores."""
        if self._grpc is not None:  # started: the announcement is this engine's
            (self.config.data_dir / ENGINE_FILE).unlink(missing_ok=True)
        if self.partitions is not None:  # first: no more pulls while delivery winds down
            await self.partitions.stop()
            self.partitions = None
        if self._ui is not None:  # first: its open streams end before the log store closes
            await self._ui.stop()
            self._ui = None
        if self._metrics_server is not None:
            await self._metrics_server.stop()
            self._metrics_server = None
        if self._worker is not None:
            await self._worker.stop()
            self._worker = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._http is not None:
            await self._http.cleanup()
            self._http = None
        if self._deliverer is not None:
            await self._deliverer.stop(deadline=grace)
            self._deliverer = None
        for sync in (self.pace_sync, self.config_sync, self.cluster_stats):
            if sync is not None:  # after delivery: a pause is shared
                await sync.stop()
        self.pace_sync = self.config_sync = self.cluster_stats = None
        if self.forwarder is not None:  # after delivery: its last rows go too
            await self.forwarder.stop()
            self.forwarder = None
        if self.log_writer is not None:
            await self.log_writer.stop()
            self.log_writer = None
        for job in self._jobs:
            await job.stop()
        self._jobs = []
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
            self._grpc = None
        if self._checker is not None:
            await self._checker.close()
            self._checker = None
        if self._logs is not None:
            await self._logs.close()
            await self.outbox.drain()
            self._logs = None
        if self._db is not None:
            await self._db.close()
            self._db = None
        if self._nc is not None:
            await self._nc.close()
            self._nc = None


def write_private(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` readable by its owner only (0600), replacing the file
    whole: a reader sees the old text or the new, never a part."""
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
