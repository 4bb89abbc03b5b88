"""The engine's side of the connector contract: start-up refuses a plugin that would break
at run time, a connection's hooks are called on its own connector's plugin only, and what
a connector returns is checked where it is used, so one bad value is one dead letter and
the connection goes on.

The connectors here are written the way a newcomer would write one: no check of whose
connection they got, a plain ``async def send``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from engine.app import Engine, EngineConfig
from engine.connector import (
    AntavoEvent,
    Connection,
    ConnectorInfo,
    Customer,
    CustomerIdMapping,
    Delivery,
    ItemOutcome,
    ParameterMapping,
    SendResult,
    Transport,
    hookimpl,
)
from engine.connector.testing import ConnectorTester
from engine.errors import ContractError, PluginError
from engine.outbound_log.rows import LogQuery
from engine.plugins import Connectors, plugin_manager
from engine.queue.dead_letters import DeadLetterQuery, StoredDeadLetter
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import (
    FAST_DELIVERY,
    TEST_DESTINATIONS,
    engine_client,
    eventually,
    insider_connection,
    post_events,
)


class Recorder:
    """A complete connector named ``name`` that keeps what it was asked to send."""

    def __init__(self, name: str = "recorder", max_batch_bytes: int = 100_000) -> None:
        self.name = name
        self.max_batch_bytes = max_batch_bytes
        self.sent: list[list[Delivery]] = []

    @hookimpl
    def connector_info(self) -> ConnectorInfo:
        return ConnectorInfo(
            name=self.name, max_batch_items=50, max_batch_bytes=self.max_batch_bytes
        )

    @hookimpl
    def identify(self, customer: Customer) -> Mapping[str, Any]:
        return {"id": customer.id}

    @hookimpl
    def map_profile(self) -> Mapping[str, Any]:
        return {}

    @hookimpl
    def map_event(self, customer: Customer, event: AntavoEvent) -> Sequence[Mapping[str, Any]]:
        return [{"name": event.action, **event.data}]

    @hookimpl
    async def send(self, deliveries: Sequence[Delivery]) -> SendResult:
        self.sent.append(list(deliveries))
        return SendResult.of(deliveries)

    def customers_sent(self) -> list[str]:
        return [d.customer.id for batch in self.sent for d in batch]


# -- start-up refusals ------------------------------------------------------------------


class Misspelled(Recorder):
    @hookimpl
    def map_events(self, event: AntavoEvent) -> Sequence[Mapping[str, Any]]:
        return []


def test_a_misspelled_hook_is_refused_naming_the_plugin_and_the_right_hook() -> None:
    with pytest.raises(PluginError) as refused:
        plugin_manager([Misspelled()], load_entry_points=False)

    message = str(refused.value)
    assert "'Misspelled'" in message
    assert "'map_events'" in message and "did you mean 'map_event'" in message


def test_two_plugins_declaring_one_connector_are_refused_naming_both() -> None:
    class Copy(Recorder):
        pass

    pm = plugin_manager([Recorder(), Copy()], load_entry_points=False)

    with pytest.raises(PluginError) as refused:
        Connectors(pm)

    assert "'Recorder'" in str(refused.value) and "'Copy'" in str(refused.value)
    assert "'recorder'" in str(refused.value)


def test_a_connector_missing_a_hook_is_refused_naming_the_hook() -> None:
    class NoSend:
        @hookimpl
        def connector_info(self) -> ConnectorInfo:
            return ConnectorInfo(name="nosend", max_batch_items=1, max_batch_bytes=10_000)

        @hookimpl
        def identify(self, customer: Customer) -> Mapping[str, Any]:
            return {"id": customer.id}

        @hookimpl
        def map_profile(self) -> Mapping[str, Any]:
            return {}

        @hookimpl
        def map_event(self) -> Sequence[Mapping[str, Any]]:
            return []

    with pytest.raises(PluginError, match=r"'NoSend' declares connector 'nosend' but does not"):
        Connectors(plugin_manager([NoSend()], load_entry_points=False))


def test_a_mapping_hook_written_as_async_is_refused() -> None:
    class AsyncIdentify(Recorder):
        @hookimpl
        async def identify(self, customer: Customer) -> Mapping[str, Any]:  # type: ignore[override]
            return {"id": customer.id}

    with pytest.raises(PluginError, match="identify must be a plain function, not async"):
        Connectors(plugin_manager([AsyncIdentify()], load_entry_points=False))


class OnlySend:
    """The review's reproduction: a send hook, written as ``async def``, returning None
    for connections it does not recognise, and no connector declared."""

    @hookimpl
    async def send(self, connection: Connection) -> SendResult | None:
        if connection.connector != "braze":
            return None
        return SendResult()


def test_connector_hooks_without_a_declared_connector_are_refused() -> None:
    pm = plugin_manager([OnlySend()])

    with pytest.raises(PluginError, match="'OnlySend' implements 'send' but declares no connector"):
        Connectors(pm)


async def test_the_engine_does_not_start_with_a_plugin_that_breaks_the_contract(
    tmp_path: Path,
) -> None:
    engine = Engine(
        EngineConfig(data_dir=tmp_path, grpc_port=0, http_port=0, extra_plugins=[OnlySend()])
    )

    with pytest.raises(PluginError):
        await engine.start()


# -- dispatch ---------------------------------------------------------------------------

INSIDER = Connection("i-1", "insider", {"partner_name": "acme"}, "key", CustomerIdMapping())
ANNA = Customer("c-1", {"first_name": "Anna"})


def test_each_connection_gets_its_own_connectors_answer() -> None:
    connectors = Connectors(plugin_manager([Recorder()]))
    recorder = Connection("r-1", "recorder", {}, "", CustomerIdMapping())

    assert connectors.hooks(INSIDER).identify(ANNA) == {"uuid": "c-1"}
    assert connectors.hooks(recorder).identify(ANNA) == {"id": "c-1"}


class Wrapper:
    @hookimpl(wrapper=True)
    def identify(self) -> Iterator[None]:
        result = yield
        return {"wrapped": result}


def test_a_hook_wrapper_of_another_plugin_wraps_every_connectors_hook() -> None:
    connectors = Connectors(plugin_manager([Wrapper(), Recorder()]))
    recorder = Connection("r-1", "recorder", {}, "", CustomerIdMapping())

    assert connectors.hooks(INSIDER).identify(ANNA) == {"wrapped": {"uuid": "c-1"}}
    assert connectors.hooks(recorder).identify(ANNA) == {"wrapped": {"id": "c-1"}}


def test_hooks_take_any_subset_of_their_arguments_in_any_order() -> None:
    class Shuffled(Recorder):
        @hookimpl
        def identify(
            self, customer: Customer, plan: Any, connection: Connection
        ) -> Mapping[str, Any]:  # type: ignore[override]
            return {"id": customer.id, "via": connection.id, "plan": plan}

        @hookimpl
        def prepare(self, connection: Connection) -> str:
            return f"plan of {connection.id}"

    hooks = ConnectorTester(Shuffled())
    connection = Connection("s-1", "recorder", {}, "", CustomerIdMapping())

    assert hooks.identify(connection, ANNA) == {"id": "c-1", "via": "s-1", "plan": "plan of s-1"}


class Naive:
    """A second connector that answers ``None`` for connections it does not recognise;
    before the engine dispatched per connector, its coroutine answered for Insider's."""

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def connector_info(self) -> ConnectorInfo:
        return ConnectorInfo(name="naivecdp", max_batch_items=75, max_batch_bytes=100_000)

    @hookimpl
    def identify(self, connection: Connection, customer: Customer) -> Mapping[str, Any] | None:
        return {"external_id": customer.id} if connection.connector == "naivecdp" else None

    @hookimpl
    def map_profile(self) -> Mapping[str, Any]:
        return {}

    @hookimpl
    def map_event(self, event: AntavoEvent) -> Sequence[Mapping[str, Any]]:
        return [{"name": event.action}]

    @hookimpl
    async def send(self, connection: Connection) -> SendResult | None:
        self.calls += 1
        if connection.connector != "naivecdp":
            return None
        return SendResult()


