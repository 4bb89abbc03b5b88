"""What one ``send`` does at Braze, and why a retry never resends accepted objects.

1. **Pacing**: when Braze's last answer said the rate-limit window is used up
   (``X-RateLimit-Remaining: 0``), the send raises ``RetryableError`` with the time to the
   window's reset, before any request.
2. **Identifier renames**: one ``POST /users/external_ids/rename`` per customer whose
   mapped external-ID attribute changed (old value from ``ProfileChange.previous``), before
   anything else for that customer. A refused rename fails that customer's items and
   nothing else is sent for them (their objects would create a second profile under the
   new ID). On a retry (attempt > 1) a refusal is taken as "an earlier attempt renamed
   it". Renames are idempotent that way; they are sent one per request so each answer's
   ``rename_errors`` belongs to exactly one customer.
3. **One** ``POST /users/track`` with everything else: one attributes object per customer
   (its attribute deliveries merged in order), then events and purchases in the order of
   their deliveries. A customer identified by ``user_alias`` gets an attributes object
   with ``_update_existing_only: false`` (unless the connection is update-only), so its
   alias profile exists before its events and purchases are processed (Braze processes
   attributes first, §6), whether or not Braze honours the flag on events (UNCONFIRMED).

A batch whose objects exceed Braze's limit (75 in total, or 75 per array with the
``per_array`` rule) raises ``PayloadTooLargeError`` *before sending*: the engine resends it
in halves, so every send makes exactly one ``/users/track`` request. That is what keeps a
retry from resending accepted objects: a request is retried only when Braze answered 429
or 5xx (nothing applied) or did not answer at all (a timeout: Braze may have applied it,
the log row is marked ``ambiguous``, and the retry may duplicate its events and
purchases: at least once). A 2xx is never retried: objects Braze lists in ``errors`` fail
the items they came from (dead letters with Braze's ``type``), every other item is
delivered. A 400 with every object invalid fails every item with its object's error or
Braze's message.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import structlog

from engine.connector import (
    ANTAVO_CUSTOMER_ID,
    DELIVERED,
    AuthError,
    Connection,
    Delivery,
    HttpResponse,
    ItemOutcome,
    PayloadTooLargeError,
    PermanentError,
    RetryableError,
    SendResult,
    Transport,
)
from plugins.braze import catalog
from plugins.braze.mapping import ConnectionPlan
from plugins.braze.responses import (
    braze_message,
    object_errors,
    parsed_body,
    raise_for_request_failure,
    reset_in,
    shorten,
    unsuccessful_message,
)
from plugins.braze.settings import BATCH_PER_ARRAY, echo

log = structlog.get_logger("tidegate.braze")

TRACK_PATH = "/users/track"
RENAME_PATH = "/users/external_ids/rename"
DELETE_PATH = "/users/delete"
MAX_OBJECTS = 75
"""Objects per /users/track request: in total, or per array on legacy contracts (§4)."""
MAX_IDENTIFIERS_PER_DELETE = 50
ARRAYS = ("attributes", "events", "purchases")
UPDATE_EXISTING_ONLY = "_update_existing_only"


class TrackBody:
    """One /users/track body and the items each of its objects came from."""

    def __init__(self) -> None:
        self.arrays: dict[str, list[dict[str, Any]]] = {name: [] for name in ARRAYS}
        self.owners: dict[tuple[str, int], list[int]] = {}
        self._attributes_of: dict[str, int] = {}

    def add(self, array: str, obj: dict[str, Any], items: list[int]) -> None:
        self.owners[(array, len(self.arrays[array]))] = items
        self.arrays[array].append(obj)

    def attributes_of(self, customer_id: str, identifiers: Mapping[str, Any]) -> dict[str, Any]:
        """The customer's attributes object, made with ``identifiers`` when it is new."""
        index = self._attributes_of.get(customer_id)
        if index is None:
            index = self._attributes_of[customer_id] = len(self.arrays["attributes"])
            self.add("attributes", dict(identifiers), [])
        return self.arrays["attributes"][index]

    def own(self, customer_id: str, item_id: int) -> None:
        index = self._attributes_of[customer_id]
        owners = self.owners[("attributes", index)]
        if item_id not in owners:
            owners.append(item_id)

    def counts(self) -> dict[str, int]:
        return {name: len(objects) for name, objects in self.arrays.items()}

    def json(self) -> dict[str, Any]:
        return {name: objects for name, objects in self.arrays.items() if objects}


