"""Background jobs that run on a schedule: the first run after a delay, then one every
interval, each logged; a failed run is logged and the next one runs on time."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

log = structlog.get_logger("tidegate.periodic")


class Periodic:
    """Runs ``job`` in the background: ``start``, then ``stop`` (which cancels a run in
    progress). ``job`` returns the fields its ``event`` log line carries."""

    def __init__(
        self,
        event: str,
        job: Callable[[], Awaitable[dict[str, Any]]],
        *,
        interval: float,
        start_delay: float,
    ) -> None:
        self.event = event
        self._job = job
        self._interval = interval
        self._start_delay = start_delay
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.event)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        await asyncio.sleep(self._start_delay)
        while True:
            started = time.monotonic()
            try:
                fields = await self._job()
            except Exception:  # the next run tries again
                log.exception(f"{self.event}_failed")
            else:
                log.info(self.event, seconds=round(time.monotonic() - started, 2), **fields)
            await asyncio.sleep(self._interval)
