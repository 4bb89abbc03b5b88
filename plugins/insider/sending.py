"""What one ``send`` does at Insider, in order, and what a failure at each step means.

1. **Identifier changes**: one ``PATCH /api/user/v1/identity`` per customer whose mapped
   identifier attribute changed (upsert cannot change an identifier, §3.3, §6.4). It goes
   first so the later requests find the profile under its new identifier. A 404 (no
   profile holds the old identifier) or "identifier values are the same" (an earlier try
   already moved it) means there is nothing to move. Any other 4xx fails that customer's
   items with Insider's message, and nothing else is sent for that customer.
2. **Cleared attributes**: one ``POST /api/user/v1/attribute/delete`` for every customer
   with a mapped attribute that Antavo cleared (upsert cannot clear, §3.5, §6.1). A
   customer Insider lists in ``fail`` has its items failed and gets no upsert.
3. **Upsert**: ``POST /api/user/v1/upsert`` with everything else (split in requests of at
   most 1,000 user objects when array modes doubled some customers).

Steps 1 and 2 are safe to repeat, the upsert (which appends events) is not, so it comes
last: 401/403 (``AuthError``), 429 and 5xx (``RetryableError``) at any step stop the send,
and the engine retries the whole batch. Other request-level errors raise
``PermanentError`` (the batch is dead-lettered). Every request is one outbound-log row;
a backfill connection tags each ``backfill`` and its upserts carry ``skip_hook: true``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import structlog

from engine.connector import (
    AuthError,
    Connection,
    Delivery,
    HttpResponse,
    MappingError,
    PermanentError,
    SendResult,
    Transport,
)
from plugins.insider.batch import (
    MAX_USERS_PER_REQUEST,
    CustomerPart,
    ReplaceRule,
    customer_parts,
    upsert_batch,
)
from plugins.insider.payloads import IdentityChange, cleared_attributes, identity_change
from plugins.insider.responses import insider_message, user_errors
from plugins.insider.settings import ARRAY_REPLACE, InsiderSettings

log = structlog.get_logger("tidegate.insider")

UPSERT_PATH = "/api/user/v1/upsert"
ATTRIBUTE_DELETE_PATH = "/api/user/v1/attribute/delete"
IDENTITY_PATH = "/api/user/v1/identity"
PARTNER_HEADER = "X-PARTNER-NAME"
TOKEN_HEADER = "X-REQUEST-TOKEN"
BACKFILL_TAG = "backfill"
NOTHING_TO_MOVE = "identifier values are the same"
"""Insider's 400 when the identifier already has its new value (§5.3)."""


def replace_rule(connection: Connection, settings: InsiderSettings) -> ReplaceRule:
    """Whether an array attribute replaces: its mapping's mode, else the connection's."""
    modes = {(m.custom, m.target_attribute): m.array_mode for m in connection.profile_mappings}

    def replace(custom: bool, target: str) -> bool:
        return (modes.get((custom, target)) or settings.array_mode) == ARRAY_REPLACE

    return replace