def _merge(into: dict[str, Any], attributes: Mapping[str, Any]) -> None:
    for key, value in attributes.items():
        current = into.get(key)
        if (
            isinstance(value, dict)
            and isinstance(current, dict)
            and _is_operations(value)
            and (_is_operations(current))
        ):
            added = list(current.get("add", [])) + list(value.get("add", []))
            removed = list(current.get("remove", [])) + list(value.get("remove", []))
            merged = {
                "add": [v for v in added if v not in value.get("remove", [])],
                "remove": [v for v in removed if v not in value.get("add", [])],
            }
            into[key] = {k: v for k, v in merged.items() if v}
        else:
            into[key] = value


def _is_operations(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and set(value) <= {"add", "remove"}


def track_body(plan: ConnectionPlan, deliveries: Sequence[Delivery]) -> TrackBody:
    """The /users/track body of ``deliveries`` (see the module docstring)."""
    settings = plan.settings
    body = TrackBody()
    update_only = settings.update_existing_only
    for delivery in deliveries:
        identifiers = delivery.identifiers
        customer_id = delivery.customer.id
        alias = catalog.USER_ALIAS in identifiers
        if delivery.attributes or (alias and not update_only):
            attributes = body.attributes_of(customer_id, identifiers)
            if update_only:
                attributes[UPDATE_EXISTING_ONLY] = True
            elif alias:
                attributes[UPDATE_EXISTING_ONLY] = False  # aliases default to update-only
            _merge(attributes, delivery.attributes or {})
            body.own(customer_id, delivery.item_id)
        for fragment in delivery.events:
            obj = {**identifiers, **fragment}
            if update_only:
                obj[UPDATE_EXISTING_ONLY] = True
            body.add("purchases" if "name" not in fragment else "events", obj, [delivery.item_id])
    # An alias's profile-creating object that no attribute change owns belongs to the
    # items it was added for: an error on it is theirs, never dropped.
    items_of: dict[str, list[int]] = {}
    for delivery in deliveries:
        items_of.setdefault(delivery.customer.id, []).append(delivery.item_id)
    for customer_id, index in body._attributes_of.items():
        owners = body.owners[("attributes", index)]
        if not owners:
            owners.extend(items_of[customer_id])
    return body


def rename_of(connection: Connection, delivery: Delivery) -> tuple[str, str] | None:
    """``(old, new)`` external ID when ``delivery`` changed the attribute that maps to it."""
    mapping = connection.customer_id_mapping
    change = delivery.change
    if (
        change is None
        or mapping.target_identifier != catalog.EXTERNAL_ID
        or mapping.source_attribute == ANTAVO_CUSTOMER_ID
        or mapping.source_attribute not in change.changes
    ):
        return None
    new, old = (
        change.changes[mapping.source_attribute],
        change.previous.get(mapping.source_attribute),
    )
    if new in (None, "") or old in (None, "") or str(old) == str(new):
        return None
    return str(old), str(new)


def erasure_bodies(
    external_ids: Sequence[str] = (), user_aliases: Sequence[Mapping[str, str]] = ()
) -> list[dict[str, Any]]:
    """``POST /users/delete`` bodies erasing these users: one identifier type per request
    and at most 50 identifiers each (§7.4). Never pass a deprecated (renamed) external ID:
    Braze would delete the whole profile it still resolves to."""
    bodies: list[dict[str, Any]] = []
    for key, values in (("external_ids", list(external_ids)), ("user_aliases", list(user_aliases))):
        for start in range(0, len(values), MAX_IDENTIFIERS_PER_DELETE):
            bodies.append({key: values[start : start + MAX_IDENTIFIERS_PER_DELETE]})
    return bodies


async def delete_user(
    connection: Connection,
    plan: ConnectionPlan,
    identifiers: Mapping[str, Any],
    transport: Transport,
) -> None:
    """``POST /users/delete`` for one customer; raises the engine's errors when Braze does
    not confirm it. ``{"deleted": n}`` means queued for deletion; n = 0 and a 404 mean
    the profile was not there, which is done too."""
    external_id, alias = identifiers.get("external_id"), identifiers.get("user_alias")
    if isinstance(external_id, str) and external_id:
        bodies = erasure_bodies(external_ids=[external_id])
    elif isinstance(alias, Mapping) and alias:
        bodies = erasure_bodies(user_aliases=[dict(alias)])
    else:
        raise PermanentError(
            "Braze's /users/delete takes an external_id or a user_alias, and this connection "
            f"identifies customers by {', '.join(sorted(identifiers)) or 'nothing'}: delete "
            "the profile in Braze's dashboard"
        )
    client = BrazeClient(connection, plan, transport)
    for body in bodies:
        response = await client.post(DELETE_PATH, body)
        if response.status == 404:
            continue  # nothing to delete there: done, as RudderStack's destination treats it
        raise_for_request_failure(response, DELETE_PATH, client.secrets)
        if not 200 <= response.status < 300:
            raise PermanentError(
                f"Braze refused {DELETE_PATH} (HTTP {response.status}): "
                f"{braze_message(response.body, client.secrets)}"
            )


class BrazeClient:
    def __init__(self, connection: Connection, plan: ConnectionPlan, transport: Transport):
        self.connection = connection
        self.plan = plan
        self.transport = transport
        self.secrets = (connection.api_key,)

    async def post(self, path: str, body: Mapping[str, Any]) -> HttpResponse:
        try:
            payload = orjson.dumps(body)
        except TypeError as error:
            raise PermanentError(f"cannot serialize the request body: {error}") from None
        response = await self.transport.request(
            "POST",
            self.plan.settings.rest_endpoint + path,
            headers={
                "Authorization": f"Bearer {self.connection.api_key}",
                "Content-Type": "application/json",
            },
            body=payload,
        )
        self._learn_pace(response)
        return response

    def _learn_pace(self, response: HttpResponse) -> None:
        remaining = response.headers.get("x-ratelimit-remaining")
        wait = reset_in(response.headers)
        pacing = self.plan.pacing
        if remaining is None or wait is None or response.status == 429:
            pacing.clear()
            return
        try:
            pacing["remaining"] = float(remaining)
        except ValueError:
            pacing.clear()
            return
        pacing["reset_at"] = time.time() + wait

    def check_pace(self) -> None:
        pacing = self.plan.pacing
        if pacing.get("remaining", 1.0) > 0:
            return
        wait = pacing.get("reset_at", 0.0) - time.time()
        if wait <= 0:
            pacing.clear()
            return
        raise RetryableError(
            "Braze's rate-limit window is used up (X-RateLimit-Remaining: 0); waiting for "
            "its reset",
            retry_after=wait,
        )

    async def rename(self, delivery: Delivery, old: str, new: str) -> str:
        """Renames an external ID; returns an error for this customer, or ''."""
        response = await self.post(
            RENAME_PATH,
            {"external_id_renames": [{"current_external_id": old, "new_external_id": new}]},
        )
        raise_for_request_failure(response, "the external ID rename", self.secrets)
        if 200 <= response.status < 300:
            parsed = parsed_body(response.body)
            errors = parsed.get("rename_errors") if isinstance(parsed, dict) else None
            message = unsuccessful_message(response.body)
            if not errors and message is None:
                log.info(
                    "braze_external_id_renamed",
                    connection=self.connection.id,
                    customer=delivery.customer.id,
                )
                return ""
            detail = shorten(
                orjson.dumps(errors).decode() if errors else str(message), self.secrets
            )
        else:
            detail = braze_message(response.body, self.secrets)
        if delivery.attempt > 1:
            # An earlier attempt may have renamed it already (then Braze refuses: the new
            # ID is in use and the old one is no longer primary).
            log.info(
                "braze_external_id_rename_refused_on_retry",
                connection=self.connection.id,
                customer=delivery.customer.id,
            )
            return ""
        return (
            f"Braze refused renaming external_id {echo(old)} to {echo(new)} "
            f"(HTTP {response.status}): {detail}"
        )


async def send_batch(
    connection: Connection,
    plan: ConnectionPlan,
    deliveries: Sequence[Delivery],
    transport: Transport,
) -> SendResult:
    """Sends ``deliveries`` (renames, then one /users/track) and returns an outcome for
    every item. See the module docstring."""
    if not plan.settings.rest_endpoint:
        raise AuthError(f"connection {connection.id} has no Braze rest_endpoint")
    client = BrazeClient(connection, plan, transport)
    client.check_pace()
    failed_customers: dict[str, str] = {}
    for delivery in deliveries:
        rename = rename_of(connection, delivery)
        if rename is None or delivery.customer.id in failed_customers:
            continue
        error = await client.rename(delivery, *rename)
        if error:
            failed_customers[delivery.customer.id] = error
    outcomes: dict[int, ItemOutcome] = {}
    remaining: list[Delivery] = []
    for delivery in deliveries:
        refused = failed_customers.get(delivery.customer.id)
        if refused is None:
            remaining.append(delivery)
        else:
            outcomes[delivery.item_id] = ItemOutcome(False, refused)
    body = track_body(plan, remaining)
    _check_size(body, plan, len(remaining))
    if not any(body.arrays.values()):
        outcomes.update({d.item_id: DELIVERED for d in remaining})
        return SendResult(outcomes)
    response = await client.post(TRACK_PATH, body.json())
    raise_for_request_failure(response, "/users/track", client.secrets)
    errors: dict[int, list[str]] = {}
    for array, index, text in object_errors(response.body, client.secrets):
        owners = body.owners.get((array, index))
        if owners is None:
            log.warning(
                "braze_error_for_unknown_object",
                connection=connection.id,
                input_array=array[:100],
                index=index,
            )
            continue
        for item_id in owners:
            errors.setdefault(item_id, []).append(f"{array}[{index}]: {text}")
    if response.status == 400:
        # Nothing was processed: every object was invalid (§5.3).
        fatal = braze_message(response.body, client.secrets)
        for delivery in remaining:
            found = errors.get(delivery.item_id)
            detail = "; ".join(found) if found else fatal
            outcomes[delivery.item_id] = ItemOutcome(False, f"Braze refused (HTTP 400): {detail}")
        return SendResult(outcomes)
    message = unsuccessful_message(response.body)
    if message is not None:
        raise PermanentError(
            f"Braze answered HTTP {response.status} without success: {shorten(message)}"
        )
    for delivery in remaining:
        found = errors.get(delivery.item_id)
        outcomes[delivery.item_id] = (
            ItemOutcome(False, "Braze refused " + "; ".join(found)) if found else DELIVERED
        )
    return SendResult(outcomes)


def _check_size(body: TrackBody, plan: ConnectionPlan, deliveries: int) -> None:
    counts = body.counts()
    if plan.settings.batch_rule == BATCH_PER_ARRAY:
        over = max(counts.values()) > MAX_OBJECTS
        rule = f"{MAX_OBJECTS} per array"
    else:
        over = sum(counts.values()) > MAX_OBJECTS
        rule = f"{MAX_OBJECTS} in total"
    if over:
        shown = ", ".join(f"{n} {name}" for name, n in counts.items() if n)
        raise PayloadTooLargeError(
            f"{shown} for {deliveries} items exceed Braze's {rule} objects per /users/track "
            "request; nothing was sent"
        )