async def test_a_natural_second_connector_never_answers_for_insiders_connections(
    tmp_path: Path, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    naive = Naive()
    async with running(tmp_path, naive) as engine:
        async with engine_client(engine) as client:
            await insider_connection(client, sandbox)
        status, _ = await post_events(
            http, engine, {"customer": "c1", "action": "point_add", "data": {"points": 5}}
        )
        assert status == 202

        async def delivered_to_insider() -> bool:
            return sandbox.state.lookup("uuid", "c1") is not None

        await eventually(delivered_to_insider)
    assert naive.calls == 0


# -- what hooks return, checked ---------------------------------------------------------


class running:
    """An engine with ``plugins`` installed beside the entry points, stopped on exit."""

    def __init__(self, tmp_path: Path, *plugins: object, **config: Any) -> None:
        self.engine = Engine(
            EngineConfig(
                data_dir=tmp_path / "data",
                grpc_port=0,
                http_port=0,
                delivery=config.pop("delivery", FAST_DELIVERY),
                extra_plugins=plugins,
                allowed_destinations=TEST_DESTINATIONS,
            )
        )

    async def __aenter__(self) -> Engine:
        await self.engine.start()
        return self.engine

    async def __aexit__(self, *exc: object) -> None:
        await self.engine.stop(grace=1.0)


async def connect(engine: Engine, connector: str, **options: Any) -> str:
    await engine.registry.create(
        connection_id="conn-1",
        display_name="",
        connector=connector,
        settings={},
        api_key="key-0123456789",
        customer_id_mapping=None,
        **options,
    )
    await engine.registry.add_event_mapping(
        "conn-1", "point_add", "points", (ParameterMapping("points", "points"),)
    )
    return "conn-1"


async def dead_letters(engine: Engine, count: int) -> list[StoredDeadLetter]:
    async def enough() -> bool:
        return len(await engine.queue.dead_letters(DeadLetterQuery(), 100)) >= count

    await eventually(enough)
    return await engine.queue.dead_letters(DeadLetterQuery(), 100)


async def points(http: aiohttp.ClientSession, engine: Engine, *customers: str, **data: Any) -> None:
    events = [
        {"customer": c, "action": "point_add", "data": {"points": 1, **data}} for c in customers
    ]
    status, body = await post_events(http, engine, {"events": events})
    assert status == 202, body


async def test_a_value_json_cannot_carry_is_one_dead_letter_and_the_connection_goes_on(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    class SetOfTags(Recorder):
        @hookimpl
        def map_event(self, customer: Customer, event: AntavoEvent) -> Sequence[Mapping[str, Any]]:  # type: ignore[override]
            tags: Any = {"gold"} if customer.id == "bad" else ["gold"]
            return [{"name": event.action, "tags": tags}]

    plugin = SetOfTags()
    async with running(tmp_path, plugin) as engine:
        await connect(engine, "recorder")
        await points(http, engine, "bad", "good")

        (dead,) = await dead_letters(engine, 1)

        async def good_sent() -> bool:
            return plugin.customers_sent() == ["good"]

        await eventually(good_sent)
        assert engine.queue.depth == 0
    assert (dead.customer_id, dead.stage) == ("bad", "map")
    assert "plugin 'SetOfTags'" in dead.error and "JSON cannot carry" in dead.error


async def test_a_wrong_type_from_a_hook_is_a_dead_letter_naming_the_plugin(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    class TextIdentifier(Recorder):
        @hookimpl
        def identify(self, customer: Customer) -> Any:  # type: ignore[override]
            return customer.id if customer.id == "bad" else {"id": customer.id}

    plugin = TextIdentifier()
    async with running(tmp_path, plugin) as engine:
        await connect(engine, "recorder")
        await points(http, engine, "bad", "good")
        (dead,) = await dead_letters(engine, 1)

        async def good_sent() -> bool:
            return plugin.customers_sent() == ["good"]

        await eventually(good_sent)
    assert dead.stage == "map"
    assert dead.error == "plugin 'TextIdentifier': identify returned a str, not a mapping"


async def test_an_item_over_the_connectors_byte_limit_is_a_dead_letter_at_stage_map(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    plugin = Recorder(max_batch_bytes=2_000)
    async with running(tmp_path, plugin) as engine:
        await connect(engine, "recorder")
        await points(http, engine, "big", note="x" * 3_000)
        await points(http, engine, "small")
        (dead,) = await dead_letters(engine, 1)

        async def small_sent() -> bool:
            return plugin.customers_sent() == ["small"]

        await eventually(small_sent)
    assert (dead.customer_id, dead.stage) == ("big", "map")
    assert dead.error.startswith("plugin 'Recorder': the item is too large for one request:")
    assert dead.error.endswith("limit 2000")


async def test_items_send_does_not_report_on_are_dead_letters_not_delivered(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    class ReportsFirstOnly(Recorder):
        @hookimpl
        async def send(self, deliveries: Sequence[Delivery]) -> SendResult:  # type: ignore[override]
            self.sent.append(list(deliveries))
            return SendResult({deliveries[0].item_id: ItemOutcome(True)})

    async with running(tmp_path, ReportsFirstOnly()) as engine:
        await connect(engine, "recorder")
        await points(http, engine, "a", "b", "c")
        dead = await dead_letters(engine, 2)

        async def settled() -> bool:
            return engine.queue.depth == 0

        await eventually(settled)
    assert sorted(d.customer_id for d in dead) == ["b", "c"]
    assert {d.stage for d in dead} == {"send"}
    assert {d.error for d in dead} == {
        "plugin 'ReportsFirstOnly' reported no outcome for this item (it may have been sent)"
    }


async def test_a_send_returning_no_result_dead_letters_its_batch_naming_the_plugin(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    class ReturnsNothing(Recorder):
        @hookimpl
        async def send(self) -> None:  # type: ignore[override]
            return None

    async with running(tmp_path, ReturnsNothing()) as engine:
        await connect(engine, "recorder")
        await points(http, engine, "a")
        (dead,) = await dead_letters(engine, 1)
    assert dead.stage == "send"
    assert dead.error == "plugin 'ReturnsNothing': send returned None, not a SendResult"


async def test_an_exception_of_send_is_retried_then_dead_lettered_past_the_window(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    class Buggy(Recorder):
        attempts = 0

        @hookimpl
        async def send(self) -> SendResult:  # type: ignore[override]
            Buggy.attempts += 1
            raise KeyError("region")

    async with running(tmp_path, Buggy()) as engine:
        await connect(engine, "recorder", retry_window_seconds=1.0)
        await points(http, engine, "a")
        (dead,) = await dead_letters(engine, 1)
    assert Buggy.attempts >= 2  # retried, not dead-lettered at once
    assert dead.stage == "send"
    assert "plugin 'Buggy' failed in send: KeyError: 'region'" in dead.error
    assert dead.error.startswith("gave up after")


async def test_a_failing_prepare_pauses_the_connection_with_the_reason(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    class BadPlan(Recorder):
        @hookimpl
        def prepare(self, connection: Connection) -> None:
            raise ValueError(f"no region for {connection.api_key}")

    async with running(tmp_path, BadPlan()) as engine:
        await connect(engine, "recorder")
        await points(http, engine, "a")

        async def paused() -> bool:
            return engine.registry.is_paused("conn-1")

        await eventually(paused)
        view = engine.registry.view("conn-1")
        assert engine.queue.depth == 1  # kept, not dead-lettered
    assert "plugin 'BadPlan'" in view.state_reason and "prepare failed" in view.state_reason
    assert "key-0123456789" not in view.state_reason
    assert "[redacted]" in view.state_reason


def test_a_contract_error_says_which_stage_and_plugin() -> None:
    error = ContractError("echo", "send returned None, not a SendResult", "send")

    assert (error.stage, error.plugin) == ("send", "echo")
    assert str(error) == "send: plugin 'echo': send returned None, not a SendResult"


async def test_the_transport_is_the_engines(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """``send`` gets a working transport: a request through it reaches the network and
    becomes a log row, whatever the connector."""
    received: list[bytes] = []

    async def handle(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/in", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/in"

    class Poster(Recorder):
        @hookimpl
        async def send(self, deliveries: Sequence[Delivery], transport: Transport) -> SendResult:  # type: ignore[override]
            await transport.request("POST", url, headers={}, body=b'{"n": 1}')
            return SendResult.of(deliveries)

    try:
        async with running(tmp_path, Poster()) as engine:
            await connect(engine, "recorder")
            await points(http, engine, "a")

            async def logged() -> bool:
                rows, _ = await engine.logs.page(LogQuery(), 10)
                return bool(rows)

            await eventually(logged)
            await asyncio.sleep(0)
    finally:
        await runner.cleanup()
    assert received == [b'{"n": 1}']
