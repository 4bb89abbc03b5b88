"""The delivery loop: one worker per connection turns queued items into requests.

A worker claims the oldest ready items of its connection (lanes held by a retry are
skipped), renders them through the connector's ``identify``/``map_*`` hooks, packs them
into one request within the connector's item and byte limits, calls ``send``, and settles
every item in one transaction: delivered, retried later, or dead-lettered. Each request
becomes one outbound-log row. Workers are independent, so a slow destination only slows
its own connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import orjson
import pluggy
import structlog

from engine import log_outbox
from engine.connections import ConnectionRegistry
from engine.database import Database
from engine.errors import (
    AuthError,
    MappingError,
    NotFoundError,
    PayloadTooLargeError,
    PermanentError,
    RetryableError,
)
from engine.ingest import event_from_payload, load_profiles
from engine.logstore import LogCustomer, LogRow, LogStore
from engine.plugins import Connectors, PipelineHooks
from engine.queue import (
    KIND_PROFILE,
    KIND_RENDERED,
    DeadLetter,
    DurableQueue,
    QueueItem,
    Retry,
)
from engine.records import (
    AntavoEvent,
    Connection,
    Customer,
    Delivery,
    ItemOutcome,
    ProfileChange,
    SendResult,
)
from engine.transport import Exchange, RecordingTransport

log = structlog.get_logger("tidegate.delivery")

ENVELOPE_BYTES = 64
"""Room kept in a request for the body's envelope around the per-customer parts."""


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


DELIVERED = ItemOutcome(delivered=True)
"""The outcome of an item a successful send did not report on (shared: it is immutable)."""

_NOTHING: dict[str, Any] = {}
"""An empty default that is only read (saves an empty dict per rendered item)."""

_DELIVERED_STATE = ("delivered", "")
"""A delivered customer's (outcome, error) in the log row."""

MIN_INTERVAL = 0.05
MAX_INTERVAL = 10.0


@dataclass
class _Pace:
    """How fast one connection may send, learned from the destination's answers."""

    hold_until: float = 0.0
    """No request before this: the backoff after a transient failure."""
    interval: float = 0.0
    """Least time between requests: doubles on every 429, decays with each success."""
    last_send: float = 0.0
    item_cap: int | None = None
    """Items per request after the destination refused a size; doubles back on success."""
    probe: bool = False
    """Send a single item first (after a pause), to test the credentials cheaply."""

    def slow_down(self) -> None:
        self.interval = min(MAX_INTERVAL, max(MIN_INTERVAL, self.interval * 2))

    def succeeded(self, items: int, max_items: int) -> None:
        self.probe = False
        self.interval = self.interval * 0.9 if self.interval > MIN_INTERVAL / 2 else 0.0
        if self.item_cap is not None:
            self.item_cap = self.item_cap * 2 if self.item_cap * 2 < max_items else None


def _dead(delivery: Delivery, item: QueueItem, stage: str, error: str) -> DeadLetter:
    """A dead letter that keeps the rendered fragment, so it can be resent as it was."""
    rendered = {
        "identifiers": dict(delivery.identifiers),
        "attributes": None if delivery.attributes is None else dict(delivery.attributes),
        "events": [dict(e) for e in delivery.events],
    }
    return DeadLetter(item, stage, error, rendered=rendered)


@dataclass(frozen=True)
class _Settling:
    """A batch whose every item leaves the queue, being settled in the background while
    the worker claims and sends the next batch without those items."""

    task: asyncio.Task[None]
    seqs: frozenset[int]


@dataclass
class _Batch:
    connection: Connection
    deliveries: list[Delivery] = field(default_factory=list)
    items: dict[int, QueueItem] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)


