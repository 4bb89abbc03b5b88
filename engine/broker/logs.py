"""The outbound log on JetStream: workers forward their log rows through the stream
``TG_LOG``, and every process in the log role copies that stream into its own outbound
log (DuckDB), inserting each row once.

Forwarding (workers). A log row is committed to the worker's SQLite outbox in the same
transaction that settles its request's items, as in the embedded engine. The
``LogForwarder`` publishes the outbox's rows, oldest first, each with ``Nats-Msg-Id`` =
its request id, and deletes a row from the outbox only once its PubAck came back (a
quorum stored it). A worker killed at any moment keeps the unsent rows in its outbox and
forwards them when it starts again; a row published twice within the stream's duplicate
window is stored once.

Writing (log role). Each log process reads the whole stream with a durable consumer of its
own, ``log-<id>`` (the id is kept in its data folder), appends the rows to its outbound
log and acknowledges a batch only after DuckDB committed it. A log process killed between
the commit and the acknowledgement gets the batch again; a redelivered row, and a row
older than the duplicate window (re-published by a worker after a long outage), is
inserted only if its id is not in the log yet. So every log process holds every settled
request once: run two for a standby that already has everything (a hot standby: there is
nothing to take over, a client or a load balancer reads from either).

``TG_LOG`` keeps rows for ``--log-stream-days`` (7 by default) and at most
``--broker-max-bytes``, dropping the oldest beyond either: a log process that is down for
longer misses the rows dropped meanwhile, and says so (``log_rows_lost``) when it resumes.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api

from engine.broker.streams import SETUP_TIMEOUT, BrokerSettings, message_id, retrying
from engine.outbound_log import outbox
from engine.outbound_log.rows import LogRow
from engine.outbound_log.store import LogStore
from engine.state.database import Database

log = structlog.get_logger("tidegate.broker")

LOG_STREAM = "TG_LOG"
LOG_SUBJECT = "tg.log"
DEFAULT_LOG_STREAM_DAYS = 7.0
LOG_CONSUMER_FILE = "log-consumer"
"""In a log process's data folder: the name of its durable consumer of ``TG_LOG``."""
FORWARD_BATCH = 500
WRITE_BATCH = 1000
FETCH_TIMEOUT = 1.0
PUBLISH_TIMEOUT = 5.0
RETRY_MIN, RETRY_MAX = 0.5, 5.0


def log_stream_config(
    settings: BrokerSettings, replicas: int, days: float = DEFAULT_LOG_STREAM_DAYS
) -> js_api.StreamConfig:
    return js_api.StreamConfig(
        name=LOG_STREAM,
        description="Tidegate: outbound-log rows, from the workers to the log services",
        subjects=[LOG_SUBJECT],
        retention=js_api.RetentionPolicy.LIMITS,
        storage=js_api.StorageType.FILE,
        num_replicas=replicas,
        discard=js_api.DiscardPolicy.OLD,
        max_age=days * 86400,
        max_bytes=settings.max_bytes,
        duplicate_window=settings.duplicate_window,
    )


async def ensure_log_stream(
    js: JetStreamContext, settings: BrokerSettings, replicas: int, days: float
) -> None:
    """Creates ``TG_LOG`` unless it exists (its limits are then the first creator's)."""

    async def create() -> None:
        try:
            await js.stream_info(LOG_STREAM)
        except nats.js.errors.NotFoundError:
            await js.add_stream(log_stream_config(settings, replicas, days))

    await retrying(create, f"creating stream {LOG_STREAM}", SETUP_TIMEOUT)


def _backoff(delay: float) -> float:
    return min(RETRY_MAX, max(RETRY_MIN, delay * 2))


