"""Destinations cannot be turned against the engine, and a send never wedges a lane: a
real engine (gRPC on loopback), the Insider sandbox and small HTTP receivers of our own."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
from aiohttp import web

from clients.client import TidegateClient
from engine.app import Engine, EngineConfig
from engine.connector import (
    AntavoEvent,
    Connection,
    ConnectorInfo,
    Customer,
    Delivery,
    ItemOutcome,
    SendResult,
    Transport,
    hookimpl,
)
from engine.pb import connections_pb2 as pb
from engine.pb import dead_letters_pb2, dead_letters_pb2_grpc
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import (
    API_KEY,
    FAST_DELIVERY,
    PARTNER,
    TEST_DESTINATIONS,
    engine_client,
    eventually,
    insider_connection,
    post_events,
)

METADATA_URLS = [
    "http://169.254.169.254/latest/meta-data/",
    "https://[fd00:ec2::254]/",
    "https://2130706433/",
    "https://[::ffff:169.254.169.254]/",
    "https://user:pw@unification.useinsider.com",
    "https://unification.useinsider.com.",
    "http://unification.useinsider.com",
    "https://10.1.2.3",
]


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


@pytest.mark.parametrize("url", METADATA_URLS)
async def test_create_connection_refuses_a_destination_insider_does_not_declare(
    client: TidegateClient, url: str
) -> None:
    error = await _refused(
        client.create_connection(
            "evil", api_key=API_KEY, settings={"partner_name": PARTNER, "base_url": url}
        )
    )

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("connection.settings.base_url: ")
    with pytest.raises(grpc.aio.AioRpcError):
        await client.get_connection("evil")


async def test_insiders_own_host_and_the_allowed_sandbox_are_accepted(
    client: TidegateClient, sandbox: RunningSandbox
) -> None:
    for connection_id, url in (
        ("real", "https://unification.useinsider.com"),
        ("sandbox", sandbox.url),  # 127.0.0.1 is allowed in the tests' engine config
    ):
        created = await client.create_connection(
            connection_id, api_key=API_KEY, settings={"partner_name": PARTNER, "base_url": url}
        )
        assert created.settings["base_url"] == url


async def test_without_an_allowance_the_loopback_sandbox_is_refused(tmp_path: Path) -> None:
    engine = Engine(EngineConfig(data_dir=tmp_path, grpc_port=0, http_port=0))
    await engine.start()
    try:
        async with engine_client(engine) as client:
            error = await _refused(
                client.create_connection(
                    "c",
                    api_key=API_KEY,
                    settings={"partner_name": PARTNER, "base_url": "http://127.0.0.1:8090"},
                )
            )
    finally:
        await engine.stop(grace=1.0)

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "loopback" in (error.details() or "")
    assert "--allow-destination" in (error.details() or "")


async def _update(client: TidegateClient, paths: list[str], **connection: Any) -> pb.Connection:
    response = await client.connections.UpdateConnection(
        pb.UpdateConnectionRequest(
            connection=pb.Connection(id="insider-main", **connection),
            update_mask={"paths": paths},
        )
    )
    return response.connection


async def test_update_connection_refuses_a_metadata_address(
    client: TidegateClient, sandbox: RunningSandbox
) -> None:
    await insider_connection(client, sandbox)

    error = await _refused(
        _update(
            client,
            ["settings", "api_key"],
            settings={"partner_name": PARTNER, "base_url": "http://169.254.169.254"},
            api_key=API_KEY,
        )
    )

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "connection.settings.base_url" in (error.details() or "")
    assert (await client.get_connection("insider-main")).settings["base_url"] == sandbox.url


@pytest.mark.parametrize(
    "settings",
    [
        {"partner_name": PARTNER, "base_url": "https://unification.useinsider.com"},
        {"partner_name": "someone-else"},  # the default base_url: only the account changes
    ],
)
async def test_redirecting_the_key_requires_the_key_in_the_same_request(
    client: TidegateClient, sandbox: RunningSandbox, settings: dict[str, str]
) -> None:
    await insider_connection(client, sandbox)
    if "base_url" not in settings:
        settings = {**settings, "base_url": sandbox.url}

    error = await _refused(_update(client, ["settings"], settings=settings))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    assert details.startswith("connection.api_key: required when settings.")
    assert API_KEY not in details
    updated = await _update(client, ["settings", "api_key"], settings=settings, api_key=API_KEY)
    assert dict(updated.settings) == settings


async def test_other_settings_change_without_the_key(
    client: TidegateClient, sandbox: RunningSandbox
) -> None:
    await insider_connection(client, sandbox)
    settings = {"partner_name": PARTNER, "base_url": sandbox.url, "default_phone_region": "HU"}

    updated = await _update(client, ["settings"], settings=settings)

    assert updated.settings["default_phone_region"] == "HU"


@pytest.mark.parametrize(
    ("field", "settings", "api_key"),
    [
        ("connection.api_key", {"partner_name": PARTNER}, API_KEY + "\n"),
        ("connection.api_key", {"partner_name": PARTNER}, API_KEY + "\r\nX-Evil: 1"),
        ("connection.api_key", {"partner_name": PARTNER}, "key with spaces"),
        ("connection.settings.partner_name", {"partner_name": PARTNER + "\n"}, API_KEY),
        ("connection.settings.default_phone_region", {"partner_name": PARTNER,
         "default_phone_region": "HU\n"}, API_KEY),
    ],
)  # fmt: skip
async def test_a_control_character_in_a_key_or_setting_is_refused_on_write(
    client: TidegateClient, field: str, settings: dict[str, str], api_key: str
) -> None:
    error = await _refused(client.create_connection("c", api_key=api_key, settings=settings))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith(f"{field}: ")
    assert API_KEY not in (error.details() or "")


# -- config apply ----------------------------------------------------------------------

DOCUMENT = """\
version: 1
connections:
  - id: insider-main
    connector: insider
    {key}
    settings:
      base_url: {url}
      partner_name: {partner}
