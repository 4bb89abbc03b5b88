"""Braze beside Insider with real processes and faults: ``tidegate braze-sandbox``,
``tidegate sandbox`` and ``tidegate serve`` as subprocesses (tests/faultload.py), one
Antavo load feeding an Insider and a Braze connection. While Braze fails (503s, 429s,
answers lost after Braze applied the request, a customer Braze refuses), Insider drains
on its own; afterwards Braze holds every acknowledged event, in order per customer,
duplicated only where an answer was lost after Braze applied it (no idempotency at
Braze: at least once), and the refused customer's items are its dead letters alone."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from engine.pb import dead_letters_pb2 as dpb
from engine.pb import dead_letters_pb2_grpc
from tests.faultload import (
    BIN,
    CONNECTION_ID,
    SOURCE_EVENT,
    TARGET_EVENT,
    Harness,
    _Process,
    admin_client,
    check,
    free_port,
    wait_drained,
)

BRAZE_KEY = "braze-fault-key-0123456789"
BRAZE_ID = "braze-fault"


class BrazeSandboxProcess(_Process):
    name = "braze-sandbox"

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        super().__init__(log_path, [self.port])
        self.url = f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [str(BIN / "tidegate"), "braze-sandbox", "--port", str(self.port),
                "--api-key", BRAZE_KEY]  # fmt: skip


async def control(url: str, method: str, path: str, body: Any = None) -> Any:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url + path, json=body) as response:
            assert response.status == 200, await response.text()
            return await response.json()


async def braze_delivered(url: str) -> dict[str, list[int]]:
    users = (await control(url, "GET", "/sandbox/users"))["users"]
    return {
        user["external_id"]: [
            int(e["properties"]["seq"]) for e in user["events"] if e["name"] == TARGET_EVENT
        ]
        for user in users
    }


async def test_braze_faults_never_slow_insider_and_lose_nothing(
    harness: Harness, tmp_path: Path
) -> None:
    braze = BrazeSandboxProcess(tmp_path / "braze-sandbox.out")
    await asyncio.to_thread(braze.start)
    try:
        await run(harness, braze)
    finally:
        braze.close()


async def run(harness: Harness, braze: BrazeSandboxProcess) -> None:
    await harness.create_connection()
    async with admin_client(harness.engine.target) as client:
        await client.create_connection(
            BRAZE_ID,
            connector="braze",
            api_key=BRAZE_KEY,
            settings={"rest_endpoint": braze.url},
            target_identifier="external_id",
        )
        await client.create_event_mapping(
            BRAZE_ID,
            SOURCE_EVENT,
            TARGET_EVENT,
            [("points", "points", False), ("seq", "seq", False)],
        )
    refused = "run-w0-c00000"
    await control(braze.url, "POST", "/sandbox/config", {"blocklist": [refused]})
    await control(braze.url, "POST", "/sandbox/faults", {"status": 503, "count": 100_000})

    load = harness.load(customers=12, workers=3, batch=20)
    load.start()
    await load.wait_acknowledged(400, within=60)
    await load.stop()
    started = time.monotonic()
    await wait_drained(harness.engine.target, within=30, sandbox=harness.control)
    insider_drained = time.monotonic() - started
    async with admin_client(harness.engine.target) as client:
        braze_state = await client.get_connection(BRAZE_ID)
    assert braze_state.queue_depth > 0  # Braze was still failing while Insider drained
    assert insider_drained < 30
    insider = check(load.acknowledged, await harness.control.delivered(), load.sent)
    assert insider.ok and insider.missing == 0, insider.details()

    # The outage ends with 429s, and answers lost after Braze applied the request.
    await control(braze.url, "DELETE", "/sandbox/faults")
    lost = 3
    await control(braze.url, "POST", "/sandbox/faults", [
        {"status": 429, "headers": {"x-ratelimit-retry-after": "1"}, "count": 3},
        {"drop": True, "apply": True, "count": lost},
    ])  # fmt: skip
    async with admin_client(harness.engine.target) as client:
        deadline = time.monotonic() + 60
        while (await client.get_connection(BRAZE_ID)).queue_depth:
            assert time.monotonic() < deadline, "Braze backlog not drained within 60 s"
            await asyncio.sleep(0.2)
        ambiguous = [
            row for row in (await client.list_logs(page_size=1000, connection_id=BRAZE_ID)).logs
            if row.status_code == 0
        ]  # fmt: skip
        stub = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)
        dead = await stub.ListDeadLetters(
            dpb.ListDeadLettersRequest(
                filter=dpb.DeadLetterFilter(connection_id=BRAZE_ID), page_size=1000
            )
        )
    assert len(ambiguous) >= lost

    delivered = await braze_delivered(braze.url)
    acknowledged = {c: s for c, s in load.acknowledged.items() if c != refused}
    report = check(acknowledged, {c: s for c, s in delivered.items() if c != refused},
                   {c: n for c, n in load.sent.items() if c != refused})  # fmt: skip
    assert report.missing == 0 and report.reordered == 0 and report.unexpected == 0, (
        report.details()
    )
    # Only a request whose answer was lost after Braze applied it is sent again: each
    # of its events is stored once more, no other event is.
    requests = (await control(braze.url, "GET", "/sandbox/requests"))["requests"]
    resent = sum(
        1
        for r in requests
        if r.get("fault") == "dropped"
        for e in orjson.loads(r["body"]).get("events", [])
        if e["external_id"] != refused
    )
    assert resent > 0
    assert report.duplicates == resent, report.summary()
    assert refused not in delivered
    assert {d.customer_id for d in dead.dead_letters} == {refused}
    assert len(dead.dead_letters) == len(load.acknowledged[refused])
    assert all("blacklisted" in d.error and d.stage == "destination" for d in dead.dead_letters)
    assert CONNECTION_ID != BRAZE_ID
