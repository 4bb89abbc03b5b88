"""The ingest role on JetStream: the HTTP/gRPC ingest validates exactly as the embedded
engine does, then this ``Ingestor`` publishes each event to ``TG_EVENTS`` instead of
queueing it locally, and returns only when every PubAck came back: with
``sync_interval: always`` and R3, a PubAck means a quorum of servers has the event on disk.

Each event carries ``Nats-Msg-Id`` (its Antavo id, or the content hash the embedded ingest
uses for an event without one), so a retried publish or an Antavo re-send within the
stream's duplicate window is stored once; the answer counts those as duplicates. Where the
events are routed (and so ``deliveries_queued``) is decided by the worker that owns the
customer's partition, later: the answer reports 0 for it.

A full stream (``discard=new`` past ``max_bytes``), or no quorum within the publish timeout,
raises a ``BacklogFullError`` subclass: ingest answers 503 with ``Retry-After`` and the
sender retries the same events, which the duplicate window then stores once.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import nats.errors
import nats.js.errors
import orjson
import structlog
from nats.js import JetStreamContext
from nats.js import api as js_api

from engine.broker.streams import BrokerSettings, event_subject, message_id
from engine.connector.records import AntavoEvent
from engine.errors import BacklogFullError
from engine.ingest.ingestor import Ingestor, IngestResult
from engine.queue.lanes import DurableQueue
from engine.state.connections import ConnectionRegistry
from engine.state.database import Database

log = structlog.get_logger("tidegate.broker")

RETRY_AFTER = 5
PIPELINE = 2000
"""Publishes in flight at a time for one request."""
REVISION_HEADER = "Tg-Config-Revision"
"""The configuration revision (``ConfigSync.stamp``) the ingesting process had applied: the
worker applies at least that much before it routes the event."""
_REVISION = re.compile(r"[0-9]{1,18}")
ERR_STORE_FAILED = 10077
"""nats-server's JSStreamStoreFailedF: ``maximum bytes exceeded`` on a ``discard=new``
stream past its ``max_bytes``."""


class BrokerUnavailableError(BacklogFullError):
    """The stream refused the events (full) or no quorum answered in time: nothing is
    acknowledged; the sender retries later (503, ``Retry-After``)."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER) -> None:
        Exception.__init__(self, message)
        self.retry_after = retry_after


def encode_event(event: AntavoEvent) -> bytes:
    """The parsed event as JSON, as the worker decodes it (``decode_event``)."""
    return orjson.dumps(
        {
            "id": event.id,
            "customer": event.customer,
            "action": event.action,
            "data": event.data,
            "timestamp": event.timestamp.isoformat(),
            "external_id": event.external_id,
            "account": event.account,
        }
    )


def config_revision(headers: dict[str, str] | None) -> int:
    """The ``Tg-Config-Revision`` of a pulled event; 0 for none (or an unreadable one)."""
    value = (headers or {}).get(REVISION_HEADER, "")
    return int(value) if _REVISION.fullmatch(value) else 0


def decode_event(payload: bytes) -> AntavoEvent:
    raw: dict[str, Any] = orjson.loads(payload)
    return AntavoEvent(
        id=raw["id"],
        customer=raw["customer"],
        action=raw["action"],
        data=raw["data"],
        timestamp=datetime.fromisoformat(raw["timestamp"]),
        external_id=raw.get("external_id", ""),
        account=raw.get("account", ""),
    )


class BrokerIngestor(Ingestor):
    """An ``Ingestor`` whose ``ingest`` publishes to JetStream. The catalog of names seen
    in traffic (``seen_names``) stays the local database's."""

    def __init__(
        self,
        db: Database,
        registry: ConnectionRegistry,
        queue: DurableQueue,
        js: JetStreamContext,
        settings: BrokerSettings,
        config_revision: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(db, registry, queue)
        self._js = js
        self._timeout = settings.publish_timeout
        self._config_revision = config_revision

    async def ingest(self, events: Sequence[AntavoEvent]) -> IngestResult:
        revision = (
            {} if self._config_revision is None else {REVISION_HEADER: str(self._config_revision())}
        )
        pending = {
            i: (
                event_subject(e.customer),
                encode_event(e),
                {"Nats-Msg-Id": message_id(e.id), **revision},
            )
            for i, e in enumerate(events)
        }
        acks: dict[int, js_api.PubAck] = {}
        deadline = time.monotonic() + self._timeout
        last_error = ""
        while pending:
            # Concurrent requests, pipelined over the one connection. Not publish_async:
            # in nats-py 2.16.0 its reply handler raises on an error reply (a full stream)
            # instead of failing the future, which then never resolves.
            order = list(pending)
            remaining = max(0.05, deadline - time.monotonic())
            results: list[js_api.PubAck | BaseException] = []
            for start in range(0, len(order), PIPELINE):
                results += await asyncio.gather(
                    *(
                        self._js.publish(
                            pending[i][0], pending[i][1], timeout=remaining, headers=pending[i][2]
                        )
                        for i in order[start : start + PIPELINE]
                    ),
                    return_exceptions=True,
                )
            for i, result in zip(order, results, strict=True):
                if isinstance(result, js_api.PubAck):
                    acks[i] = result
                    del pending[i]
                elif isinstance(result, nats.js.errors.APIError) and (
                    result.err_code == ERR_STORE_FAILED
                ):
                    raise BrokerUnavailableError(
                        f"the event stream is full ({str(result.description)[:100]}); nothing"
                        f" of this request was acknowledged: retry in {RETRY_AFTER} s"
                    )
                elif isinstance(result, Exception):
                    last_error = f"{type(result).__name__}: {str(result)[:100]}"
                else:  # a cancellation or an interpreter exit: not ours to absorb
                    raise result
            if pending and time.monotonic() >= deadline:
                log.warning("broker_publish_timeout", unacknowledged=len(pending), error=last_error)
                raise BrokerUnavailableError(
                    f"the broker did not store {len(pending)} of {len(events)} events within"
                    f" {self._timeout:g} s (no quorum: {last_error}); retry in {RETRY_AFTER} s"
                )
            if pending:
                await asyncio.sleep(0.05)  # an election: publish again with the same ids
        duplicates = sum(1 for ack in acks.values() if ack.duplicate)
        return IngestResult(len(events) - duplicates, duplicates, 0)
