"""A Hypothesis stateful test of the durable queue's promises.

Random sequences of enqueue, sends that succeed, hit 429/5xx, time out (the destination
may have applied the request), fail for one customer (per-user rejection), clock
advances, crashes (the in-flight claim is lost and the database reopened) and restarts.
Invariants: nothing is lost, nothing is reordered within a customer, a held lane holds
back only its own customer, and a permanent failure releases the barrier.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import orjson
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from engine.queue.dead_letters import DeadLetter
from engine.queue.items import KIND_EVENT, QueueItem, enqueue
from engine.queue.lanes import DurableQueue, Retry
from engine.state.database import Database

CONNECTION = "c1"
CUSTOMERS = st.sampled_from(["ana", "bo", "cy"])


class QueueMachine(RuleBasedStateMachine):
    @initialize()
    def open(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tidegate-queue-"))
        self.loop = asyncio.new_event_loop()
        self.db: Database | None = None
        self.queue: DurableQueue | None = None
        self._reopen()
        self.clock = 1000.0
        self.next_value = 0
        self.enqueued: dict[str, list[int]] = {}  # values per customer, in order
        self.delivered: dict[str, list[int]] = {}  # values as the destination saw them
        self.dead: set[int] = set()
        self.held_until: dict[str, float] = {}  # customers waiting for a retry
        self.claimed: list[QueueItem] = []  # in flight, not settled

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def _reopen(self) -> None:
        if self.db is not None:
            self._run(self.db.close())
        self.db = Database(self.dir / "state.sqlite3", synchronous="OFF")
        self._run(self.db.start())
        self.queue = DurableQueue(self.db)
        self._run(self.queue.load())

    def teardown(self) -> None:
        if getattr(self, "db", None) is not None:
            self._run(self.db.close())  # type: ignore[union-attr]
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- actions -----------------------------------------------------------------------

    @rule(customer=CUSTOMERS, count=st.integers(1, 3))
    def enqueue(self, customer: str, count: int) -> None:
        values = list(range(self.next_value, self.next_value + count))
        self.next_value += count

        def add(c):  # type: ignore[no-untyped-def]
            for v in values:
                enqueue(c, CONNECTION, customer, KIND_EVENT, f"e{v}", {"v": v}, self.clock)

        assert self.db is not None and self.queue is not None
        self._run(self.db.write(add))
        self.queue.added(count)  # as ingest does after its commit
        self.enqueued.setdefault(customer, []).extend(values)

    @rule(limit=st.integers(1, 6))
    def claim(self, limit: int) -> None:
        assert self.queue is not None
        self.claimed = self._run(self.queue.claim(CONNECTION, limit, now=self.clock))
        self._check_claim(self.claimed)

    @precondition(lambda self: bool(self.claimed))
    @rule()
    def succeed(self) -> None:
        for item in self.claimed:
            self.delivered.setdefault(item.customer_id, []).append(item.payload["v"])
        self._settle(delivered=[i.seq for i in self.claimed])

    @precondition(lambda self: bool(self.claimed))
    @rule(delay=st.floats(1, 30), applied=st.booleans())
    def fail_transiently(self, delay: float, applied: bool) -> None:
        """A 429, a 5xx, or a timeout; after a timeout Insider may have applied it."""
        if applied:
            for item in self.claimed:
                self.delivered.setdefault(item.customer_id, []).append(item.payload["v"])
        retries = [Retry(i.seq, self.clock + delay, "503") for i in self.claimed]
        for item in self.claimed:
            self.held_until[item.customer_id] = self.clock + delay
        self._settle(retries=retries)

    @precondition(lambda self: bool(self.claimed))
    @rule(data=st.data())
    def reject_one_customer(self, data: st.DataObject) -> None:
        """A 200 whose fail map names one customer: its items are dead, the rest done."""
        customers = sorted({i.customer_id for i in self.claimed})
        bad = data.draw(st.sampled_from(customers))
        dead = [
            DeadLetter(i, "destination", "rejected") for i in self.claimed if i.customer_id == bad
        ]
        done = [i for i in self.claimed if i.customer_id != bad]
        for item in done:
            self.delivered.setdefault(item.customer_id, []).append(item.payload["v"])
        self.dead.update(d.item.payload["v"] for d in dead)
        self._settle(delivered=[i.seq for i in done], dead=dead)

    @rule(seconds=st.floats(0, 40))
    def advance(self, seconds: float) -> None:
        self.clock += seconds

    @rule()
    def crash_and_restart(self) -> None:
        self.claimed = []  # the in-flight batch dies with the process
        self._reopen()

    @rule()
    def drain(self) -> None:
        """After any history, a healthy destination gets everything, in order."""
        self.clock += 10_000
        assert self.queue is not None
        for _ in range(1000):
            self.claimed = self._run(self.queue.claim(CONNECTION, 5, now=self.clock))
            if not self.claimed:
                break
            self._check_claim(self.claimed)
            self.succeed()
        assert self.queue.depth == 0
        for customer, values in self.enqueued.items():
            got = self.delivered.get(customer, [])
            missing = [v for v in values if v not in self.dead and v not in got]
            assert missing == [], f"{customer}: lost {missing}"

    # -- checks ------------------------------------------------------------------------

    def _settle(self, delivered=(), retries=(), dead=()):  # type: ignore[no-untyped-def]
        assert self.queue is not None
        self._run(
            self.queue.settle(
                delivered=delivered, retries=retries, dead=dead, attempt_time=self.clock
            )
        )
        self.claimed = []

    def _check_claim(self, items: list[QueueItem]) -> None:
        for item in items:
            assert self.held_until.get(item.customer_id, 0) <= self.clock, (
                f"claimed {item.customer_id} while its lane is held"
            )
        for customer in {i.customer_id for i in items}:
            claimed = [i.payload["v"] for i in items if i.customer_id == customer]
            pending = self._pending(customer)
            assert claimed == pending[: len(claimed)], "a claim skipped a lane's head"

    def _pending(self, customer: str) -> list[int]:
        assert self.db is not None
        rows = self._run(
            self.db.read(
                lambda c: c.execute(
                    "SELECT payload FROM queue WHERE connection_id=? AND customer_id=?"
                    " ORDER BY seq",
                    (CONNECTION, customer),
                ).fetchall()
            )
        )
        return [orjson.loads(r[0])["v"] for r in rows]

    @invariant()
    def nothing_is_lost(self) -> None:
        if not hasattr(self, "enqueued"):
            return
        for customer, values in self.enqueued.items():
            queued = set(self._pending(customer))
            seen = set(self.delivered.get(customer, []))
            for v in values:
                assert v in queued or v in seen or v in self.dead, f"{customer}: {v} lost"

    @invariant()
    def order_holds_within_each_customer(self) -> None:
        if not hasattr(self, "delivered"):
            return
        for customer, got in self.delivered.items():
            firsts: list[int] = []
            for v in got:
                if v not in firsts:
                    firsts.append(v)
            assert firsts == sorted(firsts), f"{customer} delivered out of order: {got}"

    @invariant()
    def depth_counter_matches_the_table(self) -> None:
        if getattr(self, "queue", None) is None:
            return
        assert self.db is not None and self.queue is not None
        actual = self._run(
            self.db.read(lambda c: c.execute("SELECT COUNT(*) FROM queue").fetchone()[0])
        )
        assert self.queue.depth == actual


QueueMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestQueueProperties = QueueMachine.TestCase
