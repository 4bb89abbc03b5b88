"""The delivery loop: one worker per connection turns queued items into requests.

A worker claims the oldest ready items of its connection (lanes held by a retry are
skipped), renders and packs them (``batch``), calls its connector's ``send``, settles
every item (``outcomes``) and commits that in one transaction: delivered, retried later,
or dead-lettered. Each request becomes one outbound-log row. Workers are independent, so
a slow destination only slows its own connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
import structlog

from engine.connector.records import Delivery, SendResult
from engine.delivery.batch import Batch, pack
from engine.delivery.outcomes import Settlement, log_rows, settle
from engine.delivery.pace import MAX_INTERVAL, Pace
from engine.delivery.transport import (
    Exchange,
    RecordingTransport,
    guarded_session,
    redact,
)
from engine.errors import (
    ConnectorCrashError,
    ContractError,
    DeliveryError,
    InvalidInputError,
    NotFoundError,
)
from engine.metrics import DeliveryMetrics
from engine.outbound_log import outbox
from engine.outbound_log.outbox import LogSink
from engine.outbound_log.rows import LogRow, Outcome, new_request_id
from engine.plugins import ConnectionHooks, Connectors
from engine.queue.dead_letters import DeadLetter
from engine.queue.items import QueueItem
from engine.queue.lanes import DurableQueue, Retry
from engine.state.connections import ConnectionRegistry
from engine.state.database import Database
from engine.state.profiles import load_profiles

log = structlog.get_logger("tidegate.delivery")


@dataclass(frozen=True)
class DeliverySettings:
    linger: float = 0.05
    """How long a woken worker waits for more items before sending a small batch."""
    request_timeout: float = 30.0
    base_backoff: float = 1.0
    max_backoff: float = 300.0
    max_retry_after: float = 900.0
    retry_window: float = 6 * 3600.0
    """After this long since an item's first attempt, a transient failure dead-letters it."""


@dataclass(frozen=True)
class _Settling:
    """A batch whose every item leaves the queue, being settled in the background while
    the worker claims and sends the next batch without those items."""

    task: asyncio.Task[None]
    seqs: frozenset[int]


