"""The catalog of Antavo names a mapping can read: Antavo's built-in customer attributes,
events and event parameters (``antavo-source.md`` §1.4, §2.3), merged with the names
Tidegate has seen in traffic (``SeenNames``: ingest records each the first time).

Antavo is the source of every connector, so this lives in the engine. Custom attributes
and custom events are workspace-defined: they appear once traffic carries them.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.connector.records import PROFILE_ACTIONS, AntavoEvent
from engine.state.database import Database

CATALOG_ATTRIBUTE = "attribute"
CATALOG_EVENT = "event"
CATALOG_PARAMETER = "parameter"

Name = tuple[str, str, str]
"""(kind, parent, name): ``parent`` is the action of a parameter, else empty."""

MAX_NAMES = 20_000
"""Names remembered from traffic in all: past it, new names are not recorded. Traffic
with random keys (400,000 seen in a fuzz run) would otherwise grow the table, and the
catalog's every page, without end."""
MAX_NAMES_PER_GROUP = 1_000
"""Parameters remembered per event action, and customer attributes remembered, so one
action's random keys cannot crowd out the others'."""
MAX_NAME_LENGTH = 128
"""Longer names (action or key) are not remembered; a mapping can still name them."""


@dataclass(frozen=True)
class SeenName:
    """A name seen in Antavo traffic: a customer attribute, an event action, or a
    parameter (data key) of an event action (``parent``)."""

    kind: str
    parent: str
    name: str
    first_seen: float


class SeenNames:
    """The names already in the ``source_catalog`` table, so that traffic writes only the
    names it carries for the first time. The first names seen are kept: at most
    ``max_names`` in all and ``max_per_group`` per group (the customer attributes, the
    events, each action's parameters), each at most ``MAX_NAME_LENGTH`` characters."""

    def __init__(
        self, max_names: int = MAX_NAMES, max_per_group: int = MAX_NAMES_PER_GROUP
    ) -> None:
        self._known: set[Name] = set()
        self._per_group: dict[tuple[str, str], int] = {}
        self.max_names = max_names
        self.max_per_group = max_per_group

    async def load(self, db: Database) -> None:
        rows = await db.read(
            lambda c: c.execute("SELECT kind, parent, name FROM source_catalog").fetchall()
        )
        self._known = set()
        self._per_group = {}
        self.committed((str(k), str(p), str(n)) for k, p, n in rows)

    def new_in(self, events: Sequence[AntavoEvent]) -> set[Name]:
        """The names ``events`` carry that are not recorded yet, within the caps."""
        keys_by_action: defaultdict[str, set[str]] = defaultdict(set)
        for event in events:
            keys_by_action[event.action].update(event.data)
        names: set[Name] = set()
        for action, keys in keys_by_action.items():
            names.add((CATALOG_EVENT, "", action))
            if action in PROFILE_ACTIONS:
                names.update((CATALOG_ATTRIBUTE, "", key) for key in keys)
            else:
                names.update((CATALOG_PARAMETER, action, key) for key in keys)
        new = names - self._known
        if not new:
            return new
        return self._within_caps(new)

    def _within_caps(self, names: set[Name]) -> set[Name]:
        room = self.max_names - len(self._known)
        kept: set[Name] = set()
        taken: dict[tuple[str, str], int] = {}
        for name in sorted(names):  # sorted: the same request keeps the same names
            kind, parent, text = name
            if room <= 0:
                break
            if len(text) > MAX_NAME_LENGTH or len(parent) > MAX_NAME_LENGTH:
                continue
            group = (kind, parent)
            count = self._per_group.get(group, 0) + taken.get(group, 0)
            if count >= self.max_per_group:
                continue
            taken[group] = taken.get(group, 0) + 1
            kept.add(name)
            room -= 1
        return kept

    @staticmethod
    def record(c: sqlite3.Connection, names: Iterable[Name], now: float) -> None:
        """Writes ``names`` inside the caller's transaction; call ``committed`` after."""
        c.executemany(
            "INSERT OR IGNORE INTO source_catalog (kind, parent, name, first_seen)"
            " VALUES (?,?,?,?)",
            [(*name, now) for name in names],
        )

    def committed(self, names: Iterable[Name]) -> None:
        known, per_group = self._known, self._per_group
        for name in names:
            if name not in known:
                known.add(name)
                group = (name[0], name[1])
                per_group[group] = per_group.get(group, 0) + 1


