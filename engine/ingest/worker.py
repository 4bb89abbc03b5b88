"""The ingest worker: ``POST /v1/events`` served by a process of its own.

Why a process: Python runs one thread at a time per process, so with ingest and delivery
in one process the engine used one of the machine's cores, and a webhook's
acknowledgement waited behind whatever delivery work held the event loop. The worker
takes the ingest HTTP traffic to a second core; the engine process keeps delivery, the
outbound log and the admin API (its gRPC ``IngestEvents`` still ingests in-process).

Both processes write the same SQLite (WAL) database, each through its own group-commit
writer; they take turns through an advisory ``flock`` on ``state.sqlite3-writer.lock``
(``engine.state.database`` says why not SQLite's busy handler). The engine owns the
listening socket and hands it to the worker, so a restarted worker takes over the same
port without a gap in which connections are refused. They talk over a socket pair, one
JSON object per line:

- worker -> engine: ``{"ready": pid}`` once serving; ``{"queued": total, "connections":
  [...]}`` after each commit that queued items (``total`` counts every item this worker
  queued, so the engine learns how many are new and whom to wake); ``{"refreshed":
  token}`` once a connection was reloaded.
- engine -> worker: first ``{"settings": {...}}``, the ingest credential and limits
  (``IngestSettings``; never on the worker's command line or in its environment);
  ``{"depth": n, "counted": total}`` every tenth of a second while it
  changes: the queue depth, which already counts this worker's items up to ``total``
  (ingest refuses work past ``--max-backlog``); ``{"refresh": connection_id, "token":
  t}`` after the admin API changed a connection. The admin call returns only after the
  worker has reloaded it, so an event acknowledged afterwards is routed by the new
  mappings.

Its metrics (``engine.metrics``) go to files under ``<data-dir>/metrics``, which the
engine reads at each scrape of ``GET /metrics`` (prometheus_client's multiprocess mode).

The worker dies with the engine (``PR_SET_PDEATHSIG``): a ``kill -9`` of the engine
leaves no orphan holding the port. It stops gracefully on SIGTERM or when the engine
closes the socket pair, and ignores SIGINT, which a terminal's Ctrl-C sends to both
processes: the engine stops it in order. If it exits on its own, the engine logs it,
wakes every connection (items it committed but had not announced are delivered),
recounts the queue and starts a new one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import structlog
import uvloop
from aiohttp import web

from engine.errors import TidegateError
from engine.gc_settings import settle_collector
from engine.ingest.http import create_ingest_runner
from engine.ingest.ingestor import Ingestor
from engine.ingest.settings import IngestSettings
from engine.logconfig import configure_logging
from engine.metrics import IngestMetrics, multiprocess_env
from engine.plugins import Connectors, plugin_manager
from engine.queue.lanes import DurableQueue
from engine.security import TlsFiles
from engine.state.connections import ConnectionRegistry
from engine.state.database import STATE_FILE, Database
from engine.state.secrets import SecretBox

log = structlog.get_logger("tidegate.ingest_worker")

START_TIMEOUT = 30.0
REFRESH_TIMEOUT = 5.0
# A worker that dies is restarted after RESTART_DELAY; while each restarted one dies (or
# fails to start) within STABLE_AFTER seconds, the delay doubles up to RESTART_DELAY_MAX.
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 30.0
STABLE_AFTER = 60.0
DEPTH_REPORT_INTERVAL = 0.1
PR_SET_PDEATHSIG = 1
INGEST_SECRET_ENV_PREFIX = "TIDEGATE_INGEST_"


def _line(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message) + b"\n"


async def _receive(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None once the other side has gone."""
    try:
        line = await reader.readline()
    except (ConnectionError, ValueError):  # reset, or a line over the stream's limit
        return None
    if not line:
        return None
    message: dict[str, Any] = orjson.loads(line)
    return message


# -- the engine's side ------------------------------------------------------------------


