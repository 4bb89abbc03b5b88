"""Erasing one customer from the outbound log (``EraseCustomer``).

A request row stays (it is the history of the connection: its time, status and the other
customers it carried); the customer's part of it goes:

- their ``log_customers`` rows keep their place and outcome, with the customer ID, name
  and message blanked. They are updated, not deleted: the customer index points at rows
  by rowid, and DuckDB keeps rowids through an update, not through a delete;
- their entries in the customer index are deleted (the runs are read by hash, never by
  rowid);
- in the stored request and response bodies, every element of a JSON array that carries
  one of the customer's values (the customer ID or an identifier a connector sends for
  them) is replaced by ``"[erased]"``, so the other customers keep their positions, which
  per-customer errors refer to; a body whose top level carries them, and any non-JSON
  body, has those values replaced in its text;
- in response bodies and messages, those values and the customer's attribute values
  are replaced wherever they are quoted (an error that repeats a rejected e-mail), and
  in the request's error the customer's own message.

The values are matched whole in JSON strings, and inside longer strings (an error that
quotes an e-mail address) only from ``MIN_QUOTED`` characters, so a short customer ID
such as "7" does not blank every "7" in a message.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import duckdb
import orjson

from engine.outbound_log.customer_index import run_table
from engine.outbound_log.sql import joined_errors

ERASED = "[erased]"
MIN_QUOTED = 6
"""Shortest value replaced inside a longer string."""


@dataclass(frozen=True)
class LogErasure:
    """What erasing a customer changed in the outbound log."""

    requests: int = 0  # requests that carried the customer (bodies redacted)
    customer_rows: int = 0  # the customer's rows, blanked
    index_entries: int = 0  # customer-index entries deleted

    def __add__(self, other: LogErasure) -> LogErasure:
        return LogErasure(
            self.requests + other.requests,
            self.customer_rows + other.customer_rows,
            self.index_entries + other.index_entries,
        )


class Redactor:
    """Replaces one customer's values in bodies and messages (see the module doc).
    ``quoted`` are more values replaced only inside strings (from ``MIN_QUOTED``
    characters), never used to pick an array element."""

    def __init__(self, values: Collection[str], quoted: Collection[str] = ()) -> None:
        self._values = frozenset(v for v in values if v)
        # Longest first, so an address is replaced before a shorter value inside it.
        self._quoted = sorted(
            {v for v in (*self._values, *quoted) if len(v) >= MIN_QUOTED}, key=len, reverse=True
        )

    def widened(self, quoted: Collection[str]) -> Redactor:
        """This redactor with more ``quoted`` values."""
        return Redactor(self._values, (*self._quoted, *quoted))

    def text(self, text: str) -> str:
        """``text`` with every value of ``MIN_QUOTED`` characters or more replaced."""
        if text in self._values:
            return ERASED
        for value in self._quoted:
            if value in text:
                text = text.replace(value, ERASED)
        return text

    def body(self, body: str) -> str:
        """A stored request or response body without the customer (see the module doc)."""
        if not body or not any(v in body for v in (*self._values, *self._quoted)):
            return body
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self.text(body)
        return orjson.dumps(self._redact(doc)).decode()

    def _redact(self, node: Any) -> Any:
        if isinstance(node, str):
            return self.text(node)
        if isinstance(node, list):
            return [
                ERASED
                if isinstance(item, (dict, list)) and self._carries(item)
                else self._redact(item)
                for item in node
            ]
        if isinstance(node, dict):
            return {self.text(k): self._redact(v) for k, v in node.items()}
        return node

    def _carries(self, node: Any) -> bool:
        """Whether a JSON value holds one of the values as a whole string, at any depth."""
        if isinstance(node, str):
            return node in self._values
        if isinstance(node, list):
            return any(self._carries(item) for item in node)
        if isinstance(node, dict):
            return any(k in self._values or self._carries(v) for k, v in node.items())
        return False


def erase_in_partition(
    cur: duckdb.DuckDBPyConnection,
    partition: str,
    customer_id: str,
    redactor: Redactor,
    wide: Redactor,
) -> LogErasure:
    """Erases the customer from one partition in one transaction. ``redactor`` is used on
    request bodies, ``wide`` (which also knows the customer's attribute values) on
    responses and messages. The caller holds the partition frozen (no writer, no
    indexer)."""
    p = partition
    cur.begin()
    try:
        hits = cur.execute(
            f"SELECT DISTINCT request_id FROM {p}.log_customers WHERE customer_id = ?",
            [customer_id],
        ).fetchall()
        runs = [run for (run,) in cur.execute(f"SELECT run FROM {p}.log_index_runs").fetchall()]
        entries = 0
        for run in runs:
            (deleted,) = cur.execute(
                f"DELETE FROM {p}.{run_table(run)} WHERE customer_hash = hash(?::VARCHAR)",
                [customer_id],
            ).fetchall()[0]
            if deleted:
                entries += int(deleted)
                cur.execute(
                    f"UPDATE {p}.log_index_runs SET entries = entries - ? WHERE run = ?",
                    [int(deleted), run],
                )
        if not hits:
            cur.commit()
            return LogErasure(index_entries=entries)
        ids = [request_id for (request_id,) in hits]
        # The customer's own messages, which a request's error may quote.
        own = {
            request_id: message
            for request_id, message in cur.execute(
                f"SELECT request_id, error FROM {p}.log_customers"
                " WHERE customer_id = ? AND error <> ''",
                [customer_id],
            ).fetchall()
        }
        (rows,) = cur.execute(
            f"UPDATE {p}.log_customers SET customer_id = '', name = '', error = ''"
            " WHERE customer_id = ?",
            [customer_id],
        ).fetchall()[0]
        chosen = "id IN (SELECT unnest(?::VARCHAR[]))"
        # By rowid: reading the time column back would need pytz, which DuckDB wants for
        # TIMESTAMPTZ values in Python.
        bodies = cur.execute(
            f"SELECT rowid, request_body, response_body FROM {p}.log_bodies WHERE {chosen}",
            [ids],
        ).fetchall()
        for rowid, request_body, response_body in bodies:
            cur.execute(
                f"UPDATE {p}.log_bodies SET request_body = ?, response_body = ? WHERE rowid = ?",
                [redactor.body(request_body), wide.body(response_body), rowid],
            )
        messages = cur.execute(
            f"SELECT rowid, error FROM {p}.log_customers"
            " WHERE request_id IN (SELECT unnest(?::VARCHAR[])) AND error <> ''",
            [ids],
        ).fetchall()
        for rowid, message in messages:
            redacted = wide.text(message)
            if redacted != message:
                cur.execute(
                    f"UPDATE {p}.log_customers SET error = ? WHERE rowid = ?", [redacted, rowid]
                )
        errors = cur.execute(
            f"SELECT rowid, id, error FROM {p}.log_requests WHERE {chosen}", [ids]
        ).fetchall()
        for rowid, request_id, error in errors:
            customer_errors = cur.execute(
                f"SELECT error FROM {p}.log_customers WHERE request_id = ? ORDER BY position",
                [request_id],
            ).fetchall()
            if own.get(request_id):
                error = error.replace(own[request_id], ERASED)
            error = wide.text(error)
            cur.execute(
                f"UPDATE {p}.log_requests SET error = ?, error_text = ? WHERE rowid = ?",
                [error, joined_errors(error, [e for (e,) in customer_errors]), rowid],
            )
        cur.commit()
    except BaseException:
        cur.rollback()
        raise
    return LogErasure(len(ids), int(rows), entries)