async def seen_names(db: Database) -> list[SeenName]:
    """Every attribute, event and parameter name seen in traffic, sorted."""
    return await db.read(
        lambda c: [
            SeenName(*row)
            for row in c.execute(
                "SELECT kind, parent, name, first_seen FROM source_catalog"
                " ORDER BY kind, parent, name"
            )
        ]
    )


@dataclass(frozen=True)
class SourceEntry:
    """One Antavo name. ``event`` is the action a parameter belongs to; ``first_seen`` is
    Unix seconds, or ``None`` when the name was never seen in traffic."""

    kind: str
    name: str
    event: str = ""
    type: str = ""
    description: str = ""
    built_in: bool = False
    read_only: bool = False
    first_seen: float | None = None

    @property
    def seen(self) -> bool:
        return self.first_seen is not None


def _attribute(
    name: str, type_: str, description: str = "", read_only: bool = False
) -> SourceEntry:
    return SourceEntry(CATALOG_ATTRIBUTE, name, "", type_, description, True, read_only)


BUILT_IN_ATTRIBUTES = (
    _attribute("customer_id", "string", "Antavo customer ID (_id)"),
    _attribute("email", "string"),
    _attribute("first_name", "string"),
    _attribute("last_name", "string"),
    _attribute("handler", "string", "nickname or display name"),
    _attribute("birth_date", "date YYYY-MM-DD"),
    _attribute("gender", "string", "male or female"),
    _attribute("language", "string", "ISO 639-1"),
    _attribute("currency", "string", "ISO 4217, last currency used"),
    _attribute("mobile_phone", "string"),
    _attribute("country", "string", "ISO 3166-1 alpha-2"),
    _attribute("image_url", "string"),
    _attribute("membership_id", "array of string"),
    _attribute("group_id", "array", "user groups"),
    _attribute("labels", "array of string", "customer labels"),
    _attribute("src", "string", "creation source, e.g. import:<id>"),
    _attribute("referrer", "string", "referring customer's ID"),
    _attribute("status", "string", "active, inactive, banned, merged or suspended"),
    _attribute("score", "number", "total points ever earned", read_only=True),
    _attribute("spent", "number", "points spent", read_only=True),
    _attribute("reserved", "number", "points reserved", read_only=True),
    _attribute("expired", "number", "points expired", read_only=True),
    _attribute("pending", "number", "points pending", read_only=True),
    _attribute("spendable", "number", "points spendable now", read_only=True),
    _attribute("purchase_total", "number", read_only=True),
    _attribute("purchase_count", "number", read_only=True),
    _attribute("purchase_item_count", "number", read_only=True),
    _attribute("purchase_first_date", "date", read_only=True),
    _attribute("purchase_last_date", "date", read_only=True),
    _attribute("last_earn_date", "date", read_only=True),
    _attribute("last_spend_date", "date", read_only=True),
    _attribute("optin_at", "datetime"),
    _attribute("optout_at", "datetime"),
    _attribute("last_login_at", "datetime"),
    _attribute("created_at", "datetime"),
    _attribute("updated_at", "datetime"),
    _attribute("level", "string", "legacy Levels module"),
)
"""Built-in customer attributes (§1.4). Objects (tiers, accounts) are left out: a
mapping reads flat values."""