class IngestWorker:
    """The engine's handle on its ingest worker: starts it, restarts it if it dies,
    relays its notices to delivery, and keeps it told of the queue depth and of
    connection changes. Stop it before delivery, so no request is acknowledged while the
    engine shuts down."""

    def __init__(
        self,
        *,
        data_dir: Path,
        listener: socket.socket,
        settings: IngestSettings,
        max_backlog: int,
        queue: DurableQueue,
        wake: Callable[[Iterable[str]], None],
        every_connection: Callable[[], Iterable[str]],
        log_format: str = "json",
        log_level: str = "info",
        metrics_dir: Path | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        """``metrics_dir``: where the worker keeps its metric files for the engine to
        read (prometheus_client's multiprocess mode); None keeps them in its memory.
        ``tls``: serve HTTPS with these files."""
        self._tls_args = tls_arguments(tls)
        self._data_dir = data_dir
        self._metrics_dir = metrics_dir
        self._listener = listener
        self._settings = settings
        self._max_backlog = max_backlog
        self._queue = queue
        self._wake = wake
        self._every_connection = every_connection
        self._log_args = ["--log-format", log_format, "--log-level", log_level]
        self._process: subprocess.Popen[bytes] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._queued = 0  # the current worker's running total of queued items
        self._reported: tuple[int, int] | None = None
        self._refreshes: dict[int, asyncio.Future[None]] = {}
        self._tokens = itertools.count(1)
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    async def start(self) -> None:
        """Starts the worker; returns once it serves, or raises ``TidegateError``."""
        await self._spawn()
        self._tasks = [
            asyncio.create_task(self._supervise(), name="ingest-worker"),
            asyncio.create_task(self._report_depth(), name="ingest-worker-depth"),
        ]

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._process = self._launch(theirs.fileno())
        finally:
            theirs.close()
        if self._writer is not None:
            self._writer.close()  # the channel of the worker this one replaces
        self._reader, self._writer = await asyncio.open_connection(sock=ours)
        self._queued, self._reported = 0, None
        # Its ingest settings first, credential included: never on its command line or in
        # its environment, which ps shows.
        self._writer.write(_line({"settings": self._settings.to_dict()}))
        try:
            ready = await asyncio.wait_for(_receive(self._reader), START_TIMEOUT)
        except TimeoutError:
            ready = None
        if ready is None or "ready" not in ready:
            self._process.kill()
            code = await asyncio.to_thread(self._process.wait)
            raise TidegateError(
                f"the ingest worker did not start (exit code {code}); its error is above"
            )
        self._send_depth()

    def _launch(self, channel_fd: int) -> subprocess.Popen[bytes]:
        # subprocess (vfork and exec), not the event loop's fork: a fork would run gRPC's
        # fork handlers in a process that is about to exec anyway.
        fds = (self._listener.fileno(), channel_fd)
        return subprocess.Popen(
            [
                sys.executable, "-m", "engine.ingest.worker",
                "--data-dir", str(self._data_dir),
                "--listen-fd", str(fds[0]), "--channel-fd", str(fds[1]),
                "--engine-pid", str(os.getpid()),
                "--max-backlog", str(self._max_backlog),
                *self._log_args, *self._tls_args,
            ],
            pass_fds=fds, stdin=subprocess.DEVNULL,
            env={  # the ingest secrets reach it over the channel only
                k: v for k, v in multiprocess_env(self._metrics_dir).items()
                if not k.startswith(INGEST_SECRET_ENV_PREFIX)
            },
        )  # fmt: skip

    async def _supervise(self) -> None:
        delay = RESTART_DELAY
        while True:
            started = time.monotonic()
            assert self._reader is not None
            while (message := await _receive(self._reader)) is not None:
                self._handle(message)
            assert self._process is not None
            code = await asyncio.to_thread(self._process.wait)
            self._release_refreshes()
            if self._stopping:
                return
            if time.monotonic() - started >= STABLE_AFTER:
                delay = RESTART_DELAY
            log.error("ingest_worker_exited", exit_code=code, restart_in_s=delay)
            # What it committed but had not announced: count it and deliver it.
            await self._queue.load()
            self._wake(self._every_connection())
            while not self._stopping:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_DELAY_MAX)  # for the next failure soon after
                try:
                    await self._spawn()
                    log.info("ingest_worker_restarted", pid=self.pid)
                    break
                except (TidegateError, OSError) as exc:
                    log.error("ingest_worker_restart_failed", error=str(exc), retry_in_s=delay)
            if self._stopping:
                return

    def _handle(self, message: dict[str, Any]) -> None:
        if "queued" in message:
            total = int(message["queued"])
            self._queue.added(total - self._queued)
            self._queued = total
            self._wake(message["connections"])
        elif "refreshed" in message:
            future = self._refreshes.pop(int(message["refreshed"]), None)
            if future is not None and not future.done():
                future.set_result(None)

    def _send(self, message: dict[str, Any]) -> bool:
        writer = self._writer
        if writer is None or writer.is_closing():
            return False
        writer.write(_line(message))
        return True

    def _send_depth(self) -> None:
        report = (self._queue.depth, self._queued)
        if report != self._reported and self._send({"depth": report[0], "counted": report[1]}):
            self._reported = report

    async def _report_depth(self) -> None:
        while not self._stopping:
            await asyncio.sleep(DEPTH_REPORT_INTERVAL)
            self._send_depth()

    async def refresh(self, connection_id: str) -> None:
        """Has the worker reload ``connection_id``; returns once it has (or is gone)."""
        if self._stopping:
            return
        token = next(self._tokens)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._refreshes[token] = future
        if not self._send({"refresh": connection_id, "token": token}):
            self._refreshes.pop(token, None)
            return  # no worker now: the next one loads every connection when it starts
        try:
            await asyncio.wait_for(future, REFRESH_TIMEOUT)
        except TimeoutError:
            self._refreshes.pop(token, None)
            log.warning("ingest_worker_refresh_slow", connection=connection_id)

    def _release_refreshes(self) -> None:
        for future in self._refreshes.values():
            if not future.done():
                future.set_result(None)
        self._refreshes.clear()

    async def stop(self, grace: float = 10.0) -> None:
        """Stops the worker: it stops accepting, answers the requests it has, and exits."""
        self._stopping = True
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(process.wait, grace)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
        self._release_refreshes()


