"""The worker role on JetStream: own partitions by lease, pull their events into this
process's embedded engine, and acknowledge an event only when it has left the local queue.

Ownership. Each partition ``n`` has a lease key ``p.<n>`` in the ``tg_leases`` bucket, whose
entries expire ``lease_ttl`` after their last write. A worker takes a free partition with
``create`` and renews it with ``update(last=revision)`` every ``lease_ttl / 3``. A renewal
the server refuses (someone else holds it), or no renewal for 0.6 x ``lease_ttl``, fences
the partition at once: its pulling stops and its events leave the local queue unsent. The
second is checked every 100 ms apart from the lease round, whose calls a frozen or lost
server can hold (``_fence_overdue``): the partition is fenced before its lease can expire.
Workers announce themselves with ``w.<id>`` keys; each takes at most its share
(ceil(P / workers)) and gives one partition back at a time while it holds more. Giving
back (``_hand_back``, also on a clean stop) stops the pulls, lets the local queue deliver
and ack what it holds of the partition while the lease is still renewed, and releases the
lease only then: the next owner finds nothing pending and nothing is sent twice.

Takeover. On a claim the worker deletes every earlier consumer of the partition and
creates its own, ``p<n>-<epoch>`` (the lease revision): the server then hands it every
unacknowledged event from the lowest sequence, in order, and the earlier owner can neither
pull nor ack. If an earlier consumer still had events pending, their owner may be a zombie
with a request in flight: the worker waits ``takeover_wait`` (the lease TTL plus the
request timeout by default) before it pulls anything. A fetch error re-creates the
worker's own consumer under a new epoch instead of re-binding.

Acknowledgement. Pulled events go through the local ``Ingestor`` (dedupe, profiles,
routing into the local ``DurableQueue``), unchanged; the embedded ``Deliverer`` sends them.
An event is acked once no local queue item of its id is left (delivered or dead-lettered),
per customer in stream order (a contiguous prefix), so a worker killed at any moment has
acked nothing it had not settled. ``ack_wait`` is an hour: an event held by a retrying lane
stays pending and is redelivered only when a consumer is re-created; a redelivery of a
stream sequence this worker already queued only replaces the ack handle. Deliveries sent
to a connection that died never arrive and would wait out that hour: a gap in the consumer
sequence, or a server count of deliveries past the last that arrived (asked after 5 s of
pulling nothing), makes the worker re-create its consumer (``DeliveriesLostError``).

A dead letter replayed on any worker arrives as a message with the ``Tg-Replay`` header
(``engine.broker.replay``): it is queued as it is (no re-send check, no routing), in
stream order with the customer's events, and tracked and acked like an event.

Profiles follow a partition: after each profile event the merged profile is kept with the
event, and written to the ``tg_profiles`` bucket (key: the customer token) just before the
event is acked; the first time a worker meets a customer in an ownership it replaces its
local profile with the bucket's. So the bucket holds the profile as of the customer's
acknowledged events, and the next owner re-applies the rest in order. Re-send marks
follow the same way, lazily (``engine.broker.marks``): the acked events' marks are put
every minute, and a first meeting merges the customer's marks into the local ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import secrets
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
import orjson
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.kv import KeyValue

from engine.broker.marks import STOP_FLUSH, Marks, MarkShare, merge_into_seen
from engine.broker.publish import config_revision, decode_event
from engine.broker.replay import decode_replay, is_replay
from engine.broker.streams import (
    STREAM,
    BrokerSettings,
    customer_token,
    ensure_stream,
    lease_bucket,
    marks_bucket,
    partition_filter,
    profile_bucket,
    replicas_for,
    retrying,
)
from engine.connector.records import PROFILE_ACTIONS, AntavoEvent
from engine.errors import BacklogFullError
from engine.ingest.ingestor import ID_DEDUP_WINDOW, Ingestor
from engine.queue.dead_letters import Replayable
from engine.queue.items import ORIGIN_REPLAY, ORIGIN_REPLAY_STORED
from engine.queue.lanes import DurableQueue
from engine.state.database import Database
from engine.state.profiles import load_profile

log = structlog.get_logger("tidegate.broker")

ACK_WAIT = 3600.0
CONSUMER_NAMES = f"$JS.API.CONSUMER.NAMES.{STREAM}"
MAX_ACK_PENDING = 20_000
"""Events a partition's consumer hands out before an ack: what a worker holds while one
connection's destination is down and the others go on (an event is acked only once every
connection settled it). Past it the partition stops pulling and the other connections
wait too. An entry costs about 430 bytes (measured with tracemalloc: the ack subject, the
ids and the bookkeeping): 16 partitions on one worker hold 140 MB at most."""
LOAD_CONCURRENCY = 64
"""Customers whose profile and marks a worker reads from the cluster at a time."""
FETCH_BATCH = 250
FETCH_TIMEOUT = 1.0
LOST_CHECK = 5.0
"""Seconds of pulling nothing after which a worker asks whether deliveries were lost."""
ACK_INTERVAL = 0.1
ACK_RECHECK = 1.0
"""Seconds after which an ack round reads the queue even when nothing seemed to change:
a replay that added as many items as a settle removed leaves the depth as it was."""
FENCE_AFTER = 0.6
"""Fraction of the lease TTL without a renewal after which a worker fences itself: well
before the server lets the lease expire and another worker take it."""
TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    asyncio.TimeoutError,
)


REPLAY_ORIGINS = f"'{ORIGIN_REPLAY}', '{ORIGIN_REPLAY_STORED}'"


def customer_of(event: AntavoEvent | Replayable) -> str:
    """The customer whose profile a worker loads before queuing ``event``: none for an
    event sent under an external ID (resolved locally)."""
    if isinstance(event, Replayable):
        return event.customer_id
    return "" if event.external_id else event.customer


class DeliveriesLostError(Exception):
    """Deliveries of a consumer that never arrived: the server sent them (its consumer
    sequence moved on) to a connection that was lost before they came. They stay
    pending until the ack wait (an hour); the worker re-creates its consumer instead,
    which hands out every unacked event again, in stream order."""

    def __init__(self, received: int, sent: int) -> None:
        """``received``: the last delivery that arrived; ``sent``: the last one lost."""
        lost = f"{received + 1}" if sent == received + 1 else f"{received + 1}-{sent}"
        super().__init__(f"deliveries {lost} of the consumer never arrived")


@dataclass(slots=True)
class Pending:
    """A pulled event in the local queue, not yet acked."""

    seq: int
    reply: str
    """Its ack subject (on the consumer that delivered it last), not the whole message."""
    event_id: str
    customer: str
    partition: int
    profile: bytes | None = None
    """The customer's merged profile after this event (profile events only)."""
    queued: bool = True
    """False while this event's local ingest runs: its queue items may not be committed
    yet, so the ack check must not take it for settled."""
    replay: bool = False
    """A replayed dead letter (``engine.broker.replay``), not an event: no re-send mark."""


