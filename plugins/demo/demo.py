"""``tidegate demo``: the whole product in under a minute, with no external service.

Starts the Insider and Braze sandboxes and the engine, creates a connection to each with
sample mappings over the admin API, sends realistic Antavo traffic to the ingest endpoint
(one stream reaches both destinations; some of it is rejected, as Insider and Braze would
reject it), and prints outbound-log rows of both connections as they stream in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

from clients.client import TidegateClient, read_token
from engine.app import Engine, EngineConfig
from engine.connector import Allowance
from engine.state.tokens import ADMIN_TOKEN_FILE
from plugins.braze.sandbox import SandboxConfig as BrazeSandboxConfig
from plugins.braze.sandbox import start_sandbox as start_braze_sandbox
from plugins.insider.sandbox import SandboxConfig, start_sandbox

CONNECTION_ID = "insider-demo"
BRAZE_CONNECTION_ID = "braze-demo"
PARTNER = "tidegate-demo"
FIRST_NAMES = [
    "Ana",
    "Bence",
    "Chloe",
    "Dario",
    "Eszter",
    "Farid",
    "Greta",
    "Hiro",
    "Ines",
    "Jonas",
]
LAST_NAMES = ["Kovacs", "Lindqvist", "Moreau", "Nagy", "Okafor", "Petrov", "Quinn", "Rossi"]
PROFILE_MAPPINGS = [
    ("email", "email", False),
    ("first_name", "name", False),
    ("last_name", "surname", False),
    ("birth_date", "birthday", False),
    ("gender", "gender", False),
    ("newsletter_optin", "email_optin", False),
    ("tier", "loyalty_tier", True),
    ("favourite_store", "favourite_store", True),
]
BRAZE_PROFILE_MAPPINGS = [
    ("email", "email", False),
    ("first_name", "first_name", False),
    ("last_name", "last_name", False),
    ("birth_date", "dob", False),
    ("gender", "gender", False),
    ("newsletter_optin", "email_subscribe", False),
    ("tier", "loyalty_tier", True),
    ("favourite_store", "favourite_store", True),
]
BRAZE_EVENT_MAPPINGS: list[tuple[str, str, list[tuple[str, str, bool]]]] = [
    ("opt_in", "sign_up_confirmation", []),
    (
        "checkout",
        "purchase",  # Braze purchase objects, one per line item
        [
            ("items[].sku", "product_id", False),
            ("items[].price", "price", False),
            ("items[].quantity", "quantity", False),
            ("currency", "currency", False),
            ("transaction_id", "order_id", False),
        ],
    ),
    ("point_add", "points_earned", [("points", "points", False), ("reason", "reason", False)]),
    ("coupon_redeem", "coupon_redeemed", [("code", "coupon_code", False)]),
]
EVENT_MAPPINGS: list[tuple[str, str, list[tuple[str, str, bool]]]] = [
    ("opt_in", "sign_up_confirmation", []),
    (
        "checkout",
        "purchase",
        [
            ("transaction_id", "event_group_id", False),
            ("total", "unit_sale_price", False),
            ("currency", "currency", False),
            ("total_quantity", "quantity", False),
        ],
    ),
    (
        "point_add",
        "loyalty_points_earned",
        [("points", "points", True), ("reason", "reason", True)],
    ),
    (
        "coupon_redeem",
        "coupon_redeemed",
        [("code", "coupon_code", True), ("amount", "amount", True)],
    ),
]


def run_demo(args: argparse.Namespace) -> int:
    return asyncio.run(_demo(args))


def _print(line: str) -> None:
    print(line, flush=True)


def traffic(customers: int, seed: int = 7) -> list[list[dict[str, Any]]]:
    """Bulk requests in the order Antavo would send them: opt-ins, then activity."""
    rng = random.Random(seed)
    ids = [f"cust-{n:05d}" for n in range(1, customers + 1)]
    opt_ins = []
    for n, cid in enumerate(ids):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        # Every tenth customer signs up with a malformed email: Insider rejects that user.
        email = (
            f"{first}.{last}{n}@example.com".lower()
            if n % 10 != 3
            else f"{first}.{last}-at-example"
        )
        opt_ins.append(
            {
                "customer": cid,
                "action": "opt_in",
                "id": f"evt-optin-{cid}",
                "data": {
                    "email": email,
                    "first_name": first,
                    "last_name": last,
                    "birth_date": f"19{rng.randint(60, 99)}-0{rng.randint(1, 9)}-"
                    f"{rng.randint(10, 28)}",
                    "gender": rng.choice(["male", "female"]),
                    "newsletter_optin": rng.random() < 0.7,
                    "favourite_store": rng.choice(["BUD-01", "VIE-02", "BER-03"]),
                },
            }
        )
    activity = []
    for n, cid in enumerate(ids):
        activity.append(
            {"customer": cid, "action": "profile", "data": {"tier": rng.choice(["silver", "gold"])}}
        )
        activity.append(
            {
                "customer": cid,
                "action": "point_add",
                "data": {"points": rng.choice([50, 100, 250]), "reason": "welcome"},
            }
        )
        checkout: dict[str, Any] = {
            "transaction_id": f"ORD-{10000 + n}",
            "total": round(rng.uniform(10, 300), 2),
            "currency": "EUR",
            "total_quantity": rng.randint(1, 4),
            "items": [
                {"sku": rng.choice(["tote-bag", "water-bottle", "gift-card"]),
                 "price": round(rng.uniform(5, 100), 2), "quantity": rng.randint(1, 2)}
                for _ in range(rng.randint(1, 3))
            ],
        }  # fmt: skip
        if n % 10 == 6:
            del checkout["currency"]  # both require a currency on a purchase: this one fails
        activity.append({"customer": cid, "action": "checkout", "data": checkout})
        if n % 4 == 0:
            activity.append(
                {
                    "customer": cid,
                    "action": "coupon_redeem",
                    "data": {"code": "WELCOME10", "amount": 10},
                }
            )
    half = len(activity) // 2
    return [opt_ins, activity[:half], activity[half:]]


def _row_line(entry: Any) -> str:
    when = entry.time.ToDatetime().strftime("%H:%M:%S.%f")[:-3]
    names = ", ".join(f"{c.customer_id}" for c in entry.customers[:3])
    more = f" +{entry.customer_count - 3}" if entry.customer_count > 3 else ""
    status = entry.status_code or "---"
    line = (
        f"  {when}  {entry.connection_id:<12} {status}  {entry.response_time_seconds:6.3f}s  "
        f"req {entry.id[:13]}…  "
        f"{entry.customer_count:3d} customers ({names}{more})"
    )
    if entry.error:
        line += f"\n      error: {entry.error[:160]}"
    return line


async def _demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    tmp = None
    data_dir: Path = args.data_dir
    if data_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="tidegate-demo-")
        data_dir = Path(tmp.name)
    api_key = "demo-" + secrets.token_hex(8)
    cluster = None
    broker = None
    if args.broker:
        from engine.broker.cluster import LocalCluster
        from engine.broker.streams import BrokerSettings

        _print("Starting a three-node NATS JetStream cluster on loopback…")
        cluster = LocalCluster(data_dir / "nats", size=3, max_file_store="512MB")
        try:
            await asyncio.to_thread(cluster.start)
        except BaseException:
            await asyncio.to_thread(cluster.stop)
            raise
        # The stream's size limit fits in the nodes' store.
        broker = BrokerSettings(servers=tuple(cluster.urls), max_bytes=128 << 20)
    sandbox = await start_sandbox(config=SandboxConfig(partner_name=PARTNER, api_key=api_key))
    braze = await start_braze_sandbox(config=BrazeSandboxConfig(api_key=api_key))
    engine = Engine(
        EngineConfig(
            data_dir=data_dir,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            ui_port=args.ui_port,
            broker=broker,
            role="all",
            # The sandboxes are on loopback: the demo allows them, as serve
            # --allow-destination does.
            allowed_destinations=(Allowance.parse(sandbox.url), Allowance.parse(braze.url)),
        )
    )
    try:
        await engine.start()
    except BaseException:
        if cluster is not None:
            await asyncio.to_thread(cluster.stop)
        raise
    _print("Tidegate demo" + (" on NATS JetStream" if cluster is not None else ""))
    if cluster is not None:
        _print(
            f"  JetStream        {cluster.servers}   (3 nodes, R3; this process has the"
            " ingest, worker and log roles: --role all)"
        )
    _print(f"  Insider sandbox  {sandbox.url}")
    _print(f"  Braze sandbox    {braze.url}")
    _print(f"  ingest endpoint  http://127.0.0.1:{engine.http_port}/v1/events")
    auth = f'-H "authorization: Bearer $(cat {data_dir / ADMIN_TOKEN_FILE})"'
    _print(
        f"  gRPC admin API   127.0.0.1:{engine.grpc_port}"
        f"   (try: grpcurl -plaintext {auth} 127.0.0.1:{engine.grpc_port} list)"
    )
    page = f"http://127.0.0.1:{engine.ui_port}/ui/" if args.ui_port is not None else ""
    if page:
        _print(f"  outbound-log UI  {page}   (log in with the admin token below)")
    _print(f"  data             {data_dir}")
    _print(f"  admin token      {data_dir / ADMIN_TOKEN_FILE}")
    try:
        async with TidegateClient(f"127.0.0.1:{engine.grpc_port}", read_token(data_dir)) as client:
            await client.create_connection(
                CONNECTION_ID,
                display_name="Insider (sandbox)",
                api_key=api_key,
                settings={"partner_name": PARTNER, "base_url": sandbox.url},
            )
            for source, target, custom in PROFILE_MAPPINGS:
                await client.create_profile_mapping(CONNECTION_ID, source, target, custom=custom)
            for source, target, params in EVENT_MAPPINGS:
                await client.create_event_mapping(CONNECTION_ID, source, target, params)
            _print(
                f"\nConnection {CONNECTION_ID!r}: Antavo customer ID -> Insider uuid, "
                f"{len(PROFILE_MAPPINGS)} profile mappings, {len(EVENT_MAPPINGS)} event mappings"
            )
            await client.create_connection(
                BRAZE_CONNECTION_ID,
                connector="braze",
                display_name="Braze (sandbox)",
                api_key=api_key,
                settings={"rest_endpoint": braze.url},
                target_identifier="external_id",
            )
            for source, target, custom in BRAZE_PROFILE_MAPPINGS:
                await client.create_profile_mapping(
                    BRAZE_CONNECTION_ID, source, target, custom=custom
                )
            for source, target, params in BRAZE_EVENT_MAPPINGS:
                await client.create_event_mapping(BRAZE_CONNECTION_ID, source, target, params)
            _print(
                f"Connection {BRAZE_CONNECTION_ID!r}: Antavo customer ID -> Braze external_id, "
                f"{len(BRAZE_PROFILE_MAPPINGS)} profile mappings, "
                f"{len(BRAZE_EVENT_MAPPINGS)} event mappings (checkout -> purchase objects)"
            )
            _print("\nOutbound log, streamed live (StreamLogs):")
            seen: list[Any] = []
            stream_ready = asyncio.Event()

            async def tail() -> None:
                call = client.logs.StreamLogs(_stream_request())
                await call.initial_metadata()
                stream_ready.set()
                async for response in call:
                    for entry in response.logs:
                        seen.append(entry)
                        _print(_row_line(entry))

            tail_task = asyncio.create_task(tail())
            await asyncio.wait_for(stream_ready.wait(), 10)
            requests = traffic(args.customers)
            sent = 0
            async with aiohttp.ClientSession() as http:
                for events in requests:
                    async with http.post(
                        f"http://127.0.0.1:{engine.http_port}/v1/events", json={"events": events}
                    ) as response:
                        answer = await response.json()
                        if response.status != 202:
                            _print(f"ingest refused a request: {response.status} {answer}")
                            return 1
                    sent += len(events)
                    await asyncio.sleep(0.3)  # traffic arrives over time, not all at once
            if cluster is not None:
                await _stream_emptied(cluster.urls)
            connection = await _drained(client)
            braze_connection = await _drained(client, BRAZE_CONNECTION_ID)
            await asyncio.sleep(0.5)  # the last rows reach the stream
            tail_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await tail_task
            users = list(sandbox.state.users)
            insider_rows = [e for e in seen if e.connection_id == CONNECTION_ID]
            braze_rows = [e for e in seen if e.connection_id == BRAZE_CONNECTION_ID]
            failed = sum(1 for e in insider_rows for c in e.customers if c.outcome == "failed")
            _print(
                f"\n{sent} Antavo events in, {len(insider_rows)} requests to Insider, "
                f"{len(users)} profiles now at the sandbox, queue depth "
                f"{connection.queue_depth}, {time.monotonic() - started:.1f} s.\n"
                f"Insider rejected a customer {failed} times; the "
                f"{connection.dead_letter_count} queued items those rejections covered are "
                "dead letters (ListDeadLetters shows them, ReplayDeadLetters resends them)."
            )
            purchases = sum(len(p.purchases) for p in braze.state.profiles)
            _print(
                f"Braze: {len(braze_rows)} requests to /users/track, "
                f"{len(braze.state.profiles)} profiles and {purchases} purchase objects now at "
                f"the Braze sandbox, queue depth {braze_connection.queue_depth}; "
                f"{braze_connection.dead_letter_count} items are dead letters (a malformed "
                "email or a checkout without a currency, refused before sending)."
            )
            failing = next((e for e in seen if e.error), None)
            if failing is not None:
                detail = await client.get_log(failing.id)
                _print(f"\nOne rejected request in full (GetLog {detail.id}):")
                _print(f"  request:  {detail.request_body[:300]}…")
                _print(f"  response: {detail.response_body[:300]}")
            if args.keep_running:
                if page and failing is not None:
                    customer = next(
                        (c.customer_id for c in failing.customers if c.outcome == "failed"),
                        failing.customers[0].customer_id if failing.customers else "",
                    )
                    search = f"?{urlencode({'customer_id': customer})}" if customer else ""
                    _print(
                        f"\nOn the page: {page}{search} lists that customer's requests; open"
                        " the failed one for the destination's answer. Log in with the token"
                        f" in {data_dir / ADMIN_TOKEN_FILE}."
                    )
                _print(
                    f"\nStill serving. Try: grpcurl -plaintext {auth} -d "
                    """'{"filter":{"errors_only":true}}' """
                    f"127.0.0.1:{engine.grpc_port} tidegate.admin.v1.LogService/ListLogs"
                    "   (Ctrl-C to stop)"
                )
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.Event().wait()
    finally:
        await engine.stop()
        await sandbox.close()
        await braze.close()
        if cluster is not None:
            await asyncio.to_thread(cluster.stop)
        if tmp is not None:
            tmp.cleanup()
    return 0


def _stream_request() -> Any:
    from engine.pb import logs_pb2

    return logs_pb2.StreamLogsRequest(filter=logs_pb2.LogFilter())


async def _stream_emptied(servers: list[str], within: float = 60.0) -> None:
    """Waits until the workers acknowledged every event JetStream holds (a work-queue
    stream keeps only what is not yet acknowledged)."""
    import nats

    from engine.broker.streams import STREAM

    nc = await nats.connect(servers=servers)
    try:
        js = nc.jetstream()
        for _ in range(int(within / 0.2)):
            if not (await js.stream_info(STREAM)).state.messages:
                return
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def _drained(
    client: TidegateClient, connection_id: str = CONNECTION_ID, within: float = 30.0
) -> Any:
    deadline = time.monotonic() + within
    while True:
        connection = await client.get_connection(connection_id)
        if connection.queue_depth == 0 or time.monotonic() > deadline:
            return connection
        await asyncio.sleep(0.2)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