"""


async def test_config_apply_refuses_a_private_destination_naming_its_path(
    client: TidegateClient,
) -> None:
    document = DOCUMENT.format(key="api_key_env: K", url="https://192.168.0.10", partner=PARTNER)

    error = await _refused(client.apply_config(document, api_keys={"K": API_KEY}))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("connections[0].settings.base_url: ")


async def test_config_apply_redirecting_the_key_requires_it(
    client: TidegateClient, sandbox: RunningSandbox
) -> None:
    await insider_connection(client, sandbox)
    moved = DOCUMENT.format(key="", url=sandbox.url, partner="another-account")

    error = await _refused(client.apply_config(moved))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.details() or ""
    assert details.startswith("connections[0].api_key_env: required when settings.partner_name")
    with_key = DOCUMENT.format(key="api_key_env: K", url=sandbox.url, partner="another-account")
    await client.apply_config(with_key, api_keys={"K": API_KEY})
    assert (await client.get_connection("insider-main")).settings["partner_name"] == (
        "another-account"
    )


async def test_config_apply_refuses_a_key_with_a_line_break(client: TidegateClient) -> None:
    document = DOCUMENT.format(
        key="api_key_env: K", url="https://a.useinsider.com", partner=PARTNER
    )

    error = await _refused(client.apply_config(document, api_keys={"K": API_KEY + "\n"}))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("connections[0].api_key_env: the API key in K ")


# -- before sending: a stored connection an older release accepted -----------------------


async def _store_as_an_older_release(engine: Engine, **columns: Any) -> None:
    """Writes connection columns straight into SQLite, as an older release let them in."""
    assignments = ", ".join(f"{name}=?" for name in columns)
    await engine.db.write(
        lambda c: c.execute(
            f"UPDATE connections SET {assignments} WHERE id='insider-main'",
            tuple(columns.values()),
        )
    )
    await engine.registry.refresh("insider-main")
    engine.deliverer.connection_changed("insider-main")


async def _paused_reason(client: TidegateClient) -> str:
    connection = await client.get_connection("insider-main")
    assert connection.state == pb.CONNECTION_STATE_PAUSED, connection
    return connection.state_reason


async def test_a_stored_metadata_destination_pauses_the_connection_before_any_request(
    engine: Engine,
    client: TidegateClient,
    sandbox: RunningSandbox,
    http: aiohttp.ClientSession,
) -> None:
    await insider_connection(client, sandbox)
    settings = {"partner_name": PARTNER, "base_url": "http://169.254.169.254"}
    await _store_as_an_older_release(engine, settings=orjson.dumps(settings).decode())

    status, _ = await post_events(
        http, engine, {"customer": "c-1", "action": "point_add", "data": {"points": 5}}
    )
    assert status == 202

    async def paused() -> bool:
        return (await client.get_connection("insider-main")).state == pb.CONNECTION_STATE_PAUSED

    await eventually(paused)
    reason = await _paused_reason(client)
    assert reason.startswith("connection.settings.base_url: ") and "link-local" in reason
    assert (await client.get_connection("insider-main")).queue_depth == 1  # kept, not lost
    assert (await client.list_logs()).logs == []  # nothing went out


async def test_a_stored_key_with_a_line_break_pauses_the_connection_instead_of_looping(
    engine: Engine,
    client: TidegateClient,
    sandbox: RunningSandbox,
    http: aiohttp.ClientSession,
) -> None:
    await insider_connection(client, sandbox)
    box = engine.registry._secrets  # the key as an older release stored it
    await _store_as_an_older_release(engine, api_key_encrypted=box.encrypt(API_KEY + "\n"))

    await post_events(
        http, engine, {"customer": "c-1", "action": "point_add", "data": {"points": 5}}
    )

    async def paused() -> bool:
        return (await client.get_connection("insider-main")).state == pb.CONNECTION_STATE_PAUSED

    await eventually(paused)
    reason = await _paused_reason(client)
    assert reason.startswith("connection.api_key: ") and API_KEY not in reason
    # Setting the key again (with the same request rules) resumes delivery.
    await _update(client, ["api_key"], api_key=API_KEY)

    async def delivered() -> bool:
        return (await client.get_connection("insider-main")).queue_depth == 0

    await eventually(delivered)


# -- response bodies are redacted --------------------------------------------------------


@pytest.fixture
async def echoing_insider() -> AsyncIterator[str]:
    """An Insider stand-in that repeats the request's token in its 400 answer."""

    async def handle(request: web.Request) -> web.Response:
        token = request.headers.get("X-REQUEST-TOKEN", "")
        return web.json_response({"message": f"bad request for token {token}"}, status=400)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_a_response_echoing_the_key_is_stored_redacted(
    engine: Engine,
    client: TidegateClient,
    echoing_insider: str,
    http: aiohttp.ClientSession,
) -> None:
    await client.create_connection(
        "insider-main",
        api_key=API_KEY,
        settings={"partner_name": PARTNER, "base_url": echoing_insider},
    )
    await client.create_event_mapping(
        "insider-main", "point_add", "loyalty_points_earned", [("points", "points", True)]
    )

    await post_events(
        http, engine, {"customer": "c-1", "action": "point_add", "data": {"points": 5}}
    )

    async def logged() -> bool:
        return bool((await client.list_logs()).logs)

    await eventually(logged)
    [entry] = (await client.list_logs()).logs
    full = await client.get_log(entry.id)
    assert "bad request for token [redacted]" in full.response_body
    assert API_KEY not in str(full) and API_KEY not in str(entry)
    dead = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)
    letters = await dead.ListDeadLetters(dead_letters_pb2.ListDeadLettersRequest())
    assert letters.dead_letters and API_KEY not in str(letters)


