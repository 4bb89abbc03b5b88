"""The connector kit's test half: run a connector's hooks exactly as the engine runs them,
build records in one line, script the destination's answers, and check the contract.

    from engine.connector.testing import ConnectorTester, FakeTransport, check_connector
    from engine.connector.testing import connection, customer, event, profile_change, response

- ``ConnectorTester(plugin, allow_destinations)`` loads one plugin with the engine's
  start-up checks (``allow_destinations``: what ``serve --allow-destination`` would allow,
  for a connector whose destination the operator chooses) and calls
  a connection's hooks through the engine's own dispatch, with the engine's checks of what
  they return (so a test sees the ``ContractError`` the engine would raise);
  ``deliveries`` renders records into the batch ``send`` gets.
- ``FakeTransport(*answers)`` answers ``send``'s requests from a script and records them.
- ``check_connector(plugin, sample)`` runs the contract checks every connector must pass
  and raises ``ContractViolation`` listing every one that failed.

Nothing here opens a socket. A connector's own tests may also run it against a stand-in
of its destination over loopback, as the Insider connector's do. (This module sits on top
of the engine, which it runs; the rest of ``engine.connector`` needs nothing of it.)
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson

from engine.connector.destinations import Allowance, DestinationError
from engine.connector.info import ConnectorInfo
from engine.connector.records import (
    AntavoEvent,
    Connection,
    Customer,
    CustomerIdMapping,
    Delivery,
    EventMapping,
    HttpResponse,
    ParameterMapping,
    ProfileChange,
    ProfileMapping,
    SendResult,
)
from engine.delivery.render import render
from engine.errors import (
    AuthError,
    ConnectorCrashError,
    DeliveryError,
    InvalidInputError,
    PluginError,
    RetryableError,
)
from engine.plugins import ConnectionHooks, Connectors, plugin_manager

MOMENT = datetime(2026, 1, 15, 9, 30, tzinfo=UTC)
"""The time records get when a test gives none."""
UNMAPPED_ACTION = "tidegate_kit_unmapped_action"
_Expected = TypeVar("_Expected", bound=DeliveryError)


# -- records ---------------------------------------------------------------------------


def connection(
    connector: str,
    *,
    settings: Mapping[str, str] | None = None,
    api_key: str = "kit-api-key-0123456789",
    id: str = "kit-connection",
    customer_id_mapping: CustomerIdMapping | None = None,
    profile_mappings: Sequence[ProfileMapping] = (),
    event_mappings: Sequence[EventMapping] = (),
    mapping_version: int = 1,
) -> Connection:
    """A connection of ``connector`` as the engine hands it to hooks."""
    return Connection(
        id=id,
        connector=connector,
        settings=dict(settings or {}),
        api_key=api_key,
        customer_id_mapping=customer_id_mapping or CustomerIdMapping(),
        profile_mappings=tuple(profile_mappings),
        event_mappings=tuple(event_mappings),
        mapping_version=mapping_version,
    )


_ids = itertools.count(1)


def profile_mapping(
    source: str, target: str, *, custom: bool = False, array_mode: str = "", id: str = ""
) -> ProfileMapping:
    """Antavo attribute ``source`` synced to the destination attribute ``target``."""
    return ProfileMapping(id or f"profile-{next(_ids)}", source, target, custom, array_mode)


def event_mapping(
    source: str,
    target: str,
    *parameters: tuple[str, str] | tuple[str, str, bool],
    id: str = "",
) -> EventMapping:
    """Antavo action ``source`` synced as the destination event ``target``; each parameter
    is ``(source key, target parameter)`` or ``(source key, target parameter, custom)``."""
    return EventMapping(
        id or f"event-{next(_ids)}",
        source,
        target,
        tuple(ParameterMapping(*parameter) for parameter in parameters),
    )


def customer(id: str = "customer-1", **attributes: Any) -> Customer:
    """A customer with the given profile attributes."""
    return Customer(id, dict(attributes))


def event(
    action: str,
    data: Mapping[str, Any] | None = None,
    *,
    customer: str = "customer-1",
    id: str = "",
    timestamp: datetime = MOMENT,
    external_id: str = "",
    account: str = "",
) -> AntavoEvent:
    """An Antavo event as ingest validated it."""
    return AntavoEvent(
        id or f"kit-event-{next(_ids)}",
        customer,
        action,
        dict(data or {}),
        timestamp,
        external_id,
        account,
    )


def profile_change(
    changes: Mapping[str, Any],
    previous: Mapping[str, Any] | None = None,
    timestamp: datetime = MOMENT,
) -> ProfileChange:
    """A profile change; a value of ``None`` in ``changes`` clears that attribute."""
    return ProfileChange(dict(changes), timestamp, dict(previous or {}))


def response(
    status: int = 200, body: Any = None, headers: Mapping[str, str] | None = None
) -> HttpResponse:
    """A destination answer. ``body``: bytes as they are, a string as UTF-8, anything else
    as JSON; ``None`` is ``{}``."""
    if body is None:
        raw = b"{}"
    elif isinstance(body, bytes):
        raw = body
    elif isinstance(body, str):
        raw = body.encode()
    else:
        raw = orjson.dumps(body)
    return HttpResponse(status, dict(headers or {}), raw, 0.001)


# -- the transport ---------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """One request ``send`` made through a ``FakeTransport``."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes
    tags: tuple[str, ...] = ()

    def json(self) -> Any:
        return orjson.loads(self.body)