# -- the worker's side ------------------------------------------------------------------


class _ReportedQueue(DurableQueue):
    """The queue as this worker's ingest sees it: the engine's count, plus what this
    worker queued since the engine took that count."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.queued = 0
        self._engine_depth = 0
        self._counted = 0

    def added(self, count: int) -> None:
        self.queued += count
        self.depth = self._engine_depth + self.queued - self._counted

    def reported(self, depth: int, counted: int) -> None:
        self._engine_depth, self._counted = depth, counted
        self.depth = depth + self.queued - counted


def _exit_with_engine(engine_pid: int) -> None:
    """Has the kernel kill this process when the engine dies, however it dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != engine_pid:  # it died before the line above ran
        os._exit(1)


async def _work(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    listener = socket.socket(fileno=args.listen_fd)
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=args.channel_fd))
    # Never migrates nor creates: the engine did before it started this worker, and a
    # version this code does not use is refused (SchemaError, a TidegateError).
    db = Database(args.data_dir / STATE_FILE, create=False)
    await db.start()
    runner: web.AppRunner | None = None
    try:
        given = await _receive(reader)  # the engine sends it first
        if given is None or "settings" not in given:
            raise TidegateError("the engine sent no ingest settings")
        settings = IngestSettings.from_dict(given["settings"])
        registry = ConnectionRegistry(
            db, Connectors(plugin_manager()), SecretBox.for_data_dir(args.data_dir)
        )
        await registry.load()
        queue = _ReportedQueue(db)

        def announce(connections: set[str]) -> None:
            writer.write(_line({"queued": queue.queued, "connections": sorted(connections)}))

        ingestor = Ingestor(db, registry, queue, announce, args.max_backlog)
        await ingestor.load()
        # Counted in files when the engine set PROMETHEUS_MULTIPROC_DIR (engine.metrics).
        metrics = IngestMetrics()
        runner = create_ingest_runner(ingestor, settings, metrics)
        await runner.setup()
        await web.SockSite(runner, listener, ssl_context=_ssl_context(args)).start()
        writer.write(_line({"ready": os.getpid()}))
        settle_collector()

        async def listen() -> None:
            while (message := await _receive(reader)) is not None:
                if "depth" in message:
                    queue.reported(int(message["depth"]), int(message["counted"]))
                elif "refresh" in message:
                    await registry.refresh(str(message["refresh"]))
                    writer.write(_line({"refreshed": message["token"]}))
            stop.set()  # the engine has gone

        listening = asyncio.create_task(listen())
        await stop.wait()
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
    finally:
        if runner is not None:
            await runner.cleanup()  # stops accepting, then answers the requests in flight
        await db.close()
        writer.close()
    return 0


def tls_arguments(tls: TlsFiles | None) -> list[str]:
    """The worker's command-line arguments for ``tls``."""
    if tls is None:
        return []
    args = ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
    return args + (["--tls-client-ca", str(tls.client_ca)] if tls.client_ca else [])


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if args.tls_cert is None:
        return None
    return TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca).server_context()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.ingest.worker",
        description="Tidegate's ingest worker; `tidegate serve` starts it.",
    )
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--engine-pid", type=int, required=True)
    parser.add_argument("--max-backlog", type=int, required=True)
    parser.add_argument("--log-format", default="json")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--tls-client-ca", type=Path)
    args = parser.parse_args(argv)
    _exit_with_engine(args.engine_pid)
    configure_logging(args.log_format, args.log_level)
    try:
        return uvloop.run(_work(args))
    except TidegateError as exc:
        print(f"tidegate ingest worker: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