# -- an unexpected failure in a send is a counted, logged, retried attempt ----------------


class HeaderBreaker:
    """A third party's connector whose send puts a line break in a header: aiohttp
    refuses such a header before anything is sent."""

    @hookimpl
    def connector_info(self) -> ConnectorInfo:
        return ConnectorInfo(
            name="breaker", max_batch_items=10, max_batch_bytes=100_000, url_settings=("url",)
        )

    @hookimpl
    def identify(self, customer: Customer) -> Mapping[str, Any]:
        return {"id": customer.id}

    @hookimpl
    def map_profile(self) -> Mapping[str, Any]:
        return {}

    @hookimpl
    def map_event(self, event: AntavoEvent) -> Sequence[Mapping[str, Any]]:
        return [{"name": event.action}]

    @hookimpl
    async def send(
        self, connection: Connection, deliveries: Sequence[Delivery], transport: Transport
    ) -> SendResult:
        await transport.request(
            "POST",
            connection.settings["url"],
            headers={"Authorization": f"Bearer {connection.api_key}\n"},
            body=b"{}",
        )
        return SendResult.of(deliveries)


async def test_an_unexpected_send_failure_is_logged_counted_retried_then_dead_lettered(
    tmp_path: Path, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    engine = Engine(
        EngineConfig(
            data_dir=tmp_path,
            grpc_port=0,
            http_port=0,
            delivery=FAST_DELIVERY,
            extra_plugins=[HeaderBreaker()],
            allowed_destinations=TEST_DESTINATIONS,
        )
    )
    await engine.start()
    try:
        async with engine_client(engine) as client:
            await client.connections.CreateConnection(
                pb.CreateConnectionRequest(
                    connection=pb.Connection(
                        id="breaker-1",
                        connector="breaker",
                        settings={"url": sandbox.url + "/hook"},
                        api_key=API_KEY,
                        retry_window_seconds=1,
                    )
                )
            )
            await client.create_event_mapping("breaker-1", "point_add", "points", [])
            await post_events(
                http, engine, {"customer": "c-1", "action": "point_add", "data": {"points": 5}}
            )
            dead = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)

            async def dead_lettered() -> bool:
                letters = await dead.ListDeadLetters(dead_letters_pb2.ListDeadLettersRequest())
                return bool(letters.dead_letters)

            await eventually(dead_lettered)
            [letter] = (
                await dead.ListDeadLetters(dead_letters_pb2.ListDeadLettersRequest())
            ).dead_letters
            logs = (await client.list_logs(connection_id="breaker-1")).logs
    finally:
        await engine.stop(grace=1.0)

    assert letter.stage == "send" and "gave up after" in letter.error
    assert "the request could not be sent: ValueError" in letter.error
    assert len(logs) >= 2  # every attempt has its row
    assert sorted(e.attempt for e in logs)[:2] == [1, 2]
    assert all("could not be sent" in e.error and not e.ambiguous for e in logs)
    assert all(API_KEY not in e.error for e in logs) and API_KEY not in letter.error


