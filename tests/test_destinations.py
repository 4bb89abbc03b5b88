"""Where a connection may send: the destination check, the operator's allowances, the
start-up check of what connectors declare, and the resolver that refuses internal
addresses behind a declared name (DNS rebinding)."""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest

from engine.connector import ConnectorInfo, hookimpl
from engine.connector.destinations import (
    Allowance,
    DestinationError,
    check_destination,
    check_host_pattern,
)
from engine.delivery.transport import GuardedResolver
from engine.errors import PluginError
from engine.plugins import Connectors, plugin_manager

INSIDER_HOSTS = ("*.useinsider.com", "*.insiderone.com")
SANDBOX = Allowance.parse("http://127.0.0.1:8090")


@pytest.mark.parametrize(
    "url",
    [
        "https://unification.useinsider.com",
        "https://unification.useinsider.com/",
        "https://unification.useinsider.com:443/api",
        "https://eu.useinsider.com",
        "https://api.insiderone.com/x/y",
        "HTTPS://UNIFICATION.USEINSIDER.COM",  # the same name: DNS ignores case
    ],
)
def test_https_urls_under_the_declared_domains_pass(url: str) -> None:
    check_destination(url, INSIDER_HOSTS)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        # link-local and cloud metadata addresses
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("https://169.254.169.254/", "link-local"),
        ("https://[fd00:ec2::254]/", "private"),
        ("https://[fe80::1]/", "link-local"),
        ("https://[fe80::1%25eth0]/", "zone index"),
        # private ranges and loopback
        ("https://10.0.0.5/", "private"),
        ("https://172.16.3.4/", "private"),
        ("https://192.168.1.1/", "private"),
        ("https://100.64.0.1/", "private"),
        ("https://127.0.0.1/", "loopback"),
        ("https://[::1]/", "loopback"),
        ("https://0.0.0.0/", "unspecified"),
        ("https://localhost/", "not a destination"),
        # odd encodings of them
        ("https://2130706433/", "unusual form"),
        ("https://0x7f.1/", "unusual form"),
        ("https://0x7f000001/", "unusual form"),
        ("https://0177.0.0.1/", "unusual form"),
        ("https://127.1/", "unusual form"),
        ("https://[::ffff:127.0.0.1]/", "loopback"),
        ("https://[::ffff:a9fe:a9fe]/", "link-local"),
        ("https://[2002:7f00:1::]/", "loopback"),  # 6to4 of 127.0.0.1
        ("https://unification.useinsider.com./", "trailing dot"),
        ("https://127.0.0.1./", "trailing dot"),
        ("https://user@unification.useinsider.com/", "credentials"),
        ("https://user:pw@unification.useinsider.com/", "credentials"),
        ("https://unification.useinsider.com@169.254.169.254/", "credentials"),
        ("https://unification.useinsider.com\\@evil.example/", "backslash"),
        ("https://evil.example\\.useinsider.com/", "backslash"),
        ("https://ｕnification.useinsider.com/", "non-ASCII"),  # fullwidth u (NFKC)
        ("https://%31%32%37.0.0.1/", "percent-encoded"),
        ("https://unification%2euseinsider.com/", "percent-encoded"),
        ("https://a.useinsider.com%00.evil.example/", "percent-encoded"),
        ("https://0/", "unusual form"),
        ("https://[::]/", "unspecified"),
        ("https://unification.useinsider.com\n/", "control"),
        ("https://unification.useinsider.com /", "spaces"),
        ("HTTP://LOCALHOST/", "not a destination"),
        # other schemes, ports, hosts, parts
        ("http://unification.useinsider.com/", "not https"),
        ("ftp://unification.useinsider.com/", "not an https URL"),
        ("file:///etc/passwd", "not an https URL"),
        ("gopher://unification.useinsider.com/", "not an https URL"),
        ("https://unification.useinsider.com:8443/", "not a destination"),
        ("https://useinsider.com/", "not a destination"),  # *.suffix is not the apex
        ("https://useinsider.com.evil.example/", "not a destination"),
        ("https://evilinsider.com/", "not a destination"),
        ("//unification.useinsider.com/", "not an https URL"),
        ("https:unification.useinsider.com", "not an https URL"),
        ("", "required"),
    ],
)
def test_everything_else_is_refused_saying_why(url: str, why: str) -> None:
    with pytest.raises(DestinationError) as refused:
        check_destination(url, INSIDER_HOSTS)

    assert why in str(refused.value)


