"""CPU per event of ingest alone: ``python -m bench.ingest_cpu``.

Runs what the ingest worker does for each ``POST /v1/events`` body, without the HTTP
server: ``orjson.loads``, ``parse_request`` and ``Ingestor.ingest`` (dedupe, profiles,
routing, enqueue, commit) on a real SQLite file, with the bench connection (one mapped
``checkout`` event, as in section 3). It reports the process CPU time per event (all
threads: the commit runs on the database thread), the median of ``--repeats`` runs, each
on a fresh data dir. CPU time rather than wall time: the machine is shared, and CPU time
moves much less with the neighbours' load.

To compare two checkouts, run it with ``PYTHONPATH=<checkout>`` for each, one after the
other, and compare the medians.

``--http`` sends every body through the ingest worker's aiohttp app instead (the real
``POST /v1/events`` handler on 127.0.0.1, one keep-alive connection, one request in
flight): the figure then includes the HTTP server and this process's client, so compare
it only with another ``--http`` run. It is what a single-event request costs beyond the
ingest transaction.

``--auth`` adds the ingest credential check of each request (``IngestVerifier.check``):
``bearer``, ``jwt`` (HS256, the same token on every request, as a sender that reuses one)
or ``jwt-fresh`` (a new HS256 token per request, signed before the clock starts).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench.traffic import PARAMETERS, SOURCE_EVENT, TARGET_EVENT, ingest_bodies
from engine.connector.destinations import Allowance
from engine.connector.records import ParameterMapping
from engine.ingest.ingestor import Ingestor
from engine.ingest.parse import parse_request
from engine.plugins import Connectors, plugin_manager
from engine.queue.lanes import DurableQueue
from engine.state.connections import ConnectionRegistry
from engine.state.database import Database
from engine.state.secrets import SecretBox

JWT_SECRET = "bench-jwt-secret-0123456789abcdef-0123456789"


def credentials(auth: str, requests: int) -> tuple[Any, list[str]]:
    """The verifier for ``auth`` and the ``Authorization`` value of each request."""
    if auth == "none":
        return None, [""] * requests
    from engine.ingest.auth import IngestAuth, IngestVerifier

    if auth == "bearer":
        token = "bench-token-0123456789"
        return IngestVerifier(IngestAuth.bearer(token)), [f"Bearer {token}"] * requests
    import jwt

    verifier = IngestVerifier(IngestAuth("jwt", jwt_key=JWT_SECRET))
    if auth == "jwt":
        token = jwt.encode({"iss": "antavo", "iat": int(time.time())}, JWT_SECRET)
        return verifier, [f"Bearer {token}"] * requests
    now = int(time.time())
    return verifier, [
        "Bearer " + jwt.encode({"iss": "antavo", "iat": now, "n": n}, JWT_SECRET)
        for n in range(requests)
    ]


async def post_all(ingestor: Ingestor, bodies: list[bytes], headers: list[str]) -> None:
    """Sends ``bodies`` one after the other to the ingest app on a loopback port."""
    from aiohttp import web

    from engine.ingest.http import INGEST_PATH, create_ingest_app

    token = headers[0].removeprefix("Bearer ")  # a string: releases before 0.2 take only that
    runner = web.AppRunner(create_ingest_app(ingestor, token), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for body, header in zip(bodies, headers, strict=True):
            auth = f"Authorization: {header}\r\n" if header else ""
            writer.write(
                f"POST {INGEST_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            status = await reader.readline()
            if not status.startswith(b"HTTP/1.1 202"):
                raise AssertionError(f"the ingest app answered {status!r}")
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
    finally:
        writer.close()
        await runner.cleanup()


async def one_run(
    data_dir: Path,
    events: int,
    batch: int,
    customers: int,
    auth: str = "none",
    http: bool = False,
) -> float:
    """Process CPU microseconds per event for ingesting ``events`` events."""
    db = Database(data_dir / "state.sqlite3")
    await db.start()
    try:
        registry = ConnectionRegistry(
            db,
            Connectors(plugin_manager(), [Allowance.parse("127.0.0.1")]),
            SecretBox.for_data_dir(data_dir),
        )
        await registry.load()
        await registry.create(
            connection_id="bench",
            display_name="",
            connector="insider",
            settings={"partner_name": "bench", "base_url": "http://127.0.0.1:9"},
            api_key="bench-key",
            customer_id_mapping=None,
            retry_window_seconds=0,
        )
        await registry.add_event_mapping(
            "bench",
            SOURCE_EVENT,
            TARGET_EVENT,
            tuple(ParameterMapping(s, t, c) for s, t, c in PARAMETERS),
        )
        queue = DurableQueue(db)
        ingestor = Ingestor(db, registry, queue)
        await ingestor.load()
        bodies = ingest_bodies(batch, customers)
        prepared = [next(bodies)[0] for _ in range(events // batch)]
        verifier, headers = credentials(auth, len(prepared))
        if http and auth not in ("none", "bearer"):
            raise SystemExit("--http takes --auth none or bearer")
        started = time.process_time()
        if http:
            await post_all(ingestor, prepared, headers)
        else:
            for body, header in zip(prepared, headers, strict=True):
                if verifier is not None and not verifier.check(header):
                    raise AssertionError("the bench's credential was refused")
                await ingestor.ingest(parse_request(orjson.loads(body)))
        used = time.process_time() - started
        assert queue.depth == len(prepared) * batch, (queue.depth, len(prepared) * batch)
        return used / (len(prepared) * batch) * 1e6
    finally:
        await db.close()


async def main(args: argparse.Namespace) -> None:
    results = []
    for run in range(args.repeats):
        data_dir = Path(tempfile.mkdtemp(prefix="tidegate-ingest-cpu-"))
        try:
            results.append(
                await one_run(
                    data_dir, args.events, args.batch, args.customers, args.auth, args.http
                )
            )
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
        print(f"run {run + 1}: {results[-1]:.1f} us/event", flush=True)
    print(
        f"ingest CPU per event, median of {args.repeats}: {statistics.median(results):.1f} us"
        f" ({args.events:,} events in requests of {args.batch:,})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.ingest_cpu", description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000, help="events per request")
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--http", action="store_true", help="through the aiohttp ingest app")
    parser.add_argument("--auth", choices=("none", "bearer", "jwt", "jwt-fresh"), default="none")
    asyncio.run(main(parser.parse_args()))