class Deliverer:
    def __init__(
        self,
        registry: ConnectionRegistry,
        queue: DurableQueue,
        db: Database,
        pm: pluggy.PluginManager,
        connectors: Connectors,
        logs: LogStore,
        settings: DeliverySettings | None = None,
    ) -> None:
        self._registry = registry
        self._queue = queue
        self._db = db
        self._hook = pm.hook
        self._pipeline = PipelineHooks(pm)
        self._connectors = connectors
        self._logs = logs
        self.settings = settings or DeliverySettings()
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._wakes: dict[str, asyncio.Event] = {}
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._settles: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
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
        except Exception:
            task = self._workers.pop(connection_id, None)
            self._wakes.pop(connection_id, None)
            if task:
                task.cancel()
            return
        self.wake([connection_id])

    def _ensure_worker(self, connection_id: str) -> None:
        if self._stopping or connection_id in self._workers:
            return
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
        pace = _Pace()
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
            info = self._connectors.get(connection.connector)
            limit = 1 if pace.probe else (pace.item_cap or info.max_batch_items)
            exclude = settling[0].seqs if settling else ()
            items = await self._queue.claim(connection_id, limit, exclude=exclude)
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
            try:
                await self._deliver(connection, items, pace, limit, settling)
            except Exception:
                # A bug must not kill the worker; the items stay queued and are retried.
                log.exception("delivery_failed_unexpectedly", connection=connection_id)
                pace.hold_until = time.time() + self.settings.base_backoff
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
        connection: Connection,
        items: list[QueueItem],
        pace: _Pace,
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
        batch = await self._render(connection, items, max_items)
        if not batch.deliveries:
            await self._drain(settling)
            await self._queue.settle(delivered=batch.skipped, dead=batch.dead)
            return
        assert self._session is not None
        origins = sorted({item.origin for item in batch.items.values()} - {""})  # one per delivery
        transport = RecordingTransport(
            self._session, self.settings.request_timeout, tags=tuple(origins)
        )
        now = time.time()
        pace.last_send = now
        retries: list[Retry] = []
        dead = list(batch.dead)
        delivered = list(batch.skipped)
        customer_outcome: dict[str, tuple[str, str]] = {}
        # By id, in the order of their first delivery: the customer of the last delivery.
        customers = {d.customer.id: d.customer for d in batch.deliveries}
        error = ""
        items_stay = False  # queued untouched for a resend: a pause or a resend in halves
        try:
            pending = self._hook.send(
                connection=connection, deliveries=batch.deliveries, transport=transport
            )
            if pending is None:
                raise PermanentError(
                    f"no installed plugin sends for connector {connection.connector!r}"
                )
            result: SendResult = await pending
        except asyncio.CancelledError:
            # Shutdown's deadline cut the send. The items stay queued for the next start;
            # count the attempt and log what went out, so a duplicate is visible.
            await self._interrupted(connection, batch, transport, now)
            raise
        except RetryableError as exc:
            error = str(exc)
            delay = self._backoff(batch.deliveries, exc.retry_after)
            pace.hold_until = now + delay
            if exc.throttled:
                pace.slow_down()
            window = connection.retry_window_seconds or self.settings.retry_window
            for d in batch.deliveries:
                item = batch.items[d.item_id]
                if now - (item.first_attempt_time or now) >= window:
                    reason = f"gave up after {item.attempts + 1} attempts over {window:.0f} s"
                    dead.append(_dead(d, item, "send", f"{reason}: {exc}"))
                    customer_outcome[item.customer_id] = ("failed", error)
                else:
                    retries.append(Retry(d.item_id, now + delay, error))
                    customer_outcome.setdefault(item.customer_id, ("retry", error))
        except AuthError as exc:
            error = str(exc)
            # No pause if the credentials changed while this request was out. Either way
            # the next request is a single-item probe.
            await self._registry.pause(connection, error)
            pace.probe, items_stay = True, True
            for d in batch.deliveries:
                customer_outcome[d.customer.id] = ("paused", error)
        except PayloadTooLargeError as exc:
            error = str(exc)
            if len(batch.deliveries) > 1:
                # Resend in halves: the items stay queued untouched and go out smaller.
                pace.item_cap = max(1, len(batch.deliveries) // 2)
                items_stay = True
                for d in batch.deliveries:
                    customer_outcome.setdefault(d.customer.id, ("retry", error))
            else:
                d = batch.deliveries[0]
                dead.append(_dead(d, batch.items[d.item_id], "send", f"too large alone: {exc}"))
                customer_outcome[d.customer.id] = ("failed", error)
        except PermanentError as exc:
            error = str(exc)
            for d in batch.deliveries:
                dead.append(_dead(d, batch.items[d.item_id], "send", error))
                customer_outcome[d.customer.id] = ("failed", error)
        else:
            pace.succeeded(
                len(batch.deliveries), self._connectors.get(connection.connector).max_batch_items
            )
            if all([o.delivered for o in result.outcomes.values()]):
                # Every item delivered, the common case: what the loop below would give,
                # in bulk (each customer in the order of its first delivery).
                # (batch.items holds the deliveries' item ids, in the same order.)
                delivered.extend(batch.items)
                customer_outcome = dict.fromkeys(customers, _DELIVERED_STATE)
            else:
                for d in batch.deliveries:
                    outcome = result.outcomes.get(d.item_id, DELIVERED)
                    if outcome.delivered:
                        delivered.append(d.item_id)
                        customer_outcome.setdefault(d.customer.id, _DELIVERED_STATE)
                    else:
                        dead.append(_dead(d, batch.items[d.item_id], "destination", outcome.error))
                        customer_outcome[d.customer.id] = ("failed", outcome.error)
                bad = [c for c, (state, _) in customer_outcome.items() if state == "failed"]
                if bad:
                    first = customer_outcome[bad[0]][1]
                    error = f"{len(bad)} of {len(customer_outcome)} customers rejected: {first}"
        request_id = transport.exchanges[-1].request_id if transport.exchanges else ""
        dead = [
            DeadLetter(d.item, d.stage, d.error, d.request_id or request_id, d.rendered)
            for d in dead
        ]
        names = {customer_id: c.name for customer_id, c in customers.items()}
        attempt = max([d.attempt for d in batch.deliveries])
        rows = [
            self._log_row(connection, exchange, names, customer_outcome, error, attempt)
            for exchange in transport.exchanges
        ]
        await self._drain(settling)  # one settle at a time, in order
        commit = self._commit(delivered, retries, dead, now, rows)
        if retries or items_stay:
            await commit
        else:
            task = asyncio.create_task(commit)
            self._settles.add(task)
            task.add_done_callback(self._settles.discard)
            settling.append(_Settling(task, frozenset(delivered) | {d.item.seq for d in dead}))
        last = transport.exchanges[-1] if transport.exchanges else None
        log.info(
            "delivery",
            connection=connection.id,
            request_id=request_id,
            status=last.status if last else None,
            latency_ms=round(last.elapsed * 1000, 1) if last else None,
            attempt=attempt,
            customers=len(names),
            items=len(batch.deliveries),
            delivered=len(delivered) - len(batch.skipped),
            retried=len(retries),
            dead=len(dead),
            error=error or None,
        )

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
            log_rows=[log_outbox.encode(row) for row in rows],
        )
        for row in rows:
            await self._logs.append(row)

    async def _interrupted(
        self, connection: Connection, batch: _Batch, transport: RecordingTransport, now: float
    ) -> None:
        error = "interrupted by shutdown; sent again after restart"
        retries = [Retry(d.item_id, now, error) for d in batch.deliveries]
        names = {d.customer.id: d.customer.name for d in batch.deliveries}
        outcomes = {d.customer.id: ("retry", error) for d in batch.deliveries}
        attempt = max(d.attempt for d in batch.deliveries)
        rows = [
            self._log_row(connection, exchange, names, outcomes, error, attempt)
            for exchange in transport.exchanges
        ]
        await self._queue.settle(
            retries=retries, attempt_time=now, log_rows=[log_outbox.encode(r) for r in rows]
        )
        for row in rows:
            await self._logs.append(row)

    def _log_row(
        self,
        connection: Connection,
        exchange: Exchange,
        names: dict[str, str],
        outcomes: dict[str, tuple[str, str]],
        error: str,
        attempt: int,
    ) -> LogRow:
        customers = tuple(
            [
                LogCustomer(cid, names.get(cid, ""), state, err)  # id, name, outcome, error
                for cid, (state, err) in outcomes.items()
            ]
        )
        return LogRow(
            id=exchange.request_id,
            time=exchange.time,
            connection_id=connection.id,
            method=exchange.method,
            url=exchange.url,
            status_code=exchange.status,
            response_time=exchange.elapsed,
            error=exchange.error or error,
            customers=customers,
            mapping_version=connection.mapping_version,
            attempt=attempt,
            ambiguous=exchange.ambiguous,
            request_body=exchange.request_body,
            response_body=exchange.response_body,
            tags=",".join(exchange.tags),
        )

    def _backoff(self, deliveries: Sequence[Delivery], retry_after: float | None) -> float:
        attempts = max(d.attempt for d in deliveries)
        ceiling = min(self.settings.max_backoff, self.settings.base_backoff * 2 ** (attempts - 1))
        delay = random.uniform(0, ceiling)  # full jitter: retries of many workers spread out
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.settings.max_retry_after))
        return delay

    # -- rendering ---------------------------------------------------------------------

    async def _render(
        self, connection: Connection, items: list[QueueItem], max_items: int
    ) -> _Batch:
        info = self._connectors.get(connection.connector)
        customer_ids = {item.customer_id for item in items}

        profiles = await self._db.read(lambda c: load_profiles(c, customer_ids))
        batch = _Batch(connection)
        size = ENVELOPE_BYTES
        customers: set[str] = set()
        # Looked up once per batch, not per item.
        max_customers, max_bytes = info.max_batch_items, info.max_batch_bytes
        pipeline, deliveries, batch_items = self._pipeline, batch.deliveries, batch.items
        for item in items:
            customer_id = item.customer_id
            if customer_id not in customers and len(customers) >= max_customers:
                break
            if len(deliveries) >= max_items:
                break
            # Identifying attributes as they were at ingest (see ingest._identity) over the
            # profile. Without them the profile itself serves (hooks only read it), which
            # saves a copy per item; a customer without a profile gets an empty dict of
            # its own.
            attributes = profiles.get(customer_id, _NOTHING)
            identity = item.payload.get("identity")
            if identity:
                attributes = {**attributes, **identity}
            elif attributes is _NOTHING:
                attributes = {}
            customer = Customer(customer_id, attributes)
            try:
                delivery = render_delivery(pipeline, connection, customer, item)
            except MappingError as exc:
                batch.dead.append(DeadLetter(item, exc.stage, exc.message))
                continue
            except Exception as exc:  # a plugin bug: dead-letter the item, keep the loop alive
                batch.dead.append(DeadLetter(item, "map", f"{exc.__class__.__name__}: {exc}"))
                continue
            if delivery is None:
                batch.skipped.append(item.seq)
                continue
            # A tuple serializes as the same JSON array as a list, and costs less to make.
            weight = len(orjson.dumps((delivery.identifiers, delivery.attributes, delivery.events)))
            if weight + ENVELOPE_BYTES > max_bytes:
                batch.dead.append(
                    DeadLetter(
                        item,
                        "batch",
                        f"too large for one request: {weight} bytes, limit {max_bytes}",
                    )
                )
                continue
            if size + weight > max_bytes:
                break  # the rest waits for the next request, in order
            size += weight
            customers.add(customer_id)
            deliveries.append(delivery)
            batch_items[item.seq] = item
        return batch


