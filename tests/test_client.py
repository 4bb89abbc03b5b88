"""The Python client against a real engine and the Insider sandbox over loopback."""

from __future__ import annotations

import asyncio
import contextlib

from clients.client import TidegateClient
from engine.pb import logs_pb2
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import eventually, insider_connection

CONNECTION = "insider-main"
OTHER = "insider-other"


def opt_in(customer: str) -> dict[str, object]:
    return {"customer": customer, "action": "opt_in", "data": {"email": f"{customer}@example.com"}}


def customers_of(entries: list[logs_pb2.LogEntry]) -> set[str]:
    return {c.customer_id for e in entries for c in e.customers}


async def test_stream_logs_yields_new_entries_of_the_filtered_connection(
    client: TidegateClient, sandbox: RunningSandbox
) -> None:
    await insider_connection(client, sandbox, CONNECTION)
    await insider_connection(client, sandbox, OTHER)  # maps the same events
    await client.send_events([opt_in("before")])

    async def before_logged() -> bool:
        return len((await client.list_logs(connection_id=CONNECTION)).logs) == 1

    await eventually(before_logged)

    received: list[logs_pb2.LogEntry] = []

    async def consume() -> None:
        async with contextlib.aclosing(client.stream_logs(connection_id=CONNECTION)) as stream:
            async for entry in stream:
                received.append(entry)
                if "after" in customers_of(received):
                    return

    consumer = asyncio.create_task(consume())
    try:
        # The stream sees only what is logged once it is open, so probe until it has
        # delivered something; then the entry of interest.
        probes = 0

        async def stream_is_live() -> bool:
            nonlocal probes
            if not received:
                probes += 1
                await client.send_events([opt_in(f"probe-{probes}")])
                await asyncio.sleep(0.2)
            return bool(received)

        await eventually(stream_is_live)
        await client.send_events([opt_in("after")])
        await asyncio.wait_for(consumer, timeout=10)
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer

    assert {e.connection_id for e in received} == {CONNECTION}
    assert "before" not in customers_of(received)
    (after,) = [e for e in received if "after" in customers_of([e])]
    listed = (await client.list_logs(connection_id=CONNECTION, customer_id="after")).logs
    assert [e.id for e in listed] == [after.id]
    assert after.status_code == 200 and after.customers[0].outcome == "delivered"
    # The other connection logged the same traffic, which the filter kept out.
    assert (await client.list_logs(connection_id=OTHER, customer_id="after")).logs