@dataclass
class Owned:
    revision: int
    renewed: float
    task: asyncio.Task[None] | None = None
    consumers: set[str] = field(default_factory=set)
    stopped: bool = False
    leaving: bool = False
    """Being handed back: no more pulls, the lease renewed until what was sent settled."""


async def finish(task: asyncio.Task[None]) -> None:
    """Cancels ``task`` until it ends: nats-py swallows a cancellation in places (a KV
    watcher, a fetch), and a loop of ours then goes round once more."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=1.0)


async def clear_local_queue(db: Database, queue: DurableQueue) -> int:
    """At a worker's start: every local queue item came from the stream (events, and dead
    letters replayed through it: ``engine.broker.replay``) and was never acked (an ack
    waits for the queue to empty of it), so JetStream hands it to the partition's next
    owner. The items go, with the re-send marks of their events (or the redelivery would
    count as a re-send here); a replayed dead letter's event keeps its mark."""

    def clear(c: sqlite3.Connection) -> int:
        c.execute(
            "DELETE FROM seen_events WHERE event_id IN"
            f" (SELECT event_id FROM queue WHERE origin NOT IN ({REPLAY_ORIGINS}))"
        )
        return int(c.execute("DELETE FROM queue").rowcount)

    removed = await db.write(clear)
    await queue.load()
    return removed


