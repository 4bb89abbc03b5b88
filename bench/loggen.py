"""Generated outbound logs for the log-search benchmark, cached under ``bench/.cache/``.

Rows are written by DuckDB itself (``INSERT ... SELECT`` over ``range()``) into the
tables that ``engine.outbound_log.sql.SCHEMA`` creates: this is about 50 times faster than
building the same rows in Python, which keeps a first run of the 10M-row file within the
harness's time budget. Everything is derived from the row number by ``hash()``, so a
file is the same on every machine. The shape:

- rows spread evenly over ``SPAN``, ending when the log was made, in time order, in one
  file per week as the engine partitions the log (``engine.outbound_log.partitions``); ids
  are UUIDv7 carrying the row's millisecond, as ``new_request_id`` makes them;
- two connections (80% / 20%); 1 to 4 customers per request (2.5 on average) drawn from
  a million customer ids, so one customer is in about 25 requests per 10M rows;
- 94% delivered (200), 3% a 200 with one customer rejected (an email error), 1.5% 429,
  1% 500, 0.3% no answer, 0.2% 400 -- with the engine's error texts;
- a request body of about 250 bytes per customer, and Insider's response body.

The cache key covers the schema text, so a schema change makes a new file. The customer
index (see ``engine.outbound_log.customer_index``) is not generated here: ``ensure_log``
opens the file with ``LogStore`` and waits for ``indexed()``, exactly as the engine
builds it when it opens a log written before the index existed. So a file cached by an
older version is upgraded in place on first use (once: about 20 s for 10M rows), a new
one is indexed after it is generated, and the benchmark never times searches against a
half-built index.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from engine.outbound_log.migrations import open_schema
from engine.outbound_log.partitions import LOG_DIR, PARTITION_SPAN, read_only, week_of
from engine.outbound_log.sql import SCHEMA, connect
from engine.outbound_log.store import LogStore
from engine.upgrade import migrate

GENERATOR_VERSION = "5"  # 5: one file per week, as the engine partitions the log
CHUNK = 1_000_000
SPAN_SECONDS = 30 * 24 * 3600
CUSTOMER_POOL = 1_000_000
SAMPLES_FILE = "samples.json"
EMAIL_ERROR = "users.0.attributes.email.email: The email must be a valid email address."

# Per row number ``i``: k decides the outcome, n the customer count, c<pos> the customers.
_BASE = """
SELECT i,
       $start_ms + (i * $step_us) // 1000 AS ms,
       (hash(i, 1) % 1000)::BIGINT AS k,
       (1 + hash(i, 2) % 4)::BIGINT AS n
FROM range($first, $last) t(i)
"""
_STATUS = "CASE WHEN k < 970 THEN 200 WHEN k < 985 THEN 429 WHEN k < 995 THEN 500"
_STATUS += " WHEN k < 998 THEN 0 ELSE 400 END"
_ERROR = f"""CASE
  WHEN k < 940 THEN ''
  WHEN k < 970 THEN '1 of ' || n || ' customers rejected: {EMAIL_ERROR}'
  WHEN k < 985 THEN 'rate limited by Insider (HTTP 429)'
  WHEN k < 995 THEN 'Insider answered HTTP 500: The request processing has failed because of an unknown error.'
  WHEN k < 998 THEN 'cannot connect: Connection refused'
  ELSE 'Insider rejected the request (HTTP 400): users must be at most 1000: bad request' END"""  # noqa: E501
# As engine.outbound_log.sql.error_text: the request's and its customers' distinct errors,
# lowercased.
_ERROR_TEXT = f"""CASE WHEN k < 940 THEN ''
  WHEN k < 970 THEN lower(({_ERROR}) || chr(10) || '{EMAIL_ERROR}')
  ELSE lower({_ERROR}) END"""
_TIME = "make_timestamptz(ms * 1000)"
_ID = (
    "printf('%08x-%04x-7%03x-%04x-%012x', ms // 65536, ms % 65536, hash(i, 5) % 4096,"
    " 32768 + hash(i, 6) % 16384, hash(i, 7) % 281474976710656)"
)
_CUSTOMER = f"'cust-' || (hash(i, 10 + pos) % {CUSTOMER_POOL})"

REQUESTS_SQL = f"""
INSERT INTO log_requests BY NAME
SELECT {_TIME} AS time, {_ID} AS id,
       CASE WHEN hash(i, 3) % 5 = 0 THEN 'insider-eu' ELSE 'insider-main' END AS connection_id,
       'POST' AS method, 'https://unification.useinsider.com/api/user/v1/upsert' AS url,
       {_STATUS} AS status_code, 0.02 + (hash(i, 4) % 400) / 1000.0 AS response_time,
       {_ERROR} AS error, n AS customer_count, 3 AS mapping_version,
       CASE WHEN k >= 970 AND k < 998 THEN 1 + hash(i, 8) % 3 ELSE 1 END AS attempt,
       k >= 995 AND k < 998 AS ambiguous, '' AS tags,
       {_ERROR_TEXT} AS error_text
