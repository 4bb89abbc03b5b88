"""Where a connection may send: the check of every destination URL.

A connector declares its destination's hosts in ``ConnectorInfo.destination_hosts``:
exact host names (``api.example.com``) or ``*.suffix`` patterns (``*.example.com``, any
name under that domain, not the domain itself). A URL is a destination when it is
``https`` on the default port to one of them. The operator may allow more destinations
when the engine starts (``tidegate serve --allow-destination``, an ``Allowance`` each):
that is the only way to a loopback or private address, to plain ``http``, or to a host
no connector declares.

Everything else is refused, whatever its spelling: IP addresses (a connector declares
names, never addresses; an allowance may name one), credentials in the URL, other
schemes, non-ASCII text (IDNA look-alikes), control characters and spaces, backslashes,
trailing dots, and numeric hosts in other forms than the dotted quad (``2130706433``,
``0x7f.1``, ``0177.0.0.1``, ``127.1``). URLs are parsed with ``yarl`` and addresses read
with ``ipaddress``; no regular expression reads a URL.

``check_destination`` is the kit's helper. The engine runs it on every setting a
connector lists in ``ConnectorInfo.url_settings`` when a connection is written and before
it sends, and on the URL of every request the transport makes; a connector needs no
check of its own.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from yarl import URL

MAX_URL_LENGTH = 2048
ECHO_LIMIT = 100
SCHEMES = ("http", "https")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class DestinationError(ValueError):
    """A URL that is not a destination the connection may send to; the message says why
    and what would be allowed."""


def echo(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` as an error message may quote it: ``repr`` of at most ``limit`` characters,
    with a count of the rest."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text) - limit} more characters)"


def _has_bad_characters(text: str) -> str:
    """What makes ``text`` unfit for a URL or host ("" when nothing does)."""
    if not text.isascii():
        return "non-ASCII characters (write an international name in its xn-- form)"
    if any(ord(ch) < 0x21 or ord(ch) == 0x7F for ch in text):
        return "spaces or control characters"
    if "\\" in text:
        return "a backslash"
    return ""


def address_of(host: str) -> IPAddress | None:
    """The IP address ``host`` names, or None for a host name.

    Raises ``DestinationError`` for a host that a resolver or browser would read as a
    number although it is not a dotted quad: ``2130706433``, ``0x7f.1``, ``0177.0.0.1``.
    """
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if "%" in bare:
        what = "an IPv6 address with a zone index" if ":" in bare else "a percent-encoded host"
        raise DestinationError(f"{echo(host)} is {what}; write the host name plainly")
    try:
        return ipaddress.ip_address(bare)
    except ValueError:
        pass
    last = bare.rsplit(".", 1)[-1]
    if last and (last.isdigit() or last.lower().startswith("0x")):
        # Resolvers (inet_aton) and browsers read such names as IPv4 addresses.
        raise DestinationError(
            f"{echo(host)} is an IP address in an unusual form; write a host name"
        )
    return None


def address_problem(address: IPAddress) -> str:
    """Why ``address`` is not a public destination ("" when it is one). An IPv4 address
    mapped or embedded in IPv6 is judged as the IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None:
            return address_problem(embedded)
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address (cloud metadata services live there)"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_private or address.is_reserved or not address.is_global:
        return "a private or reserved address"
    return ""


def normal_host(host: str) -> str:
    """A host as it is compared: lowercase; an IP address in its canonical form."""
    address = address_of(host)
    return str(address) if address is not None else host.lower()


def check_host_pattern(pattern: str) -> str:
    """Raises ``DestinationError`` unless ``pattern`` is a host name or ``*.suffix`` (a
    name with at least two labels), lowercase ASCII, without a trailing dot, port or
    scheme; returns it. Used at start-up on ``destination_hosts``."""
    problem = _has_bad_characters(pattern)
    if problem:
        raise DestinationError(f"{echo(pattern)} holds {problem}")
    name = pattern[2:] if pattern.startswith("*.") else pattern
    labels = name.split(".")
    if (
        not name
        or pattern != pattern.lower()
        or any(not label for label in labels)
        or any(ch in name for ch in "*/:@[]?#")
        or (pattern.startswith("*.") and len(labels) < 2)
    ):
        raise DestinationError(
            f"{echo(pattern)} is not a host name or *.suffix pattern (lowercase, e.g. "
            "api.example.com or *.example.com)"
        )
    if address_of(name) is not None:
        raise DestinationError(
            f"{echo(pattern)} is an IP address; declare host names (an operator allows "
            "an address with --allow-destination)"
        )
    return pattern


def host_matches(host: str, patterns: Iterable[str]) -> bool:
    """``host`` (lowercase) is one of ``patterns``, or a name under a ``*.suffix`` one."""
    for pattern in patterns:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


