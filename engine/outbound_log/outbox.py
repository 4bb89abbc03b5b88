"""The outbound log's outbox: a log row is committed to SQLite in the same transaction
that settles the items of its request, and removed once DuckDB holds it.

The DuckDB writer batches rows for up to a tenth of a second, so a ``kill -9`` used to
lose the newest log rows even though their deliveries were settled. With the outbox a
restart finds every such row and writes it to the log before anything else happens.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

import orjson

from engine.outbound_log.rows import LogCustomer, LogRow
from engine.state.database import Database

if TYPE_CHECKING:  # the ingest worker stages no log rows: it need not load DuckDB
    from engine.outbound_log.store import LogStore


class LogSink(Protocol):
    """Where the ``Deliverer`` hands a log row once the row is in the outbox: the
    ``LogStore`` in the embedded engine, a forwarder to the log service on a broker."""

    async def append(self, row: LogRow) -> None: ...


def encode(row: LogRow) -> tuple[str, bytes]:
    """The (request id, JSON) pair stored in the outbox."""
    return row.id, orjson.dumps(row)


def decode(blob: bytes) -> LogRow:
    fields = orjson.loads(blob)
    fields["time"] = datetime.fromisoformat(fields["time"])
    fields["customers"] = tuple(LogCustomer(**c) for c in fields["customers"])
    return LogRow(**fields)


def stage(c: sqlite3.Connection, rows: Sequence[tuple[str, bytes]]) -> None:
    """Adds encoded rows inside the caller's transaction."""
    c.executemany("INSERT OR REPLACE INTO log_outbox (request_id, row) VALUES (?, ?)", rows)


class LogOutbox:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._pending: set[asyncio.Task[None]] = set()

    def forget(self, request_ids: Sequence[str]) -> None:
        """Called (on the event loop) once DuckDB committed these rows."""
        task = asyncio.create_task(self._delete(list(request_ids)))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _delete(self, request_ids: list[str]) -> None:
        await self._db.write(
            lambda c: c.executemany(
                "DELETE FROM log_outbox WHERE request_id = ?", [(i,) for i in request_ids]
            )
        )

    async def drain(self) -> None:
        """Waits for the deletes already scheduled (before the database closes)."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def recover(self, logs: LogStore) -> int:
        """Writes to the log every outbox row it does not hold yet; returns how many."""
        rows = await self._db.read(
            lambda c: c.execute("SELECT row FROM log_outbox ORDER BY rowid").fetchall()
        )
        recovered = 0
        for (blob,) in rows:
            row = decode(blob)
            if await logs.get(row.id) is None:
                await logs.append(row)
                recovered += 1
        await logs.flush()
        await self._db.write(lambda c: c.execute("DELETE FROM log_outbox"))
        return recovered
