"""Claiming around a settle still committing: delivery claims the next batch while the
previous one's settle commits in the background, leaving that batch's items out."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from engine.queue.dead_letters import DeadLetter
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


async def test_a_send_does_not_dead_letter_an_item_taken_away_while_it_was_in_flight(
    tmp_path: Path,
) -> None:
    """A partition handed to another worker (or an erased customer) takes queued items
    away under a send in flight; that send's dead letters cover only what is still
    queued, so no dead letter stands for an event the next owner delivers."""
    db = Database(tmp_path / "state.sqlite3")
    await db.start()
    try:
        queue = DurableQueue(db)

        def fill(c: sqlite3.Connection) -> None:
            for n, customer in enumerate(["kept", "gone"]):
                enqueue(c, "conn", customer, KIND_EVENT, f"e{n}", {"n": n}, 100.0)

        await db.write(fill)
        await queue.load()
        batch = await queue.claim("conn", 10)
        assert [i.customer_id for i in batch] == ["kept", "gone"]
        await db.write(lambda c: c.execute("DELETE FROM queue WHERE customer_id = 'gone'"))
        await queue.settle(dead=[DeadLetter(item, "send", "rejected") for item in batch])
        letters = await db.read(
            lambda c: c.execute("SELECT customer_id FROM dead_letters").fetchall()
        )
        assert letters == [("kept",)]
        assert await db.read(lambda c: c.execute("SELECT count(*) FROM queue").fetchone()) == (0,)
    finally:
        await db.close()
