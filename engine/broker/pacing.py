"""429 pacing per connection across the cluster's workers, through the ``tg_pace``
key-value bucket.

When a worker's lane gets a 429 (``Deliverer.on_pace``), this process puts the lane's pace
under the connection's key (``p.<32 hex digits of the SHA-256 of its id>``):
``{"hold_until": epoch seconds, "interval": seconds}``. Every worker watches the bucket and
merges what it gets into its own lane (``Deliverer.merge_pace``): no request before the
later hold, at the longer interval. So a ``Retry-After`` one worker was told holds all of
them. Entries expire ``PACE_TTL`` after their last write (the bucket's TTL); a hold is an
absolute time, so the processes' clocks must agree (NTP), as for the leases.

Pacing is advice, not state: a put that fails is logged (``pace_share_failed``) and not
retried; the other workers then learn of the 429 from their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib

import nats.errors
import orjson
import structlog
from nats.aio.client import Client as NATS
from nats.js import api as js_api
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from engine.broker.streams import SETUP_TIMEOUT, _bucket, retrying
from engine.delivery.pace import MAX_INTERVAL, Pace
from engine.delivery.worker import Deliverer
from engine.state.connections import ConnectionRegistry

log = structlog.get_logger("tidegate.broker")

PACE_BUCKET = "tg_pace"
PACE_TTL = 6 * MAX_INTERVAL
"""Seconds an entry lives after its last write: a few of the longest intervals."""
PUT_TIMEOUT = 2.0
WATCH_POLL = 1.0


def pace_key(connection_id: str) -> str:
    return "p." + hashlib.sha256(connection_id.encode()).hexdigest()[:32]


class PaceSync:
    """Shares each 429's pace with the cluster and merges the others'."""

    def __init__(
        self, nc: NATS, deliverer: Deliverer, registry: ConnectionRegistry, replicas: int
    ) -> None:
        self._js = nc.jetstream()
        self._deliverer = deliverer
        self._registry = registry
        self._replicas = replicas
        self._kv: KeyValue | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._task: asyncio.Task[None] | None = None
        self._puts: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def start(self) -> None:
        config = js_api.KeyValueConfig(
            bucket=PACE_BUCKET, history=1, ttl=PACE_TTL, replicas=self._replicas
        )
        self._kv = kv = await retrying(
            lambda: _bucket(self._js, config), "creating the pace bucket", SETUP_TIMEOUT
        )
        self._watcher = await retrying(lambda: kv.watch("p.>"), "watching paces", SETUP_TIMEOUT)
        self._task = asyncio.create_task(self._watch())
        self._deliverer.on_pace = self.share

    async def stop(self) -> None:
        self._stopping = True
        self._deliverer.on_pace = None
        for task in [t for t in [self._task, *self._puts] if t is not None]:
            while not task.done():  # nats-py's watcher swallows a cancellation at times
                task.cancel()
                await asyncio.wait([task], timeout=1.0)
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._watcher.stop(), 2.0)  # type: ignore[no-untyped-call]
            await asyncio.sleep(0)  # its heartbeat task, cancelled, ends before the loop does

    def share(self, connection_id: str, pace: Pace) -> None:
        """``Deliverer.on_pace``: puts the pace in the background (a lane never waits)."""
        if self._stopping or self._kv is None:
            return
        value = orjson.dumps({"hold_until": pace.hold_until, "interval": pace.interval})
        task = asyncio.create_task(self._put(connection_id, value))
        self._puts.add(task)
        task.add_done_callback(self._puts.discard)

    async def _put(self, connection_id: str, value: bytes) -> None:
        kv = self._kv
        assert kv is not None
        try:
            await asyncio.wait_for(kv.put(pace_key(connection_id), value), PUT_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "pace_share_failed",
                connection=connection_id,
                error=f"{type(exc).__name__}: {exc}"[:200],
            )

    async def _watch(self) -> None:
        watcher = self._watcher
        assert watcher is not None
        while not self._stopping:
            try:
                entry = await watcher.updates(timeout=WATCH_POLL)  # type: ignore[no-untyped-call]
            except nats.errors.TimeoutError:
                continue
            if entry is None or entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                continue
            try:
                self._merge(entry.key, entry.value)
            except (ValueError, KeyError, TypeError) as exc:
                log.error("pace_undecodable", key=entry.key, error=f"{type(exc).__name__}"[:100])

    def _merge(self, key: str, value: bytes) -> None:
        for connection in self._registry.runtimes():
            if pace_key(connection.id) == key:
                pace = orjson.loads(value)
                hold_until, interval = float(pace["hold_until"]), float(pace["interval"])
                self._deliverer.merge_pace(connection.id, hold_until, interval)
                return
