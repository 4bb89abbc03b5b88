"""Admin API tokens: named, with a role, an optional expiry, revocable.

A token is ``tg_<id>_<secret>``: ``id`` (12 hex digits) names its row and is not secret,
``secret`` is 256 random bits from ``secrets`` (43 URL-safe characters). The token is
shown once, when it is made; the table keeps only its SHA-256. A slow, salted password
hash (bcrypt, scrypt) exists to make guessing a *low-entropy* password expensive; a
256-bit random secret cannot be guessed, so one SHA-256 is as strong and costs about a
microsecond per RPC instead of tens of milliseconds. A check reads the row by ``id`` and
compares the hashes with ``hmac.compare_digest`` (constant time), so neither a wrong
secret nor an unknown id answers any faster than a right one would.

These functions take a ``sqlite3.Connection``: the engine runs them in its ``Database``
transactions, and ``tidegate token`` on a connection of its own, while an engine serves
the same folder or not (SQLite's WAL lets both, and the engine reads each token on use,
so it sees a change at once).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from enum import IntEnum

from engine.errors import InvalidInputError, NotFoundError


class Role(IntEnum):
    """A token's role; each includes the ones below it."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str, field: str = "role") -> Role:
        for role in cls:
            if role.label == text:
                return role
        raise InvalidInputError(
            field, f"{_shown(text)} is not a role; use one of viewer, operator, admin"
        )