def test_a_refusal_says_what_is_allowed_and_echoes_a_long_url_cut() -> None:
    url = "https://169.254.169.254/" + "a" * 5000

    with pytest.raises(DestinationError) as refused:
        check_destination(url[:2000], INSIDER_HOSTS, connector="insider")
    message = str(refused.value)

    assert "*.useinsider.com, *.insiderone.com" in message and "--allow-destination" in message
    assert "more characters" in message and len(message) < 600
    with pytest.raises(DestinationError, match="longer than 2048"):
        check_destination(url, INSIDER_HOSTS)


@pytest.mark.parametrize(
    ("allowance", "url", "allowed"),
    [
        ("http://127.0.0.1:8090", "http://127.0.0.1:8090/api", True),
        ("http://127.0.0.1:8090", "https://127.0.0.1:8090/api", False),  # scheme is part of it
        ("http://127.0.0.1:8090", "http://127.0.0.1:8091/api", False),
        ("http://127.0.0.1:8090", "http://0x7f.1:8090/api", False),
        ("127.0.0.1:8090", "https://127.0.0.1:8090", True),
        ("127.0.0.1", "http://127.0.0.1:1234", True),
        ("127.0.0.1", "http://127.0.0.2:1234", False),
        ("[::1]:8090", "http://[::1]:8090", True),
        ("[::1]:8090", "http://[0:0:0:0:0:0:0:1]:8090", True),  # the same address
        ("sandbox.internal", "http://SANDBOX.internal:80/x", True),
        ("https://sandbox.internal", "https://sandbox.internal/x", True),
        ("https://sandbox.internal", "https://sandbox.internal:8443/x", False),
        ("sandbox.internal", "http://user@sandbox.internal/", False),  # credentials: never
    ],
)
def test_an_operator_allowance_opens_exactly_what_it_names(
    allowance: str, url: str, allowed: bool
) -> None:
    allowances = [Allowance.parse(allowance)]

    if allowed:
        check_destination(url, INSIDER_HOSTS, allowances)
    else:
        with pytest.raises(DestinationError):
            check_destination(url, INSIDER_HOSTS, allowances)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ftp://host",
        "http://user:pw@host",
        "http://host/path",
        "host.",
        "host\n",
        "hóst",
        "http://host:99999",
    ],
)
def test_a_bad_allowance_is_refused(text: str) -> None:
    with pytest.raises(DestinationError):
        Allowance.parse(text)


def test_an_allowance_prints_as_written() -> None:
    assert [str(Allowance.parse(t)) for t in ("http://127.0.0.1:8090", "[::1]", "h.example")] == [
        "http://127.0.0.1:8090",
        "[::1]",
        "h.example",
    ]


@pytest.mark.parametrize(
    "pattern", ["*", "*.com", "*.", "127.0.0.1", "[::1]", "Api.example.com", "a.example.com:443",
                "https://a.example.com", "a..example.com", "a.example.com.", "*.*.example.com"],
)  # fmt: skip
def test_a_connector_must_declare_host_names(pattern: str) -> None:
    with pytest.raises(DestinationError):
        check_host_pattern(pattern)


class _Declares:
    def __init__(self, **fields: object) -> None:
        self.info = ConnectorInfo(name="declares", max_batch_items=1, max_batch_bytes=1000)
        self.info = replace(self.info, **fields)  # type: ignore[arg-type]

    @hookimpl
    def connector_info(self) -> ConnectorInfo:
        return self.info

    @hookimpl
    def identify(self) -> dict[str, str]:
        return {}

    @hookimpl
    def map_profile(self) -> dict[str, str]:
        return {}

    @hookimpl
    def map_event(self) -> list[dict[str, str]]:
        return []

    @hookimpl
    async def send(self) -> None:
        return None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"destination_hosts": ("169.254.169.254",)}, "destination_hosts"),
        ({"destination_hosts": ("*.com",)}, "destination_hosts"),
        ({"destination_hosts": ["api.example.com"]}, "tuple"),
        ({"url_settings": ("",)}, "url_settings"),
    ],
)
def test_the_engine_refuses_to_start_with_a_bad_declaration(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(PluginError) as refused:
        Connectors(plugin_manager([_Declares(**fields)], load_entry_points=False))

    assert message in str(refused.value) and "_Declares" in str(refused.value)


async def test_the_resolver_refuses_a_name_that_resolves_to_loopback() -> None:
    resolver = GuardedResolver()
    try:
        with pytest.raises(OSError, match="non-public"):
            await resolver.resolve("localhost", 443, socket.AF_INET)
    finally:
        await resolver.close()


async def test_the_resolver_lets_an_allowed_name_resolve_to_loopback() -> None:
    resolver = GuardedResolver(allowed_hosts=["localhost"])
    try:
        addresses = await resolver.resolve("localhost", 443, socket.AF_INET)
    finally:
        await resolver.close()

    assert {a["host"] for a in addresses} == {"127.0.0.1"}