def render_delivery(
    hook: Any, connection: Connection, customer: Customer, item: QueueItem
) -> Delivery | None:
    """Renders one queued item through the connector's hooks, as delivery does.

    Returns ``None`` for an event whose mapping was removed since it was queued; raises
    ``MappingError`` when the customer cannot be identified or the record mapped. An item
    replayed as a stored request is not rendered again: its fragment goes out as it was.
    """
    # A queued item's fields are read through descriptors: each one once.
    kind, payload = item.kind, item.payload
    if kind == KIND_RENDERED:
        return Delivery(
            item_id=item.seq,
            customer=customer,
            identifiers=payload["identifiers"],
            attributes=payload.get("attributes"),
            events=list(payload.get("events") or []),
            attempt=item.attempts + 1,
        )
    attributes: Any = None
    events: Any = []
    change: ProfileChange | None = None
    event: AntavoEvent | None = None
    if kind == KIND_PROFILE:
        change = ProfileChange(
            payload["changes"],
            datetime.fromisoformat(payload["timestamp"]),
            payload.get("previous", {}),
        )
        attributes = hook.map_profile(connection=connection, customer=customer, change=change)
        if attributes is None:
            raise MappingError(
                "map_profile", f"no installed plugin maps for {connection.connector!r}"
            )
    else:
        event = event_from_payload(customer.id, payload)
        events = hook.map_event(connection=connection, customer=customer, event=event)
        if events is None:
            raise MappingError(
                "map_event", f"no installed plugin maps for {connection.connector!r}"
            )
    if change is None and not events:
        return None  # the event's mapping was removed after the item was queued
    # A profile change goes to send even when no attribute maps: the connector may
    # still have work (a cleared attribute, a changed identifier) or report it done.
    identifiers = hook.identify(connection=connection, customer=customer)
    if identifiers is None:
        raise MappingError(
            "identify", f"no installed plugin identifies for {connection.connector!r}"
        )
    # Positional (item_id, customer, identifiers, attributes, events, attempt, change,
    # event): built for every item. A list of events is kept as the hook returned it, not
    # copied: nothing downstream changes a delivery's events (a dead letter copies them).
    return Delivery(
        item.seq, customer, identifiers, attributes or None,
        events if type(events) is list else list(events), item.attempts + 1, change, event,
    )  # fmt: skip