_EVENTS: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "opt_in": ("creates the customer; data holds profile fields", ()),
    "opt_out": ("", ()),
    "profile": ("profile update; data holds the changed attributes", ()),
    "point_add": ("", (("points", "integer"), ("effective_timestamp", "unix seconds"))),
    "point_sub": ("", (("points", "integer"),)),
    "point_spend": ("", (("points", "integer"), ("transaction_id", "string"))),
    "point_unspend": ("", (("points", "integer"), ("transaction_id", "string"))),
    "checkout": (
        "a purchase; items holds its lines",
        (
            ("transaction_id", "string"),
            ("total", "number"),
            ("currency", "string"),
            ("total_quantity", "number"),
            ("discount", "number"),
            ("shipping", "number"),
            ("points_burned", "number"),
            ("items", "array of line objects"),
            ("items[].product_id", "string"),
            ("items[].product_name", "string"),
            ("items[].product_url", "string"),
            ("items[].price", "number"),
            ("items[].quantity", "number"),
            ("items[].discount", "number"),
            ("items[].subtotal", "number"),
        ),
    ),
    "checkout_item": (
        "one purchase line",
        (
            ("product_id", "string"),
            ("product_name", "string"),
            ("product_url", "string"),
            ("price", "number"),
            ("quantity", "number"),
            ("discount", "number"),
            ("subtotal", "number"),
        ),
    ),
    "checkout_update": ("", (("transaction_id", "string"),)),
    "checkout_update_item": ("", (("transaction_id", "string"),)),
    "checkout_accept": ("", (("transaction_id", "string"),)),
    "checkout_accept_item": ("", (("transaction_id", "string"),)),
    "checkout_reject": ("", (("transaction_id", "string"),)),
    "checkout_claim": ("links an earlier guest checkout to a member", ()),
    "refund": ("", (("transaction_id", "string"),)),
    "partial_refund": ("", (("transaction_id", "string"),)),
    "refund_item": ("", (("transaction_id", "string"),)),
    "reserve_points": ("", (("transaction_id", "string"), ("points", "integer"))),
    "release_points": ("", (("transaction_id", "string"), ("points", "integer"))),
    "coupon_redeem": (
        "",
        (("code", "string"), ("amount", "number"), ("transaction_id", "string")),
    ),
    "coupon_unredeem": ("", (("code", "string"),)),
    "challenge_reset": ("", (("challenge", "string"),)),
    "review_submit": (
        "",
        (("item", "string"), ("review", "string"), ("review_id", "string"), ("provider", "string")),
    ),
    "daily_login": ("internal: at most once per day", ()),
    "activity": ("internal: a completed challenge", (("activity", "string"),)),
    "coupon_assign": ("internal", (("coupon", "string"), ("code", "string"))),
    "campaign_bonus": ("written by a workflow", (("points", "integer"),)),
    "birthday": ("internal", ()),
    "anniversary": ("internal", ()),
}
"""Antavo event actions (§2.3) with their documented data keys."""


def built_in_entries() -> list[SourceEntry]:
    """Antavo's built-in attributes, events and event parameters."""
    entries = list(BUILT_IN_ATTRIBUTES)
    for action, (description, parameters) in _EVENTS.items():
        entries.append(SourceEntry(CATALOG_EVENT, action, "", "", description, True))
        entries.extend(
            SourceEntry(CATALOG_PARAMETER, key, action, type_, "", True)
            for key, type_ in parameters
        )
    return entries


def source_catalog(seen: Iterable[SeenName]) -> list[SourceEntry]:
    """Built-in entries merged with ``seen`` names, sorted by kind, event and name. A
    built-in name seen in traffic is one entry, marked both built-in and seen."""
    merged: dict[tuple[str, str, str], SourceEntry] = {
        (e.kind, e.event, e.name): e for e in built_in_entries()
    }
    for name in seen:
        key = (name.kind, name.parent, name.name)
        known = merged.get(key)
        if known is None:
            merged[key] = SourceEntry(name.kind, name.name, name.parent, first_seen=name.first_seen)
        else:
            merged[key] = SourceEntry(
                known.kind,
                known.name,
                known.event,
                known.type,
                known.description,
                known.built_in,
                known.read_only,
                name.first_seen,
            )
    return [merged[key] for key in sorted(merged)]
