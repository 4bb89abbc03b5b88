"""The audit trail: one row per admin change (each RPC that is not a read, successful or
not, and ``tidegate token create``/``revoke``): when, by which token, which method, its
target, the fields it set, its outcome and the caller's address.

Field values are recorded except secrets: a field whose name says it holds one
(``api_key``, ``api_keys``, ``token``, ``secret``...) is recorded as ``"(secret)"``, and
each value is cut to ``MAX_VALUE_CHARS``. Rows are deleted ``AUDIT_RETENTION_DAYS`` after
they were written, a minute after start-up and then hourly (``audit_retention``).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from engine.periodic import Periodic
from engine.state.database import Database

AUDIT_RETENTION_DAYS = 365.0
DAY = 86400.0
AUDIT_RETENTION_INTERVAL = 3600.0
AUDIT_RETENTION_START_DELAY = 60.0
EXPIRE_CHUNK = 1000
MAX_VALUE_CHARS = 200
MAX_FIELDS = 100
SECRET_MARK = "(secret)"
SECRET_NAMES = ("api_key", "api_keys", "token", "secret", "password", "key_material")
CLI_PEER = "cli"
"""The peer recorded for a change made by the ``tidegate`` command on the data folder."""


@dataclass(frozen=True)
class AuditEvent:
    seq: int
    time: float
    token_name: str
    method: str
    target: str
    fields: dict[str, str]
    outcome: str
    peer: str


def is_secret(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1].lower()
    return any(leaf == s or leaf.endswith("_" + s) for s in SECRET_NAMES)


def cut(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, with a count of the rest."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted field names -> values as short text; secret fields masked."""
    out: dict[str, str] = {}
    for name, value in values.items():
        path = f"{prefix}{name}"
        if len(out) >= MAX_FIELDS:
            break
        if is_secret(path):
            out[path] = SECRET_MARK
        elif isinstance(value, Mapping) and value and path.count(".") < 2:
            out.update(flatten(value, f"{path}."))
        elif isinstance(value, str):
            out[path] = cut(value)
        else:
            out[path] = cut(orjson.dumps(value, default=str).decode())
    return dict(list(out.items())[:MAX_FIELDS])


def record(
    c: sqlite3.Connection,
    *,
    token_name: str,
    method: str,
    target: str,
    fields: Mapping[str, str],
    outcome: str,
    peer: str,
    now: float | None = None,
) -> None:
    c.execute(
        "INSERT INTO audit_events (time, token_name, method, target, fields, outcome, peer)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            time.time() if now is None else now,
            cut(token_name, 100),
            cut(method, 200),
            cut(target, 300),
            orjson.dumps(dict(fields)).decode(),
            cut(outcome, 300),
            cut(peer, 100),
        ),
    )


def list_events(
    c: sqlite3.Connection,
    *,
    start_time: float | None,
    end_time: float | None,
    method: str,
    token_name: str,
    before_seq: int | None,
    limit: int,
) -> list[AuditEvent]:
    """Events newest first (by ``seq``), filtered; ``before_seq`` continues a listing."""
    where: list[str] = []
    params: list[float | str | int] = []
    if start_time is not None:
        where.append("time >= ?")
        params.append(start_time)
    if end_time is not None:
        where.append("time < ?")
        params.append(end_time)
    if method:
        where.append("(method = ? OR method LIKE ?)")
        params += [method, f"%/{method}"]
    if token_name:
        where.append("token_name = ?")
        params.append(token_name)
    if before_seq is not None:
        where.append("seq < ?")
        params.append(before_seq)
    sql = "SELECT seq, time, token_name, method, target, fields, outcome, peer FROM audit_events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY seq DESC LIMIT ?"
    params.append(limit)
    return [
        AuditEvent(seq, at, name, m, target, orjson.loads(fields), outcome, peer)
        for seq, at, name, m, target, fields, outcome, peer in c.execute(sql, params)
    ]


async def expire_audit_events(
    db: Database, retention: float, now: float | None = None, chunk: int = EXPIRE_CHUNK
) -> int:
    """Deletes the audit events older than ``retention`` seconds, a chunk per transaction
    (as dead-letter retention does); returns how many."""
    cutoff = (time.time() if now is None else now) - retention

    def step(c: sqlite3.Connection) -> int:
        seqs = [
            (seq,)
            for (seq,) in c.execute(
                "SELECT seq FROM audit_events WHERE time < ? ORDER BY time LIMIT ?",
                (cutoff, chunk),
            )
        ]
        c.executemany("DELETE FROM audit_events WHERE seq = ?", seqs)
        return len(seqs)

    return await db.write_in_chunks(step, chunk)


def audit_retention(
    db: Database,
    retention: float = AUDIT_RETENTION_DAYS * DAY,
    interval: float = AUDIT_RETENTION_INTERVAL,
    start_delay: float = AUDIT_RETENTION_START_DELAY,
) -> Periodic:
    """``expire_audit_events`` in the background, logged as ``audit_events_expired``."""

    async def expire() -> dict[str, Any]:
        return {"deleted": await expire_audit_events(db, retention)}

    return Periodic("audit_events_expired", expire, interval=interval, start_delay=start_delay)
