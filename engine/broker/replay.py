"""Dead-letter replay on JetStream: through the event stream, to the customer's owner.

A worker keeps the dead letters it made. Replaying one must not queue it in that worker's
local queue: the customer's partition may belong to another worker by now (which would
then send the customer's newer events while this one sends the replay), and a local item
is lost with the worker's disk. So ``StreamReplay`` publishes each replayed dead letter
to ``TG_EVENTS`` on its customer's subject, marked with the ``Tg-Replay`` header, and
deletes the dead letter only after the PubAck. The partition's owner pulls it in stream
order and queues it as it is (``PartitionWorker``): no re-send check, no routing, only
the dead letter's connection, at the end of the customer's lane, acked once settled like
any event.

``Nats-Msg-Id`` is a hash of the dead letter's connection, id, event and failure time: a
replay published again after a crash between the PubAck and the deletion is stored once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from typing import Any

import orjson
import structlog
from nats.js import JetStreamContext
from nats.js import api as js_api

from engine.broker.publish import BrokerUnavailableError
from engine.broker.streams import BrokerSettings, event_subject
from engine.queue.dead_letters import (
    DeadLetterQuery,
    Replayable,
    ReplayResult,
    delete_dead_letters,
    replay_result,
    select_replayable,
)
from engine.state.database import Database

log = structlog.get_logger("tidegate.broker")

REPLAY_HEADER = "Tg-Replay"
PIPELINE = 1000


def encode_replay(r: Replayable) -> bytes:
    fields = dataclasses.asdict(r)
    fields["payload"] = orjson.Fragment(r.payload)
    return orjson.dumps(fields)


def decode_replay(data: bytes) -> Replayable:
    """The replayed dead letter as the owning worker queues it (``Replayable.items``)."""
    raw: dict[str, Any] = orjson.loads(data)
    raw["payload"] = orjson.dumps(raw["payload"])
    return Replayable(**raw)


def is_replay(headers: dict[str, str] | None) -> bool:
    return headers is not None and REPLAY_HEADER in headers


def replay_message_id(r: Replayable) -> str:
    key = f"{r.connection_id}\x00{r.id}\x00{r.event_id}\x00{r.fail_time!r}"
    return "replay:" + hashlib.sha256(key.encode()).hexdigest()


class StreamReplay:
    """``DurableQueue.replay``'s counterpart on a worker: the same selection, published
    to the stream instead of queued here."""

    def __init__(self, db: Database, js: JetStreamContext, settings: BrokerSettings) -> None:
        self._db = db
        self._js = js
        self._timeout = settings.publish_timeout

    async def replay(self, query: DeadLetterQuery, stored: bool, dry_run: bool) -> ReplayResult:
        matched, usable = await self._db.read(lambda c: select_replayable(c, query, stored))
        result = replay_result(matched, usable)
        if dry_run or not usable:
            return result
        published: list[int] = []
        failed = ""
        for start in range(0, len(usable), PIPELINE):
            chunk = usable[start : start + PIPELINE]
            answers = await asyncio.gather(
                *(self._publish(r) for r in chunk), return_exceptions=True
            )
            for r, answer in zip(chunk, answers, strict=True):
                if isinstance(answer, js_api.PubAck):
                    published.append(r.id)
                elif isinstance(answer, Exception):
                    failed = f"{type(answer).__name__}: {str(answer)[:100]}"
                else:
                    raise answer
        if published:
            await self._db.write(lambda c: delete_dead_letters(c, published))
        if len(published) < len(usable):
            log.warning(
                "replay_publish_failed",
                published=len(published),
                unpublished=len(usable) - len(published),
                error=failed,
            )
            raise BrokerUnavailableError(
                f"the broker stored {len(published)} of {len(usable)} replayed dead letters"
                f" within {self._timeout:g} s ({failed}); the others are still dead letters:"
                " replay them again"
            )
        return result

    async def _publish(self, r: Replayable) -> js_api.PubAck:
        return await self._js.publish(
            event_subject(r.customer_id),
            encode_replay(r),
            timeout=self._timeout,
            headers={"Nats-Msg-Id": replay_message_id(r), REPLAY_HEADER: "1"},
        )
