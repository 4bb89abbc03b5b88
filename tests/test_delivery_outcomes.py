"""What a send's result or error means for each item of its batch: the settlement table
(README "Delivery"; engine/delivery/outcomes.py), one row per case."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from engine.connector import (
    AuthError,
    Customer,
    Delivery,
    ItemOutcome,
    PayloadTooLargeError,
    PermanentError,
    RetryableError,
    SendResult,
)
from engine.delivery.batch import Batch
from engine.delivery.outcomes import Settlement, settle
from engine.errors import ContractError, DeliveryError
from engine.outbound_log.rows import Outcome
from engine.queue.dead_letters import DeadLetter
from engine.queue.items import QueueItem

NOW = 1_000_000.0
WINDOW = 3600.0
BACKOFF = 7.0


def item(seq: int, customer: str, first_attempt: float | None = None) -> QueueItem:
    attempts = 0 if first_attempt is None else 3
    return QueueItem(seq, "c", customer, "event", f"e{seq}", {}, NOW - 10, attempts, first_attempt)


def batch(*items: QueueItem, skipped: tuple[int, ...] = ()) -> Batch:
    deliveries = [
        Delivery(i.seq, Customer(i.customer_id), {"id": i.customer_id}, events=[{"n": i.seq}])
        for i in items
    ]
    return Batch(deliveries, {i.seq: i for i in items}, list(skipped))


ANA_1, ANA_2, BO = item(1, "ana"), item(2, "ana"), item(3, "bo")


@dataclass
class Expected:
    delivered: list[int] = field(default_factory=list)
    retried: list[int] = field(default_factory=list)
    dead: list[tuple[int, str]] = field(default_factory=list)
    customers: dict[str, Outcome] = field(default_factory=dict)
    items_stay: bool = False
    pause: bool = False
    hold: float = 0.0
    throttled: bool = False
    item_cap: int | None = None
    succeeded: bool = False


CASES: list[tuple[str, Batch, SendResult | DeliveryError, Expected]] = [
    (
        "every item delivered",
        batch(ANA_1, ANA_2, BO, skipped=(9,)),
        SendResult({1: ItemOutcome(True), 2: ItemOutcome(True), 3: ItemOutcome(True)}),
        Expected(
            delivered=[9, 1, 2, 3],
            customers={"ana": Outcome.DELIVERED, "bo": Outcome.DELIVERED},
            succeeded=True,
        ),
    ),
    (
        "one customer refused by the destination",
        batch(ANA_1, ANA_2, BO),
        SendResult(
            {1: ItemOutcome(True), 2: ItemOutcome(False, "bad email"), 3: ItemOutcome(True)}
        ),
        Expected(
            delivered=[1, 3],
            dead=[(2, "destination")],
            customers={"ana": Outcome.FAILED, "bo": Outcome.DELIVERED},
            succeeded=True,
        ),
    ),
    (
        "an item the result leaves out",
        batch(ANA_1, BO),
        SendResult({1: ItemOutcome(True)}),
        Expected(
            delivered=[1],
            dead=[(3, "send")],
            customers={"ana": Outcome.DELIVERED, "bo": Outcome.FAILED},
            succeeded=True,
        ),
    ),
    (
        "a transient failure within the window",
        batch(ANA_1, BO),
        RetryableError("503 from the destination"),
        Expected(
            retried=[1, 3],
            customers={"ana": Outcome.RETRY, "bo": Outcome.RETRY},
            hold=BACKOFF,
        ),
    ),
    (
        "a 429 waits at least its Retry-After and slows the connection",
        batch(ANA_1),
        RetryableError("429", retry_after=60.0, throttled=True),
        Expected(retried=[1], customers={"ana": Outcome.RETRY}, hold=60.0, throttled=True),
    ),
    (
        "a transient failure past the window, for the item first tried long ago",
        batch(item(1, "ana", first_attempt=NOW - WINDOW - 1), BO),
        RetryableError("timeout"),
        Expected(
            retried=[3],
            dead=[(1, "send")],
            customers={"ana": Outcome.FAILED, "bo": Outcome.RETRY},
            hold=BACKOFF,
        ),
    ),
    (
        "refused credentials",
        batch(ANA_1, BO),
        AuthError("401 from the destination"),
        Expected(
            customers={"ana": Outcome.PAUSED, "bo": Outcome.PAUSED}, items_stay=True, pause=True
        ),
    ),
    (
        "a batch too large for the destination",
        batch(ANA_1, ANA_2, BO),
        PayloadTooLargeError("413"),
        Expected(
            customers={"ana": Outcome.RETRY, "bo": Outcome.RETRY}, items_stay=True, item_cap=1
        ),
    ),
    (
        "one item too large on its own",
        batch(BO),
        PayloadTooLargeError("413"),
        Expected(dead=[(3, "send")], customers={"bo": Outcome.FAILED}),
    ),
    (
        "a request the destination rejects for good",
        batch(ANA_1, BO),
        PermanentError("400 malformed"),
        Expected(
            dead=[(1, "send"), (3, "send")],
            customers={"ana": Outcome.FAILED, "bo": Outcome.FAILED},
        ),
    ),
    (
        "a send that broke the contract",
        batch(ANA_1),
        ContractError("echo", "send returned None, not a SendResult", "send"),
        Expected(dead=[(1, "send")], customers={"ana": Outcome.FAILED}),
    ),
]


def backoff(retry_after: float | None) -> float:
    return max(BACKOFF, retry_after or 0.0)


@pytest.mark.parametrize(
    ("case", "sent_batch", "sent", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_settlement(
    case: str, sent_batch: Batch, sent: SendResult | DeliveryError, expected: Expected
) -> None:
    result = settle(sent_batch, sent, plugin="echo", now=NOW, window=WINDOW, backoff=backoff)

    assert actual(result) == expected


def actual(result: Settlement) -> Expected:
    return Expected(
        delivered=result.delivered,
        retried=[r.seq for r in result.retries],
        dead=[(d.item.seq, d.stage) for d in result.dead],
        customers={c: outcome for c, (outcome, _) in result.customers.items()},
        items_stay=result.items_stay,
        pause=bool(result.pause),
        hold=result.hold,
        throttled=result.throttled,
        item_cap=result.item_cap,
        succeeded=result.succeeded,
    )


def test_retries_are_due_after_the_backoff() -> None:
    result = settle(
        batch(ANA_1), RetryableError("503"), plugin="echo", now=NOW, window=WINDOW, backoff=backoff
    )

    assert [(r.next_attempt_time, r.error) for r in result.retries] == [(NOW + BACKOFF, "503")]


def test_a_dead_letter_keeps_what_was_rendered_for_a_resend_as_stored() -> None:
    result = settle(
        batch(BO), PermanentError("400"), plugin="echo", now=NOW, window=WINDOW, backoff=backoff
    )

    [dead] = result.dead
    assert dead.rendered == {"identifiers": {"id": "bo"}, "attributes": None, "events": [{"n": 3}]}


def test_render_time_dead_letters_are_kept_with_the_sends_outcome() -> None:
    earlier = DeadLetter(item(5, "cy"), "identify", "no email")
    sent_batch = batch(ANA_1)
    sent_batch.dead.append(earlier)

    result = settle(
        sent_batch,
        SendResult({1: ItemOutcome(True)}),
        plugin="echo",
        now=NOW,
        window=WINDOW,
        backoff=backoff,
    )

    assert result.dead == [earlier]


def test_the_requests_error_counts_the_refused_customers() -> None:
    refused = SendResult({1: ItemOutcome(False, "bad email"), 3: ItemOutcome(True)})

    result = settle(
        batch(ANA_1, BO), refused, plugin="echo", now=NOW, window=WINDOW, backoff=backoff
    )

    assert result.error == "1 of 2 customers rejected: bad email"
    assert result.customers["ana"] == (Outcome.FAILED, "bad email")
