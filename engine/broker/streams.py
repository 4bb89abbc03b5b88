"""The JetStream layout: the partitioned event stream ``TG_EVENTS`` and the key-value
buckets for partition leases and customer profiles, created idempotently (retried while
the cluster elects), and the broker settings ``serve --broker`` validates.

Subjects: ingest publishes each event to ``tg.in.<customer token>``; the stream's subject
transform stores it as ``tg.p.<partition>.<customer token>``, where the server hashes the
token into one of P partitions (``{{partition(P,1)}}``), so a customer always lands in one
partition. The token is a hash of the customer id (hex), never the id itself: an id may
hold characters a subject token cannot, and the subject is visible to every operator.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.kv import KeyValue

from engine.errors import TidegateError

STREAM = "TG_EVENTS"
SUBJECT_PREFIX = "tg.in"
PARTITIONED_PREFIX = "tg.p"
PARTITIONS_METADATA = "tidegate_partitions"
DEFAULT_PARTITIONS = 16
DEFAULT_DUPLICATE_WINDOW = 600.0
"""Seconds within which JetStream stores a re-published ``Nats-Msg-Id`` once (10 min: well
past a publisher's retries and Antavo's first re-sends)."""
DEFAULT_MAX_BYTES = 1 << 30
"""The stream's size limit: past it ``discard=new`` refuses publishes (ingest answers
503) instead of dropping the oldest undelivered events."""
LEASES_BUCKET = "tg_leases"
PROFILES_BUCKET = "tg_profiles"
MARKS_BUCKET = "tg_marks"
DEFAULT_LEASE_TTL = 10.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_PUBLISH_TIMEOUT = 5.0
SETUP_TIMEOUT = 30.0
PING_INTERVAL = 2
MAX_OUTSTANDING_PINGS = 2
"""A server that stops answering without closing the socket (frozen, partitioned away)
is given up after at most (MAX_OUTSTANDING_PINGS + 1) x PING_INTERVAL = 6 s, and the
client reconnects to another: well within the lease's fencing time (0.6 x 10 s). The
client's default (2 minutes, 2 pings) left an ingest process answering 503 for minutes."""

ERR_NO_SUITABLE_PEERS = 10005
ERR_STREAM_NOT_FOUND = 10059

_SERVER_URL = re.compile(r"(nats|tls)://[A-Za-z0-9.\-]{1,253}:[0-9]{1,5}")
_SAFE_MSG_ID = re.compile(r"[A-Za-z0-9._:@\-]{1,128}")

T = TypeVar("T")


class BrokerError(TidegateError):
    """The broker is misconfigured or unreachable; the message names what to fix."""


def _echo(text: str, limit: int = 100) -> str:
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text) - limit} more characters)"


def parse_servers(value: str) -> list[str]:
    """``nats://h:p[,nats://h:p...]`` into a list; a clear error for anything else."""
    servers = [part.strip() for part in value.split(",") if part.strip()]
    if not servers:
        raise BrokerError("--broker: give one or more URLs, e.g. nats://127.0.0.1:4222")
    for server in servers:
        if not _SERVER_URL.fullmatch(server) or not 0 < (urlsplit(server).port or 0) < 65536:
            raise BrokerError(
                f"--broker: {_echo(server)} is not a broker URL; write nats://HOST:PORT"
                " (several separated by commas)"
            )
    return servers


def customer_token(customer: str) -> str:
    """The subject token of a customer: 32 hex digits of the SHA-256 of its id."""
    return hashlib.sha256(customer.encode()).hexdigest()[:32]


def event_subject(customer: str) -> str:
    return f"{SUBJECT_PREFIX}.{customer_token(customer)}"


def partition_filter(partition: int) -> str:
    return f"{PARTITIONED_PREFIX}.{partition}.*"


def message_id(event_id: str) -> str:
    """``Nats-Msg-Id`` of an event: its id when that is a short plain token, else a hash
    of it (an Antavo id is user input; a header carries no control characters)."""
    if _SAFE_MSG_ID.fullmatch(event_id):
        return event_id
    return "h:" + hashlib.sha256(event_id.encode()).hexdigest()


@dataclass(frozen=True)
class BrokerSettings:
    servers: tuple[str, ...]
    partitions: int = DEFAULT_PARTITIONS
    replicas: int | None = None
    """None: 3 when the cluster has 3 or more servers, else 1."""
    max_bytes: int = DEFAULT_MAX_BYTES
    duplicate_window: float = DEFAULT_DUPLICATE_WINDOW
    lease_ttl: float = DEFAULT_LEASE_TTL
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    publish_timeout: float = DEFAULT_PUBLISH_TIMEOUT

    def check(self) -> None:
        if not 1 <= self.partitions <= 1024:
            raise BrokerError(f"--partitions: {self.partitions} is not between 1 and 1024")