class Deliverer:
    """One worker task per connection; ``wake`` tells workers that items were queued."""

    def __init__(
        self,
        registry: ConnectionRegistry,
        queue: DurableQueue,
        db: Database,
        connectors: Connectors,
        logs: LogSink,
        settings: DeliverySettings | None = None,
        metrics: DeliveryMetrics | None = None,
    ) -> None:
        self._registry = registry
        self._queue = queue
        self._db = db
        self._connectors = connectors
        self._logs = logs
        self.settings = settings or DeliverySettings()
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._wakes: dict[str, asyncio.Event] = {}
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._settles: set[asyncio.Task[None]] = set()
        self._metrics = metrics or DeliveryMetrics()
        # Batches from their claim until settled: what ``settled()`` waits for.
        self._open_batches: dict[int, asyncio.Event] = {}
        self._batch_count = 0
        self._paces: dict[str, Pace] = {}
        self.on_pace: Callable[[str, Pace], None] | None = None
        """Called with a connection's pace after a 429 slowed it (its hold and interval
        changed): how the broker shares 429 pacing with the cluster's other workers."""

    async def start(self) -> None:
        # Hosts the operator allowed by name may resolve to internal addresses.
        names = [a.host for a in self._connectors.allowed if ":" not in a.host]
        self._session = guarded_session(names)
        for connection in self._registry.runtimes():
            self._ensure_worker(connection.id)

    def wake(self, connection_ids: Iterable[str]) -> None:
        for connection_id in connection_ids:
            self._ensure_worker(connection_id)
            self._wakes[connection_id].set()

    def connection_changed(self, connection_id: str) -> None:
        if self._stopping:
            return
        try:
            self._registry.runtime(connection_id)
        except NotFoundError:
            self._connectors.forget(connection_id)
            task = self._workers.pop(connection_id, None)
            self._wakes.pop(connection_id, None)
            self._paces.pop(connection_id, None)
            if task:
                task.cancel()
            return
        self.wake([connection_id])

    def _ensure_worker(self, connection_id: str) -> None:
        if self._stopping or connection_id in self._workers:
            return
        self._metrics.connection(connection_id)  # its counters show 0 from the start
        self._wakes[connection_id] = asyncio.Event()
        self._workers[connection_id] = asyncio.create_task(
            self._run(connection_id), name=f"deliver-{connection_id}"
        )

    async def stop(self, deadline: float = 10.0) -> None:
        """Lets in-flight batches finish (up to ``deadline`` seconds), then stops."""
        self._stopping = True
        self._stop_event.set()
        for wake in self._wakes.values():
            wake.set()
        workers = list(self._workers.values())
        if workers:
            _, pending = await asyncio.wait(workers, timeout=deadline)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._workers.clear()
        await asyncio.gather(*self._settles, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def transport(self, hooks: ConnectionHooks, tags: tuple[str, ...] = ()) -> RecordingTransport:
        """A transport for one call of ``hooks`` outside delivery (``EraseCustomer``),
        with the same checks, timeout and redaction as a send's."""
        assert self._session is not None, "start() first"
        return RecordingTransport(
            self._session,
            self.settings.request_timeout,
            tags=tags,
            check_url=hooks.check_url,
            secrets=hooks.secrets(),
        )

    async def settled(self) -> None:
        """Returns once every batch claimed before the call is settled, or given up and
        left queued (``EraseCustomer`` waits for this between its passes)."""
        for done in list(self._open_batches.values()):
            await done.wait()

    def _begin_batch(self) -> int:
        """Registers a batch before its claim reads the queue."""
        self._batch_count += 1
        self._open_batches[self._batch_count] = asyncio.Event()
        return self._batch_count

    def _batch_done(self, batch: int, _task: asyncio.Task[None]) -> None:
        self._end_batch(batch)

    def _end_batch(self, batch: int) -> None:
        done = self._open_batches.pop(batch, None)
        if done is not None:
            done.set()

    # -- the worker --------------------------------------------------------------------

    async def _run(self, connection_id: str) -> None:
        settling: list[_Settling] = []  # at most one: the previous batch's settle
        try:
            await self._loop(connection_id, settling)
        finally:
            for pending in settling:
                await asyncio.gather(pending.task, return_exceptions=True)

    async def _loop(self, connection_id: str, settling: list[_Settling]) -> None:
        wake = self._wakes[connection_id]
        pace = self._paces.setdefault(connection_id, Pace())
        was_paused = self._registry.is_paused(connection_id)
        while not self._stopping:
            if settling and settling[0].task.done():
                await self._settled(settling.pop())
            wake.clear()
            if self._registry.is_paused(connection_id):
                was_paused = True
                await wake.wait()
                continue
            if was_paused:
                # Back from a pause (new credentials or an explicit resume): one probe
                # request first, so a still-wrong key costs one request, not a backlog.
                was_paused, pace.probe = False, True
            delay = max(pace.hold_until, pace.last_send + pace.interval) - time.time()
            if delay > 0:
                # The whole connection waits (backoff, adaptive rate): others go on.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_event.wait(), delay)
                continue
            try:
                connection = self._registry.runtime(connection_id)
            except NotFoundError:
                return
            try:
                hooks = self._connectors.hooks(connection)
            except (InvalidInputError, ContractError) as exc:
                # The connector is not installed, a stored destination is not allowed (any
                # more), or its prepare hook failed: nothing of this connection can go
                # out. Pausing shows why, and keeps its backlog.
                log.warning("connection_paused", connection=connection_id, reason=str(exc))
                await self._registry.pause(connection, str(exc))
                continue
            info = hooks.info
            limit = 1 if pace.probe else (pace.item_cap or info.max_batch_items)
            exclude = settling[0].seqs if settling else ()
            items: list[QueueItem] = []
            batch = self._begin_batch()
            try:
                items = await self._queue.claim(connection_id, limit, exclude=exclude)
            finally:
                if not items:
                    self._end_batch(batch)
            if not items and settling:
                await self._settled(settling.pop())  # what is left may be what it settles
                continue
            if not items:
                due = await self._queue.next_due(connection_id)
                timeout = None if due is None else max(0.0, due - time.time())
                try:
                    await asyncio.wait_for(wake.wait(), timeout)
                except TimeoutError:
                    continue
                if self.settings.linger and not self._stopping:
                    await asyncio.sleep(self.settings.linger)
                continue
            before = settling[-1] if settling else None
            try:
                await self._deliver(hooks, items, pace, limit, settling)
            except Exception as exc:
                # A bug must not kill the worker, nor loop silently: the attempt counts
                # for each item, which is retried with backoff within the retry window
                # and then dead-lettered, and one log row says what happened.
                log.exception("delivery_failed_unexpectedly", connection=connection_id)
                with contextlib.suppress(Exception):
                    await self._drain(settling)  # what it settled is not counted twice
                await self._failed_unexpectedly(hooks, items, exc, pace)
            finally:
                if settling and settling[-1] is not before:  # settles in the background
                    settling[-1].task.add_done_callback(functools.partial(self._batch_done, batch))
                else:
                    self._end_batch(batch)
            if len(items) < info.max_batch_items and self.settings.linger:
                # The queue held less than a full request: let more arrive before the next
                # one, so a trickle of events goes out in batches, not one request each.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_event.wait(), self.settings.linger)

    async def _drain(self, settling: list[_Settling]) -> None:
        while settling:
            await self._settled(settling.pop())

    async def _settled(self, settling: _Settling) -> None:
        try:
            await settling.task
        except Exception:  # its items stay queued and go out again: duplicates, not losses
            log.exception("settle_failed")

    async def _deliver(
        self,
        hooks: ConnectionHooks,
        items: list[QueueItem],
        pace: Pace,
        max_items: int,
        settling: list[_Settling],
    ) -> None:
        """Sends one batch, settles its items, and adjusts the connection's pace.

        When every item of the batch leaves the queue (delivered, skipped or dead-lettered),
        the settle commits in the background and is recorded in ``settling``: the next
        claim leaves those items out, so claiming and sending the next batch overlaps the
        commit. When items stay (a retry, a pause, a resend in halves), the settle commits
        before the next claim, which must see the held lanes.
        """
        customer_ids = {item.customer_id for item in items}
        profiles = await self._db.read(lambda c: load_profiles(c, customer_ids))
        batch = pack(hooks, items, profiles, max_items)
        if not batch.deliveries:
            await self._drain(settling)
            await self._queue.settle(delivered=batch.skipped, dead=batch.dead)
            self._metrics.connection(hooks.connection.id).settled(
                skipped=len(batch.skipped), dead=_by_stage(batch.dead)
            )
            return
        assert self._session is not None
        origins = sorted({item.origin for item in batch.items.values()} - {""})
        transport = RecordingTransport(
            self._session,
            self.settings.request_timeout,
            tags=tuple(origins),
            check_url=hooks.check_url,
            secrets=hooks.secrets(),
        )
        now = pace.last_send = time.time()
        sent: SendResult | DeliveryError
        try:
            sent = await hooks.send(batch.deliveries, transport)
        except asyncio.CancelledError:
            # Shutdown's deadline cut the send. The items stay queued for the next start;
            # count the attempt and log what went out, so a duplicate is visible.
            await self._interrupted(hooks, batch, transport, now)
            raise
        except DeliveryError as exc:
            sent = exc
            if isinstance(exc, ConnectorCrashError) and not transport.exchanges:
                # The connector failed before any request: a row still tells the log.
                transport.exchanges.append(_no_request(transport, str(exc), hooks.secrets()))
        window = hooks.connection.retry_window_seconds or self.settings.retry_window
        settlement = settle(
            batch,
            sent,
            plugin=hooks.plugin,
            now=now,
            window=window,
            backoff=lambda retry_after: self._backoff(batch.deliveries, retry_after),
        )
        await self._adjust(hooks, pace, settlement, now, len(batch.deliveries))
        await self._record(hooks, batch, transport, settlement, now, settling)

    async def _record(
        self,
        hooks: ConnectionHooks,
        batch: Batch,
        transport: RecordingTransport,
        settlement: Settlement,
        now: float,
        settling: list[_Settling],
    ) -> None:
        """Commits a settlement with its log rows (in the background when every item
        leaves the queue, see ``_deliver``) and writes the canonical delivery line."""
        request_id = transport.exchanges[-1].request_id if transport.exchanges else ""
        dead = [
            DeadLetter(d.item, d.stage, d.error, d.request_id or request_id, d.rendered)
            for d in settlement.dead
        ]
        # By id, in the order of their first delivery: the name of the last delivery's.
        names = {d.customer.id: d.customer.name for d in batch.deliveries}
        attempt = max([d.attempt for d in batch.deliveries])
        rows = log_rows(
            hooks.connection,
            transport.exchanges,
            names,
            settlement.customers,
            settlement.error,
            attempt,
        )
        await self._drain(settling)  # one settle at a time, in order
        commit = self._commit(settlement.delivered, settlement.retries, dead, now, rows)
        if settlement.retries or settlement.items_stay:
            await commit
        else:
            task = asyncio.create_task(commit)
            self._settles.add(task)
            task.add_done_callback(self._settles.discard)
            left = frozenset(settlement.delivered) | {d.item.seq for d in dead}
            settling.append(_Settling(task, left))
        last = transport.exchanges[-1] if transport.exchanges else None
        delivered = len(settlement.delivered) - len(batch.skipped)
        self._count(hooks, transport, batch, settlement, delivered, dead)
        log.info(
            "delivery",
            connection=hooks.connection.id,
            request_id=request_id,
            status=last.status if last else None,
            latency_ms=round(last.elapsed * 1000, 1) if last else None,
            attempt=attempt,
            customers=len(names),
            items=len(batch.deliveries),
            delivered=delivered,
            retried=len(settlement.retries),
            dead=len(dead),
            error=settlement.error or None,
        )

    def _count(
        self,
        hooks: ConnectionHooks,
        transport: RecordingTransport,
        batch: Batch,
        settlement: Settlement,
        delivered: int,
        dead: list[DeadLetter],
    ) -> None:
        """Counts one send for the metrics: with the counts the delivery line has."""
        counted = self._metrics.connection(hooks.connection.id)
        for exchange in transport.exchanges:
            counted.request(exchange.status, exchange.elapsed)
        counted.settled(
            delivered=delivered,
            skipped=len(batch.skipped),
            failed=len(batch.deliveries) - delivered,
            retried=len(settlement.retries),
            dead=_by_stage(dead) if dead else None,
        )

    async def _adjust(
        self, hooks: ConnectionHooks, pace: Pace, settlement: Settlement, now: float, items: int
    ) -> None:
        """Applies a settlement's pace changes, and its pause."""
        if settlement.hold:
            pace.hold_until = now + settlement.hold
        if settlement.throttled:
            pace.slow_down()
            if self.on_pace is not None:
                self.on_pace(hooks.connection.id, pace)
        if settlement.item_cap is not None:
            pace.item_cap = settlement.item_cap
        if settlement.pause:
            await self._registry.pause(hooks.connection, settlement.pause)
            pace.probe = True
        if settlement.succeeded:
            pace.succeeded(items, hooks.info.max_batch_items)

    def merge_pace(self, connection_id: str, hold_until: float, interval: float) -> None:
        """Takes a pace another process learned for this connection: no request before
        the later of the two holds, at the longer of the two intervals. A lane waiting
        out its delay sees it when the wait ends; a request already going out goes."""
        pace = self._paces.setdefault(connection_id, Pace())
        pace.hold_until = max(pace.hold_until, hold_until)
        pace.interval = min(MAX_INTERVAL, max(pace.interval, interval))

    async def _commit(
        self,
        delivered: list[int],
        retries: list[Retry],
        dead: list[DeadLetter],
        now: float,
        rows: list[LogRow],
    ) -> None:
        """Settles the items and their log rows in one transaction, then hands the rows to
        the outbound log."""
        await self._queue.settle(
            delivered=delivered,
            retries=retries,
            dead=dead,
            attempt_time=now,
            log_rows=[outbox.encode(row) for row in rows],
        )
        for row in rows:
            await self._logs.append(row)

    async def _failed_unexpectedly(
        self, hooks: ConnectionHooks, items: list[QueueItem], exc: Exception, pace: Pace
    ) -> None:
        """Settles ``items`` after an unexpected error outside ``send`` (a bug): each
        attempt counts; items within the retry window are retried after the backoff,
        the others dead-lettered at stage ``send``; one log row records it."""
        try:
            # Only items still queued: the error may have come after some were settled.
            queued = await self._db.read(lambda c: _still_queued(c, [i.seq for i in items]))
        except Exception:
            log.exception("settle_failed", connection=hooks.connection.id)
            pace.hold_until = time.time() + self.settings.base_backoff
            return
        items = [item for item in items if item.seq in queued]
        if not items:
            return
        now = time.time()
        text = redact(f"{exc.__class__.__name__}: {exc}", hooks.secrets())[:300]
        error = f"delivery failed unexpectedly: {text}"
        window = hooks.connection.retry_window_seconds or self.settings.retry_window
        attempts = max(item.attempts for item in items) + 1
        ceiling = min(self.settings.max_backoff, self.settings.base_backoff * 2 ** (attempts - 1))
        delay = random.uniform(ceiling / 2, ceiling)
        retries: list[Retry] = []
        dead: list[DeadLetter] = []
        outcomes: dict[str, tuple[Outcome, str]] = {}
        for item in items:
            if now - (item.first_attempt_time or now) >= window:
                reason = f"gave up after {item.attempts + 1} attempts over {window:.0f} s"
                dead.append(DeadLetter(item, "send", f"{reason}: {error}"))
                outcomes[item.customer_id] = (Outcome.FAILED, error)
            else:
                retries.append(Retry(item.seq, now + delay, error))
                outcomes.setdefault(item.customer_id, (Outcome.RETRY, error))
        exchange = _no_request(None, error, ())
        names = {item.customer_id: "" for item in items}
        rows = log_rows(hooks.connection, [exchange], names, outcomes, error, attempts)
        pace.hold_until = now + delay
        try:
            await self._queue.settle(
                retries=retries,
                dead=dead,
                attempt_time=now,
                log_rows=[outbox.encode(r) for r in rows],
            )
        except Exception:
            log.exception("settle_failed", connection=hooks.connection.id)
            return
        counted = self._metrics.connection(hooks.connection.id)
        counted.settled(
            failed=len(items),
            retried=len(retries),
            dead=_by_stage(dead) if dead else None,
        )
        for row in rows:
            await self._logs.append(row)

    async def _interrupted(
        self, hooks: ConnectionHooks, batch: Batch, transport: RecordingTransport, now: float
    ) -> None:
        error = "interrupted by shutdown; sent again after restart"
        retries = [Retry(d.item_id, now, error) for d in batch.deliveries]
        names = {d.customer.id: d.customer.name for d in batch.deliveries}
        outcomes = {d.customer.id: (Outcome.RETRY, error) for d in batch.deliveries}
        attempt = max(d.attempt for d in batch.deliveries)
        rows = log_rows(hooks.connection, transport.exchanges, names, outcomes, error, attempt)
        await self._queue.settle(
            retries=retries, attempt_time=now, log_rows=[outbox.encode(r) for r in rows]
        )
        counted = self._metrics.connection(hooks.connection.id)
        for exchange in transport.exchanges:
            counted.request(exchange.status, exchange.elapsed)
        counted.settled(failed=len(retries), retried=len(retries))
        for row in rows:
            await self._logs.append(row)

    def _backoff(self, deliveries: Sequence[Delivery], retry_after: float | None) -> float:
        attempts = max(d.attempt for d in deliveries)
        ceiling = min(self.settings.max_backoff, self.settings.base_backoff * 2 ** (attempts - 1))
        delay = random.uniform(0, ceiling)  # full jitter: retries of many workers spread out
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.settings.max_retry_after))
        return delay


def _still_queued(c: sqlite3.Connection, seqs: list[int]) -> set[int]:
    found: set[int] = set()
    for start in range(0, len(seqs), 500):
        chunk = seqs[start : start + 500]
        marks = ",".join("?" * len(chunk))
        found.update(
            row[0] for row in c.execute(f"SELECT seq FROM queue WHERE seq IN ({marks})", chunk)
        )
    return found


def _no_request(
    transport: RecordingTransport | None, error: str, secrets: tuple[str, ...]
) -> Exchange:
    """A log entry for a send that failed before it made any request."""
    tags = transport.tags if transport is not None else ()
    return Exchange(
        new_request_id(),
        datetime.now(UTC),
        "",
        "",
        0,
        0.0,
        "",
        "",
        redact(error, secrets),
        False,
        tags,
    )


def _by_stage(dead: Sequence[DeadLetter]) -> dict[str, int]:
    """Dead letters counted per stage (none, mostly)."""
    counts: dict[str, int] = {}
    for letter in dead:
        counts[letter.stage] = counts.get(letter.stage, 0) + 1
    return counts