class InsiderClient:
    """Requests to one connection's Insider account through the engine's transport."""

    def __init__(self, connection: Connection, settings: InsiderSettings, transport: Transport):
        self.connection = connection
        self.settings = settings
        self.transport = transport
        self.tags = (BACKFILL_TAG,) if settings.backfill else ()

    async def request(self, method: str, path: str, body: Mapping[str, Any]) -> HttpResponse:
        try:
            payload = orjson.dumps(body)
        except TypeError as error:  # orjson.JSONEncodeError: a value JSON cannot hold
            raise PermanentError(f"cannot serialize the request body: {error}") from None
        return await self.transport.request(
            method,
            self.settings.base_url + path,
            headers={
                PARTNER_HEADER: self.settings.partner_name.lower(),
                TOKEN_HEADER: self.connection.api_key,
                "Content-Type": "application/json",
            },
            body=payload,
            tags=self.tags,
        )

    def user_errors(self, response: HttpResponse, users: int) -> dict[int, str]:
        """Errors per user index of an upsert or attribute-delete answer; raises for a
        request-level failure."""
        return user_errors(response, users, secrets=(self.connection.api_key,))

    async def move_identity(self, customer_id: str, move: IdentityChange) -> str:
        """Moves an identifier; returns an error message for this customer, or ''."""
        body = {"old_identifier": move.old, "new_identifier": move.new}
        response = await self.request("PATCH", IDENTITY_PATH, body)
        detail = insider_message(response.body, secrets=(self.connection.api_key,))
        moved = 200 <= response.status < 300
        log.info(
            "insider_identifier_changed" if moved else "insider_identifier_not_changed",
            connection=self.connection.id,
            customer=customer_id,
            identifier=self.connection.customer_id_mapping.target_identifier,
            status=response.status,
        )
        if moved or response.status == 404 or NOTHING_TO_MOVE in detail:
            return ""
        if response.status in (401, 403, 429) or response.status >= 500:
            self.user_errors(response, 0)  # raises the engine's error for this status
        return f"Insider refused the identifier change (HTTP {response.status}): {detail}"


async def send_batch(
    connection: Connection,
    settings: InsiderSettings,
    deliveries: Sequence[Delivery],
    transport: Transport,
) -> SendResult:
    """Sends ``deliveries`` (identity moves, attribute deletes, upsert) and returns an
    outcome for every item. See the module docstring for the order and failure rules."""
    if not settings.partner_name:
        raise AuthError(f"connection {connection.id} has no Insider partner name")
    client = InsiderClient(connection, settings, transport)
    failed: dict[str, str] = {}
    for delivery in deliveries:
        if delivery.change is None:  # only a profile change moves an identifier
            continue
        customer_id = delivery.customer.id
        if customer_id in failed:
            continue
        try:
            move = identity_change(
                connection.customer_id_mapping, delivery.change, settings.default_phone_region
            )
        except MappingError as exc:
            failed[customer_id] = exc.message
            continue
        if move is not None:
            error = await client.move_identity(customer_id, move)
            if error:
                failed[customer_id] = error
    replace = replace_rule(connection, settings)
    parts = customer_parts(
        [d for d in deliveries if d.customer.id not in failed] if failed else deliveries,
        lambda d: cleared_attributes(connection.profile_mappings, d.change),
        replace,
    )
    await _delete_cleared(client, parts, failed)
    await _upsert(
        client,
        [p for p in parts if p.customer_id not in failed] if failed else parts,
        replace,
        failed,
    )
    return SendResult.of(deliveries, failed)


async def _delete_cleared(
    client: InsiderClient, parts: Sequence[CustomerPart], failed: dict[str, str]
) -> None:
    deletions = [(part, user) for part in parts if (user := part.deletion()) is not None]
    if not deletions:
        return
    response = await client.request(
        "POST", ATTRIBUTE_DELETE_PATH, {"users": [user for _, user in deletions]}
    )
    for index, error in client.user_errors(response, len(deletions)).items():
        failed[deletions[index][0].customer_id] = f"attribute delete: {error}"


async def _upsert(
    client: InsiderClient,
    parts: Sequence[CustomerPart],
    replace: ReplaceRule,
    failed: dict[str, str],
) -> None:
    batch = upsert_batch(parts, replace, skip_hook=client.settings.backfill)
    start = 0
    while start < len(batch.users):
        end = min(start + MAX_USERS_PER_REQUEST, len(batch.users))
        # Both user objects of one customer travel in the same request.
        if end < len(batch.users) and batch.owners[end] == batch.owners[end - 1]:
            end -= 1
        body: dict[str, Any] = {"users": batch.users[start:end]}
        if batch.skip_hook:
            body["skip_hook"] = True
        response = await client.request("POST", UPSERT_PATH, body)
        for index, error in client.user_errors(response, end - start).items():
            owner = batch.owners[start + index]
            failed[owner] = f"{failed[owner]} | {error}" if owner in failed else error
        start = end