async def connect(settings: BrokerSettings, name: str) -> NATS:
    """A connection that reconnects for ever once made; a clear error when no server of
    ``settings.servers`` answers within ``connect_timeout``."""
    errors: list[str] = []

    async def note(exc: Exception) -> None:
        if len(errors) < 3:
            errors.append(f"{type(exc).__name__}: {str(exc)[:100]}")

    try:
        async with asyncio.timeout(settings.connect_timeout):
            return await nats.connect(
                servers=list(settings.servers),
                name=name,
                connect_timeout=min(2.0, settings.connect_timeout),
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                ping_interval=PING_INTERVAL,
                max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                error_cb=note,
            )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        detail = "; ".join(errors) or f"{type(exc).__name__}: {str(exc)[:100]}"
        raise BrokerError(
            f"no NATS server of {', '.join(settings.servers)} answered within"
            f" {settings.connect_timeout:g} s ({detail}); check --broker and that the cluster runs"
        ) from None


def replicas_for(nc: NATS, settings: BrokerSettings) -> int:
    if settings.replicas is not None:
        return settings.replicas
    known = {(u.hostname, u.port) for u in [*nc.servers, *nc.discovered_servers]}
    return 3 if len(known) >= 3 else 1


async def retrying(call: Callable[[], Awaitable[T]], what: str, within: float) -> T:
    """``call`` again while the cluster elects (no suitable peers, timeouts, no
    responders), until ``within`` seconds have passed."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except nats.js.errors.APIError as exc:
            if getattr(exc, "err_code", None) != ERR_NO_SUITABLE_PEERS and not isinstance(
                exc, nats.js.errors.ServiceUnavailableError
            ):
                raise
            last: Exception = exc
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            last = exc
        except nats.js.errors.NoStreamResponseError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise BrokerError(
                f"{what}: the JetStream cluster did not answer within {within:g} s"
                f" ({type(last).__name__}: {str(last)[:100]}); check that a quorum of its"
                " servers runs"
            )
        await asyncio.sleep(0.25)


def stream_config(settings: BrokerSettings, replicas: int) -> js_api.StreamConfig:
    p = settings.partitions
    return js_api.StreamConfig(
        name=STREAM,
        description="Tidegate: Antavo events, partitioned by customer",
        subjects=[f"{SUBJECT_PREFIX}.*"],
        subject_transform=js_api.SubjectTransform(
            src=f"{SUBJECT_PREFIX}.*",
            dest=f"{PARTITIONED_PREFIX}.{{{{partition({p},1)}}}}.{{{{wildcard(1)}}}}",
        ),
        retention=js_api.RetentionPolicy.WORK_QUEUE,
        storage=js_api.StorageType.FILE,
        num_replicas=replicas,
        discard=js_api.DiscardPolicy.NEW,
        max_bytes=settings.max_bytes,
        duplicate_window=settings.duplicate_window,
        metadata={PARTITIONS_METADATA: str(p)},
    )


async def ensure_stream(js: JetStreamContext, settings: BrokerSettings, replicas: int) -> None:
    """Creates ``TG_EVENTS``, or checks that the existing one has the same partition
    count: a different P would move customers between partitions (and reorder them)."""

    async def create() -> None:
        try:
            info = await js.stream_info(STREAM)
        except nats.js.errors.NotFoundError:
            await js.add_stream(stream_config(settings, replicas))
            return
        recorded = (info.config.metadata or {}).get(PARTITIONS_METADATA)
        if recorded != str(settings.partitions):
            raise BrokerError(
                f"stream {STREAM} was created with {recorded} partitions, this process was"
                f" started with --partitions {settings.partitions}; start every process with"
                f" --partitions {recorded} (changing it needs the stream drained and deleted)"
            )

    await retrying(create, f"creating stream {STREAM}", SETUP_TIMEOUT)


async def lease_bucket(js: JetStreamContext, settings: BrokerSettings, replicas: int) -> KeyValue:
    """Partition leases (and worker heartbeats): keys expire ``lease_ttl`` after their
    last write."""
    config = js_api.KeyValueConfig(
        bucket=LEASES_BUCKET, ttl=settings.lease_ttl, history=1, replicas=replicas
    )
    return await retrying(lambda: _bucket(js, config), "creating the lease bucket", SETUP_TIMEOUT)


async def profile_bucket(js: JetStreamContext, replicas: int) -> KeyValue:
    """Customer profiles by customer token, as of each customer's acknowledged events."""
    config = js_api.KeyValueConfig(bucket=PROFILES_BUCKET, history=1, replicas=replicas)
    return await retrying(lambda: _bucket(js, config), "creating the profile bucket", SETUP_TIMEOUT)


async def marks_bucket(js: JetStreamContext, replicas: int, ttl: float) -> KeyValue:
    """Re-send marks by customer token (``engine.broker.marks``); a customer's entry
    expires ``ttl`` after its last write."""
    config = js_api.KeyValueConfig(bucket=MARKS_BUCKET, history=1, ttl=ttl, replicas=replicas)
    return await retrying(lambda: _bucket(js, config), "creating the marks bucket", SETUP_TIMEOUT)


async def _bucket(js: JetStreamContext, config: js_api.KeyValueConfig) -> KeyValue:
    try:
        return await js.key_value(config.bucket)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(config)
