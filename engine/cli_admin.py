"""``tidegate`` commands that drive a running engine over its gRPC admin API:
``connections``, ``mappings``, ``logs``, ``dead-letters`` and ``tokens``.

They reach the engine exactly as ``config`` and ``backup`` do: ``engine.cli`` hands its
own helpers over in an ``EngineAccess`` (the ``--target``/``--token``/TLS flags, the
token lookup, the client options and the one call wrapper that turns gRPC failures into
one-line messages), so there is one client path. This module sits a floor below
``engine.cli`` and does not import it.

Output is a table for people (aligned; status codes coloured only when standard output
is a terminal and ``NO_COLOR`` is unset; long texts cut with a count of the rest) or,
with ``--output json``, one JSON document in the proto's JSON mapping (``logs tail``:
one JSON object per line). Exit codes: 0 done, 1 refused, not found, unreachable or bad
input (one line on standard error naming what to fix), 2 usage errors (argparse).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from clients.client import TidegateClient
from engine.errors import InvalidInputError, TidegateError, shown
from engine.pb import (
    connections_pb2,
    dead_letters_pb2,
    dead_letters_pb2_grpc,
    logs_pb2,
    mappings_pb2,
    tokens_pb2,
    tokens_pb2_grpc,
)
from engine.state.tokens import parse_duration
from engine.ui.server import BadParameter, parse_status

T = TypeVar("T")

TARGET = re.compile(r"[^\s/]{1,253}")
"""What ``--target`` may be: a host (or [IPv6]) and port, no scheme, spaces or path."""
EXIT_CODES = (
    "exit codes: 0 done; 1 not done (unreachable engine, refused token or role, unknown id,"
    " bad filter, declined replay), with one line on standard error naming what to fix;"
    " 2 usage error"
)
MAX_PAGE = 1000
TAIL_GAP = 1000
"""Requests logged while ``logs tail`` reconnected that it lists, at most (the newest)."""
TAIL_RECONNECT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
)
"""How a followed stream may end that ``logs tail`` reconnects after: the engine went away
or restarts, or cut the stream of a reader that fell behind."""
"""The largest page the admin API serves."""
MAX_REPLAY_IDS = 10_000
"""Ids one ReplayDeadLetters call takes at most."""
REPLAY_CHUNK = 1000
"""Dead letters a replay sends per call: each call is one short transaction in the
engine, so ingest and delivery go on between them, and progress shows after each."""
CELL = 60
"""Characters of a free-text table cell (an error) shown before it is cut."""
BODY = 4000
"""Characters of a request or response body ``logs get`` shows by default."""
GREEN, YELLOW, RED, RESET = "\033[32m", "\033[33m", "\033[31m", "\033[0m"
ROLES = {
    "viewer": tokens_pb2.TOKEN_ROLE_VIEWER,
    "operator": tokens_pb2.TOKEN_ROLE_OPERATOR,
    "admin": tokens_pb2.TOKEN_ROLE_ADMIN,
}
ROLE_LABELS = {value: label for label, value in ROLES.items()}
REPLAY_MODES = {
    "rerender": dead_letters_pb2.REPLAY_MODE_RERENDER,
    "stored": dead_letters_pb2.REPLAY_MODE_STORED_REQUEST,
}
STATES = {
    connections_pb2.CONNECTION_STATE_ACTIVE: "active",
    connections_pb2.CONNECTION_STATE_PAUSED: "paused",
}
LOG_FLAGS = {
    "customer_id": "--customer",
    "identifier": "--identifier",
    "error": "--error",
    "status": "--status",
    "connection": "--connection",
}


@dataclass(frozen=True)
class EngineAccess:
    """``engine.cli``'s way to a running engine, handed to this module so both use the
    same flags, token lookup, TLS options and error messages.

    ``add_arguments(parser)`` adds ``--target``, ``--token``, ``--data-dir`` and the TLS
    flags; ``client_options(args)`` turns them into ``TidegateClient`` keyword
    arguments; ``call(target, job, refused, **options)`` runs ``job(client)`` and raises
    ``TidegateError`` with a one-line message when the engine is unreachable, refuses
    the token or the call, or answers an error (``refused`` leads an
    ``INVALID_ARGUMENT``'s message)."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    client_options: Callable[[argparse.Namespace], dict[str, Any]]
    call: Callable[..., Any]


def add_admin_commands(sub: Any, access: EngineAccess) -> None:
    """Registers ``connections``, ``mappings``, ``logs``, ``dead-letters`` and ``tokens``
    on ``tidegate``'s subparsers."""
    AdminCommands(access).register(sub)


# -- output --------------------------------------------------------------------------------


def colour_wanted() -> bool:
    """Colour only for a person: standard output is a terminal and NO_COLOR is unset."""
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


def status_colour(code: int) -> str:
    if 200 <= code < 300:
        return GREEN
    if 400 <= code < 500 and code not in (401, 403, 408, 429):
        return YELLOW
    return RED


def clip(text: str, limit: int = CELL) -> str:
    """``text`` on one line, at most ``limit`` characters and a count of the rest."""
    flat = " ".join(text.split())
    if len(flat) <= limit:
        return flat
    return f"{flat[:limit]}... (+{len(flat) - limit} chars)"


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    colours: Callable[[int, Sequence[str]], str] | None = None,
    widths: list[int] | None = None,
) -> list[str]:
    """Lines of an aligned table; ``colours(column, row)`` gives a cell's ANSI colour
    ("" for none), applied after padding so colour codes never skew the columns.
    ``widths``: the columns' widths so far, widened in place to fit these rows (so the
    batches of a stream line up with the ones before)."""
    body = [list(r) for r in rows]
    if widths is None:
        widths = [0] * len(headers)
    for i, h in enumerate(headers):
        widths[i] = max([widths[i], len(h)] + [len(r[i]) for r in body])
    last = len(headers) - 1

    def line(cells: Sequence[str], coloured: bool) -> str:
        parts = []
        for i, cell in enumerate(cells):
            padded = cell if i == last else cell.ljust(widths[i])
            code = colours(i, cells) if coloured and colours is not None else ""
            parts.append(f"{code}{padded}{RESET}" if code and cell else padded)
        return "  ".join(parts).rstrip()

    return [line(headers, False)] + [line(r, True) for r in body]


