"""Delivery reads every customer's stored profile for a batch: the outbound log names each
customer of a many-customer request from its own profile."""

from __future__ import annotations

import aiohttp

from clients.client import TidegateClient
from engine.app import Engine
from engine.outbound_log.rows import LogQuery
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import eventually, insider_connection, post_events

CUSTOMERS = 700  # more than one chunk of any 500-id lookup


async def test_each_customer_of_a_batch_is_logged_under_its_own_profile_name(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    opt_ins = [
        {"customer": f"c{n}", "action": "opt_in", "data": {"first_name": f"Ann{n}", "last_name": "Lee"}}  # noqa: E501
        for n in range(CUSTOMERS)
    ]  # fmt: skip
    assert (await post_events(http, engine, {"events": opt_ins}))[0] == 202

    async def profiles_delivered() -> bool:
        return len(sandbox.state.users) == CUSTOMERS

    await eventually(profiles_delivered, within=30)
    await engine.logs.flush()
    before = {row.id for row in (await engine.logs.page(LogQuery(), 1000))[0]}

    points = [
        {"customer": f"c{n}", "action": "point_add", "data": {"points": n}}
        for n in range(CUSTOMERS)
    ]
    assert (await post_events(http, engine, {"events": points}))[0] == 202

    async def points_delivered() -> bool:
        return all(len(user.events) == 1 for user in sandbox.state.users)

    await eventually(points_delivered, within=30)
    await engine.logs.flush()
    rows, _ = await engine.logs.page(LogQuery(), 1000)
    names: dict[str, str] = {}
    for listed_row in rows:
        if listed_row.id in before:
            continue
        row = await engine.logs.get(listed_row.id)
        assert row is not None
        names.update((c.customer_id, c.name) for c in row.customers)
    assert names == {f"c{n}": f"Ann{n} Lee" for n in range(CUSTOMERS)}
