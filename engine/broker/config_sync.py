"""Cluster-wide configuration on JetStream: every process of a cluster keeps the same
connections and mappings, through the ``tg_config`` key-value bucket.

Keys. One per connection, ``c.<32 hex digits of the SHA-256 of its id>`` (an id may hold
characters a key cannot); the value is the connection's rows as stored in SQLite (the
``connections`` row, the API key still encrypted, its state, and its profile and event
mapping rows), encoded canonically (orjson, sorted keys). A deleted connection is a KV
delete. ``k.check`` holds a token of a fixed text encrypted under the secret key of the
process that created the bucket: a process whose key cannot read it refuses to start.

Publish. On a change of connection X (``ConnectionRegistry.on_change``) this process reads
X's rows, and puts them unless they are the bytes last seen for X's key. The admin call
that made the change returns after the put, so when it answers, the bucket holds the
change. A put that fails (no quorum within 5 s) is logged (``config_publish_failed``) and
tried again in the background, with the rows as they are then, until it lands. Puts go
one at a time, each conditional on the revision of X's key this process last saw or
wrote: a write made from older rows (a lane's 401 pause decided on credentials another
process has just replaced, or two processes changing X at once) is refused by the server
and dropped (``config_change_superseded``); the watcher then brings the newer rows here.

Apply. A watcher on ``c.>`` gets every key's last value at start, then each change. This
process's own writes are skipped (its rows are here already, maybe changed again since).
For each other, if the bytes equal this process's own encoding of X, nothing happens (so
a change does not bounce between processes); else X's rows are replaced in one transaction and X
reloaded, which tells every listener (delivery lanes, ingest routing). A connection whose
connector is not installed here is refused with a log line (``config_connector_missing``);
the watcher goes on. ``start`` returns once the initial values are applied, so a fresh
process never routes with an empty configuration; connections of this data folder that the
bucket has never held are then published (the first process of a cluster seeds it).

Revision. ``applied`` is the bucket revision the watcher has reached; ``stamp`` also counts
this process's own puts. Ingest stamps each event with it (``Tg-Config-Revision``) and a
worker waits (``wait_for``, at most 5 s) until it has applied that revision before it
routes the event: an event ingested after a mapping change is sent with that mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Mapping
from typing import Any

import nats.errors
import nats.js.errors
import orjson
import structlog
from nats.aio.client import Client as NATS
from nats.js import api as js_api
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from engine.broker.streams import SETUP_TIMEOUT, BrokerError, _bucket, retrying
from engine.errors import InvalidInputError, TidegateError
from engine.state.connections import ConnectionRegistry
from engine.state.secrets import SECRET_KEY_ENV

log = structlog.get_logger("tidegate.broker")

CONFIG_BUCKET = "tg_config"
KEY_CHECK = "k.check"
KEY_CHECK_TEXT = "tidegate: every process of a cluster shares one secret key"
PUBLISH_TIMEOUT = 5.0
RETRY_INTERVAL = 1.0
REVISION_WAIT = 5.0
"""Longest a worker waits for the configuration revision an event was ingested under."""
WATCH_POLL = 1.0
EXPECTED_LAST = str(js_api.Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value)
WRONG_LAST_SEQUENCE = (10071, 10164)
"""nats-server's error codes for a conditional write whose expected revision has passed."""

_ABSENT: Any = object()
"""A key this process has not seen in the bucket (a deleted key is seen as None)."""


def connection_key(connection_id: str) -> str:
    """The bucket key of a connection: ``c.`` and 32 hex digits of its id's SHA-256."""
    return "c." + hashlib.sha256(connection_id.encode()).hexdigest()[:32]


def encode(document: Mapping[str, object] | None) -> bytes | None:
    """The canonical bytes of a connection's document (None: no connection)."""
    if document is None:
        return None
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