class LocalhostConnector(HeaderBreaker):
    """Declares ``localhost`` as its destination's host: a name that passes the list but
    resolves to loopback, as a rebinding DNS answer would make any name do."""

    @hookimpl
    def connector_info(self) -> ConnectorInfo:
        return ConnectorInfo(
            name="rebound",
            max_batch_items=10,
            max_batch_bytes=100_000,
            destination_hosts=("localhost",),
        )

    @hookimpl
    async def send(
        self, connection: Connection, deliveries: Sequence[Delivery], transport: Transport
    ) -> SendResult:
        await transport.request("POST", "https://localhost/hook", headers={}, body=b"{}")
        return SendResult.of(deliveries)


async def test_a_declared_name_resolving_to_loopback_is_not_connected_to(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    engine = Engine(
        EngineConfig(
            data_dir=tmp_path,
            grpc_port=0,
            http_port=0,
            delivery=FAST_DELIVERY,
            extra_plugins=[LocalhostConnector()],
            allowed_destinations=TEST_DESTINATIONS,  # 127.0.0.1 by address, not localhost
        )
    )
    await engine.start()
    try:
        async with engine_client(engine) as client:
            await client.create_connection("rebound-1", connector="rebound", api_key=API_KEY,
                                           settings={})  # fmt: skip
            await client.create_event_mapping("rebound-1", "point_add", "points", [])
            await post_events(
                http, engine, {"customer": "c-1", "action": "point_add", "data": {"points": 5}}
            )

            async def logged() -> bool:
                return bool((await client.list_logs(connection_id="rebound-1")).logs)

            await eventually(logged)
            entry = (await client.list_logs(connection_id="rebound-1")).logs[-1]
    finally:
        await engine.stop(grace=1.0)

    assert entry.status_code == 0 and entry.url == "https://localhost/hook"
    assert "cannot connect" in entry.error and "non-public addresses" in entry.error


# -- serve --allow-destination -----------------------------------------------------------

BIN = Path(sys.executable).parent


def test_serve_refuses_a_bad_allowance_with_a_usage_error() -> None:
    result = subprocess.run(
        [str(BIN / "tidegate"), "serve", "--allow-destination", "ftp://files.example"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert "--allow-destination" in result.stderr and "only http and https" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_logs_each_allowed_destination_at_start(tmp_path: Path) -> None:
    output = tmp_path / "serve.out"
    with output.open("wb") as out:
        process = subprocess.Popen(
            [str(BIN / "tidegate"), "--log-format", "json", "serve", "--grpc-port", "0",
             "--http-port", "0", "--metrics-port", "off", "--ui-port", "off", "--ingest-in-process",
             "--data-dir", str(tmp_path / "data"),
             "--allow-destination", "http://127.0.0.1:8090",
             "--allow-destination", "[::1]:9000",
             "--allow-destination", "Sandbox.Internal"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "tidegate serving" not in output.read_text():
            assert process.poll() is None, output.read_text()
            assert time.monotonic() < deadline, output.read_text()
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    lines = [json.loads(line) for line in output.read_text().splitlines() if line.startswith("{")]

    allowed = [line["destination"] for line in lines if line["event"] == "destination_allowed"]
    assert allowed == ["http://127.0.0.1:8090", "[::1]:9000", "sandbox.internal"]


class OddOutcome(HeaderBreaker):
    """Reports a failed item with a dict as its error: storing that dead letter would fail
    on every try, and the batch would be sent again and again."""

    @hookimpl
    def connector_info(self) -> ConnectorInfo:
        return ConnectorInfo(name="odd", max_batch_items=10, max_batch_bytes=100_000)

    @hookimpl
    async def send(self, deliveries: Sequence[Delivery]) -> SendResult:
        self.calls = getattr(self, "calls", 0) + 1
        return SendResult({d.item_id: ItemOutcome(False, {"code": 7}) for d in deliveries})  # type: ignore[arg-type]


async def test_an_outcome_that_cannot_be_stored_is_a_contract_error_not_a_resend_loop(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    odd = OddOutcome()
    engine = Engine(
        EngineConfig(
            data_dir=tmp_path, grpc_port=0, http_port=0, delivery=FAST_DELIVERY,
            extra_plugins=[odd], allowed_destinations=TEST_DESTINATIONS,
        )
    )  # fmt: skip
    await engine.start()
    try:
        async with engine_client(engine) as client:
            await client.create_connection("odd-1", connector="odd", api_key=API_KEY, settings={})
            await client.create_event_mapping("odd-1", "point_add", "points", [])
            await post_events(
                http, engine, {"customer": "c-1", "action": "point_add", "data": {"points": 5}}
            )
            dead = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)

            async def dead_lettered() -> bool:
                letters = await dead.ListDeadLetters(dead_letters_pb2.ListDeadLettersRequest())
                return bool(letters.dead_letters)

            await eventually(dead_lettered)
            [letter] = (
                await dead.ListDeadLetters(dead_letters_pb2.ListDeadLettersRequest())
            ).dead_letters
            depth = (await client.get_connection("odd-1")).queue_depth
    finally:
        await engine.stop(grace=1.0)

    assert letter.stage == "send" and "plugin" in letter.error and "ItemOutcome" in letter.error
    assert depth == 0 and odd.calls == 1
