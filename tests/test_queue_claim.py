"""Claiming around a settle still committing: delivery claims the next batch while the
previous one's settle commits in the background, leaving that batch's items out."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from engine.queue.items import KIND_EVENT, enqueue
from engine.queue.lanes import DurableQueue, Retry
from engine.state.database import Database


async def test_claim_leaves_out_the_excluded_items_and_keeps_order(tmp_path: Path) -> None:
    db = Database(tmp_path / "state.sqlite3")
    await db.start()
    try:
        queue = DurableQueue(db)
        customers = ["a", "b", "a", "c", "b", "d"]  # seqs 1-6

        def fill(c: sqlite3.Connection) -> None:
            for n, customer in enumerate(customers):
                enqueue(c, "conn", customer, KIND_EVENT, f"e{n}", {"n": n}, 100.0)

        await db.write(fill)
        first = await queue.claim("conn", 3)
        assert [i.payload["n"] for i in first] == [0, 1, 2]
        rest = await queue.claim("conn", 10, exclude={i.seq for i in first})
        assert [i.payload["n"] for i in rest] == [3, 4, 5]

        # With a lane held by a retry (customer b), the held path excludes the same way.
        await queue.settle(retries=[Retry(rest[1].seq, 1e12, "later")])
        held = await queue.claim("conn", 10, exclude={first[0].seq, rest[0].seq})
        assert [i.payload["n"] for i in held] == [2, 5]
    finally:
        await db.close()