class ConfigSync:
    """Keeps this process's connections and mappings the same as the cluster's. Call
    ``start`` once the registry is loaded (it returns after the initial values are
    applied), ``stop`` before the connection closes."""

    def __init__(
        self,
        nc: NATS,
        registry: ConnectionRegistry,
        replicas: int,
        revision_wait: float = REVISION_WAIT,
    ) -> None:
        self._js = nc.jetstream()
        self._registry = registry
        self._replicas = replicas
        self.revision_wait = revision_wait
        self._kv: KeyValue | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._task: asyncio.Task[None] | None = None
        self._retries: dict[str, asyncio.Task[None]] = {}
        self._last: dict[str, bytes | None] = {}
        self._ids: dict[str, str] = {}
        self._revisions: dict[str, int] = {}
        """The last revision of each key this process saw or wrote (0: none)."""
        self._pending: dict[str, bytes | None] = {}
        """What this process is writing to a key right now."""
        self._writing = asyncio.Lock()
        self._advanced = asyncio.Condition()
        self._stopping = False
        self.applied = 0
        """The bucket revision the watcher has reached (every change up to it is applied)."""
        self._own = 0

    def stamp(self) -> int:
        """The revision an event ingested now is stamped with: what the watcher applied,
        or this process's own last put if later."""
        return max(self.applied, self._own)

    async def start(self) -> None:
        config = js_api.KeyValueConfig(bucket=CONFIG_BUCKET, history=1, replicas=self._replicas)
        self._kv = kv = await retrying(
            lambda: _bucket(self._js, config), "creating the configuration bucket", SETUP_TIMEOUT
        )
        await retrying(self._check_key, "checking the secret key", SETUP_TIMEOUT)
        self._watcher = watcher = await retrying(
            lambda: kv.watch("c.>"), "watching the configuration", SETUP_TIMEOUT
        )
        initial = 0
        while True:
            try:
                entry = await watcher.updates(timeout=SETUP_TIMEOUT)  # type: ignore[no-untyped-call]
            except nats.errors.TimeoutError:
                raise BrokerError(
                    f"the configuration bucket {CONFIG_BUCKET} did not deliver its values within"
                    f" {SETUP_TIMEOUT:g} s; check that a quorum of the cluster's servers runs"
                ) from None
            if entry is None:  # nats-py marks the end of the initial values so
                break
            await self._apply(entry, notify=False)
            initial += 1
        seeded = 0
        for view in self._registry.views():
            if connection_key(view.id) not in self._last:
                await self._publish(view.id)
                seeded += 1
        self._registry.on_change(self._publish)
        self._task = asyncio.create_task(self._watch())
        log.info("config_sync_started", revision=self.applied, values=initial, seeded=seeded)

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for t in [self._task, *self._retries.values()] if t is not None]
        for task in tasks:
            while not task.done():  # nats-py's watcher swallows a cancellation at times
                task.cancel()
                await asyncio.wait([task], timeout=1.0)
        self._retries.clear()
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._watcher.stop(), 2.0)  # type: ignore[no-untyped-call]
            await asyncio.sleep(0)  # its heartbeat task, cancelled, ends before the loop does

    async def wait_for(self, revision: int) -> None:
        """Returns once the watcher applied ``revision``, or after ``revision_wait``
        seconds (logged: ``config_revision_wait_timeout``)."""
        if self.applied >= revision:
            return
        try:
            async with asyncio.timeout(self.revision_wait), self._advanced:
                await self._advanced.wait_for(lambda: self.applied >= revision)
        except TimeoutError:
            log.warning(
                "config_revision_wait_timeout",
                revision=revision,
                applied=self.applied,
                seconds=self.revision_wait,
            )

    # -- the secret key ----------------------------------------------------------------------

    async def _check_key(self) -> None:
        kv = self._kv
        assert kv is not None
        box = self._registry.secrets
        try:
            token = (await kv.get(KEY_CHECK)).value or b""
        except nats.js.errors.KeyNotFoundError:
            try:
                await kv.create(KEY_CHECK, box.encrypt(KEY_CHECK_TEXT))
                return
            except nats.js.errors.KeyWrongLastSequenceError:  # another process was first
                token = (await kv.get(KEY_CHECK)).value or b""
        try:
            readable = box.decrypt(token) == KEY_CHECK_TEXT
        except TidegateError:
            readable = False
        if not readable:
            raise BrokerError(
                "this process's secret key is not the one the cluster's configuration was"
                f" encrypted with (bucket {CONFIG_BUCKET}), so it could not read the API keys"
                f" of the connections: set {SECRET_KEY_ENV} to the same key on every process"
                " of the cluster (without it, each data folder makes a secret.key of its own)"
            )

    # -- apply -------------------------------------------------------------------------------

    async def _watch(self) -> None:
        watcher = self._watcher
        assert watcher is not None
        while not self._stopping:
            try:
                entry = await watcher.updates(timeout=WATCH_POLL)  # type: ignore[no-untyped-call]
            except nats.errors.TimeoutError:
                continue
            if entry is None:
                continue
            try:
                await self._apply(entry)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one bad value must not end the watch
                log.error("config_apply_failed", key=entry.key, error=_short(exc))

    async def _apply(self, entry: KeyValue.Entry, notify: bool = True) -> None:
        try:
            await self._apply_entry(entry, notify)
        finally:
            async with self._advanced:
                self.applied = max(self.applied, entry.revision or 0)
                self._advanced.notify_all()

    async def _apply_entry(self, entry: KeyValue.Entry, notify: bool) -> None:
        key = entry.key
        value = None if entry.operation in (KV_DEL, KV_PURGE) else (entry.value or b"")
        revision = entry.revision or 0
        if revision <= self._revisions.get(key, 0) or self._pending.get(key, _ABSENT) == value:
            # This process's own write (done, or on its way): its rows are here already,
            # maybe changed again since; applying it would take them back.
            if revision > self._revisions.get(key, 0):
                self._revisions[key], self._last[key] = revision, value
            return
        # The bytes count as seen at once (the listeners this apply tells publish nothing
        # back); the revision only once the rows are here: until then a write of this
        # process made from the earlier rows (a lane's pause) is conditional on the earlier
        # revision, so it cannot overwrite this change.
        self._last[key] = value
        try:
            await self._replace(key, value, revision, notify)
        finally:
            self._revisions[key] = max(self._revisions.get(key, 0), revision)

    async def _replace(self, key: str, value: bytes | None, revision: int, notify: bool) -> None:
        deleted = value is None
        document: dict[str, Any] | None = None
        if value is None:
            connection_id = self._ids.get(key) or self._local_id(key)
            if connection_id is None:
                return  # a connection this process never had
        else:
            document = orjson.loads(value)
            connection_id = str(document["connection"]["id"])
            if connection_key(connection_id) != key:
                log.error("config_value_misplaced", key=key)
                return
            self._ids[key] = connection_id
        if encode(await self._registry.document(connection_id)) == value:
            return
        try:
            await self._registry.replace_from_document(connection_id, document, notify=notify)
        except InvalidInputError as exc:
            log.error(
                "config_connector_missing",
                connection=connection_id,
                error=exc.message[:200],
                hint="install the connector's plugin on this process as on the others",
            )
            return
        log.info("config_applied", connection=connection_id, revision=revision, deleted=deleted)

    def _local_id(self, key: str) -> str | None:
        for view in self._registry.views():
            if connection_key(view.id) == key:
                return view.id
        return None

    # -- publish -----------------------------------------------------------------------------

    async def _publish(self, connection_id: str) -> None:
        """The registry's listener: puts X's rows (or deletes X's key) unless the bucket
        already holds these bytes; on failure, keeps trying in the background."""
        if self._stopping:
            return
        try:
            await self._put(connection_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error(
                "config_publish_failed",
                connection=connection_id,
                error=_short(exc),
                retrying_every=RETRY_INTERVAL,
            )
            if connection_id not in self._retries:
                self._retries[connection_id] = asyncio.create_task(self._keep_trying(connection_id))

    async def _put(self, connection_id: str) -> None:
        """Writes X's rows to the bucket, on the condition that X's key is still at the
        revision this process last saw: a write made from an older state of X (a 401
        pause of a lane that sent with the credentials another process has just replaced)
        does not overwrite the newer one, which the watcher then applies here too."""
        async with self._writing:  # one at a time: each on the revision the last one made
            await self._put_now(connection_id)

    async def _put_now(self, connection_id: str) -> None:
        key = connection_key(connection_id)
        self._ids[key] = connection_id
        value = encode(await self._registry.document(connection_id))
        last = self._last.get(key, _ABSENT)
        if last == value or (value is None and last is _ABSENT):
            return
        headers = {EXPECTED_LAST: str(self._revisions.get(key, 0))}
        if value is None:
            headers[KV_OP] = KV_DEL
        subject = f"$KV.{CONFIG_BUCKET}.{key}"

        async def write() -> int:
            ack = await self._js.publish(subject, value or b"", headers=headers)
            return int(ack.seq)

        self._pending[key] = value
        try:
            revision = await retrying(write, "publishing a configuration change", PUBLISH_TIMEOUT)
        except nats.js.errors.APIError as exc:
            if exc.err_code not in WRONG_LAST_SEQUENCE:
                raise
            log.warning(
                "config_change_superseded",
                connection=connection_id,
                hint="another process changed this connection first; its change applies here",
            )
            return
        finally:
            self._pending.pop(key, None)
        if revision > self._revisions.get(key, 0):
            self._last[key] = value
            self._revisions[key] = revision
        self._own = max(self._own, revision)

    async def _keep_trying(self, connection_id: str) -> None:
        try:
            while not self._stopping:
                await asyncio.sleep(RETRY_INTERVAL)
                try:
                    await self._put(connection_id)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    continue
                log.info("config_published_late", connection=connection_id)
                return
        finally:
            self._retries.pop(connection_id, None)