@dataclass(frozen=True)
class Allowance:
    """One destination the operator allowed at start-up: ``scheme`` ("" for http or
    https), ``host`` (normalized) and ``port`` (None for any)."""

    host: str
    port: int | None = None
    scheme: str = ""

    @classmethod
    def parse(cls, text: str) -> Allowance:
        """``URL_OR_HOST[:PORT]``: ``http://127.0.0.1:8090``, ``127.0.0.1:8090``,
        ``[::1]:8090``, ``sandbox.internal``. Raises ``DestinationError``."""
        problem = _has_bad_characters(text)
        if problem or not text:
            raise DestinationError(f"{echo(text)} holds {problem or 'nothing'}")
        has_scheme = "://" in text
        try:
            url = URL(text if has_scheme else f"http://{text}")
            port = url.explicit_port
        except ValueError as exc:
            raise DestinationError(f"{echo(text)} is not a URL or HOST[:PORT]: {exc}") from None
        if has_scheme and url.scheme not in SCHEMES:
            raise DestinationError(f"{echo(text)}: only http and https can be allowed")
        if url.raw_host is None or url.user is not None or url.password is not None:
            raise DestinationError(f"{echo(text)} is not a host without credentials")
        if url.raw_host.endswith("."):
            raise DestinationError(f"{echo(text)}: remove the trailing dot")
        if url.raw_path not in ("", "/") or url.raw_query_string or url.raw_fragment:
            raise DestinationError(f"{echo(text)}: give a host and port, not a path")
        if has_scheme and port is None:
            port = url.port  # a URL means its default port
        return cls(normal_host(url.raw_host), port, url.scheme if has_scheme else "")

    def allows(self, scheme: str, host: str, port: int | None) -> bool:
        return (
            host == self.host
            and (not self.scheme or scheme == self.scheme)
            and (self.port is None or port == self.port)
        )

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        text = f"{self.scheme}://{host}" if self.scheme else host
        return text if self.port is None else f"{text}:{self.port}"


def check_destination(
    url: str,
    destination_hosts: Sequence[str],
    allowed: Sequence[Allowance] = (),
    *,
    connector: str = "",
) -> URL:
    """The parsed ``url`` if a connection may send there, else ``DestinationError``.

    ``destination_hosts``: the connector's declaration; ``allowed``: what the operator
    allowed at start-up. See the module's text for the rules.
    """
    if not isinstance(url, str) or not url:
        raise DestinationError("required: an https URL")
    if len(url) > MAX_URL_LENGTH:
        raise DestinationError(f"{echo(url)} is longer than {MAX_URL_LENGTH} characters")
    problem = _has_bad_characters(url)
    if problem:
        raise DestinationError(f"{echo(url)} holds {problem}")
    try:
        parsed = URL(url)
        port = parsed.port
    except ValueError as exc:
        raise DestinationError(f"{echo(url)} is not a URL: {exc}") from None
    scheme = parsed.scheme
    if scheme not in SCHEMES or not parsed.is_absolute() or not parsed.raw_host:
        raise DestinationError(f"{echo(url)} is not an https URL (https://host/...)")
    if parsed.user is not None or parsed.password is not None or "@" in parsed.raw_authority:
        raise DestinationError(f"{echo(url)} holds credentials; the URL must not carry any")
    raw_host = parsed.raw_host
    if raw_host.endswith("."):
        raise DestinationError(f"{echo(url)}: remove the trailing dot from the host")
    address = address_of(raw_host)
    host = str(address) if address is not None else raw_host.lower()
    if any(allowance.allows(scheme, host, port) for allowance in allowed):
        return parsed
    if address is not None:
        why = address_problem(address) or "an IP address, not a host name"
        raise DestinationError(
            f"{echo(url)} is {why}; {_what_is_allowed(destination_hosts, allowed, connector)}"
        )
    if (
        scheme == "https"
        and parsed.explicit_port in (None, 443)
        and host_matches(host, destination_hosts)
    ):
        return parsed
    if scheme != "https" and host_matches(host, destination_hosts):
        raise DestinationError(f"{echo(url)} is not https; use https://{host}")
    raise DestinationError(
        f"{echo(url)} is not a destination of this connector; "
        f"{_what_is_allowed(destination_hosts, allowed, connector)}"
    )


def _what_is_allowed(hosts: Sequence[str], allowed: Sequence[Allowance], connector: str) -> str:
    who = f"connector {connector!r}" if connector else "the connector"
    declared = ", ".join(hosts) if hosts else "(none declared)"
    extra = f"; allowed at start-up: {', '.join(str(a) for a in allowed)}" if allowed else ""
    return (
        f"{who} sends to https hosts {declared}{extra} "
        "(the operator can allow another with tidegate serve --allow-destination HOST[:PORT])"
    )