FROM ({_BASE})
"""
CUSTOMERS_SQL = f"""
INSERT INTO log_customers BY NAME
SELECT {_TIME} AS time, {_ID} AS request_id, pos AS position, {_CUSTOMER} AS customer_id,
       'Customer ' || (hash(i, 10 + pos) % {CUSTOMER_POOL}) AS name,
       CASE WHEN k < 940 THEN 'delivered'
            WHEN k < 970 THEN CASE WHEN pos = 0 THEN 'failed' ELSE 'delivered' END
            WHEN k < 998 THEN 'retry' ELSE 'failed' END AS outcome,
       CASE WHEN k < 940 THEN ''
            WHEN k < 970 THEN CASE WHEN pos = 0 THEN '{EMAIL_ERROR}' ELSE '' END
            ELSE {_ERROR} END AS error
FROM (SELECT *, unnest(range(n)) AS pos FROM ({_BASE}))
"""
_USER = (
    'printf(\'{"identifiers":{"uuid":"cust-%d"},"events":[{"event_name":"purchase",'
    '"timestamp":"%s","event_params":{"event_group_id":"ORD-%d","unit_sale_price":'
    '%d.%02d,"currency":"EUR","custom":{"store_code":"BUD-%02d"}}}]}\','
    " hash(i, 10 + x) % 1000000, strftime(make_timestamptz(ms * 1000), '%Y-%m-%dT%H:%M:%SZ'),"
    " i * 4 + x, hash(i, 20 + x) % 500, hash(i, 30 + x) % 100, hash(i, 40 + x) % 40)"
)
BODIES_SQL = f"""
INSERT INTO log_bodies BY NAME
SELECT {_ID} AS id, {_TIME} AS time,
       '{{"users":[' || array_to_string(list_transform(range(n), lambda x: {_USER}), ',')
           || ']}}' AS request_body,
       CASE WHEN {_STATUS} = 200 AND k < 940
                THEN '{{"data":{{"successful":{{"count":' || n || '}},"fail":{{}}}}}}'
            WHEN {_STATUS} = 200
                THEN '{{"data":{{"successful":{{"count":' || (n - 1)
                     || '}},"fail":{{"count":1,"errors":{{"users.0.attributes.email.email":'
                     || '["The email must be a valid email address."]}}}}}}}}'
            WHEN {_STATUS} = 0 THEN ''
            ELSE '{{"error":"rejected"}}' END AS response_body