TOKEN_PREFIX = "tg_"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_TOKEN_RE = re.compile(r"tg_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
LAST_USED_EVERY = 60.0
"""A token's last-used time is written at most this often (seconds), never per RPC."""
ADMIN_TOKEN_FILE = "admin-token"
"""Where the first start on a data folder without tokens writes an admin token (0600)."""
TOKEN_ENV = "TIDEGATE_TOKEN"
"""The environment variable the ``tidegate`` commands that call the engine read a token
from (before ``<data-dir>/admin-token``)."""
BOOTSTRAP_NAME = "bootstrap-admin"
"""The name of the admin token the first ``serve`` writes to ``<data-dir>/admin-token``."""


@dataclass(frozen=True)
class TokenInfo:
    """What is known about a token; never its secret or hash."""

    id: str
    name: str
    role: Role
    create_time: float
    expire_time: float | None
    last_used_time: float | None
    revoke_time: float | None

    def usable(self, now: float) -> bool:
        return self.revoke_time is None and (self.expire_time is None or now < self.expire_time)


def _shown(text: str, limit: int = 100) -> str:
    """``text`` quoted for a message, cut to ``limit`` characters with a count of the rest."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text) - limit} more characters)"


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise InvalidInputError(
            "name",
            f"{_shown(name)} is not a token name: 1-64 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit",
        )


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


_COLUMNS = "id, name, role, create_time, expire_time, last_used_time, revoke_time"


def _info(row: tuple[object, ...]) -> TokenInfo:
    id_, name, role, create, expire, used, revoked = row
    return TokenInfo(
        id=str(id_),
        name=str(name),
        role=Role[str(role).upper()],
        create_time=float(create),  # type: ignore[arg-type]
        expire_time=None if expire is None else float(expire),  # type: ignore[arg-type]
        last_used_time=None if used is None else float(used),  # type: ignore[arg-type]
        revoke_time=None if revoked is None else float(revoked),  # type: ignore[arg-type]
    )


def create_token(
    c: sqlite3.Connection,
    name: str,
    role: Role,
    expires_in: float | None = None,
    now: float | None = None,
) -> tuple[str, TokenInfo]:
    """Stores a new token; returns the token (to show once) and its info. A name already
    held by a token not revoked is refused."""
    check_name(name)
    if expires_in is not None and not expires_in > 0:
        raise InvalidInputError("expires_in", "must be a positive duration, or none")
    at = time.time() if now is None else now
    taken = c.execute(
        "SELECT 1 FROM admin_tokens WHERE name = ? AND revoke_time IS NULL", (name,)
    ).fetchone()
    if taken:
        raise InvalidInputError(
            "name", f"a token named {name!r} exists; revoke it first, or choose another name"
        )
    token_id = secrets.token_hex(6)
    token = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
    expire = None if expires_in is None else at + expires_in
    c.execute(
        "INSERT INTO admin_tokens (id, name, role, token_hash, create_time, expire_time)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (token_id, name, role.label, token_hash(token), at, expire),
    )
    return token, TokenInfo(token_id, name, role, at, expire, None, None)


def list_tokens(c: sqlite3.Connection) -> list[TokenInfo]:
    """Every token, revoked ones too, in the order they were made."""
    rows = c.execute(f"SELECT {_COLUMNS} FROM admin_tokens ORDER BY create_time, id")
    return [_info(row) for row in rows]


def revoke_token(c: sqlite3.Connection, name: str, now: float | None = None) -> TokenInfo:
    """Revokes the token named ``name`` (not yet revoked); ``NotFoundError`` if none."""
    at = time.time() if now is None else now
    row = c.execute(
        f"SELECT {_COLUMNS} FROM admin_tokens WHERE name = ? AND revoke_time IS NULL", (name,)
    ).fetchone()
    if row is None:
        raise NotFoundError(f"no token named {_shown(name)} that is not revoked")
    c.execute("UPDATE admin_tokens SET revoke_time = ? WHERE id = ?", (at, row[0]))
    info = _info(row)
    return TokenInfo(
        info.id, info.name, info.role, info.create_time, info.expire_time, info.last_used_time, at
    )


def has_usable_token(c: sqlite3.Connection, now: float | None = None) -> bool:
    at = time.time() if now is None else now
    row = c.execute(
        "SELECT 1 FROM admin_tokens WHERE revoke_time IS NULL"
        " AND (expire_time IS NULL OR expire_time > ?) LIMIT 1",
        (at,),
    ).fetchone()
    return row is not None


def has_any_token(c: sqlite3.Connection) -> bool:
    return c.execute("SELECT 1 FROM admin_tokens LIMIT 1").fetchone() is not None


_DUMMY_HASH = token_hash("tg_000000000000_" + "A" * 43)


def verify(c: sqlite3.Connection, token: str, now: float | None = None) -> TokenInfo | None:
    """The token's info if ``token`` is a usable token (not revoked, not expired); else
    None, without saying why."""
    match = _TOKEN_RE.fullmatch(token)
    presented = token_hash(token)
    row = None
    if match is not None:
        row = c.execute(
            f"SELECT {_COLUMNS}, token_hash FROM admin_tokens WHERE id = ?", (match[1],)
        ).fetchone()
    stored = bytes(row[-1]) if row is not None else _DUMMY_HASH
    same = hmac.compare_digest(presented, stored)
    if row is None or not same:
        return None
    info = _info(row[:-1])
    return info if info.usable(time.time() if now is None else now) else None


def touch(c: sqlite3.Connection, used: dict[str, float]) -> None:
    """Writes the last-used times in ``used`` (token id -> time)."""
    c.executemany(
        "UPDATE admin_tokens SET last_used_time = max(coalesce(last_used_time, 0), ?) WHERE id = ?",
        [(at, token_id) for token_id, at in used.items()],
    )


DURATION_RE = re.compile(r"(\d+)([smhdw])")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, field: str = "expires_in") -> float:
    """``30d``, ``12h``, ``90m``, ``2w`` or ``45s`` in seconds; ``InvalidInputError``
    otherwise."""
    match = DURATION_RE.fullmatch(text.strip())
    if match is None or int(match[1]) == 0:
        raise InvalidInputError(
            field, f"{_shown(text)} is not a duration such as 30d, 12h, 90m or 2w"
        )
    return float(int(match[1]) * DURATION_UNITS[match[2]])