Answer = HttpResponse | BaseException | Callable[[RecordedRequest], HttpResponse]


class FakeTransport:
    """A ``Transport`` that records every request and answers from a script.

    Each answer is an ``HttpResponse``, an exception to raise (``RetryableError`` stands
    for a timeout or a refused connection, as the engine's transport raises it), or a
    function of the request. Answers are used in order; the last one repeats. With no
    script every request gets ``200 {}``.
    """

    def __init__(self, *answers: Answer) -> None:
        self._answers = list(answers) or [response()]
        self.requests: list[RecordedRequest] = []

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes,
        tags: Collection[str] = (),
    ) -> HttpResponse:
        recorded = RecordedRequest(method, url, dict(headers), bytes(body), tuple(tags))
        self.requests.append(recorded)
        answer = self._answers[min(len(self.requests), len(self._answers)) - 1]
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, HttpResponse):
            return answer
        return answer(recorded)


# -- running hooks as the engine does --------------------------------------------------


class ConnectorTester:
    """One connector plugin, loaded with the engine's start-up checks (``PluginError``
    when it breaks them) and called through the engine's dispatch and checks."""

    def __init__(self, plugin: object, allow_destinations: Sequence[str] = ()) -> None:
        allowed = [Allowance.parse(text) for text in allow_destinations]
        self._connectors = Connectors(plugin_manager([plugin], load_entry_points=False), allowed)
        names = self._connectors.names()
        if len(names) != 1:
            raise PluginError(f"{plugin!r} declares no connector (connector_info)")
        self.info: ConnectorInfo = self._connectors.info(names[0])
        self.name = self.info.name

    def hooks(self, connection: Connection) -> ConnectionHooks:
        """The engine's ``ConnectionHooks`` for ``connection`` (``prepare`` ran once)."""
        return self._connectors.hooks(connection)

    def identify(self, connection: Connection, customer: Customer) -> Mapping[str, Any]:
        return self.hooks(connection).identify(customer)

    def map_profile(
        self, connection: Connection, customer: Customer, change: ProfileChange
    ) -> Mapping[str, Any]:
        return self.hooks(connection).map_profile(customer, change)

    def map_event(
        self, connection: Connection, customer: Customer, event: AntavoEvent
    ) -> list[Mapping[str, Any]]:
        return self.hooks(connection).map_event(customer, event)

    def render(
        self,
        connection: Connection,
        customer: Customer,
        *,
        change: ProfileChange | None = None,
        event: AntavoEvent | None = None,
        item_id: int = 1,
        attempt: int = 1,
    ) -> Delivery | None:
        """What delivery sends for ``change`` or ``event``: the hooks' answers as one
        ``Delivery``, checked for JSON and size (``None``: the event is not mapped)."""
        rendered = render(
            self.hooks(connection), customer, item_id, attempt, change=change, event=event
        )
        return None if rendered is None else rendered[0]

    def deliveries(
        self,
        connection: Connection,
        customer: Customer,
        *records: ProfileChange | AntavoEvent,
    ) -> list[Delivery]:
        """A batch for ``send``: each profile change or event of ``customer`` rendered as
        ``render`` does, with item ids 1, 2, ... in order. ``AssertionError`` for an event
        the connection does not map (delivery would send nothing for it)."""
        batch: list[Delivery] = []
        for item_id, record in enumerate(records, 1):
            if isinstance(record, ProfileChange):
                delivery = self.render(connection, customer, change=record, item_id=item_id)
            else:
                delivery = self.render(connection, customer, event=record, item_id=item_id)
                assert delivery is not None, f"action {record.action!r} is not mapped"
            assert delivery is not None  # a profile change always renders
            batch.append(delivery)
        return batch

    async def send(
        self,
        connection: Connection,
        deliveries: Sequence[Delivery],
        transport: FakeTransport | None = None,
    ) -> SendResult:
        """``send`` as delivery awaits it (``FakeTransport()`` answers 200 when none is
        given). Raises the engine's errors as ``send`` raised them."""
        return await self.hooks(connection).send(deliveries, transport or FakeTransport())

    async def erase(
        self, connection: Connection, customer: Customer, transport: FakeTransport | None = None
    ) -> None:
        """``erase`` as ``EraseCustomer`` awaits it, with the identifiers ``identify`` gives
        (``AssertionError`` for a connector without ``erase``)."""
        hooks = self.hooks(connection)
        assert hooks.can_erase, f"connector {self.name!r} has no erase hook"
        await hooks.erase(customer, hooks.identify(customer), transport or FakeTransport())


