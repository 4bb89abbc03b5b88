"""Erasing one customer from the state database (``EraseCustomer``): their profile and
external IDs, their queued items and dead letters on every connection, the re-send marks
of those items' events, and any log row still waiting in the outbox that carries them.

Re-send marks hold only an event ID and a time, with no customer: the marks of events
already delivered cannot be told apart and stay until their window passes (30 days for
an ID Antavo gave, 24 hours for a content hash). Keeping them also means an Antavo
re-send of an erased customer's old event is still recognised as a re-send.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from engine.outbound_log import outbox

CHUNK = 500
"""Ids per ``IN`` list: below SQLite's default limit of 999 parameters."""


@dataclass(frozen=True)
class StateErasure:
    """What erasing a customer removed from the state database."""

    profile: bool = False
    external_ids: int = 0
    queued_items: int = 0
    dead_letters: int = 0
    resend_marks: int = 0
    outbox_rows: int = 0

    def __add__(self, other: StateErasure) -> StateErasure:
        return StateErasure(
            self.profile or other.profile,
            self.external_ids + other.external_ids,
            self.queued_items + other.queued_items,
            self.dead_letters + other.dead_letters,
            self.resend_marks + other.resend_marks,
            self.outbox_rows + other.outbox_rows,
        )


def identifier_values(c: sqlite3.Connection, customer_id: str) -> list[str]:
    """The customer's external-ID values (what events may name them by)."""
    rows = c.execute("SELECT value FROM external_ids WHERE customer_id = ?", (customer_id,))
    return [value for (value,) in rows.fetchall()]


def erase_state(c: sqlite3.Connection, customer_id: str) -> StateErasure:
    """Deletes the customer's rows, inside the caller's transaction."""
    event_ids = [
        event_id
        for (event_id,) in c.execute(
            "SELECT event_id FROM queue WHERE customer_id = ?"
            " UNION SELECT event_id FROM dead_letters WHERE customer_id = ?",
            (customer_id, customer_id),
        ).fetchall()
    ]
    queued = c.execute("DELETE FROM queue WHERE customer_id = ?", (customer_id,)).rowcount
    dead = c.execute("DELETE FROM dead_letters WHERE customer_id = ?", (customer_id,)).rowcount
    profile = c.execute("DELETE FROM profiles WHERE customer_id = ?", (customer_id,)).rowcount
    external = c.execute("DELETE FROM external_ids WHERE customer_id = ?", (customer_id,)).rowcount
    marks = 0
    for start in range(0, len(event_ids), CHUNK):
        chunk = event_ids[start : start + CHUNK]
        marks += c.execute(
            f"DELETE FROM seen_events WHERE event_id IN ({','.join('?' * len(chunk))})", chunk
        ).rowcount
    return StateErasure(bool(profile), external, queued, dead, marks)


def erase_outbox(c: sqlite3.Connection, customer_id: str) -> StateErasure:
    """Deletes the outbox rows that carry the customer. Call it only after flushing the
    outbound log: then each of them is in the log already (where it is erased), and only
    the outbox's own delete of it had not run yet."""
    doomed = [
        request_id
        for request_id, blob in c.execute("SELECT request_id, row FROM log_outbox").fetchall()
        if any(customer.customer_id == customer_id for customer in outbox.decode(blob).customers)
    ]
    for request_id in doomed:
        c.execute("DELETE FROM log_outbox WHERE request_id = ?", (request_id,))
    return StateErasure(outbox_rows=len(doomed))