def to_json(message: Message) -> dict[str, Any]:
    """A message in the proto's JSON mapping (camelCase names, as grpcurl and the page's
    endpoints print it), every field present."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def when(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def when_ms(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def when_iso(ts: Timestamp) -> str:
    return ts.ToDatetime(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def age(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def pretty_body(text: str, limit: int | None) -> list[str]:
    """A body indented as JSON when it is JSON, cut after ``limit`` characters with a
    count of the rest (``None``: whole)."""
    if not text:
        return ["(empty)"]
    try:
        shaped = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        shaped = text
    if limit is not None and len(shaped) > limit:
        rest = len(shaped) - limit
        shaped = f"{shaped[:limit]}\n... ({rest} more characters; --full shows them)"
    return shaped.splitlines()


# -- input ---------------------------------------------------------------------------------


def parse_time(flag: str, text: str) -> datetime:
    """An ISO 8601 time with its zone (``2026-12-06T18:00:00Z``); else ``TidegateError``
    naming ``flag``."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise TidegateError(
            f"{flag}: {shown(text)} is not a time; use ISO 8601, e.g. 2026-12-06T18:00:00Z"
        ) from None
    if value.utcoffset() is None:
        raise TidegateError(f"{flag}: give a time zone, e.g. 2026-12-06T18:00:00Z or +01:00")
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise TidegateError(f"{flag}: {shown(text)} is out of range in UTC") from None


def time_range(args: argparse.Namespace) -> tuple[datetime | None, datetime | None]:
    """``--since``, or ``--start``/``--end``, as a range (either end may be open)."""
    start = end = None
    if args.since is not None:
        try:
            seconds = parse_duration(args.since, "--since")
        except InvalidInputError as exc:
            raise TidegateError(f"--since: {exc.message}; e.g. --since 15m or 1h") from None
        if seconds >= time.time():
            raise TidegateError(f"--since: {shown(args.since)} reaches back before 1970")
        start = datetime.fromtimestamp(time.time() - seconds, UTC)
    if args.start is not None:
        start = parse_time("--start", args.start)
    if args.end is not None:
        end = parse_time("--end", args.end)
    if start is not None and end is not None and end <= start:
        raise TidegateError("--end must be after the start of the range")
    return start, end


def log_filter(args: argparse.Namespace) -> logs_pb2.LogFilter:
    """The ``LogFilter`` of ``logs search``/``tail``'s flags; the same criteria, and the
    same status syntax (``4xx,503``), as the outbound-log page's search field."""
    f = logs_pb2.LogFilter(
        identifier=args.identifier or "",
        customer_id=args.customer or "",
        error_contains=args.error or "",
        connection_id=args.connection or "",
        errors_only=args.errors_only,
        tags=args.tag or (),
    )
    try:
        f.status_codes.extend(parse_status(args.status or ""))
    except BadParameter as exc:
        raise TidegateError(f"--status: {exc.message}") from None
    start, end = time_range(args) if hasattr(args, "since") else (None, None)  # tail: none
    if start is not None:
        f.start_time.FromDatetime(start)
    if end is not None:
        f.end_time.FromDatetime(end)
    return f


def dead_letter_filter(args: argparse.Namespace) -> dead_letters_pb2.DeadLetterFilter:
    f = dead_letters_pb2.DeadLetterFilter(
        connection_id=args.connection or "",
        customer_id=args.customer or "",
        stage=args.stage or "",
        error_contains=args.error or "",
    )
    start, end = time_range(args)
    if start is not None:
        f.start_time.FromDatetime(start)
    if end is not None:
        f.end_time.FromDatetime(end)
    return f


def _counting_number(what: str) -> Callable[[str], int]:
    """An argparse type for a whole number of 1 or more; an error says it is not ``what``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{text!r:.40} is not {what}")
        return value

    return parse


positive_limit = _counting_number("a whole number of 1 or more")
dead_letter_id = _counting_number("a dead-letter id (a number)")


def closed_pipe_ends_quietly(
    func: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """``func``, ending with 0 and no traceback when its reader goes away
    (``tidegate logs search | head``), as Unix filters do."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except BrokenPipeError:
            # Python flushes stdout again at exit; point it at nothing so that flush is quiet.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0

    run.__name__ = func.__name__
    return run


