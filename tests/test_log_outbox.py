"""The outbound log's outbox: rows settled with their items survive a crash of the log
writer and reach DuckDB on the next start."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from clients.client import TidegateClient
from engine.app import Engine, EngineConfig
from engine.outbound_log import outbox as log_outbox
from engine.outbound_log.rows import LogCustomer, LogRow, new_request_id
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import (
    FAST_DELIVERY,
    TEST_DESTINATIONS,
    eventually,
    insider_connection,
    post_events,
)


def sample_row() -> LogRow:
    at = datetime.now(UTC)
    return LogRow(
        id=new_request_id(at=at),
        time=at,
        connection_id="c1",
        method="POST",
        url="http://127.0.0.1:9/api/user/v1/upsert",
        status_code=200,
        response_time=0.01,
        error="1 of 2 customers rejected: bad email",
        customers=(
            LogCustomer("a", "Ana K", "delivered"),
            LogCustomer("b", "", "failed", "bad email"),
        ),
        mapping_version=4,
        attempt=2,
        ambiguous=True,
        request_body='{"users":[]}',
        response_body='{"data":{}}',
        tags="replay",
    )


def test_an_encoded_row_decodes_to_the_same_row() -> None:
    row = sample_row()
    request_id, blob = log_outbox.encode(row)
    assert request_id == row.id
    assert log_outbox.decode(blob) == row


async def outbox_ids(engine: Engine) -> list[str]:
    rows = await engine.db.read(lambda c: c.execute("SELECT request_id FROM log_outbox").fetchall())
    return [r[0] for r in rows]


async def test_rows_staged_before_a_crash_are_written_on_the_next_start(tmp_path: Path) -> None:
    config = EngineConfig(
        data_dir=tmp_path,
        grpc_port=0,
        http_port=0,
        delivery=FAST_DELIVERY,
        allowed_destinations=TEST_DESTINATIONS,
    )
    row = sample_row()
    first = Engine(config)
    await first.start()
    # As if the engine died after settling a request but before DuckDB took its row.
    await first.db.write(lambda c: log_outbox.stage(c, [log_outbox.encode(row)]))
    assert await first.logs.get(row.id) is None  # only the outbox has it
    await first.stop()

    config.grpc_port = config.http_port = 0
    second = Engine(config)
    await second.start()
    try:
        stored = await second.logs.get(row.id)
        assert stored == row
        assert await outbox_ids(second) == []
    finally:
        await second.stop()


async def test_delivered_requests_leave_the_outbox_once_logged(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    await post_events(http, engine, {"customer": "a", "action": "point_add", "data": {"points": 1}})

    async def logged_and_cleared() -> bool:
        listed = (await client.list_logs()).logs
        return len(listed) == 1 and await outbox_ids(engine) == []

    await eventually(logged_and_cleared)
