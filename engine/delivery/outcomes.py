"""Settlement: what a send's result or error means for every item of its batch.

``settle`` is pure: from the batch and what ``send`` returned or raised it decides which
items are delivered, retried later or dead-lettered, what each customer's outcome is in
the log, and how the connection's pace changes. The worker then commits that in one
transaction. The rules:

=======================  ===================================================================
send                     items
=======================  ===================================================================
a ``SendResult``         as reported: delivered, or dead at stage ``destination``; an item
                         the result leaves out is dead at stage ``send`` (a connector error)
``RetryableError``       retried after the backoff (at least ``retry_after``), or dead at
                         ``send`` once past the retry window; a 429 also slows the pace
``AuthError``            stay queued; the connection pauses, the next request is a probe
``PayloadTooLargeError`` stay queued and go out in halves; a single item is dead at ``send``
``PermanentError``       dead at ``send``; so is every item when ``send`` broke the contract
=======================  ===================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from engine.connector.records import Connection, Delivery, SendResult
from engine.delivery.batch import Batch
from engine.delivery.transport import Exchange
from engine.errors import (
    AuthError,
    DeliveryError,
    MappingError,
    PayloadTooLargeError,
    RetryableError,
)
from engine.outbound_log.rows import LogCustomer, LogRow, Outcome
from engine.queue.dead_letters import DeadLetter
from engine.queue.items import QueueItem
from engine.queue.lanes import Retry

CustomerOutcome = tuple[Outcome, str]
"""A customer's outcome in one request, and the error that caused it ("" if none)."""
_DELIVERED: CustomerOutcome = (Outcome.DELIVERED, "")


@dataclass
class Settlement:
    """What to commit for one send, and how the connection's pace changes."""

    delivered: list[int] = field(default_factory=list)
    retries: list[Retry] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    customers: dict[str, CustomerOutcome] = field(default_factory=dict)
    """Per customer, in the order of their first delivery."""
    error: str = ""
    """The request's error for the log ("" when every customer was delivered)."""
    items_stay: bool = False
    """The batch's items stay queued untouched: a pause, or a resend in halves."""
    pause: str = ""
    """Pause the connection with this reason."""
    hold: float = 0.0
    """Seconds the whole connection waits before its next request (the backoff)."""
    throttled: bool = False
    """The destination asked to slow down (429)."""
    item_cap: int | None = None
    """Resend in requests of at most this many items."""
    succeeded: bool = False
    """The request went through (some items may still have been refused)."""


def dead_letter(delivery: Delivery, item: QueueItem, stage: str, error: str) -> DeadLetter:
    """A dead letter that keeps the rendered fragment, so it can be resent as it was."""
    rendered = {
        "identifiers": dict(delivery.identifiers),
        "attributes": None if delivery.attributes is None else dict(delivery.attributes),
        "events": [dict(e) for e in delivery.events],
    }
    return DeadLetter(item, stage, error, rendered=rendered)


