"""Retention of the outbound log: whole weekly partitions are deleted once every row in
them is older than the retention period (90 days by default: what Antavo keeps its own
webhook logs for), and the oldest go first while the log is over its size budget, if it
has one. The newest partition always stays. See ``engine.outbound_log.partitions``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from engine.outbound_log.store import LogStore
from engine.periodic import Periodic

LOG_RETENTION_DAYS = 90.0
LOG_RETENTION_INTERVAL = 3600.0
LOG_RETENTION_START_DELAY = 60.0


def log_retention(
    logs: LogStore,
    days: float = LOG_RETENTION_DAYS,
    max_bytes: int | None = None,
    *,
    interval: float = LOG_RETENTION_INTERVAL,
    start_delay: float = LOG_RETENTION_START_DELAY,
) -> Periodic:
    """The retention job, logged as ``log_retention`` each run. ``days`` 0 keeps rows
    however old (only ``max_bytes``, if given, bounds the log)."""

    async def run() -> dict[str, Any]:
        cutoff = datetime.now(UTC) - timedelta(days=days) if days > 0 else None
        result = await logs.drop_partitions(older_than=cutoff, max_bytes=max_bytes)
        return {
            "partitions_dropped": result.dropped,
            "freed_bytes": result.freed_bytes,
            "size_bytes": result.size_bytes,
        }

    return Periodic("log_retention", run, interval=interval, start_delay=start_delay)
