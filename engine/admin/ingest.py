"""IngestService: the same records as POST /v1/events, over gRPC."""

from __future__ import annotations

import time
from typing import Any

from google.protobuf import json_format

from engine.admin.errors import Context, rpc
from engine.errors import BacklogFullError, InvalidInputError, NotFoundError, TidegateError
from engine.ingest.ingestor import Ingestor, IngestResult
from engine.ingest.limits import DEFAULT_LIMITS, IngestLimits
from engine.ingest.parse import parse_event
from engine.metrics import TRANSPORT_GRPC, IngestMetrics
from engine.pb import ingest_pb2 as pb
from engine.pb import ingest_pb2_grpc


def whole_numbers(value: Any) -> Any:
    """protobuf Struct carries every number as a double; integral ones become ints again so
    points and quantities reach the destination as they left Antavo."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [whole_numbers(v) for v in value]
    return value


def event_dict(message: pb.AntavoEvent) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "customer": message.customer,
        "action": message.action,
        "data": whole_numbers(json_format.MessageToDict(message.data)),
    }
    for key in ("external_id", "account", "id"):
        if getattr(message, key):
            raw[key] = getattr(message, key)
    if message.HasField("timestamp"):
        stamp = message.timestamp
        try:
            raw["timestamp"] = stamp.ToJsonString()
        except ValueError:  # outside protobuf's years 1-9999: parse names the field
            raw["timestamp"] = stamp.seconds + stamp.nanos / 1e9
    return raw


def status_name(exc: Exception) -> str:
    """The gRPC status ``rpc`` answers ``exc`` with, for the metrics."""
    if isinstance(exc, InvalidInputError):
        return "INVALID_ARGUMENT"
    if isinstance(exc, NotFoundError):
        return "NOT_FOUND"
    if isinstance(exc, BacklogFullError):
        return "RESOURCE_EXHAUSTED"
    if isinstance(exc, TidegateError):
        return "FAILED_PRECONDITION"
    return "INTERNAL"


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(
        self,
        ingestor: Ingestor,
        metrics: IngestMetrics | None = None,
        limits: IngestLimits = DEFAULT_LIMITS,
    ) -> None:
        self._ingestor = ingestor
        self._metrics = metrics or IngestMetrics()
        self._limits = limits

    @rpc
    async def IngestEvents(
        self, request: pb.IngestEventsRequest, context: Context
    ) -> pb.IngestEventsResponse:
        started = time.perf_counter()
        try:
            result = await self._ingest(request)
        except Exception as exc:
            self._metrics.refused(TRANSPORT_GRPC, status_name(exc))
            raise
        self._metrics.acknowledged(
            TRANSPORT_GRPC,
            result.accepted,
            result.duplicates,
            result.deliveries_queued,
            time.perf_counter() - started,
        )
        return pb.IngestEventsResponse(
            accepted=result.accepted,
            duplicates=result.duplicates,
            deliveries_queued=result.deliveries_queued,
        )

    async def _ingest(self, request: pb.IngestEventsRequest) -> IngestResult:
        if not request.events:
            raise InvalidInputError("events", "expected at least one event")
        limits = self._limits
        if len(request.events) > limits.max_events:
            raise InvalidInputError("events", f"at most {limits.max_events} events per request")
        events = [
            parse_event(event_dict(e), f"events[{i}]", limits=limits)
            for i, e in enumerate(request.events)
        ]
        return await self._ingestor.ingest(events)