def settle(
    batch: Batch,
    sent: SendResult | DeliveryError,
    *,
    plugin: str,
    now: float,
    window: float,
    backoff: Callable[[float | None], float],
) -> Settlement:
    """The settlement of ``batch`` after its send returned or raised ``sent``.

    ``window`` is the connection's retry window in seconds, counted from an item's first
    attempt; ``backoff(retry_after)`` the delay before a retry. Items rendering already
    settled (skipped, dead) are included.
    """
    result = Settlement(delivered=list(batch.skipped), dead=list(batch.dead))
    if isinstance(sent, SendResult):
        _reported(batch, sent, plugin, result)
    elif isinstance(sent, RetryableError):
        _retry(batch, sent, now, window, backoff(sent.retry_after), result)
    elif isinstance(sent, AuthError):
        # No pause if the credentials changed while this request was out (the registry
        # checks). Either way the next request is a single-item probe.
        result.error = result.pause = str(sent)
        result.items_stay = True
        result.customers = dict.fromkeys(_customer_ids(batch), (Outcome.PAUSED, result.error))
    elif isinstance(sent, PayloadTooLargeError) and len(batch.deliveries) > 1:
        result.error = str(sent)
        result.item_cap = max(1, len(batch.deliveries) // 2)
        result.items_stay = True
        result.customers = dict.fromkeys(_customer_ids(batch), (Outcome.RETRY, result.error))
    else:  # PermanentError, or a MappingError (a ContractError) raised from send
        result.error = message = sent.message if isinstance(sent, MappingError) else str(sent)
        if isinstance(sent, PayloadTooLargeError):
            message = f"too large alone: {sent}"
        for d in batch.deliveries:
            result.dead.append(dead_letter(d, batch.items[d.item_id], "send", message))
            result.customers[d.customer.id] = (Outcome.FAILED, result.error)
    return result


def _customer_ids(batch: Batch) -> list[str]:
    return [d.customer.id for d in batch.deliveries]


def _reported(batch: Batch, sent: SendResult, plugin: str, result: Settlement) -> None:
    result.succeeded = True
    outcomes = sent.outcomes
    deliveries = batch.deliveries
    if len(outcomes) == len(deliveries) and all([o.delivered for o in outcomes.values()]):
        if all([d.item_id in outcomes for d in deliveries]):
            # The common case, in bulk: every item delivered (batch.items holds the
            # deliveries' items in the same order).
            result.delivered.extend(batch.items)
            result.customers = dict.fromkeys(_customer_ids(batch), _DELIVERED)
            return
    customers = result.customers
    for d in deliveries:
        outcome = outcomes.get(d.item_id)
        if outcome is None:
            error = f"plugin {plugin!r} reported no outcome for this item (it may have been sent)"
            result.dead.append(dead_letter(d, batch.items[d.item_id], "send", error))
            customers[d.customer.id] = (Outcome.FAILED, error)
        elif outcome.delivered:
            result.delivered.append(d.item_id)
            customers.setdefault(d.customer.id, _DELIVERED)
        else:
            result.dead.append(dead_letter(d, batch.items[d.item_id], "destination", outcome.error))
            customers[d.customer.id] = (Outcome.FAILED, outcome.error)
    bad = [c for c, (state, _) in customers.items() if state == Outcome.FAILED]
    if bad:
        first = customers[bad[0]][1]
        result.error = f"{len(bad)} of {len(customers)} customers rejected: {first}"


def _retry(
    batch: Batch,
    sent: RetryableError,
    now: float,
    window: float,
    delay: float,
    result: Settlement,
) -> None:
    result.error = error = str(sent)
    result.hold = delay
    result.throttled = sent.throttled
    for d in batch.deliveries:
        item = batch.items[d.item_id]
        if now - (item.first_attempt_time or now) >= window:
            reason = f"gave up after {item.attempts + 1} attempts over {window:.0f} s"
            result.dead.append(dead_letter(d, item, "send", f"{reason}: {sent}"))
            result.customers[item.customer_id] = (Outcome.FAILED, error)
        else:
            result.retries.append(Retry(d.item_id, now + delay, error))
            result.customers.setdefault(item.customer_id, (Outcome.RETRY, error))


def log_rows(
    connection: Connection,
    exchanges: Sequence[Exchange],
    names: Mapping[str, str],
    customers: Mapping[str, CustomerOutcome],
    error: str,
    attempt: int,
) -> list[LogRow]:
    """One outbound-log row per request a send made, each carrying every customer of the
    batch with their outcome."""
    logged = tuple(
        [
            LogCustomer(customer_id, names.get(customer_id, ""), outcome, customer_error)
            for customer_id, (outcome, customer_error) in customers.items()
        ]
    )
    return [
        LogRow(
            id=exchange.request_id,
            time=exchange.time,
            connection_id=connection.id,
            method=exchange.method,
            url=exchange.url,
            status_code=exchange.status,
            response_time=exchange.elapsed,
            error=exchange.error or error,
            customers=logged,
            mapping_version=connection.mapping_version,
            attempt=attempt,
            ambiguous=exchange.ambiguous,
            request_body=exchange.request_body,
            response_body=exchange.response_body,
            tags=",".join(exchange.tags),
        )
        for exchange in exchanges
    ]
