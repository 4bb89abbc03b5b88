"""The connector kit's test half (``engine.connector.testing``).

``check_connector`` passes for every installed connector and fails, naming the check,
for connectors that break the contract of README "Connector plugins" and
``engine/connector/hookspecs.py``; ``FakeTransport`` answers from its script and records
what was sent; the record builders build what their docstrings promise.

The connectors here are plugin modules built in the test (``types.ModuleType``), as a
third party's module would be: one that keeps the contract, and copies of it with one
hook swapped for one that breaks a rule.
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from engine.connector import (
    ANTAVO_CUSTOMER_ID,
    AntavoEvent,
    AuthError,
    Connection,
    ConnectorInfo,
    Customer,
    CustomerIdMapping,
    Delivery,
    EventMapping,
    HttpResponse,
    InvalidInputError,
    ParameterMapping,
    PermanentError,
    ProfileChange,
    ProfileMapping,
    RetryableError,
    SendResult,
    Transport,
    hookimpl,
)
from engine.connector.testing import (
    ConnectorTester,
    ContractViolation,
    FakeTransport,
    RecordedRequest,
    Sample,
    check_connector,
    connection,
    customer,
    default_sample,
    event,
    event_mapping,
    profile_change,
    profile_mapping,
    response,
)
from engine.errors import ContractError, PluginError
from engine.plugins import plugin_manager

# -- every installed connector passes ----------------------------------------------------

SAMPLES: dict[str, Callable[[], Sample]] = {
    # Insider requires its account name (README, "Insider mapping reference").
    "insider": lambda: default_sample("insider", {"partner_name": "acme"}),
    # Braze requires its REST endpoint and has no "uuid" identifier (README, "Braze
    # mapping reference").
    "braze": lambda: braze_sample(),
}
"""Samples of the connectors whose settings ``default_sample`` does not satisfy."""


def braze_sample() -> Sample:
    sample = default_sample("braze", {"rest_endpoint": "https://rest.iad-01.braze.com"})
    mapping = CustomerIdMapping(target_identifier="external_id")
    return dataclasses.replace(
        sample, connection=dataclasses.replace(sample.connection, customer_id_mapping=mapping)
    )


def installed_connectors() -> list[tuple[str, object, str]]:
    """(entry point, plugin, connector name) of every ``tidegate`` entry point that
    declares a connector."""
    pm = plugin_manager()
    return sorted(
        (impl.plugin_name, impl.plugin, impl.function().name)
        for impl in pm.hook.connector_info.get_hookimpls()
    )


INSTALLED = installed_connectors()


def test_the_installed_connectors_include_insider() -> None:
    assert ("insider", "insider") in {(ep, name) for ep, _, name in INSTALLED}


@pytest.mark.parametrize(
    ("plugin", "connector"), [(p, n) for _, p, n in INSTALLED], ids=[ep for ep, _, _ in INSTALLED]
)
async def test_check_connector_passes_for_every_installed_connector(
    plugin: object, connector: str
) -> None:
    sample = SAMPLES[connector]() if connector in SAMPLES else default_sample(connector)
    await check_connector(plugin, sample)


async def test_check_connector_tells_a_connector_needing_settings_to_pass_a_sample() -> None:
    insider = next(p for _, p, name in INSTALLED if name == "insider")
    with pytest.raises(ContractViolation) as raised:
        await check_connector(insider)  # default_sample has no partner_name
    assert "validators_accept_the_sample" in str(raised.value)
    assert "pass a Sample" in str(raised.value)


# -- a connector that keeps the contract, and broken copies of it ------------------------

NAME = "kitcheck"
URL = "https://destination.example/v1/batch"


def _required(field: str) -> Callable[[Any], None]:
    def validate(mapping: Any) -> None:
        if not getattr(mapping, field):
            raise InvalidInputError(field, "required")

    return validate


@hookimpl
def connector_info() -> ConnectorInfo:
    return ConnectorInfo(
        name=NAME,
        max_batch_items=10,
        max_batch_bytes=100_000,
        validate_profile_mapping=_required("target_attribute"),
        validate_event_mapping=_required("target_event"),
        destination_hosts=("destination.example",),
    )


@hookimpl
def identify(customer: Customer) -> Mapping[str, Any]:
    return {"id": customer.id}


@hookimpl
def map_profile(connection: Connection, change: ProfileChange) -> Mapping[str, Any]:
    return {
        m.target_attribute: change.changes[m.source_attribute]
        for m in connection.profile_mappings
        if m.source_attribute in change.changes
    }


@hookimpl
def map_event(connection: Connection, event: AntavoEvent) -> Sequence[Mapping[str, Any]]:
    mapping = connection.event_mapping_for(event.action)
    return [] if mapping is None else [{"name": mapping.target_event, "data": dict(event.data)}]


def body_of(deliveries: Sequence[Delivery]) -> bytes:
    return orjson.dumps(
        [{"id": d.identifiers, "attributes": d.attributes, "events": d.events} for d in deliveries]
    )


def answer(answer: HttpResponse, deliveries: Sequence[Delivery]) -> SendResult:
    """The destination's answer as the contract says: 2xx delivered, 401/403 AuthError,
    429 RetryableError (throttled), 5xx RetryableError, other statuses PermanentError."""
    status = answer.status
    if 200 <= status < 300:
        return SendResult.of(deliveries)
    if status in (401, 403):
        raise AuthError(f"refused the key (HTTP {status})")
    if status == 429:
        raise RetryableError("rate limited (HTTP 429)", throttled=True)
    if status >= 500:
        raise RetryableError(f"HTTP {status}")
    raise PermanentError(f"HTTP {status}")


@hookimpl
async def send(
    connection: Connection, deliveries: Sequence[Delivery], transport: Transport
) -> SendResult:
    headers = {"Authorization": f"Bearer {connection.api_key}"}
    reply = await transport.request("POST", URL, headers=headers, body=body_of(deliveries))
    return answer(reply, deliveries)


COMPLIANT = {
    "connector_info": connector_info,
    "identify": identify,
    "map_profile": map_profile,
    "map_event": map_event,
    "send": send,
}


def plugin(name: str = "compliant", **hooks: Callable[..., Any] | None) -> types.ModuleType:
    """A plugin module with the compliant hooks, ``hooks`` swapped in (``None``: left out)."""
    module = types.ModuleType(name)
    for hook, function in {**COMPLIANT, **hooks}.items():
        if function is not None:
            setattr(module, hook, function)
    return module


def failed_checks(violation: ContractViolation) -> set[str]:
    return set(re.findall(r"^- (\w+): ", str(violation), re.MULTILINE))


async def violations(module: types.ModuleType) -> ContractViolation:
    with pytest.raises(ContractViolation) as raised:
        await check_connector(module)
    return raised.value


async def test_the_compliant_connector_passes() -> None:
    await check_connector(plugin())


# Each broken hook below breaks one rule; the check named for that rule must fail, and
# only that one.


@hookimpl
def map_event_none_when_unmapped(
    connection: Connection, event: AntavoEvent
) -> Sequence[Mapping[str, Any]] | None:
    mapping = connection.event_mapping_for(event.action)
    return None if mapping is None else [{"name": mapping.target_event}]


@hookimpl
def map_event_maps_every_action(event: AntavoEvent) -> Sequence[Mapping[str, Any]]:
    return [{"name": event.action}]


@hookimpl
def identify_nothing(customer: Customer) -> Mapping[str, Any]:
    return {}


@hookimpl
def identify_marks_the_customer(customer: Customer) -> Mapping[str, Any]:
    customer.attributes["seen"] = True  # type: ignore[index]
    return {"id": customer.id}


@hookimpl
def map_profile_nothing(change: ProfileChange) -> Mapping[str, Any]:
    return {}


@hookimpl
def connector_info_without_validators() -> ConnectorInfo:
    return ConnectorInfo(
        name=NAME,
        max_batch_items=10,
        max_batch_bytes=100_000,
        destination_hosts=("destination.example",),
    )


@hookimpl
def connector_info_without_hosts() -> ConnectorInfo:
    return ConnectorInfo(
        name=NAME,
        max_batch_items=10,
        max_batch_bytes=100_000,
        validate_profile_mapping=_required("target_attribute"),
        validate_event_mapping=_required("target_event"),
    )


@hookimpl
def connector_info_with_no_room() -> ConnectorInfo:
    return ConnectorInfo(
        name=NAME,
        max_batch_items=0,
        max_batch_bytes=100_000,
        destination_hosts=("destination.example",),
        validate_profile_mapping=_required("target_attribute"),
        validate_event_mapping=_required("target_event"),
    )


@hookimpl
async def send_leaving_an_item_out(
    connection: Connection, deliveries: Sequence[Delivery], transport: Transport
) -> SendResult:
    headers = {"Authorization": f"Bearer {connection.api_key}"}
    reply = await transport.request("POST", URL, headers=headers, body=body_of(deliveries))
    return answer(reply, deliveries[:-1])


@hookimpl
async def send_without_a_request(deliveries: Sequence[Delivery]) -> SendResult:
    return SendResult.of(deliveries)


@hookimpl
async def send_key_in_url(
    connection: Connection, deliveries: Sequence[Delivery], transport: Transport
) -> SendResult:
    url = f"{URL}?api_key={connection.api_key}"
    reply = await transport.request("POST", url, headers={}, body=body_of(deliveries))
    return answer(reply, deliveries)


@hookimpl
async def send_key_in_body(
    connection: Connection, deliveries: Sequence[Delivery], transport: Transport
) -> SendResult:
    body = orjson.dumps({"key": connection.api_key, "batch": orjson.loads(body_of(deliveries))})
    reply = await transport.request("POST", URL, headers={}, body=body)
    return answer(reply, deliveries)


def send_answering(
    status_rule: Callable[[HttpResponse, Sequence[Delivery]], SendResult],
) -> Callable[..., Any]:
    @hookimpl
    async def send(
        connection: Connection, deliveries: Sequence[Delivery], transport: Transport
    ) -> SendResult:
        headers = {"Authorization": f"Bearer {connection.api_key}"}
        reply = await transport.request("POST", URL, headers=headers, body=body_of(deliveries))
        return status_rule(reply, deliveries)

    return send


def delivered_on_401(reply: HttpResponse, deliveries: Sequence[Delivery]) -> SendResult:
    if reply.status == 401:
        return SendResult.of(deliveries)
    return answer(reply, deliveries)


def permanent_on_5xx(reply: HttpResponse, deliveries: Sequence[Delivery]) -> SendResult:
    if reply.status >= 500:
        raise PermanentError(f"HTTP {reply.status}")
    return answer(reply, deliveries)


def retryable_on_403(reply: HttpResponse, deliveries: Sequence[Delivery]) -> SendResult:
    if reply.status == 403:
        raise RetryableError("try again later")
    return answer(reply, deliveries)


def crashes_on_429(reply: HttpResponse, deliveries: Sequence[Delivery]) -> SendResult:
    if reply.status == 429:
        float(reply.headers["Retry-After"])  # KeyError: the answer has no Retry-After
    return answer(reply, deliveries)


def unthrottled_429(reply: HttpResponse, deliveries: Sequence[Delivery]) -> SendResult:
    if reply.status == 429:
        raise RetryableError("rate limited (HTTP 429)")
    return answer(reply, deliveries)


@hookimpl
async def send_key_in_auth_error(
    connection: Connection, deliveries: Sequence[Delivery], transport: Transport
) -> SendResult:
    headers = {"Authorization": f"Bearer {connection.api_key}"}
    reply = await transport.request("POST", URL, headers=headers, body=body_of(deliveries))
    if reply.status in (401, 403):
        raise AuthError(f"key {connection.api_key} refused")
    return answer(reply, deliveries)


@hookimpl
async def send_key_in_tags(
    connection: Connection, deliveries: Sequence[Delivery], transport: Transport
) -> SendResult:
    reply = await transport.request(
        "POST", URL, headers={}, body=body_of(deliveries), tags=[f"key:{connection.api_key}"]
    )
    return answer(reply, deliveries)


@hookimpl
async def send_crashing_on_a_timeout(
    connection: Connection, deliveries: Sequence[Delivery], transport: Transport
) -> SendResult:
    headers = {"Authorization": f"Bearer {connection.api_key}"}
    try:
        reply = await transport.request("POST", URL, headers=headers, body=body_of(deliveries))
    except RetryableError as exc:
        raise RuntimeError("no answer") from exc
    return answer(reply, deliveries)


@hookimpl
async def send_swallowing_a_timeout(
    connection: Connection, deliveries: Sequence[Delivery], transport: Transport
) -> SendResult:
    headers = {"Authorization": f"Bearer {connection.api_key}"}
    try:
        reply = await transport.request("POST", URL, headers=headers, body=body_of(deliveries))
    except RetryableError:
        return SendResult.of(deliveries, failed={d.customer.id: "timeout" for d in deliveries})
    return answer(reply, deliveries)


BROKEN = [
    pytest.param(
        {"map_event": map_event_none_when_unmapped}, "map_event_answers_events", id="event-None"
    ),
    pytest.param(
        {"map_event": map_event_maps_every_action},
        "map_event_answers_events",
        id="event-for-unmapped-action",
    ),
    pytest.param({"identify": identify_nothing}, "identify_answers_a_mapping", id="no-ids"),
    pytest.param(
        {"identify": identify_marks_the_customer},
        "identify_answers_a_mapping",
        id="identify-changes-customer",
    ),
    pytest.param(
        {"map_profile": map_profile_nothing}, "map_profile_answers_a_mapping", id="no-attributes"
    ),
    pytest.param(
        {"connector_info": connector_info_without_validators},
        "validators_refuse_a_mapping_without_a_target",
        id="no-validators",
    ),
    pytest.param(
        {"connector_info": connector_info_without_hosts},
        "send_goes_only_to_its_destinations",
        id="undeclared-host",
    ),
    pytest.param(
        {"connector_info": connector_info_with_no_room}, "declares_usable_limits", id="no-room"
    ),
    pytest.param(
        {"send": send_leaving_an_item_out},
        "send_reports_every_item_delivered",
        id="item-left-out",
    ),
    pytest.param({"send": send_key_in_url}, "send_keeps_the_key_out_of_the_log", id="key-in-url"),
    pytest.param(
        {"send": send_key_in_body},
        "send_keeps_the_key_out_of_the_log",
        id="key-in-body",
    ),
    pytest.param({"send": send_key_in_tags}, "send_keeps_the_key_out_of_the_log", id="key-in-tags"),
    pytest.param(
        {"send": send_key_in_auth_error},
        "send_keeps_the_key_out_of_the_log",
        id="key-in-error",
    ),
    pytest.param(
        {"send": send_answering(delivered_on_401)},
        "send_raises_auth_error_on_401_and_403",
        id="401-delivered",
    ),
    pytest.param(
        {"send": send_answering(retryable_on_403)},
        "send_raises_auth_error_on_401_and_403",
        id="403-retried",
    ),
    pytest.param(
        {"send": send_answering(permanent_on_5xx)},
        "send_raises_retryable_error_on_429_and_5xx",
        id="5xx-permanent",
    ),
    pytest.param(
        {"send": send_answering(crashes_on_429)},
        "send_raises_retryable_error_on_429_and_5xx",
        id="429-crash",
    ),
    pytest.param(
        {"send": send_answering(unthrottled_429)},
        "send_raises_retryable_error_on_429_and_5xx",
        id="429-unthrottled",
    ),
    pytest.param(
        {"send": send_crashing_on_a_timeout},
        "send_lets_a_transport_failure_through",
        id="timeout-crash",
    ),
    pytest.param(
        {"send": send_swallowing_a_timeout},
        "send_lets_a_transport_failure_through",
        id="timeout-swallowed",
    ),
]


@pytest.mark.parametrize(("hooks", "check"), BROKEN)
async def test_check_connector_names_the_one_check_a_broken_hook_fails(
    hooks: dict[str, Callable[..., Any]], check: str
) -> None:
    violation = await violations(plugin("broken", **hooks))
    assert failed_checks(violation) == {check}, str(violation)
    assert f"connector {NAME!r}" in str(violation)


async def test_check_connector_names_the_status_a_send_got_wrong() -> None:
    violation = await violations(plugin(send=send_answering(delivered_on_401)))
    assert "401: send returned instead of raising AuthError" in str(violation)
    violation = await violations(plugin(send=send_answering(retryable_on_403)))
    assert "403: send raised RetryableError('try again later'), not AuthError" in str(violation)


async def test_check_connector_names_the_exception_a_send_crashed_with() -> None:
    violation = await violations(plugin(send=send_answering(crashes_on_429)))
    assert "429: send failed with its own KeyError" in str(violation)


async def test_check_connector_reports_a_send_that_makes_no_request() -> None:
    violation = await violations(plugin(send=send_without_a_request))
    assert "send_reports_every_item_delivered" in failed_checks(violation)
    assert "made no request" in str(violation)


async def test_check_connector_lists_every_failed_check_of_one_connector() -> None:
    violation = await violations(
        plugin(map_event=map_event_maps_every_action, send=send_key_in_url)
    )
    assert failed_checks(violation) == {
        "map_event_answers_events",
        "send_keeps_the_key_out_of_the_log",
    }


async def test_check_connector_reports_an_unknown_hook_name_with_the_closest_one() -> None:
    violation = await violations(plugin("typo", map_events=map_event))
    assert "refuses to load it" in str(violation)
    assert "'map_events'" in str(violation) and "did you mean 'map_event'" in str(violation)


async def test_check_connector_reports_a_missing_hook() -> None:
    violation = await violations(plugin("sendless", send=None))
    assert "refuses to load it" in str(violation)
    assert "does not implement send" in str(violation)


@hookimpl
async def identify_async(customer: Customer) -> Mapping[str, Any]:
    return {"id": customer.id}


async def test_check_connector_reports_a_synchronous_hook_written_async() -> None:
    violation = await violations(plugin("eager", identify=identify_async))
    assert "refuses to load it" in str(violation)
    assert "identify must be a plain function" in str(violation)


async def test_check_connector_reports_a_plugin_declaring_no_connector() -> None:
    violation = await violations(plugin("anonymous", connector_info=None))
    assert "refuses to load it" in str(violation)
    assert "connector_info" in str(violation)


# -- ConnectorTester: the engine's dispatch and checks ------------------------------------

COMPLIANT_TESTER = ConnectorTester(plugin())
POINTS = connection(NAME, event_mappings=[event_mapping("point_add", "points_earned")])


def test_connector_tester_reads_the_connector_info() -> None:
    assert (COMPLIANT_TESTER.name, COMPLIANT_TESTER.info.max_batch_items) == (NAME, 10)


def test_connector_tester_refuses_a_plugin_without_a_connector() -> None:
    with pytest.raises(PluginError):
        ConnectorTester(plugin("anonymous", connector_info=None))


@hookimpl
def identify_as_a_list(customer: Customer) -> Any:
    return [customer.id]


def test_connector_tester_raises_the_engines_contract_error_naming_the_plugin() -> None:
    tester = ConnectorTester(plugin("listy", identify=identify_as_a_list))
    with pytest.raises(ContractError) as raised:
        tester.identify(connection(NAME), customer("c-1"))
    assert raised.value.plugin == "listy"
    assert raised.value.stage == "map"


def test_connector_tester_renders_nothing_for_an_unmapped_event() -> None:
    assert COMPLIANT_TESTER.render(POINTS, customer("c-1"), event=event("unmapped")) is None


def test_connector_tester_renders_what_the_hooks_answer() -> None:
    points = event("point_add", {"points": 5}, customer="c-1")
    delivery = COMPLIANT_TESTER.render(POINTS, customer("c-1"), event=points, item_id=7)
    assert delivery is not None
    assert (delivery.item_id, delivery.identifiers) == (7, {"id": "c-1"})
    assert delivery.events == [{"name": "points_earned", "data": {"points": 5}}]
    assert (delivery.attributes, delivery.event, delivery.attempt) == (None, points, 1)


def test_connector_tester_renders_records_into_a_batch_numbered_in_order() -> None:
    tester = ConnectorTester(plugin())
    mapped = connection(
        NAME,
        profile_mappings=[profile_mapping("email", "mail")],
        event_mappings=[event_mapping("point_add", "points_earned")],
    )
    points = event("point_add", customer="c-1")
    batch = tester.deliveries(mapped, customer("c-1"), profile_change({"email": "a@b.co"}), points)
    assert [(d.item_id, d.attributes, d.events) for d in batch] == [
        (1, {"mail": "a@b.co"}, []),
        (2, None, [{"name": "points_earned", "data": {}}]),
    ]


def test_connector_tester_refuses_to_batch_an_event_that_would_not_be_sent() -> None:
    with pytest.raises(AssertionError, match="'unmapped' is not mapped"):
        COMPLIANT_TESTER.deliveries(POINTS, customer("c-1"), event("unmapped"))


async def test_connector_tester_sends_through_a_transport_answering_200() -> None:
    points = event("point_add", customer="c-1")
    delivery = COMPLIANT_TESTER.render(POINTS, customer("c-1"), event=points)
    assert delivery is not None
    result = await COMPLIANT_TESTER.send(POINTS, [delivery])
    assert result.outcomes[delivery.item_id].delivered


# -- FakeTransport ---------------------------------------------------------------------


async def post(transport: FakeTransport, body: bytes = b"{}", **headers: str) -> HttpResponse:
    return await transport.request("POST", URL, headers=headers, body=body)


async def test_fake_transport_answers_200_with_an_empty_object_without_a_script() -> None:
    transport = FakeTransport()
    answers = [await post(transport), await post(transport)]
    assert [(a.status, a.body) for a in answers] == [(200, b"{}"), (200, b"{}")]


async def test_fake_transport_answers_in_order_and_repeats_the_last_answer() -> None:
    transport = FakeTransport(response(429), response(500), response(202))
    statuses = [(await post(transport)).status for _ in range(5)]
    assert statuses == [429, 500, 202, 202, 202]


async def test_fake_transport_raises_a_scripted_exception_and_still_records_the_request() -> None:
    timeout = RetryableError("no answer within 30 s")
    transport = FakeTransport(timeout, response(200))
    with pytest.raises(RetryableError) as raised:
        await post(transport, b'{"try": 1}')
    assert raised.value is timeout
    assert (await post(transport, b'{"try": 2}')).status == 200
    assert [r.json() for r in transport.requests] == [{"try": 1}, {"try": 2}]


async def test_fake_transport_answers_with_a_function_of_the_request() -> None:
    def echo(request: RecordedRequest) -> HttpResponse:
        return response(201, {"seen": request.json(), "auth": request.headers["Authorization"]})

    answer = await post(FakeTransport(echo), b'{"a": 1}', Authorization="Bearer k")
    assert (answer.status, orjson.loads(answer.body)) == (
        201,
        {"seen": {"a": 1}, "auth": "Bearer k"},
    )


async def test_fake_transport_records_each_request_as_sent() -> None:
    transport = FakeTransport()
    headers = {"Authorization": "Bearer k", "Content-Type": "application/json"}
    await transport.request("PUT", URL, headers=headers, body=b"[1]", tags=["backfill"])
    await transport.request("DELETE", URL + "/2", headers={}, body=b"")
    assert transport.requests == [
        RecordedRequest("PUT", URL, headers, b"[1]", ("backfill",)),
        RecordedRequest("DELETE", URL + "/2", {}, b"", ()),
    ]


# -- the record builders -----------------------------------------------------------------


def test_connection_builds_what_hooks_get_with_the_default_customer_id_mapping() -> None:
    built = connection(
        "acme",
        settings={"url": URL},
        profile_mappings=[profile_mapping("email", "mail", id="p1")],
        event_mappings=[event_mapping("point_add", "points", id="e1")],
    )
    assert isinstance(built, Connection)
    assert (built.connector, built.settings) == ("acme", {"url": URL})
    assert built.api_key, "a connection has a key, so the kit can look for it in requests"
    assert built.customer_id_mapping == CustomerIdMapping(ANTAVO_CUSTOMER_ID, "uuid", False)
    assert built.profile_mappings == (ProfileMapping("p1", "email", "mail"),)
    assert built.event_mappings == (EventMapping("e1", "point_add", "points"),)
    assert built.event_mapping_for("point_add") == EventMapping("e1", "point_add", "points")


def test_mapping_builders_give_each_mapping_its_own_id() -> None:
    ids = {profile_mapping("a", "b").id, profile_mapping("a", "b").id}
    ids |= {event_mapping("x", "y").id, event_mapping("x", "y").id}
    assert len(ids) == 4


def test_profile_mapping_passes_custom_and_array_mode() -> None:
    mapping = profile_mapping("tags", "labels", custom=True, array_mode="replace", id="p")
    assert mapping == ProfileMapping("p", "tags", "labels", True, "replace")


def test_event_mapping_reads_parameter_pairs_as_default_and_triples_as_given() -> None:
    mapping = event_mapping("checkout", "purchase", ("total", "price"), ("shop", "store", True))
    assert mapping.parameters == (
        ParameterMapping("total", "price", False),
        ParameterMapping("shop", "store", True),
    )


def test_customer_builds_a_customer_with_its_attributes() -> None:
    built = customer("c-9", first_name="Ana", last_name="Kovacs")
    assert built == Customer("c-9", {"first_name": "Ana", "last_name": "Kovacs"})
    assert built.name == "Ana Kovacs"


def test_event_defaults_fit_the_default_customer() -> None:
    first, second = event("point_add", {"points": 5}), event("point_add")
    assert isinstance(first, AntavoEvent)
    assert first.customer == customer().id
    assert (first.action, first.data, second.data) == ("point_add", {"points": 5}, {})
    assert first.id != second.id
    assert first.timestamp.tzinfo is not None


def test_event_takes_every_field() -> None:
    when = datetime(2026, 3, 1, 10, tzinfo=UTC)
    built = event(
        "checkout", {"total": 9}, customer="c-2", id="e-1", timestamp=when,
        external_id="email", account="eu",
    )  # fmt: skip
    assert built == AntavoEvent("e-1", "c-2", "checkout", {"total": 9}, when, "email", "eu")


def test_profile_change_keeps_a_cleared_attribute_as_none() -> None:
    change = profile_change({"email": None, "tier": "gold"}, previous={"email": "a@b.co"})
    assert isinstance(change, ProfileChange)
    assert change.changes == {"email": None, "tier": "gold"}
    assert change.previous == {"email": "a@b.co"}
    assert profile_change({"tier": "gold"}).previous == {}


@pytest.mark.parametrize(
    ("body", "raw"),
    [
        (None, b"{}"),
        (b"\x00raw", b"\x00raw"),
        ("árvíz", "árvíz".encode()),
        ({"ok": True, "n": [1, 2]}, b'{"ok":true,"n":[1,2]}'),
    ],
    ids=["none", "bytes", "text", "json"],
)
def test_response_encodes_its_body(body: Any, raw: bytes) -> None:
    assert response(body=body).body == raw


def test_response_carries_status_and_headers() -> None:
    built = response(429, headers={"Retry-After": "7"})
    assert (built.status, built.headers) == (429, {"Retry-After": "7"})