FROM ({_BASE})
"""


def cache_key(rows: int) -> str:
    digest = hashlib.sha256(f"{GENERATOR_VERSION}\n{rows}\n{SCHEMA}".encode()).hexdigest()
    return digest[:12]


def ensure_log(cache_dir: Path, rows: int, log: Any = print) -> Path:
    """A data dir holding an outbound log of ``rows`` requests (made once, then reused),
    with ``samples.json`` beside it (ids, customers and the time range to query)."""
    data_dir = cache_dir / f"log-{rows}-{cache_key(rows)}"
    if (data_dir / SAMPLES_FILE).exists():
        index_log(data_dir / LOG_DIR, log)
        return data_dir
    if data_dir.exists():
        shutil.rmtree(data_dir)  # an interrupted earlier run
    building = data_dir.with_name(data_dir.name + ".partial")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    started = time.monotonic()
    folder = building / LOG_DIR
    folder.mkdir()
    end_ms = int(time.time() * 1000)
    step_us = SPAN_SECONDS * 1_000_000 // rows
    start_ms = end_ms - SPAN_SECONDS * 1000
    done = 0
    for week, first, last in _weeks(rows, start_ms, step_us):
        conn = connect(str(folder / f"{week:%Y-%m-%d}.duckdb"))  # as the engine creates one
        try:
            conn.execute("SET TimeZone = 'UTC'")
            conn.execute("SET enable_progress_bar = false")
            open_schema(conn, folder / f"{week:%Y-%m-%d}.duckdb")  # at the log's version
            _check_columns(conn)
            for chunk in range(first, last, CHUNK):
                params = {
                    "first": chunk,
                    "last": min(last, chunk + CHUNK),
                    "start_ms": start_ms,
                    "step_us": step_us,
                }
                conn.begin()
                for sql in GENERATED.values():
                    conn.execute(sql, params)
                conn.commit()
                done += params["last"] - chunk
                log(f"  log rows generated: {done:,} of {rows:,}")
            conn.execute("CHECKPOINT")
        finally:
            conn.close()
    with read_only(folder) as conn:
        samples = _samples(conn)
    samples["seconds_to_generate"] = round(time.monotonic() - started, 1)
    (building / SAMPLES_FILE).write_text(json.dumps(samples, indent=1))
    building.rename(data_dir)
    index_log(data_dir / LOG_DIR, log)
    return data_dir


def _weeks(rows: int, start_ms: int, step_us: int) -> list[tuple[datetime, int, int]]:
    """(partition start, first row, end row) of each week the rows' times fall in: row
    ``i`` is at ``start_ms + (i * step_us) // 1000`` milliseconds (``_BASE``)."""
    weeks: list[tuple[datetime, int, int]] = []
    first = 0
    while first < rows:
        week = week_of(datetime.fromtimestamp((start_ms + first * step_us // 1000) / 1000, UTC))
        end_ms = int((week + PARTITION_SPAN).timestamp() * 1000)
        # The first row at or after the week's end (times grow with the row number).
        low, high = first + 1, rows
        while low < high:
            middle = (low + high) // 2
            if start_ms + (middle * step_us) // 1000 < end_ms:
                low = middle + 1
            else:
                high = middle
        weeks.append((week, first, low))
        first = low
    return weeks


def index_log(path: Path, log: Any = print) -> None:
    """Opens the log with ``LogStore`` and waits until its customer index covers every
    row (it builds or completes the index if needed; quick when it is complete). A file
    cached before the log recorded its schema version is migrated first."""
    migrate(path.parent)

    async def run() -> None:
        store = LogStore(path)
        await store.start()
        try:
            await store.indexed()
        finally:
            await store.close()

    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:  # the caller may be inside an event loop
        pool.submit(asyncio.run, run()).result()
    log(f"  log customer index ready ({time.monotonic() - started:.1f} s)")


GENERATED = {
    "log_requests": REQUESTS_SQL,
    "log_customers": CUSTOMERS_SQL,
    "log_bodies": BODIES_SQL,
}


def _check_columns(conn: duckdb.DuckDBPyConnection) -> None:
    """Fails clearly when engine.outbound_log.sql's schema has a column this generator does not
    fill, instead of with a NOT NULL error halfway through."""
    for table, sql in GENERATED.items():
        names = [r[0] for r in conn.execute(f"DESCRIBE {table}").fetchall()]
        missing = [n for n in names if not re.search(rf"\bAS {n}\b", sql)]
        if missing:
            raise RuntimeError(
                f"the outbound log's {table} has columns bench/loggen.py does not generate: "
                f"{', '.join(missing)}; add them to its {table} SELECT"
            )


def _samples(conn: duckdb.DuckDBPyConnection) -> dict[str, Any]:
    ids = [r[0] for r in conn.execute("SELECT id FROM log_requests USING SAMPLE 200").fetchall()]
    customers = [
        r[0]
        for r in conn.execute("SELECT customer_id FROM log_customers USING SAMPLE 200").fetchall()
    ]
    first, last = conn.execute(
        "SELECT epoch_ms(min(time)), epoch_ms(max(time)) FROM log_requests"
    ).fetchone() or (0, 0)
    (rows,) = conn.execute("SELECT count(*) FROM log_requests").fetchone() or (0,)
    return {"rows": rows, "ids": ids, "customers": customers, "first_ms": first, "last_ms": last}
