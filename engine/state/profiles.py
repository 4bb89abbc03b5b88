"""Customer profiles: the latest Antavo attributes of each customer, kept in SQLite.

Ingest merges every ``opt_in`` and ``profile`` event into the stored profile and queues
only what changed; delivery reads profiles to give connectors the whole customer. The
merge rule lives here once, for ingest and for the preview.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Mapping
from typing import Any

import orjson


def merge_profile(
    profile: dict[str, Any], data: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merges ``data`` into ``profile`` in place; a value of ``None`` clears an attribute.

    Returns (changes, previous): the attributes whose value changed, with their new value
    (``None`` when cleared), and the earlier values of those that had one.
    """
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if value is None:
            if key in profile:
                changes[key] = None
        elif key not in profile or profile[key] != value:
            changes[key] = value
    previous = {k: profile[k] for k in changes if k in profile}
    for key, value in changes.items():
        if value is None:
            profile.pop(key, None)
        else:
            profile[key] = value
    return changes, previous


def update_profile(
    c: sqlite3.Connection, customer_id: str, data: Mapping[str, Any], now: float
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Merges ``data`` into the stored profile (see ``merge_profile``) inside the caller's
    transaction. Returns (changes, previous, profile), the last the whole profile after
    the merge. A customer seen for the first time gets a stored profile even when
    nothing changed."""
    row = c.execute(
        "SELECT attributes FROM profiles WHERE customer_id = ?", (customer_id,)
    ).fetchone()
    profile: dict[str, Any] = orjson.loads(row[0]) if row else {}
    changes, previous = merge_profile(profile, data)
    if changes or row is None:
        c.execute(
            "INSERT OR REPLACE INTO profiles (customer_id, attributes, update_time) VALUES (?,?,?)",
            (customer_id, orjson.dumps(profile).decode(), now),
        )
    return changes, previous, profile


def load_profile(c: sqlite3.Connection, customer_id: str) -> dict[str, Any]:
    """The stored profile of ``customer_id``; ``{}`` when there is none."""
    row = c.execute(
        "SELECT attributes FROM profiles WHERE customer_id = ?", (customer_id,)
    ).fetchone()
    return orjson.loads(row[0]) if row else {}


def load_profiles(
    c: sqlite3.Connection, customer_ids: Collection[str]
) -> dict[str, dict[str, Any]]:
    """Profiles of ``customer_ids`` (absent customers are left out), in one query: the ids
    go in as a JSON array, each looked up by primary key (CROSS JOIN keeps the array the
    outer loop). Measured against ``IN (?,?,...)`` lists: 0.07 against 0.31 us per absent
    id (CHANGELOG, 2026-11-27)."""
    return {
        customer_id: orjson.loads(attributes)
        for customer_id, attributes in c.execute(
            "SELECT p.customer_id, p.attributes FROM json_each(?) AS j"
            " CROSS JOIN profiles AS p ON p.customer_id = j.value",
            (orjson.dumps(list(customer_ids)),),
        )
    }