# -- the commands ------------------------------------------------------------------------------


class AdminCommands:
    def __init__(self, access: EngineAccess) -> None:
        self.access = access

    def run(
        self,
        args: argparse.Namespace,
        job: Callable[[TidegateClient], Awaitable[T]],
        refused: str = "the engine refused the request",
    ) -> T:
        if TARGET.fullmatch(args.target) is None:
            raise TidegateError(
                f"--target: {shown(args.target)} is not an address such as 127.0.0.1:50051"
            )
        result: T = self.access.call(
            args.target, job, refused=refused, **self.access.client_options(args)
        )
        return result

    # -- registration

    def _leaf(
        self,
        actions: Any,
        name: str,
        help_text: str,
        func: Callable[[argparse.Namespace], int],
        description: str | None = None,
    ) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(
            name, help=help_text, description=description or help_text, epilog=EXIT_CODES
        )
        parser.add_argument(
            "--output",
            choices=("table", "json"),
            default="table",
            help="table for people (default) or json for scripts",
        )
        self.access.add_arguments(parser)
        parser.set_defaults(func=closed_pipe_ends_quietly(func))
        return parser

    def register(self, sub: Any) -> None:
        over_api = "over the admin API of a running engine"
        connections = sub.add_parser(
            "connections",
            help=f"list, show or resume connections ({over_api})",
            description=f"Connections, {over_api} (viewer role; resume: operator).",
        )
        actions = connections.add_subparsers(
            dest="connections_command", required=True, metavar="ACTION"
        )
        self._leaf(
            actions, "list", "list connections: state, backlog, dead letters", self.connections_list
        )
        get = self._leaf(actions, "get", "show one connection", self.connections_get)
        get.add_argument("id", help="the connection's id")
        resume = self._leaf(
            actions,
            "resume",
            "resume a paused connection (operator role): it sends one probe request first",
            self.connections_resume,
        )
        resume.add_argument("id", help="the connection's id")

        mappings = sub.add_parser(
            "mappings",
            help=f"list profile and event mappings ({over_api})",
            description=f"Mappings, {over_api} (viewer role).",
        )
        actions = mappings.add_subparsers(dest="mappings_command", required=True, metavar="ACTION")
        listing = self._leaf(actions, "list", "list profile and event mappings", self.mappings_list)
        listing.add_argument(
            "--connection", metavar="ID", help="only this connection's (default: every one)"
        )

        self._register_logs(sub, over_api)
        self._register_dead_letters(sub, over_api)

        tokens = sub.add_parser(
            "tokens",
            help=f"make, list or revoke admin API tokens ({over_api}, admin role; `token`"
            " is the offline form)",
            description=f"Admin API tokens, {over_api}, with an admin token. `tidegate token"
            " ...` does the same offline, on the data folder (for the first token, or with"
            " no engine running).",
        )
        actions = tokens.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
        create = self._leaf(
            actions, "create", "make a token and print it (shown only once)", self.tokens_create
        )
        create.add_argument("--name", required=True, help="a name for the token, unique")
        create.add_argument("--role", required=True, choices=list(ROLES), help="what it may call")
        create.add_argument(
            "--expires-in", metavar="DURATION", help="e.g. 30d, 12h, 2w (default: never)"
        )
        self._leaf(actions, "list", "list tokens (never the tokens themselves)", self.tokens_list)
        revoke = self._leaf(actions, "revoke", "revoke a token by name", self.tokens_revoke)
        revoke.add_argument("--name", required=True, help="the token's name")

    def _register_logs(self, sub: Any, over_api: str) -> None:
        logs = sub.add_parser(
            "logs",
            help=f"search, follow or show outbound-log requests ({over_api})",
            description=f"The outbound log, {over_api} (viewer role).",
        )
        actions = logs.add_subparsers(dest="logs_command", required=True, metavar="ACTION")
        search = self._leaf(
            actions,
            "search",
            "list requests, newest first, matching every criterion given",
            self.logs_search,
        )
        tail = self._leaf(
            actions,
            "tail",
            "print requests as they are logged, matching every criterion given, until Ctrl-C",
            self.logs_tail,
        )
        for parser in (search, tail):
            parser.add_argument("--customer", metavar="ID", help="carried this Antavo customer")
            parser.add_argument("--identifier", metavar="UUID", help="one request identifier")
            parser.add_argument("--error", metavar="TEXT", help="error text contains (any case)")
            parser.add_argument(
                "--status",
                metavar="CODES",
                help="any of these codes or classes, e.g. 4xx,503 (0: no response)",
            )
            parser.add_argument("--connection", metavar="ID", help="one connection's requests")
            parser.add_argument(
                "--tag",
                action="append",
                metavar="TAG",
                help="carries this tag, e.g. replay or backfill (repeat: any of them)",
            )
            parser.add_argument(
                "--errors-only", action="store_true", help="only requests with an error"
            )
        span = search.add_mutually_exclusive_group()
        span.add_argument("--since", metavar="DURATION", help="logged in the last 15m, 1h, 7d...")
        span.add_argument("--start", metavar="TIME", help="from this ISO 8601 time (inclusive)")
        search.add_argument("--end", metavar="TIME", help="before this ISO 8601 time")
        search.add_argument(
            "--limit",
            type=positive_limit,
            default=50,
            help="show at most this many, paging through the log (default 50)",
        )
        search.add_argument(
            "--page-token", default="", help="continue after a previous --output json search"
        )
        get = self._leaf(
            actions,
            "get",
            "show one request: its bodies and every customer's outcome",
            self.logs_get,
        )
        get.add_argument("id", help="the request identifier (the ID column)")
        get.add_argument(
            "--full", action="store_true", help=f"whole bodies (default: first {BODY} characters)"
        )

    def _register_dead_letters(self, sub: Any, over_api: str) -> None:
        dead = sub.add_parser(
            "dead-letters",
            help=f"list or replay dead letters ({over_api})",
            description=f"Dead letters, {over_api} (list: viewer role; replay: operator).",
        )
        actions = dead.add_subparsers(dest="dead_letters_command", required=True, metavar="ACTION")
        listing = self._leaf(
            actions, "list", "list dead letters, oldest first", self.dead_letters_list
        )
        replay = self._leaf(
            actions,
            "replay",
            "queue dead letters again, by --id or by filter",
            self.dead_letters_replay,
            description="Queues dead letters again, by --id or by filter (with both, a dead"
            " letter must match both). It first counts them; --dry-run stops there. Without"
            " --yes it asks for confirmation on a terminal, and refuses when there is none."
            f" Then it replays those it counted, {REPLAY_CHUNK} per call, with progress.",
        )
        for parser in (listing, replay):
            parser.add_argument("--connection", metavar="ID", help="one connection's")
            parser.add_argument("--customer", metavar="ID", help="one Antavo customer's")
            parser.add_argument(
                "--stage",
                metavar="STAGE",
                help="where it failed: identify, map_profile, map_event, map, prepare, send,"
                " destination",
            )
            parser.add_argument("--error", metavar="TEXT", help="error text contains (any case)")
            span = parser.add_mutually_exclusive_group()
            span.add_argument("--since", metavar="DURATION", help="failed in the last 1h, 7d...")
            span.add_argument("--start", metavar="TIME", help="failed from this ISO 8601 time")
            parser.add_argument("--end", metavar="TIME", help="failed before this ISO 8601 time")
        listing.add_argument(
            "--limit", type=positive_limit, default=50, help="show at most this many (default 50)"
        )
        replay.add_argument(
            "--id",
            dest="ids",
            type=dead_letter_id,
            action="append",
            default=[],
            help="a dead letter's id (repeatable)",
        )
        replay.add_argument(
            "--mode",
            choices=list(REPLAY_MODES),
            default="rerender",
            help="rerender with the current mapping (default) or resend the stored request",
        )
        replay.add_argument(
            "--dry-run", action="store_true", help="only count what would be replayed"
        )
        replay.add_argument("--yes", action="store_true", help="replay without asking")

    # -- connections

    def connections_list(self, args: argparse.Namespace) -> int:
        async def job(client: TidegateClient) -> list[connections_pb2.Connection]:
            found: list[connections_pb2.Connection] = []
            token = ""
            while True:
                page = await client.list_connections(MAX_PAGE, token)
                found += page.connections
                token = page.next_page_token
                if not token:
                    return found

        found = self.run(args, job)
        if args.output == "json":
            print_json({"connections": [to_json(c) for c in found]})
            return 0
        if not found:
            print("no connections")
            return 0
        lines = table(
            ["ID", "CONNECTOR", "STATE", "QUEUED", "OLDEST", "DEAD", "MAPPING", "REASON"],
            (
                [
                    c.id,
                    c.connector,
                    STATES.get(c.state, "unknown"),
                    str(c.queue_depth),
                    age(c.oldest_pending_age_seconds),
                    str(c.dead_letter_count),
                    f"v{c.mapping_version}",
                    clip(c.state_reason),
                ]
                for c in found
            ),
            self._state_colour,
        )
        print("\n".join(lines))
        return 0

    def _state_colour(self, column: int, row: Sequence[str]) -> str:
        if column != 2 or not colour_wanted():
            return ""
        return GREEN if row[2] == "active" else RED

    def connections_get(self, args: argparse.Namespace) -> int:
        async def job(
            client: TidegateClient,
        ) -> tuple[connections_pb2.Connection, list[logs_pb2.LogEntry]]:
            found = await client.get_connection(args.id)
            if args.output == "json":
                return found, []
            # Its newest request that succeeded, and its newest with an error, of the last
            # day (as the page shows them): a bounded search, however big the log.
            day = Timestamp()
            day.FromSeconds(int(time.time()) - 86400)
            latest = []
            for f in (
                logs_pb2.LogFilter(connection_id=found.id, status_codes=range(200, 300)),
                logs_pb2.LogFilter(connection_id=found.id, errors_only=True),
            ):
                f.start_time.CopyFrom(day)
                page = await client.logs.ListLogs(logs_pb2.ListLogsRequest(filter=f, page_size=1))
                latest.append(page.logs[0] if page.logs else logs_pb2.LogEntry())
            return found, latest

        found, latest = self.run(args, job)
        self._show_connection(args, found, latest)
        return 0

    def connections_resume(self, args: argparse.Namespace) -> int:
        async def job(client: TidegateClient) -> connections_pb2.Connection:
            answer = await client.connections.ResumeConnection(
                connections_pb2.ResumeConnectionRequest(id=args.id)
            )
            return answer.connection

        found = self.run(args, job)
        if args.output == "table":
            print(
                f"resumed connection {found.id}: it sends one probe request first", file=sys.stderr
            )
        self._show_connection(args, found)
        return 0

    def _show_connection(
        self,
        args: argparse.Namespace,
        c: connections_pb2.Connection,
        latest: Sequence[logs_pb2.LogEntry] = (),
    ) -> None:
        if args.output == "json":
            print_json(to_json(c))
            return
        state = STATES.get(c.state, "unknown")
        if colour_wanted():
            state = f"{GREEN if state == 'active' else RED}{state}{RESET}"
        ids = c.customer_id_mapping
        rows = [
            ("id", c.id),
            ("display name", c.display_name or "-"),
            ("connector", c.connector),
            ("state", state + (f" ({c.state_reason})" if c.state_reason else "")),
            ("queued", f"{c.queue_depth} (oldest {age(c.oldest_pending_age_seconds)})"),
            ("dead letters", str(c.dead_letter_count)),
            ("mapping version", str(c.mapping_version)),
            ("api key", c.api_key_hint or "-"),
            (
                "customer id",
                f"{ids.source_attribute} -> {ids.target_identifier}"
                + (" (custom)" if ids.custom else ""),
            ),
            (
                "retry window",
                age(c.retry_window_seconds) if c.retry_window_seconds else "6.0h (the default)",
            ),
            ("created", when(c.create_time)),
            ("updated", when(c.update_time)),
        ]
        rows += [(f"setting {k}", v) for k, v in sorted(c.settings.items())]
        for title, entry in zip(("last success", "last error"), latest, strict=True):
            said = f" {clip(entry.error, 100)}" if entry.error else ""
            code = entry.status_code or "no response"
            rows.append(
                (
                    title,
                    f"{when_ms(entry.time)} {code}{said} ({entry.id})"
                    if entry.id
                    else "none in the last day",
                )
            )
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key + ':':<{width + 1}}  {value}")

    # -- mappings

    def mappings_list(self, args: argparse.Namespace) -> int:
        async def job(client: TidegateClient) -> list[dict[str, Any]]:
            if args.connection:
                ids = [args.connection]
            else:
                ids, token = [], ""
                while True:
                    page = await client.list_connections(MAX_PAGE, token)
                    ids += [c.id for c in page.connections]
                    token = page.next_page_token
                    if not token:
                        break
            found = []
            for cid in ids:
                profile: list[mappings_pb2.ProfileMapping] = []
                events: list[mappings_pb2.EventMapping] = []
                token, version = "", 0
                while True:
                    p = await client.list_profile_mappings(cid, MAX_PAGE, token)
                    profile += p.mappings
                    version, token = p.mapping_version, p.next_page_token
                    if not token:
                        break
                while True:
                    e = await client.list_event_mappings(cid, MAX_PAGE, token)
                    events += e.mappings
                    token = e.next_page_token
                    if not token:
                        break
                found.append({"id": cid, "version": version, "profile": profile, "events": events})
            return found

        found = self.run(args, job)
        if args.output == "json":
            print_json(
                {
                    "connections": [
                        {
                            "connectionId": f["id"],
                            "mappingVersion": str(f["version"]),
                            "profileMappings": [to_json(m) for m in f["profile"]],
                            "eventMappings": [to_json(m) for m in f["events"]],
                        }
                        for f in found
                    ]
                }
            )
            return 0
        rows = []
        for f in found:
            for m in f["profile"]:
                target = m.target_attribute + (" (custom)" if m.custom else "")
                mode = mappings_pb2.ArrayMode.Name(m.array_mode).removeprefix("ARRAY_MODE_")
                extra = "" if m.array_mode == mappings_pb2.ARRAY_MODE_UNSPECIFIED else mode.lower()
                rows.append([f["id"], "profile", m.id, m.source_attribute, target, extra])
            for e in f["events"]:
                params = ", ".join(
                    f"{p.source_parameter}->{p.target_parameter}" + ("*" if p.custom else "")
                    for p in e.parameters
                )
                rows.append([f["id"], "event", e.id, e.source_event, e.target_event, params])
        if not rows:
            print("no mappings")
            return 0
        print("\n".join(table(["CONNECTION", "KIND", "ID", "SOURCE", "TARGET", "DETAILS"], rows)))
        if any(r[1] == "event" and "*" in r[5] for r in rows):
            print("(* custom parameter)")
        return 0

    # -- logs

    def logs_search(self, args: argparse.Namespace) -> int:
        f = log_filter(args)

        async def job(client: TidegateClient) -> tuple[list[logs_pb2.LogEntry], str]:
            found: list[logs_pb2.LogEntry] = []
            token = args.page_token
            while len(found) < args.limit:
                size = min(MAX_PAGE, args.limit - len(found))
                page = await client.logs.ListLogs(
                    logs_pb2.ListLogsRequest(filter=f, page_size=size, page_token=token)
                )
                found += page.logs
                token = page.next_page_token
                if not token:
                    break
            return found, token

        found, token = self.run(args, job, refused="the search was refused")
        if args.output == "json":
            print_json({"logs": [to_json(e) for e in found], "nextPageToken": token})
            return 0
        if not found:
            print("no requests match")
            return 0
        print("\n".join(self._log_table(found)))
        if token:
            print(f"(more match: raise --limit, now {args.limit}, to see them)", file=sys.stderr)
        return 0

    def _log_table(
        self, entries: Sequence[logs_pb2.LogEntry], widths: list[int] | None = None
    ) -> list[str]:
        return table(
            ["TIME (UTC)", "STATUS", "SECONDS", "CUSTOMER", "CONNECTION", "ERROR", "ID"],
            (self._log_row(e) for e in entries),
            self._status_colour,
            widths,
        )

    def _log_row(self, e: logs_pb2.LogEntry) -> list[str]:
        customer = "-"
        if e.customers:
            first = e.customers[0]
            customer = f"{first.name} ({first.customer_id})" if first.name else first.customer_id
            if e.customer_count > 1:
                customer += f" +{e.customer_count - 1}"
        status = str(e.status_code) if e.status_code else "none"
        return [
            when_ms(e.time),
            status,
            f"{e.response_time_seconds:.3f}",
            clip(customer, 40),
            e.connection_id,
            clip(e.error) or "-",
            e.id,
        ]

    def _status_colour(self, column: int, row: Sequence[str]) -> str:
        if column != 1 or not colour_wanted():
            return ""
        return status_colour(int(row[1]) if row[1].isdigit() else 0)

    def logs_tail(self, args: argparse.Namespace) -> int:
        """Follows StreamLogs. Once it has followed, a stream that ends (the engine
        restarted, or cut a reader that fell behind) is opened again, with backoff, and
        the requests logged meanwhile are listed first (at most ``TAIL_GAP``), so the
        output has no gap and no repeat."""
        f = log_filter(args)
        as_json = args.output == "json"
        header = not as_json
        widths = [24, 6, 7, 24, 12, 5, 36]  # a time, a code, a UUID: the usual sizes
        printed: deque[str] = deque(maxlen=TAIL_GAP * 2)  # ids, to print none twice

        def emit(entries: Sequence[logs_pb2.LogEntry]) -> None:
            nonlocal header
            entries = [e for e in entries if e.id not in printed]
            if not entries:
                return
            printed.extend(e.id for e in entries)
            since.CopyFrom(entries[-1].time)
            if as_json:
                for entry in entries:
                    print(json.dumps(to_json(entry), ensure_ascii=False))
            else:
                lines = self._log_table(entries, widths)
                # The header once; columns only ever widen, so rows line up.
                print("\n".join(lines if header else lines[1:]))
                header = False
            sys.stdout.flush()

        def say(text: str) -> None:
            print(f"tidegate logs tail: {text}", file=sys.stderr, flush=True)

        since = Timestamp()  # the newest row printed, or when following began

        async def missed(client: TidegateClient) -> None:
            """Prints what was logged since ``since`` (the stream is open again first)."""
            gap = logs_pb2.LogFilter()
            gap.CopyFrom(f)
            gap.start_time.CopyFrom(since)
            page = await client.logs.ListLogs(
                logs_pb2.ListLogsRequest(filter=gap, page_size=TAIL_GAP)
            )
            if page.next_page_token:
                say(
                    f"more than {TAIL_GAP} requests were logged meanwhile; the newest"
                    f" {TAIL_GAP} follow (`logs search --start {when_iso(since)}` lists all)"
                )
            emit(list(reversed(page.logs)))

        async def job(client: TidegateClient) -> None:
            followed, delay, down = False, 1.0, ""
            while True:
                call = client.logs.StreamLogs(logs_pb2.StreamLogsRequest(filter=f))
                try:
                    await call.initial_metadata()  # the engine sends it once it is subscribed
                    if not followed:
                        since.GetCurrentTime()
                        say(f"following the outbound log of {args.target} (Ctrl-C stops)")
                        followed = True
                    else:
                        await missed(client)
                        if down:
                            say("following again")
                            down = ""
                    delay = 1.0
                    async for response in call:
                        emit(response.logs)
                    reason = "the engine ended the stream"
                except grpc.aio.AioRpcError as exc:
                    if not followed or exc.code() not in TAIL_RECONNECT:
                        raise
                    reason = f"{exc.code().name}: {clip(exc.details() or '', 100)}"
                finally:
                    call.cancel()
                if not down:
                    down = reason
                    say(f"the stream ended ({reason}); reconnecting")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

        try:
            self.run(args, job, refused="the stream was refused")
        except KeyboardInterrupt:
            print("tidegate logs tail: stopped", file=sys.stderr)
        return 0

    def logs_get(self, args: argparse.Namespace) -> int:
        entry = self.run(args, lambda client: client.get_log(args.id))
        if args.output == "json":
            print_json(to_json(entry))
            return 0
        status = str(entry.status_code) if entry.status_code else "none (no response)"
        if colour_wanted():
            status = f"{status_colour(entry.status_code)}{status}{RESET}"
        rows = [
            ("id", entry.id),
            ("time", when_ms(entry.time)),
            ("connection", entry.connection_id),
            ("request", f"{entry.method} {entry.url}"),
            ("status", status),
            ("response time", f"{entry.response_time_seconds:.3f} s"),
            ("error", entry.error or "-"),
            ("mapping version", str(entry.mapping_version)),
            ("attempt", str(entry.attempt)),
            (
                "ambiguous",
                "yes: no answer came back; it may have been applied" if entry.ambiguous else "no",
            ),
            ("tags", ", ".join(entry.tags) or "-"),
        ]
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key + ':':<{width + 1}}  {value}")
        print(f"\ncustomers ({entry.customer_count}):")
        print(
            "\n".join(
                "  " + line
                for line in table(
                    ["CUSTOMER", "NAME", "OUTCOME", "MESSAGE"],
                    (
                        [c.customer_id, c.name or "-", c.outcome, c.error or "-"]
                        for c in entry.customers
                    ),
                )
            )
        )
        limit = None if args.full else BODY
        for title, body in (
            ("request body", entry.request_body),
            ("response body", entry.response_body),
        ):
            print(f"\n{title}:")
            print("\n".join("  " + line for line in pretty_body(body, limit)))
        return 0

    # -- dead letters

    def dead_letters_list(self, args: argparse.Namespace) -> int:
        f = dead_letter_filter(args)

        async def job(client: TidegateClient) -> tuple[list[dead_letters_pb2.DeadLetter], str]:
            stub = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)
            found: list[dead_letters_pb2.DeadLetter] = []
            token = ""
            while len(found) < args.limit:
                page = await stub.ListDeadLetters(
                    dead_letters_pb2.ListDeadLettersRequest(
                        filter=f,
                        page_size=min(MAX_PAGE, args.limit - len(found)),
                        page_token=token,
                    )
                )
                found += page.dead_letters
                token = page.next_page_token
                if not token:
                    break
            return found, token

        found, token = self.run(args, job, refused="the listing was refused")
        if args.output == "json":
            print_json({"deadLetters": [to_json(d) for d in found], "more": bool(token)})
            return 0
        if not found:
            print("no dead letters match")
            return 0
        rows = (
            [
                str(d.id),
                when(d.fail_time),
                d.connection_id,
                d.customer_id,
                d.kind,
                d.stage,
                str(d.attempts),
                clip(d.error),
                d.request_id or "-",
            ]
            for d in found
        )
        print(
            "\n".join(
                table(
                    [
                        "ID",
                        "FAILED (UTC)",
                        "CONNECTION",
                        "CUSTOMER",
                        "KIND",
                        "STAGE",
                        "ATTEMPTS",
                        "ERROR",
                        "REQUEST",
                    ],
                    rows,
                )
            )
        )
        if token:
            print(f"(more match: raise --limit, now {args.limit}, to see them)", file=sys.stderr)
        return 0

    def dead_letters_replay(self, args: argparse.Namespace) -> int:
        """Counts (one dry-run call), confirms, then replays in calls of ``REPLAY_CHUNK``
        ids: the oldest dead letters that were counted, each call its own short
        transaction, with progress on standard error after each."""
        f = dead_letter_filter(args)
        if not args.ids and f == dead_letters_pb2.DeadLetterFilter():
            raise TidegateError(
                "say which dead letters to replay: --id ID, or a filter such as --connection"
                " ID, --customer ID, --stage STAGE, --error TEXT or --since 1h"
            )
        if len(args.ids) > MAX_REPLAY_IDS:
            raise TidegateError(
                f"--id: {len(args.ids)} given, at most {MAX_REPLAY_IDS} at a time; replay by"
                " filter instead"
            )
        mode = REPLAY_MODES[args.mode]

        async def count(client: TidegateClient) -> dead_letters_pb2.ReplayDeadLettersResponse:
            stub = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)
            answer: dead_letters_pb2.ReplayDeadLettersResponse = await stub.ReplayDeadLetters(
                dead_letters_pb2.ReplayDeadLettersRequest(
                    ids=args.ids, filter=f, mode=mode, dry_run=True
                )
            )
            return answer

        refused = "the replay was refused, nothing was replayed"
        counted = self.run(args, count, refused=refused)
        skipped = f"; {counted.skipped} skipped (never rendered)" if counted.skipped else ""
        if args.dry_run or counted.replayed == 0:
            if args.output == "json":
                print_json({**to_json(counted), "dryRun": args.dry_run})
            elif args.dry_run:
                print(
                    f"dry run: {counted.matched} dead letter(s) match, {counted.replayed} would"
                    f" be replayed{skipped}; nothing was replayed"
                )
            else:
                print(f"nothing to replay: {counted.matched} dead letter(s) match{skipped}")
            return 0
        if not args.yes:
            self._confirm(counted.replayed, args.mode)
        done = dead_letters_pb2.ReplayDeadLettersResponse()
        total = counted.matched

        def progress() -> None:
            print(
                f"tidegate dead-letters replay: {done.matched} of {total} done,"
                f" {done.replayed} replayed",
                file=sys.stderr,
                flush=True,
            )

        async def replay(client: TidegateClient) -> None:
            stub = dead_letters_pb2_grpc.DeadLetterServiceStub(client.channel)
            ids = list(args.ids)
            if not ids:  # the oldest `total` that match: those counted, not later ones
                token = ""
                while len(ids) < total:
                    page = await stub.ListDeadLetters(
                        dead_letters_pb2.ListDeadLettersRequest(
                            filter=f, page_size=MAX_PAGE, page_token=token
                        )
                    )
                    ids += [d.id for d in page.dead_letters]
                    token = page.next_page_token
                    if not token:
                        break
                ids = ids[:total]
            for start in range(0, len(ids), REPLAY_CHUNK):
                answer = await stub.ReplayDeadLetters(
                    dead_letters_pb2.ReplayDeadLettersRequest(
                        ids=ids[start : start + REPLAY_CHUNK], filter=f, mode=mode
                    )
                )
                done.matched += answer.matched
                done.replayed += answer.replayed
                done.skipped += answer.skipped
                if len(ids) > REPLAY_CHUNK:
                    progress()

        try:
            self.run(args, replay, refused=refused)
        except (TidegateError, KeyboardInterrupt) as exc:
            if not done.matched:
                raise
            progress()
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise TidegateError(f"{exc} (after the calls counted above)") from None
        if args.output == "json":
            print_json({**to_json(done), "dryRun": False})
        else:
            later = f"; {done.skipped} skipped (never rendered)" if done.skipped else ""
            print(
                f"replayed {done.replayed} of {done.matched} matching dead letter(s){later};"
                " they join the end of their customers' queues"
            )
        return 0

    def _confirm(self, count: int, mode: str) -> None:
        if not sys.stdin.isatty():
            raise TidegateError(
                f"{count} dead letter(s) would be replayed, and there is no terminal to"
                " confirm on: pass --yes to replay them, or --dry-run to only count them"
            )
        how = "re-rendered with the current mapping" if mode == "rerender" else "as stored"
        print(f"Replay {count} dead letter(s), {how}? [y/N] ", end="", file=sys.stderr, flush=True)
        try:
            answer = input()
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            raise TidegateError("replay cancelled: nothing was replayed")

    # -- tokens

    def tokens_create(self, args: argparse.Namespace) -> int:
        seconds = 0
        if args.expires_in is not None:
            try:
                seconds = int(parse_duration(args.expires_in, "--expires-in"))
            except InvalidInputError as exc:
                raise TidegateError(str(exc)) from None
        request = tokens_pb2.CreateTokenRequest(
            name=args.name, role=ROLES[args.role], expires_in_seconds=seconds
        )

        async def job(client: TidegateClient) -> tokens_pb2.CreateTokenResponse:
            stub = tokens_pb2_grpc.TokenServiceStub(client.channel)
            answer: tokens_pb2.CreateTokenResponse = await stub.CreateToken(request)
            return answer

        made = self.run(args, job, refused="the token was not made")
        if args.output == "json":
            print_json(to_json(made))
            return 0
        print(made.token)
        info = made.info
        expiry = (
            "never expires"
            if not info.HasField("expire_time")
            else (f"expires {when(info.expire_time)}")
        )
        print(
            f"tidegate tokens: made token {info.name!r} ({ROLE_LABELS.get(info.role, '?')},"
            f" {expiry}); it is shown only this once",
            file=sys.stderr,
        )
        return 0

    def tokens_list(self, args: argparse.Namespace) -> int:
        async def job(client: TidegateClient) -> list[tokens_pb2.TokenInfo]:
            stub = tokens_pb2_grpc.TokenServiceStub(client.channel)
            found: list[tokens_pb2.TokenInfo] = []
            token = ""
            while True:
                page = await stub.ListTokens(
                    tokens_pb2.ListTokensRequest(page_size=MAX_PAGE, page_token=token)
                )
                found += page.tokens
                token = page.next_page_token
                if not token:
                    return found

        found = self.run(args, job)
        if args.output == "json":
            print_json({"tokens": [to_json(t) for t in found]})
            return 0
        now = time.time()

        def state(t: tokens_pb2.TokenInfo) -> str:
            if t.HasField("revoke_time"):
                return "revoked"
            if t.HasField("expire_time") and t.expire_time.seconds <= now:
                return "expired"
            return "active"

        print(
            "\n".join(
                table(
                    ["NAME", "ROLE", "ID", "CREATED", "EXPIRES", "LAST USED", "STATE"],
                    (
                        [
                            t.name,
                            ROLE_LABELS.get(t.role, "?"),
                            t.id,
                            when(t.create_time),
                            when(t.expire_time),
                            when(t.last_used_time),
                            state(t),
                        ]
                        for t in found
                    ),
                )
            )
        )
        return 0

    def tokens_revoke(self, args: argparse.Namespace) -> int:
        async def job(client: TidegateClient) -> tokens_pb2.TokenInfo:
            stub = tokens_pb2_grpc.TokenServiceStub(client.channel)
            answer = await stub.RevokeToken(tokens_pb2.RevokeTokenRequest(name=args.name))
            return answer.info

        info = self.run(args, job, refused="the token was not revoked")
        if args.output == "json":
            print_json(to_json(info))
            return 0
        print(
            f"tidegate tokens: revoked token {info.name!r} ({ROLE_LABELS.get(info.role, '?')})",
            file=sys.stderr,
        )
        return 0