# -- the contract check ----------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """A working example for ``check_connector``: a connection whose validators accept
    it, a customer it can identify, a profile change of a mapped attribute and an event
    of a mapped action, and the destination's answer to a request that went through."""

    connection: Connection
    customer: Customer
    change: ProfileChange
    event: AntavoEvent
    success: HttpResponse = field(default_factory=response)


def default_sample(connector: str, settings: Mapping[str, str] | None = None) -> Sample:
    """A sample with an email attribute and a ``point_add`` event mapped, and ``settings``."""
    return Sample(
        connection=connection(
            connector,
            settings=settings,
            profile_mappings=[profile_mapping("email", "email")],
            event_mappings=[
                event_mapping("point_add", "points_earned", ("points", "points", True))
            ],
        ),
        customer=customer("customer-1", email="ana@example.com", first_name="Ana"),
        change=profile_change({"email": "ana@example.com"}),
        event=event("point_add", {"points": 50}),
    )


class ContractViolation(AssertionError):
    """A connector failed ``check_connector``; the message lists every failed check."""


async def check_connector(
    plugin: object, sample: Sample | None = None, allow_destinations: Sequence[str] = ()
) -> None:
    """Checks ``plugin`` against the connector contract; raises ``ContractViolation``
    naming every check it fails. ``sample`` defaults to ``default_sample`` with no
    settings, which a connector that needs settings refuses: pass one of your own.
    ``allow_destinations``: as for ``ConnectorTester``."""
    try:
        tester = ConnectorTester(plugin, allow_destinations)
    except PluginError as exc:
        raise ContractViolation(f"the engine refuses to load it: {exc}") from None
    sample = sample or default_sample(tester.name)
    problems: list[str] = []
    for check in _CHECKS:
        try:
            await check(tester, sample)
        except AssertionError as exc:
            problems.append(f"{check.__name__.removeprefix('_')}: {exc}")
        except Exception as exc:  # a hook that raised what no rule allows
            problems.append(f"{check.__name__.removeprefix('_')}: raised {exc!r}")
    if problems:
        raise ContractViolation(
            f"connector {tester.name!r} breaks the contract:\n- " + "\n- ".join(problems)
        )