class PartitionWorker:
    def __init__(
        self,
        nc: NATS,
        settings: BrokerSettings,
        ingestor: Ingestor,
        db: Database,
        queue: DurableQueue,
        takeover_wait: float,
        settled: Callable[[], Awaitable[None]] | None = None,
        hand_back_wait: float = 10.0,
        config_applied: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        """``settled``: returns once every batch the local deliverer has claimed so far is
        settled (``Deliverer.settled``); a partition handed back waits for it, up to
        ``hand_back_wait`` seconds, so that what it sent is acked, not sent again."""
        self._nc = nc
        self._config_applied = config_applied
        """Waits until this process applied a configuration revision (``ConfigSync``)."""
        self._js: JetStreamContext = nc.jetstream()
        self.settings = settings
        self._ingestor = ingestor
        self._db = db
        self._queue = queue
        self.takeover_wait = takeover_wait
        self.id = secrets.token_hex(6)
        self.owned: dict[int, Owned] = {}
        self.pending: dict[int, Pending] = {}
        self._by_customer: dict[str, list[int]] = {}
        self._fresh: dict[str, int] = {}
        self._epochs: dict[int, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._leases: KeyValue | None = None
        self._profiles: KeyValue | None = None
        self._marks: MarkShare | None = None
        self._stopping = False
        self._settled = settled
        self.hand_back_wait = hand_back_wait
        self._ack_lock = asyncio.Lock()
        self._hand_backs: set[asyncio.Task[None]] = set()
        self.acked = 0
        self._checked_depth = -1
        self._checked_at = 0.0
        self._recheck = True

    async def start(self) -> None:
        replicas = replicas_for(self._nc, self.settings)
        await ensure_stream(self._js, self.settings, replicas)
        self._leases = await lease_bucket(self._js, self.settings, replicas)
        self._profiles = await profile_bucket(self._js, replicas)
        self._marks = MarkShare(await marks_bucket(self._js, replicas, ID_DEDUP_WINDOW), self._db)
        self._marks.start()
        self._tasks = [
            asyncio.create_task(self._lease_loop()),
            asyncio.create_task(self._ack_loop()),
        ]
        log.info("broker_worker_started", worker=self.id, partitions=self.settings.partitions)

    async def stop(self) -> None:
        """Stops pulling, lets what was taken settle and be acked (for up to half the
        lease TTL, while the lease loop keeps renewing: no other worker may take a
        partition whose events this one may still be sending), and gives the leases back.
        The next owner still waits out a request that outlived that: its consumer shows
        pending events."""
        self._stopping = True  # the lease loop renews, and claims or gives back nothing
        if self._leases is not None:  # leaving: the others' share grows at once
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._leases.delete(self._worker_key), 2.0)
        self.hand_back_wait = min(self.hand_back_wait, self.settings.lease_ttl / 2)
        await asyncio.gather(*self._hand_backs, return_exceptions=True)
        await asyncio.gather(*(self._hand_back(n, "worker stopping") for n in list(self.owned)))
        for task in self._tasks:
            await finish(task)
        self._tasks = []
        # A lease round that was claiming when the stop began may have taken one more:
        # its pulling task would otherwise go on after the stop.
        for n in list(self.owned):
            await self._drop(n, "worker stopping", release=True)
        if self._marks is not None:  # what was acked, for the next owners
            await self._marks.stop()

    @property
    def _worker_key(self) -> str:
        return f"w.{self.id}"

    # -- leases --------------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one bad round must not end ownership handling
                log.warning("broker_lease_round_failed", error=f"{type(exc).__name__}: {exc}"[:200])
            await asyncio.sleep(self.settings.lease_ttl / 3)

    async def _tick(self) -> None:
        leases = self._leases
        assert leases is not None
        me = self.id.encode()
        # No call of a round may outlast the round: a server that is frozen or gone holds
        # a request until its timeout, and renewals wait for nothing but themselves.
        within = self.settings.lease_ttl / 3
        if not self._stopping:
            with contextlib.suppress(*TRANSIENT, nats.js.errors.APIError):
                await asyncio.wait_for(leases.put(self._worker_key, me), within)
        await asyncio.gather(
            *(self._renew(leases, n, own, me, within) for n, own in list(self.owned.items()))
        )
        if self._stopping:  # only renewing what is being handed back
            return
        try:
            keys = await leases.keys()
        except nats.js.errors.NoKeysError:
            keys = []
        workers = max(1, sum(1 for k in keys if k.startswith("w.")))
        share = math.ceil(self.settings.partitions / workers)
        staying = [n for n, own in self.owned.items() if not own.leaving]
        if len(staying) > share and not self._hand_backs:
            task = asyncio.create_task(self._hand_back(max(staying), "rebalancing"))
            self._hand_backs.add(task)
            task.add_done_callback(self._hand_backs.discard)
            return
        held = {k for k in keys if k.startswith("p.")}
        start = int(self.id, 16) % self.settings.partitions
        for i in range(self.settings.partitions):
            if len(self.owned) >= share or self._stopping:  # a stop began meanwhile
                break
            n = (start + i) % self.settings.partitions
            if n in self.owned or f"p.{n}" in held:
                continue
            try:
                revision = await leases.create(f"p.{n}", me)
            except (nats.js.errors.KeyWrongLastSequenceError, *TRANSIENT):
                continue
            own = self.owned[n] = Owned(revision, time.monotonic())
            own.task = asyncio.create_task(self._run_partition(n, own))
            log.info("partition_claimed", worker=self.id, partition=n, revision=revision)

    async def _renew(self, leases: KeyValue, n: int, own: Owned, me: bytes, within: float) -> None:
        """Renews partition ``n``'s lease. A failure leaves it to ``_fence_overdue``."""
        try:
            revision = await asyncio.wait_for(
                leases.update(f"p.{n}", me, last=own.revision), within
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            await self._drop(n, "lease taken by another worker")
            return
        except (*TRANSIENT, nats.js.errors.APIError):
            return
        if self.owned.get(n) is own:
            own.revision, own.renewed = revision, time.monotonic()

    async def _fence_overdue(self) -> None:
        """Fences every partition whose lease was not renewed for ``FENCE_AFTER`` of the
        TTL, whatever the lease round is waiting for: before the server lets the lease
        expire and another worker take the partition."""
        limit = FENCE_AFTER * self.settings.lease_ttl
        for n, own in list(self.owned.items()):
            if time.monotonic() - own.renewed > limit:
                await self._drop(n, "lease not renewed in time")

    async def _hand_back(self, n: int, reason: str) -> None:
        """Gives partition ``n`` back gracefully: stops pulling, lets the local queue
        deliver and ack what it holds of the partition (the lease loop keeps renewing
        meanwhile) for up to ``hand_back_wait`` seconds, waits for the batches then in
        flight, and only then drops what is left unsent and releases the lease. A
        rebalance or a clean stop thus sends nothing twice unless a lane is held longer
        (a destination down): its events go to the next owner unsent."""
        own = self.owned.get(n)
        if own is None or own.leaving:
            return
        own.leaving = own.stopped = True
        if own.task is not None:  # the pull in progress ends by itself (nothing left pending)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(own.task), 2 * FETCH_TIMEOUT + 1)
            await finish(own.task)
        deadline = time.monotonic() + self.hand_back_wait
        try:
            while any(p.partition == n for p in self.pending.values()):
                await self._fence_overdue()  # the ack loop's check, ended by a stop
                await self._ack_settled()
                if time.monotonic() > deadline:
                    if self._settled is not None:  # what is in flight settles first
                        await asyncio.wait_for(self._settled(), self.hand_back_wait)
                        await self._ack_settled()
                    break
                await asyncio.sleep(ACK_INTERVAL)
            # The acks are on their way; the server has them before the lease goes.
            await self._nc.flush(timeout=2)
            if self._marks is not None:  # the next owner reads a customer's marks when
                await self._marks.flush(within=STOP_FLUSH)  # it meets them: put them first
        except Exception as exc:  # unacked events go to the next owner, as on a kill
            log.warning("broker_hand_back_failed", error=f"{type(exc).__name__}: {exc}"[:200])
        await self._drop(n, reason, release=True)

    async def _drop(self, n: int, reason: str, release: bool = False) -> None:
        """Stops partition ``n`` at once (fenced): no more pulls or acks, and its events
        leave the local queue unsent; the next owner's consumer gets them again."""
        own = self.owned.pop(n, None)
        if own is None:
            return
        own.stopped = True
        if own.task is not None:
            await finish(own.task)
        entries = [p for p in self.pending.values() if p.partition == n]
        ids = sorted({p.event_id for p in entries})
        # A replayed dead letter's event was accepted long ago: its mark stays.
        marked = sorted({p.event_id for p in entries if not p.replay})
        for entry in entries:
            self._untrack(entry)
        for customer in [c for c, p in self._fresh.items() if p == n]:
            del self._fresh[customer]

        def forget(c: sqlite3.Connection) -> int:
            c.execute(
                "DELETE FROM seen_events WHERE event_id IN (SELECT value FROM json_each(?))",
                (orjson.dumps(marked).decode(),),
            )
            return int(
                c.execute(
                    "DELETE FROM queue WHERE event_id IN (SELECT value FROM json_each(?))",
                    (orjson.dumps(ids).decode(),),
                ).rowcount
            )

        removed = await self._db.write(forget) if ids else 0
        self._queue.depth -= removed
        if release and self._leases is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._leases.delete(f"p.{n}", last=own.revision), 2.0)
        # Giving back a partition with nothing held is routine (a clean stop, a rebalance).
        emit = log.info if release and not entries else log.warning
        emit(
            "partition_released" if release else "partition_fenced",
            worker=self.id,
            partition=n,
            reason=reason,
            events_given_back=len(entries),
            items_dropped=removed,
        )

    # -- pulling -------------------------------------------------------------------------

    async def _run_partition(self, n: int, own: Owned) -> None:
        first = True
        while not own.stopped:
            sub = None
            try:
                name, wait = await self._new_consumer(n, own)
                if first and wait:
                    log.info("partition_takeover_wait", partition=n, seconds=self.takeover_wait)
                    await asyncio.sleep(self.takeover_wait)
                first = False
                sub = await self._js.pull_subscribe_bind(name, stream=STREAM)
                received = 0  # the consumer sequence of the last delivery that arrived
                checked = time.monotonic()
                while not own.stopped:
                    try:
                        msgs = await sub.fetch(FETCH_BATCH, timeout=FETCH_TIMEOUT)
                    except TimeoutError:  # nothing to pull (nats-py raises either kind)
                        if time.monotonic() - checked > LOST_CHECK:
                            checked = time.monotonic()
                            await self._check_delivered(name, received)
                        continue
                    if own.stopped:  # fenced or leaving while the fetch ran: not ours to queue
                        for msg in msgs:  # not pending any more: the next owner need not wait
                            with contextlib.suppress(*TRANSIENT):
                                await msg.nak()
                        break
                    for msg in msgs:
                        delivery = msg.metadata.sequence.consumer
                        if delivery != received + 1:
                            raise DeliveriesLostError(received, delivery - 1)
                        received = delivery
                    await self._take(n, msgs)
            except asyncio.CancelledError:
                raise
            except DeliveriesLostError as exc:
                # A new consumer hands out every unacked event again, in stream order.
                log.warning("partition_deliveries_lost", partition=n, error=str(exc))
                await asyncio.sleep(0.5)  # not a loop of new consumers if it goes on
            except Exception as exc:
                log.warning(
                    "partition_consumer_error",
                    partition=n,
                    error=f"{type(exc).__name__}: {exc}"[:200],
                )
                await asyncio.sleep(0.5)
            finally:
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

    async def _check_delivered(self, name: str, received: int) -> None:
        """Raises ``DeliveriesLostError`` when the server counts deliveries of consumer
        ``name`` beyond the last that arrived here: sent to a connection that was lost
        (a frozen or cut-off server), they would be redelivered only after the hour of
        the ack wait, while the later events of their customers went out."""
        try:
            info = await self._js.consumer_info(STREAM, name, timeout=2.0)
        except (*TRANSIENT, nats.js.errors.APIError):
            return  # no answer: asked again on the next idle round
        delivered = info.delivered.consumer_seq if info.delivered is not None else 0
        if delivered > received:
            raise DeliveriesLostError(received, delivered)

    async def _new_consumer(self, n: int, own: Owned) -> tuple[str, bool]:
        """Deletes the partition's earlier consumers and creates this epoch's. Returns its
        name, and whether an earlier owner's consumer still had events pending."""
        names = await retrying(self._consumer_names, "listing consumers", 30.0)
        wait = False
        for name in names:
            if not name.startswith(f"p{n}-"):
                continue
            if name not in own.consumers and await self._had_pending(name):
                wait = True
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await retrying(
                    functools.partial(self._js.delete_consumer, STREAM, name),
                    "deleting a consumer",
                    30.0,
                )
        epoch = max(own.revision, self._epochs.get(n, 0) + 1)
        self._epochs[n] = epoch
        name = f"p{n}-{epoch}"
        config = js_api.ConsumerConfig(
            durable_name=name,
            filter_subject=partition_filter(n),
            deliver_policy=js_api.DeliverPolicy.ALL,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT,
            max_ack_pending=MAX_ACK_PENDING,
            max_deliver=-1,
        )
        await retrying(lambda: self._js.add_consumer(STREAM, config), "creating a consumer", 30.0)
        own.consumers.add(name)
        return name, wait

    async def _consumer_names(self) -> list[str]:
        """The stream's consumer names (``CONSUMER.NAMES``, answered from the cluster's
        assignments). Not ``CONSUMER.LIST``: in a cluster it waits up to 4 s for the info
        of a consumer still being created, and the partitions a worker claims together
        create theirs at the same time (measured: the first event waited 4.1 s)."""
        names: list[str] = []
        while True:
            request = orjson.dumps({"offset": len(names)})
            try:
                reply = await self._nc.request(CONSUMER_NAMES, request, timeout=5.0)
            except nats.errors.NoRespondersError:
                raise nats.js.errors.ServiceUnavailableError from None
            answer = orjson.loads(reply.data)
            if "error" in answer:
                raise nats.js.errors.APIError.from_error(answer["error"])
            page = answer.get("consumers") or []
            names += page
            if not page or len(names) >= int(answer.get("total", 0)):
                return names

    async def _had_pending(self, name: str) -> bool:
        """Whether an earlier owner's consumer still has events out; unknown counts as
        yes (the takeover wait is the safe side)."""
        try:
            info = await self._js.consumer_info(STREAM, name, timeout=5.0)
        except nats.js.errors.NotFoundError:
            return False
        except (*TRANSIENT, nats.js.errors.APIError):
            return True
        return (info.num_ack_pending or 0) > 0

    async def _take(self, n: int, msgs: Sequence[Msg]) -> None:
        fresh: list[tuple[int, Msg, AntavoEvent | Replayable]] = []
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            known = self.pending.get(seq)
            if known is not None:  # redelivered to our new consumer: ack through it
                known.reply = msg.reply
                continue
            try:
                event = (
                    decode_replay(msg.data) if is_replay(msg.headers) else decode_event(msg.data)
                )
            except (ValueError, KeyError, TypeError) as exc:
                log.error(
                    "broker_event_undecodable",
                    partition=n,
                    stream_seq=seq,
                    error=f"{type(exc).__name__}: {exc}"[:200],
                )
                await msg.term()
                continue
            fresh.append((seq, msg, event))
        if not fresh:
            return
        revision = max(config_revision(msg.headers) for _, msg, _ in fresh)
        if revision and self._config_applied is not None:  # route with the sender's config
            await self._config_applied(revision)
        await self._load_customers(n, [e for _, _, e in fresh])
        run: list[tuple[int, Msg, AntavoEvent]] = []
        for seq, msg, event in fresh:
            if isinstance(event, Replayable):  # in stream order with the events around it
                await self._ingest(n, run)
                run = []
                await self._requeue(n, seq, msg, event)
            elif event.action in PROFILE_ACTIONS and event.data and not event.external_id:
                await self._ingest(n, run)
                run = []
                await self._ingest(n, [(seq, msg, event)], snapshot=True)
            else:
                run.append((seq, msg, event))
        await self._ingest(n, run)

    def _track(self, entry: Pending) -> None:
        self.pending[entry.seq] = entry
        self._by_customer.setdefault(entry.customer, []).append(entry.seq)

    def _untrack(self, entry: Pending) -> None:
        self.pending.pop(entry.seq, None)
        lane = self._by_customer.get(entry.customer)
        if lane is not None:
            with contextlib.suppress(ValueError):
                lane.remove(entry.seq)
            if not lane:
                del self._by_customer[entry.customer]

    async def _requeue(self, n: int, seq: int, msg: Msg, item: Replayable) -> None:
        """Queues a replayed dead letter at the end of its customer's lane, tracked (and
        acked once settled) like an event; dropped with the partition like one."""
        entry = Pending(seq, msg.reply, item.event_id, item.customer_id, n, queued=False)
        entry.replay = True
        self._track(entry)
        try:
            await self._ingestor.requeue(item.items(time.time()))
        except asyncio.CancelledError:
            raise  # fenced: the entry stays for _drop
        except BaseException:
            self._untrack(entry)  # not queued: the redelivery is queued afresh
            raise
        entry.queued = True
        self._recheck = True

    async def _ingest(
        self, n: int, items: list[tuple[int, Msg, AntavoEvent]], snapshot: bool = False
    ) -> None:
        if not items:
            return
        # Pending before the ingest starts: a fence that cancels this task mid-ingest must
        # still find these events, since the ingest's transaction commits all the same
        # (on the database thread), and its items must leave the local queue unsent.
        # Found by the partition trials: items of a cancelled ingest were sent after the
        # partition's earlier events had been dropped, reordering the customer.
        entries = []
        for seq, msg, event in items:
            entry = Pending(seq, msg.reply, event.id, event.customer, n, queued=False)
            self._track(entry)
            entries.append(entry)
        try:
            while True:
                try:
                    await self._ingestor.ingest([event for _, _, event in items])
                    break
                except BacklogFullError:  # the local backlog is full: wait, keep them unacked
                    await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            raise  # fenced: the entries stay for _drop
        except BaseException:
            for entry in entries:  # not ingested: the redelivery is ingested afresh
                self._untrack(entry)
            raise
        profile = None
        if snapshot:
            customer = items[0][2].customer
            profile = orjson.dumps(await self._db.read(lambda c: load_profile(c, customer)))
        for entry in entries:
            entry.profile, entry.queued = profile, True
        self._recheck = True  # an event routed to no item (or a duplicate) is settled now

    async def _load_customers(self, n: int, events: Sequence[AntavoEvent | Replayable]) -> None:
        """For each customer met for the first time in this ownership: replaces the local
        profile with the cluster's (none there: no local one either), and adds the
        customer's re-send marks from the cluster to the local ones. Reads
        ``LOAD_CONCURRENCY`` customers at a time, then writes them in one transaction."""
        wanted: dict[str, bool] = {}  # customer -> whether its profile follows it
        for event in events:
            customer = event.customer_id if isinstance(event, Replayable) else event.customer
            if customer not in self._fresh:
                wanted[customer] = wanted.get(customer, False) or bool(customer_of(event))
        if not wanted:
            return
        customers = list(wanted)
        loaded: list[tuple[bytes | None, Marks]] = []
        for start in range(0, len(customers), LOAD_CONCURRENCY):
            loaded += await asyncio.gather(
                *(
                    self._load_customer(c, wanted[c])
                    for c in customers[start : start + LOAD_CONCURRENCY]
                )
            )
        now = time.time()

        def put(c: sqlite3.Connection) -> None:
            for customer, (profile, marks) in zip(customers, loaded, strict=True):
                if wanted[customer] and profile:
                    c.execute(
                        "INSERT OR REPLACE INTO profiles (customer_id, attributes, update_time)"
                        " VALUES (?,?,?)",
                        (customer, profile.decode(), now),
                    )
                elif wanted[customer]:
                    c.execute("DELETE FROM profiles WHERE customer_id = ?", (customer,))
                if marks:
                    merge_into_seen(c, marks)

        await self._db.write(put)
        for customer in customers:
            self._fresh[customer] = n

    async def _load_customer(self, customer: str, with_profile: bool) -> tuple[bytes | None, Marks]:
        profiles, marks = self._profiles, self._marks
        assert profiles is not None and marks is not None

        async def profile() -> bytes | None:
            if not with_profile:
                return None
            try:
                entry = await retrying(
                    functools.partial(profiles.get, customer_token(customer)),
                    "reading a profile",
                    30.0,
                )
            except nats.js.errors.NotFoundError:
                return None
            return entry.value

        found = await asyncio.gather(
            profile(),
            retrying(functools.partial(marks.load, customer), "reading re-send marks", 30.0),
        )
        return found[0], found[1]

    # -- acknowledging -------------------------------------------------------------------

    async def _ack_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(ACK_INTERVAL)
            try:
                await self._fence_overdue()
                await self._ack_settled()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("broker_ack_round_failed", error=f"{type(exc).__name__}: {exc}"[:200])

    async def _ack_settled(self) -> None:
        """Acks, per customer in stream order, the events no queue item is left of. Reads
        the queue only when something can have settled since the last read: the queue's
        depth moved (a settle, an erasure), events were pulled, a profile write failed, or
        ``ACK_RECHECK`` passed; a lane held by a retry costs no read per round."""
        async with self._ack_lock:  # the ack loop and a hand-back: one at a time
            await self._ack_round()

    async def _ack_round(self) -> None:
        if not self.pending:
            return
        depth, now = self._queue.depth, time.monotonic()
        if (
            not self._recheck
            and depth == self._checked_depth
            and now - self._checked_at < ACK_RECHECK
        ):
            return
        self._recheck, self._checked_depth, self._checked_at = False, depth, now
        # Only events whose items were committed before the read below can be judged by
        # it: the profile writes further down await, and an ingest that commits meanwhile
        # adds events this read never saw (not in ``queued``, yet not settled).
        known = {seq for seq, entry in self.pending.items() if entry.queued}
        # The whole column, made a set here: cheaper than DISTINCT's temporary b-tree, and
        # than probing an index for each pending event (measured; no index either).
        queued: set[str] = set(
            await self._db.read(
                lambda c: [row[0] for row in c.execute("SELECT event_id FROM queue")]
            )
        )
        profiles = self._profiles
        assert profiles is not None and self._marks is not None
        now_wall = time.time()
        for customer, seqs in list(self._by_customer.items()):
            done = 0
            profile = None
            for seq in seqs:
                entry = self.pending.get(seq)
                if entry is None or seq not in known or entry.event_id in queued:
                    break
                if entry.profile is not None:
                    profile = entry.profile
                done += 1
            if not done:
                continue
            if profile is not None:
                try:
                    await profiles.put(customer_token(customer), profile)
                except (*TRANSIENT, nats.js.errors.APIError):
                    self._recheck = True
                    continue  # not acked: tried again next round
            acked: list[str] = []
            for seq in seqs[:done]:
                entry = self.pending.pop(seq, None)
                if entry is not None:
                    with contextlib.suppress(*TRANSIENT):
                        await self._nc.publish(entry.reply)  # an empty payload acks
                    self.acked += 1
                    if not entry.replay:
                        acked.append(entry.event_id)
            self._marks.note(customer, acked, now_wall)
            del seqs[:done]
            if not seqs:
                self._by_customer.pop(customer, None)