class LogForwarder:
    """A worker's sink for log rows (the ``Deliverer``'s ``logs``): the row is already in
    the outbox when ``append`` is called, so ``append`` only wakes the forwarding loop."""

    def __init__(self, db: Database, js: JetStreamContext) -> None:
        self._db = db
        self._js = js
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.forwarded = 0

    async def append(self, row: LogRow) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self, grace: float = 2.0) -> None:
        """Forwards what the outbox holds for up to ``grace`` seconds; the rest stays in
        the outbox for the next start."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        except TimeoutError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    async def _run(self) -> None:
        delay = 0.0
        while True:
            try:
                delay = await self._round(delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a database error: the rows stay in the outbox
                delay = _backoff(delay)
                log.warning(
                    "log_forward_failed", error=f"{type(exc).__name__}: {exc}"[:200], retry_in=delay
                )
                await asyncio.sleep(delay)
            if delay < 0:
                return

    async def _round(self, delay: float) -> float:
        """One batch from the outbox; returns the next backoff, or -1 to stop."""
        while True:
            self._wake.clear()  # before the read: a row staged after it wakes the wait
            rows = await self._db.read(
                lambda c: c.execute(
                    "SELECT request_id, row FROM log_outbox ORDER BY rowid LIMIT ?",
                    (FORWARD_BATCH,),
                ).fetchall()
            )
            if not rows:
                if self._stopping:
                    return -1
                try:
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                except TimeoutError:
                    pass
                continue
            stored = await self._publish(rows)
            if stored:
                await self._db.write(functools.partial(_delete, request_ids=stored))
                self.forwarded += len(stored)
            if len(stored) == len(rows):
                return 0.0
            if self._stopping:
                return -1
            delay = _backoff(delay)
            await asyncio.sleep(delay)
            return delay

    async def _publish(self, rows: list[tuple[str, bytes]]) -> list[str]:
        results = await asyncio.gather(
            *(
                self._js.publish(
                    LOG_SUBJECT,
                    blob,
                    timeout=PUBLISH_TIMEOUT,
                    headers={"Nats-Msg-Id": message_id(request_id)},
                )
                for request_id, blob in rows
            ),
            return_exceptions=True,
        )
        stored: list[str] = []
        failed: BaseException | None = None
        for (request_id, _), result in zip(rows, results, strict=True):
            if isinstance(result, js_api.PubAck):
                stored.append(request_id)
            elif isinstance(result, Exception):
                failed = result
            else:
                raise result
        if failed is not None:
            log.warning(
                "log_forward_failed",
                rows=len(rows) - len(stored),
                error=f"{type(failed).__name__}: {failed}"[:200],
            )
        return stored


def _delete(c: sqlite3.Connection, request_ids: list[str]) -> None:
    c.executemany("DELETE FROM log_outbox WHERE request_id = ?", [(i,) for i in request_ids])


def consumer_name(data_dir: Path) -> str:
    """This log process's durable consumer: ``log-<12 hex digits>``, made on first use and
    kept in the data folder (a copy of the folder started as a second log process would
    share it and split the rows: give a standby a data folder of its own)."""
    path = data_dir / LOG_CONSUMER_FILE
    try:
        name = path.read_text().strip()
    except FileNotFoundError:
        name = ""
    if not name.startswith("log-"):
        name = f"log-{secrets.token_hex(6)}"
        path.write_text(name + "\n")
    return name


class LogWriter:
    """The log role: copies ``TG_LOG`` into ``logs``, each row once."""

    def __init__(
        self,
        js: JetStreamContext,
        logs: LogStore,
        name: str,
        settings: BrokerSettings,
        stream_days: float = DEFAULT_LOG_STREAM_DAYS,
    ) -> None:
        self._js = js
        self._logs = logs
        self.name = name
        self._window = timedelta(seconds=settings.duplicate_window)
        self._keep = stream_days * 86400
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_seq = 0
        self._recheck_through = 0
        """Rows up to this stream sequence were delivered to an earlier consumer of ours:
        each may be in the log already."""
        self.written = 0
        self.duplicates = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        log.info("log_service_started", consumer=self.name)

    async def stop(self) -> None:
        self._stopping = True
        task, self._task = self._task, None
        if task is None:
            return
        while not task.done():  # nats-py swallows a cancellation inside a fetch
            task.cancel()
            await asyncio.wait([task], timeout=1.0)

    def _config(self, start: int) -> js_api.ConsumerConfig:
        return js_api.ConsumerConfig(
            durable_name=self.name,
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            ack_policy=js_api.AckPolicy.ALL,
            ack_wait=120.0,
            max_deliver=-1,
            max_ack_pending=20 * WRITE_BATCH,
            filter_subject=LOG_SUBJECT,
            # An abandoned log process's consumer goes once the stream could not serve it.
            inactive_threshold=self._keep,
        )

    async def _run(self) -> None:
        delay = 0.0
        while not self._stopping:
            try:
                sub = await self._subscribe()
                delay = 0.0
                while not self._stopping:
                    try:
                        msgs = await sub.fetch(WRITE_BATCH, timeout=FETCH_TIMEOUT)
                    except TimeoutError:  # nothing new (nats-py raises either kind)
                        continue
                    await self._write(msgs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a lost connection, an election: subscribe again
                delay = _backoff(delay)
                log.warning(
                    "log_service_error",
                    consumer=self.name,
                    error=f"{type(exc).__name__}: {exc}"[:200],
                    retry_in=delay,
                )
                await asyncio.sleep(delay)

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        """Our consumer, created afresh from the first row not acknowledged: a consumer
        kept from before a kill would hold the rows it had delivered until its ack wait
        ran out. What the earlier one had delivered is checked against the log."""
        start = 1
        try:
            info = await self._js.consumer_info(LOG_STREAM, self.name)
        except nats.js.errors.NotFoundError:
            info = None
        if info is not None:
            start = int(info.ack_floor.stream_seq if info.ack_floor else 0) + 1
            delivered = int(info.delivered.stream_seq if info.delivered else 0)
            self._recheck_through = max(self._recheck_through, delivered)
            self._last_seq = start - 1
            await self._js.delete_consumer(LOG_STREAM, self.name)
        await self._js.add_consumer(LOG_STREAM, self._config(start))
        return await self._js.pull_subscribe_bind(self.name, stream=LOG_STREAM)

    async def _write(self, msgs: list[Msg]) -> None:
        old = datetime.now(UTC) - self._window
        seen: set[str] = set()
        rows: list[LogRow] = []
        for msg in msgs:
            self._note_gap(msg)
            try:
                row = outbox.decode(msg.data)
            except (ValueError, TypeError, KeyError) as exc:
                log.error("log_row_undecodable", error=f"{type(exc).__name__}: {exc}"[:200])
                continue
            if row.id in seen:
                self.duplicates += 1
                continue
            seen.add(row.id)
            # Within the window the stream stored a re-published row once; a first
            # delivery of a recent row is new. Anything else may be in the log already.
            maybe_there = (
                msg.metadata.num_delivered > 1
                or msg.metadata.sequence.stream <= self._recheck_through
                or row.time < old
            )
            if maybe_there and await self._logs.get(row.id) is not None:
                self.duplicates += 1
                continue
            rows.append(row)
        for row in rows:
            await self._logs.append(row)
        await self._logs.flush()
        self.written += len(rows)
        if msgs:
            await msgs[-1].ack_sync()  # AckAll: the batch and everything before it

    def _note_gap(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        if self._last_seq and seq > self._last_seq + 1 and msg.metadata.num_delivered == 1:
            # Sequences are contiguous in a stream that only ever drops its oldest rows.
            log.error(
                "log_rows_lost",
                consumer=self.name,
                rows=seq - self._last_seq - 1,
                reason=f"dropped from {LOG_STREAM} (age or size limit) before this log"
                " service read them",
            )
        self._last_seq = max(self._last_seq, seq)

    async def lag(self) -> int:
        """Rows in the stream this log process has not written yet."""
        info = await self._js.consumer_info(LOG_STREAM, self.name)
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