async def _declares_usable_limits(tester: ConnectorTester, sample: Sample) -> None:
    info = tester.info
    assert info.name and info.name == info.name.strip().lower(), f"name {info.name!r}"
    assert info.max_batch_items >= 1, f"max_batch_items is {info.max_batch_items}"
    assert info.max_batch_bytes > 1024, f"max_batch_bytes is {info.max_batch_bytes}"


async def _validators_accept_the_sample(tester: ConnectorTester, sample: Sample) -> None:
    info, conn = tester.info, sample.connection
    checks: list[tuple[str, Callable[[Any], None], object]] = [
        ("validate_settings", info.validate_settings, conn.settings),
        ("validate_customer_id_mapping", info.validate_customer_id_mapping,
         conn.customer_id_mapping),
    ]  # fmt: skip
    checks += [("validate_profile_mapping", info.validate_profile_mapping, m)
               for m in conn.profile_mappings]  # fmt: skip
    checks += [("validate_event_mapping", info.validate_event_mapping, m)
               for m in conn.event_mappings]  # fmt: skip
    for name, validate, value in checks:
        try:
            validate(value)
        except InvalidInputError as exc:
            raise AssertionError(f"{name} refused the sample: {exc} (pass a Sample)") from None


async def _validators_refuse_a_mapping_without_a_target(
    tester: ConnectorTester, sample: Sample
) -> None:
    checks: list[tuple[str, Callable[[Any], None], object, str]] = [
        ("validate_profile_mapping", tester.info.validate_profile_mapping,
         ProfileMapping("kit", "email", ""), "target_attribute"),
        ("validate_event_mapping", tester.info.validate_event_mapping,
         EventMapping("kit", "point_add", ""), "target_event"),
    ]  # fmt: skip
    for name, validate, value, target in checks:
        try:
            validate(value)
        except InvalidInputError as exc:
            assert exc.field == target, f"{name} named field {exc.field!r}, not {target!r}"
        else:
            raise AssertionError(f"{name} accepted a mapping with an empty {target}")


async def _identify_answers_a_mapping(tester: ConnectorTester, sample: Sample) -> None:
    before = copy.deepcopy(dict(sample.customer.attributes))
    first = tester.identify(sample.connection, sample.customer)
    second = tester.identify(sample.connection, sample.customer)
    assert first, "identify returned no identifiers"
    assert first == second, "identify answered differently for the same customer"
    assert dict(sample.customer.attributes) == before, "identify changed the customer"


async def _map_profile_answers_a_mapping(tester: ConnectorTester, sample: Sample) -> None:
    before = copy.deepcopy((dict(sample.change.changes), dict(sample.customer.attributes)))
    attributes = tester.map_profile(sample.connection, sample.customer, sample.change)
    assert attributes, "map_profile mapped nothing for a change of a mapped attribute"
    after = (dict(sample.change.changes), dict(sample.customer.attributes))
    assert after == before, "map_profile changed its input"


async def _map_event_answers_events(tester: ConnectorTester, sample: Sample) -> None:
    before = copy.deepcopy(dict(sample.event.data))
    events = tester.map_event(sample.connection, sample.customer, sample.event)
    assert events, "map_event returned no event for a mapped action"
    assert dict(sample.event.data) == before, "map_event changed the event"
    unmapped = AntavoEvent(
        "kit-unmapped", sample.event.customer, UNMAPPED_ACTION, {}, sample.event.timestamp
    )
    assert tester.map_event(sample.connection, sample.customer, unmapped) == [], (
        "map_event must return [] for an action the connection does not map"
    )


def _deliveries(tester: ConnectorTester, sample: Sample) -> list[Delivery]:
    return tester.deliveries(sample.connection, sample.customer, sample.change, sample.event)


async def _send_reports_every_item_delivered(tester: ConnectorTester, sample: Sample) -> None:
    deliveries = _deliveries(tester, sample)
    transport = FakeTransport(sample.success)
    result = await tester.send(sample.connection, deliveries, transport)
    assert transport.requests, "send made no request through the transport"
    missing = [d.item_id for d in deliveries if d.item_id not in result.outcomes]
    assert not missing, f"no outcome reported for items {missing}"
    refused = {i: o.error for i, o in result.outcomes.items() if not o.delivered}
    assert not refused, f"items failed against the success answer: {refused}"


async def _send_keeps_the_key_out_of_the_log(tester: ConnectorTester, sample: Sample) -> None:
    # The outbound log records each request's URL, body and tags, and the errors send
    # raises or reports per item; only headers stay out of it.
    key = sample.connection.api_key
    for answer in (sample.success, *(response(s, {"message": "no"}) for s in (400, 401, 429, 500))):
        transport = FakeTransport(answer)
        try:
            result = await tester.send(sample.connection, _deliveries(tester, sample), transport)
        except DeliveryError as exc:
            errors = [str(exc)]
        else:
            errors = [outcome.error for outcome in result.outcomes.values()]
        for request in transport.requests:
            assert key not in request.url, "the API key is in a URL (URLs are logged)"
            assert key.encode() not in request.body, "the API key is in a body (bodies are logged)"
            assert not any(key in tag for tag in request.tags), (
                "the API key is in a tag (tags are logged)"
            )
        assert not any(key in error for error in errors), (
            f"{answer.status}: the API key is in an error message (errors are logged)"
        )


async def _send_raises_auth_error_on_401_and_403(tester: ConnectorTester, sample: Sample) -> None:
    for status in (401, 403):
        await _expect(tester, sample, response(status, {"message": "denied"}), AuthError, status)


async def _send_raises_retryable_error_on_429_and_5xx(
    tester: ConnectorTester, sample: Sample
) -> None:
    for status in (429, 500, 503):
        error = await _expect(
            tester, sample, response(status, {"message": "later"}), RetryableError, status
        )
        assert status != 429 or error.throttled, (
            "429: RetryableError without throttled=True (the engine would not slow down)"
        )


async def _send_lets_a_transport_failure_through(tester: ConnectorTester, sample: Sample) -> None:
    await _expect(
        tester, sample, RetryableError("no answer within 30 s"), RetryableError, "timeout"
    )


async def _expect(
    tester: ConnectorTester,
    sample: Sample,
    answer: Answer,
    error: type[_Expected],
    what: object,
) -> _Expected:
    try:
        result = await tester.send(
            sample.connection, _deliveries(tester, sample), FakeTransport(answer)
        )
    except ConnectorCrashError as exc:
        raise AssertionError(
            f"{what}: send failed with its own {exc.crash!r} (the engine retries that as if "
            "the destination had not answered)"
        ) from None
    except DeliveryError as exc:
        if not isinstance(exc, error):
            raise AssertionError(f"{what}: send raised {exc!r}, not {error.__name__}") from None
        return exc
    delivered = [i for i, o in result.outcomes.items() if o.delivered]
    raise AssertionError(
        f"{what}: send returned instead of raising {error.__name__}"
        + (f" and reported items {delivered} delivered" if delivered else "")
    )


async def _send_goes_only_to_its_destinations(tester: ConnectorTester, sample: Sample) -> None:
    # The engine's transport refuses, and pauses the connection at, any other URL.
    hooks = tester.hooks(sample.connection)
    transport = FakeTransport(sample.success)
    await tester.send(sample.connection, _deliveries(tester, sample), transport)
    for request in transport.requests:
        try:
            hooks.check_url(request.url)
        except DestinationError as exc:
            raise AssertionError(
                f"send requested a URL the engine would refuse (declare its host in "
                f"destination_hosts, or pass allow_destinations): {exc}"
            ) from None


_CHECKS = (
    _declares_usable_limits,
    _validators_accept_the_sample,
    _validators_refuse_a_mapping_without_a_target,
    _identify_answers_a_mapping,
    _map_profile_answers_a_mapping,
    _map_event_answers_events,
    _send_reports_every_item_delivered,
    _send_keeps_the_key_out_of_the_log,
    _send_raises_auth_error_on_401_and_403,
    _send_raises_retryable_error_on_429_and_5xx,
    _send_lets_a_transport_failure_through,
    _send_goes_only_to_its_destinations,
)
