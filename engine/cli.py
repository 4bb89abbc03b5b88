"""The ``tidegate`` command. ``serve`` runs the engine; plugins add more commands
(the Insider plugin adds ``sandbox`` and ``demo``)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import getpass
import json
import os
import re
import signal
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import structlog
import uvloop

from clients.client import TidegateClient, read_token
from engine import __version__
from engine.app import (
    DEFAULT_DATA_DIR,
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_PORT,
    ENGINE_FILE,
    Engine,
    EngineConfig,
)
from engine.backup import back_up_stopped
from engine.broker.options import add_broker_options, broker_config
from engine.cli_admin import EngineAccess, add_admin_commands
from engine.connector.destinations import Allowance, DestinationError
from engine.connector.info import tcp_port
from engine.delivery.worker import DeliverySettings
from engine.errors import TidegateError
from engine.gc_settings import settle_collector
from engine.ingest.auth import (
    BASIC_PASSWORD_ENV,
    BASIC_USER_ENV,
    DEFAULT_JWT_LEEWAY,
    JWT_ALGORITHMS,
    JWT_PUBLIC_KEY_ENV,
    JWT_SECRET_ENV,
    SCHEMES,
    load_ingest_auth,
)
from engine.ingest.auth import TOKEN_ENV as INGEST_TOKEN_ENV
from engine.ingest.ingestor import DEFAULT_MAX_BACKLOG
from engine.ingest.limits import DEFAULT_LIMITS, MAX_DEPTH_CEILING, IngestLimits
from engine.ingest.settings import IngestSettings
from engine.logconfig import configure_logging
from engine.metrics import inherited_multiprocess_dir_problem
from engine.outbound_log.retention import LOG_RETENTION_DAYS
from engine.outbound_log.store import MAX_SUBSCRIBERS
from engine.pb import config_pb2
from engine.plugins import plugin_commands, plugin_manager
from engine.queue.retention import DAY, DEFAULT_RETENTION_DAYS
from engine.security import INSECURE_FLAG, TlsFiles, exposure_problem, is_loopback
from engine.state import audit, tokens
from engine.state.config_document import key_env_names
from engine.state.database import STATE_FILE, Database
from engine.state.secrets import SECRET_KEY_ENV, rotate_secrets
from engine.state.tokens import ADMIN_TOKEN_FILE, TOKEN_ENV, Role
from engine.ui.server import DEFAULT_UI_PORT
from engine.upgrade import migrate, plan, prepare

T = TypeVar("T")


def positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not 1 or more")
    return value


def non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number of 0 or more")
    return value


SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", re.IGNORECASE)
SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def byte_size(text: str) -> int:
    """``20GB``, ``500MB`` or a number of bytes (decimal units, as disks are sold)."""
    match = SIZE.fullmatch(text.strip())
    value = 0 if match is None else int(float(match[1]) * SIZE_UNITS[match[2].upper()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a size such as 500MB or 20GB")
    return value


def allowance(text: str) -> Allowance:
    """An ``argparse`` type for ``--allow-destination``."""
    try:
        return Allowance.parse(text)
    except DestinationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def metrics_port(text: str) -> int | None:
    """``--metrics-port``: a TCP port (0: any free one), or ``off`` for no endpoint."""
    if text.strip().lower() == "off":
        return None
    try:
        return tcp_port(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is neither a TCP port nor off") from None


def ui_port(text: str) -> int | None:
    """``--ui-port``: a TCP port (0: any free one), or ``off`` for no page."""
    return metrics_port(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidegate", description="Outbound sync engine: Antavo to customer data platforms."
    )
    parser.add_argument("--version", action="version", version=f"tidegate {__version__}")
    parser.add_argument(
        "--log-format",
        choices=("auto", "console", "json"),
        default="auto",
        help="log lines as console text or JSON (default: console on a terminal)",
    )
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the engine: ingest HTTP, delivery, gRPC admin API")
    serve.add_argument(
        "--grpc-port",
        type=tcp_port,
        default=DEFAULT_GRPC_PORT,
        help=f"admin API port (default {DEFAULT_GRPC_PORT})",
    )
    serve.add_argument(
        "--http-port",
        type=tcp_port,
        default=DEFAULT_HTTP_PORT,
        help=f"ingest port (default {DEFAULT_HTTP_PORT})",
    )
    serve.add_argument(
        "--metrics-port",
        type=metrics_port,
        default=DEFAULT_METRICS_PORT,
        help=f"Prometheus GET /metrics port, or off (default {DEFAULT_METRICS_PORT})",
    )
    serve.add_argument(
        "--ui-port",
        type=ui_port,
        default=DEFAULT_UI_PORT,
        help=f"outbound-log page port, or off (default {DEFAULT_UI_PORT})",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"state, log and key files (default ./{DEFAULT_DATA_DIR})",
    )
    defaults = DeliverySettings()
    serve.add_argument(
        "--retry-base-seconds",
        type=positive,
        default=defaults.base_backoff,
        help=f"first retry delay ceiling, doubled per attempt (default {defaults.base_backoff:g})",
    )
    serve.add_argument(
        "--retry-max-seconds",
        type=positive,
        default=defaults.max_backoff,
        help=f"longest retry delay (default {defaults.max_backoff:g})",
    )
    serve.add_argument(
        "--max-backlog",
        type=int,
        default=DEFAULT_MAX_BACKLOG,
        help=f"queued items past which ingest answers 503 (default {DEFAULT_MAX_BACKLOG})",
    )
    serve.add_argument(
        "--max-log-streams",
        type=positive_int,
        default=MAX_SUBSCRIBERS,
        help="StreamLogs calls served at a time; more are refused with RESOURCE_EXHAUSTED"
        f" (default {MAX_SUBSCRIBERS})",
    )
    serve.add_argument(
        "--log-retention-days",
        type=non_negative,
        default=LOG_RETENTION_DAYS,
        help="delete outbound-log rows older than this, a week's partition at a time"
        f" (default {LOG_RETENTION_DAYS:g}; 0 keeps them)",
    )
    serve.add_argument(
        "--log-max-size",
        type=byte_size,
        default=None,
        metavar="SIZE",
        help="also delete the oldest outbound-log partitions while the log takes more than"
        " SIZE on disk (e.g. 20GB; default: no limit)",
    )
    serve.add_argument(
        "--allow-destination",
        type=allowance,
        action="append",
        default=[],
        metavar="URL_OR_HOST[:PORT]",
        help="also let connections send here (repeatable): a host no connector declares, a"
        " loopback or private address, or plain http, e.g. http://127.0.0.1:8090 for the"
        " sandbox",
    )
    serve.add_argument(
        "--ingest-in-process",
        action="store_true",
        help="serve ingest HTTP from the engine process instead of a worker process of its"
        " own (uses one core instead of two)",
    )
    add_upgrade_options(serve)
    add_security_options(serve)
    add_ingest_options(serve)
    add_broker_options(serve)
    serve.set_defaults(func=run_serve)
    add_config_command(sub)
    add_backup_command(sub)
    add_token_command(sub)
    add_migrate_command(sub)
    add_secrets_command(sub)
    add_admin_commands(sub, EngineAccess(_target_argument, client_options, _engine_call))
    for command in plugin_commands(plugin_manager()):
        added = sub.add_parser(command.name, help=command.help)
        command.configure(added)
        added.set_defaults(func=command.run)
    return parser


def run_serve(args: argparse.Namespace) -> int:
    try:
        ingest = ingest_settings(args, os.environ)
        broker = broker_config(args)  # with --broker: no ingest worker process
    except TidegateError as exc:
        print(f"tidegate: cannot start: {exc}", file=sys.stderr)
        return 1
    problem = inherited_multiprocess_dir_problem() or security_problem(args, ingest.configured)
    if problem is not None:
        print(f"tidegate: cannot start: {problem}", file=sys.stderr)
        return 1
    config = EngineConfig(
        data_dir=args.data_dir,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        ingest=ingest,
        max_backlog=args.max_backlog,
        max_log_streams=args.max_log_streams,
        metrics_port=args.metrics_port,
        ui_port=args.ui_port,
        ingest_worker=not args.ingest_in_process and not broker,
        log_retention_days=args.log_retention_days,
        log_max_bytes=args.log_max_size,
        log_format=args.log_format,
        log_level=args.log_level,
        allowed_destinations=tuple(args.allow_destination),
        delivery=DeliverySettings(
            base_backoff=args.retry_base_seconds,
            max_backoff=max(args.retry_max_seconds, args.retry_base_seconds),
        ),
        **upgrade_settings(args),
        **security_settings(args),
        **broker,
    )
    # uvloop: the libuv event loop serves aiohttp and grpc.aio with less CPU per request.
    return uvloop.run(_serve(config))


async def _serve(config: EngineConfig) -> int:
    # The handlers come first: a SIGTERM that arrives while the engine starts (its ports
    # are open before start() returns) stops it cleanly once it has started.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    engine = Engine(config)
    try:
        await engine.start()
    except (OSError, TidegateError) as exc:
        print(f"tidegate: cannot start: {exc}", file=sys.stderr)
        return 1
    settle_collector()
    if engine.admin_token_file is not None:
        print(
            f"tidegate: first start on this data folder: wrote an admin token to"
            f" {engine.admin_token_file} (readable by this user only); send it as"
            " `authorization: Bearer <token>`, and make more with `tidegate token create`",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"tidegate serving: gRPC admin on {config.host}:{engine.grpc_port}, "
        f"ingest on {'http' if config.tls is None else 'https'}://{config.host}:"
        f"{engine.http_port}/v1/events, data in {config.data_dir}"
        f"{_metrics_address(config, engine)}{_ui_address(config, engine)}",
        file=sys.stderr,
        flush=True,
    )
    await stop.wait()
    print("tidegate: stopping (finishing in-flight deliveries)", file=sys.stderr, flush=True)
    await engine.stop()
    gc.unfreeze()  # let the interpreter's exit release them (DuckDB reports any it cannot)
    return 0


# -- serve: ingest credential and limits ----------------------------------------------


def whole_number(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"{text!r:.40} is not a whole number of {minimum} or more"
            )
        return value

    return parse


def add_ingest_options(serve: argparse.ArgumentParser) -> None:
    """``serve``'s ``--ingest-*`` flags. Secrets are read from environment variables or
    from files these flags name, never from a flag's value: flags show in ``ps``."""
    group = serve.add_argument_group(
        "ingest authentication",
        "The credential POST /v1/events requires, as Antavo's trusted site sends it."
        f" Secrets come from {INGEST_TOKEN_ENV}, {BASIC_PASSWORD_ENV}, {JWT_SECRET_ENV},"
        f" {JWT_PUBLIC_KEY_ENV} or from the files named below.",
    )
    group.add_argument(
        "--ingest-auth",
        choices=SCHEMES,
        default=None,
        help=f"the scheme (default: bearer when {INGEST_TOKEN_ENV} or --ingest-token-file is set,"
        " else none)",
    )
    group.add_argument(
        "--ingest-token-file", type=Path, metavar="PATH", help="bearer: the token, in a file"
    )
    group.add_argument(
        "--ingest-basic-user", metavar="NAME", help=f"basic: the user name (or {BASIC_USER_ENV})"
    )
    group.add_argument(
        "--ingest-basic-password-file", type=Path, metavar="PATH", help="basic: the password"
    )
    group.add_argument(
        "--ingest-jwt-algorithm",
        choices=JWT_ALGORITHMS,
        default="HS256",
        help="jwt: the only algorithm accepted (default HS256)",
    )
    group.add_argument(
        "--ingest-jwt-secret-file",
        type=Path,
        metavar="PATH",
        help="jwt HS256: the shared secret (at least 32 bytes)",
    )
    group.add_argument(
        "--ingest-jwt-public-key-file",
        type=Path,
        metavar="PATH",
        help="jwt RS256: the RSA public key, PEM",
    )
    group.add_argument(
        "--ingest-jwt-require-exp",
        action="store_true",
        help="jwt: refuse tokens without an exp claim (default: exp is checked when present)",
    )
    group.add_argument(
        "--ingest-jwt-leeway-seconds",
        type=non_negative,
        default=DEFAULT_JWT_LEEWAY,
        help=f"jwt: clock skew allowed for exp, iat and nbf (default {DEFAULT_JWT_LEEWAY:g})",
    )
    group.add_argument("--ingest-jwt-audience", default="", help="jwt: the aud claim required")
    group.add_argument("--ingest-jwt-issuer", default="", help="jwt: the iss claim required")
    limits = serve.add_argument_group("ingest limits")
    d = DEFAULT_LIMITS
    limits.add_argument(
        "--ingest-max-body-size",
        type=byte_size,
        default=d.max_body_bytes,
        metavar="SIZE",
        help=f"largest request body, e.g. 10MB (default {d.max_body_bytes} bytes)",
    )
    limits.add_argument(
        "--ingest-max-events",
        type=whole_number(1),
        default=d.max_events,
        help=f"events per request (default {d.max_events})",
    )
    limits.add_argument(
        "--ingest-max-depth",
        type=whole_number(1),
        default=d.max_depth,
        help=f"nesting levels of an event's data (default {d.max_depth}, at most"
        f" {MAX_DEPTH_CEILING})",
    )
    limits.add_argument(
        "--ingest-max-string-length",
        type=whole_number(1),
        default=d.max_string_length,
        help=f"characters in a string inside data (default {d.max_string_length})",
    )
    limits.add_argument(
        "--ingest-max-key-length",
        type=whole_number(1),
        default=d.max_key_length,
        help=f"characters in a key inside data (default {d.max_key_length})",
    )
    limits.add_argument(
        "--ingest-max-keys",
        type=whole_number(0),
        default=d.max_keys,
        help=f"keys in one event's data, nested ones included (default {d.max_keys})",
    )
    limits.add_argument(
        "--ingest-idle-timeout",
        type=positive,
        default=d.idle_timeout,
        metavar="SECONDS",
        help="close a connection whose next request's headers are not complete this long"
        f" after it opened or last answered (default {d.idle_timeout:g})",
    )
    limits.add_argument(
        "--ingest-body-timeout",
        type=positive,
        default=d.body_timeout,
        metavar="SECONDS",
        help=f"answer 408 when a body takes longer to arrive (default {d.body_timeout:g})",
    )


def ingest_settings(args: argparse.Namespace, environ: Any) -> IngestSettings:
    """The ingest settings from ``add_ingest_options``' flags; raises ``TidegateError``."""
    auth = load_ingest_auth(
        args.ingest_auth,
        environ,
        token_file=args.ingest_token_file,
        basic_user=args.ingest_basic_user,
        basic_password_file=args.ingest_basic_password_file,
        jwt_algorithm=args.ingest_jwt_algorithm,
        jwt_secret_file=args.ingest_jwt_secret_file,
        jwt_public_key_file=args.ingest_jwt_public_key_file,
        jwt_require_exp=args.ingest_jwt_require_exp,
        jwt_leeway=args.ingest_jwt_leeway_seconds,
        jwt_audience=args.ingest_jwt_audience,
        jwt_issuer=args.ingest_jwt_issuer,
    )
    settings = IngestSettings(
        auth,
        IngestLimits(
            max_body_bytes=args.ingest_max_body_size,
            max_events=args.ingest_max_events,
            max_depth=args.ingest_max_depth,
            max_string_length=args.ingest_max_string_length,
            max_key_length=args.ingest_max_key_length,
            max_keys=args.ingest_max_keys,
            idle_timeout=args.ingest_idle_timeout,
            body_timeout=args.ingest_body_timeout,
        ),
    )
    settings.check()
    return settings


# -- tidegate config ---------------------------------------------------------------------

DEFAULT_TARGET = f"127.0.0.1:{DEFAULT_GRPC_PORT}"
VERBS = {
    config_pb2.CHANGE_ACTION_CREATE: ("created", "would create"),
    config_pb2.CHANGE_ACTION_UPDATE: ("updated", "would update"),
    config_pb2.CHANGE_ACTION_DELETE: ("deleted", "would delete"),
}
OBJECT_NAMES = {
    config_pb2.CONFIG_OBJECT_KIND_CONNECTION: "connection",
    config_pb2.CONFIG_OBJECT_KIND_PROFILE_MAPPING: "profile mapping",
    config_pb2.CONFIG_OBJECT_KIND_EVENT_MAPPING: "event mapping",
}


def add_config_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``tidegate config export`` and ``tidegate config apply``: they talk to a running
    engine over gRPC, which holds the configuration and reloads ingest on a change."""
    config = sub.add_parser(
        "config",
        help="export or apply the whole configuration as one YAML document (over gRPC, to a"
        " running engine)",
    )
    actions = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    export = actions.add_parser("export", help="print the configuration as YAML (no API keys)")
    export.add_argument(
        "-o", "--output", type=Path, help="write the document to this file, not standard output"
    )
    _target_argument(export)
    export.set_defaults(func=run_config_export)
    apply = actions.add_parser(
        "apply", help="apply a YAML document: all of it or nothing; prints the changes"
    )
    apply.add_argument(
        "-f", "--file", required=True, help="the document to apply ('-': standard input)"
    )
    apply.add_argument(
        "--dry-run", action="store_true", help="validate and print the changes; change nothing"
    )
    apply.add_argument(
        "--prune",
        action="store_true",
        help="delete the connections and mappings the document does not mention (without it"
        " they are kept and listed)",
    )
    _target_argument(apply)
    apply.set_defaults(func=run_config_apply)


def _target_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        help=f"the engine's gRPC admin address (default {DEFAULT_TARGET})",
    )
    _token_arguments(parser)


def run_config_export(args: argparse.Namespace) -> int:
    document = _engine_call(
        args.target, lambda client: client.export_config(), **client_options(args)
    )
    if args.output is None:
        sys.stdout.write(document)
        return 0
    try:
        args.output.write_text(document, encoding="utf-8")
    except OSError as exc:
        raise TidegateError(f"cannot write {args.output}: {exc.strerror}") from None
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def run_config_apply(args: argparse.Namespace) -> int:
    text = _read_document(args.file)
    # The keys the document names, from this command's environment; the engine says
    # which one is missing, so a missing one is reported like every other problem.
    keys = {name: os.environ[name] for name in key_env_names(text) if name in os.environ}
    response = _engine_call(
        args.target,
        lambda client: client.apply_config(
            text, api_keys=keys, dry_run=args.dry_run, prune=args.prune
        ),
        **client_options(args),
    )
    for line in describe_apply(response, args.dry_run):
        print(line)
    return 0


def _read_document(name: str) -> str:
    try:
        if name == "-":
            return sys.stdin.read()
        return Path(name).read_text(encoding="utf-8")
    except OSError as exc:
        raise TidegateError(f"cannot read {name}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise TidegateError(f"cannot read {name}: it is not UTF-8 text") from None


def describe_apply(response: config_pb2.ApplyConfigResponse, dry_run: bool) -> list[str]:
    """What ``tidegate config apply`` prints: each change with its changed fields, what
    the document left out, and a last line that says what happened."""
    lines = []
    for change in response.changes:
        done, planned = VERBS[change.action]
        lines.append(f"{planned if dry_run else done} {_object_name(change.object)}")
        for field in change.fields:
            old, new = field.old_value or "(none)", field.new_value or "(none)"
            lines.append(f"    {field.field}: {old} -> {new}")
    if response.unmentioned:
        lines.append("not in the document, kept (apply with --prune to delete them):")
        lines += [f"    {_object_name(ref)}" for ref in response.unmentioned]
    count = len(response.changes)
    if not count:
        lines.append("no changes: the engine's configuration already matches the document")
    elif dry_run:
        lines.append(f"dry run: {count} change(s) found, nothing was changed")
    else:
        lines.append(f"applied {count} change(s)")
    return lines


def _object_name(ref: config_pb2.ConfigObject) -> str:
    name = OBJECT_NAMES.get(ref.kind, "object")
    if ref.mapping_id:
        return f"{name} {ref.mapping_id} of connection {ref.connection_id}"
    return f"{name} {ref.connection_id}"


def _engine_call(
    target: str,
    call: Callable[[TidegateClient], Awaitable[T]],
    refused: str = "the document was refused, nothing was changed",
    **options: Any,
) -> T:
    """``options``: ``TidegateClient``'s keyword arguments (``client_options``)."""

    async def run() -> T:
        async with TidegateClient(target, **options) as client:
            return await call(client)

    try:
        return asyncio.run(run())
    except grpc.aio.AioRpcError as exc:
        raise TidegateError(_rpc_failure(target, exc, refused)) from None


def _rpc_failure(target: str, exc: grpc.aio.AioRpcError, refused: str) -> str:
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"cannot reach the engine at {target}: nothing answers there. Start it with "
            "`tidegate serve`, or name where it runs with --target HOST:PORT"
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return f"{refused}: {exc.details()}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (
            f"the engine at {target} refused the token: pass --token, set {TOKEN_ENV}, or"
            f" name the engine's data folder with --data-dir (its {ADMIN_TOKEN_FILE} file)"
        )
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"the engine at {target} refused the call: the token's role does not allow it"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return f"the engine at {target} does not offer that call: it runs an older Tidegate"
    return f"the engine at {target} answered {code.name}: {exc.details()}"


# -- tidegate backup ---------------------------------------------------------------------


def add_backup_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``tidegate backup``: through the engine that serves the folder, or by itself."""
    backup = sub.add_parser(
        "backup",
        help="copy a data folder consistently, while its engine serves it or while none does",
    )
    backup.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"the data folder to back up (default ./{DEFAULT_DATA_DIR})",
    )
    backup.add_argument(
        "--to",
        type=Path,
        required=True,
        metavar="DIR",
        help="the folder to create (it must not exist, or be empty)",
    )
    _token_arguments(backup, data_dir=False)
    backup.set_defaults(func=run_backup)


def run_backup(args: argparse.Namespace) -> int:
    destination = args.to.resolve()
    target = serving_engine(args.data_dir)
    if target is None:
        result = back_up_stopped(args.data_dir, destination)
        how = "no engine serves it: copied its files"
        parts, log_bytes, key = result.log_partitions, result.log_bytes, result.secret_key_copied
    else:
        answer = _engine_call(
            target,
            lambda client: client.create_backup(str(destination)),
            refused="the backup was refused, nothing was written",
            **client_options(args),
        )
        how = f"through the engine serving it at {target}"
        parts, log_bytes, key = answer.log_partitions, answer.log_bytes, answer.secret_key_copied
    print(
        f"tidegate backup: {args.data_dir} -> {destination} ({how}):"
        f" state database, {parts} outbound-log file(s) ({log_bytes:,} bytes)"
        + ("" if key else "; the secret key is not in the folder: keep TIDEGATE_SECRET_KEY"),
        file=sys.stderr,
    )
    return 0


def serving_engine(data_dir: Path) -> str | None:
    """The admin address of the engine serving ``data_dir`` (from its ``engine.json``),
    or None when none runs."""
    try:
        announced = json.loads((data_dir / ENGINE_FILE).read_text())
        pid, address = int(announced["pid"]), str(announced["grpc"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # left by an engine that was killed
    except PermissionError:
        pass  # alive, another user's
    return address


def add_upgrade_options(serve: argparse.ArgumentParser) -> None:
    """``serve``'s flags for schema migrations and dead-letter retention."""
    serve.add_argument(
        "--no-migrate",
        action="store_true",
        help="refuse to start when the data folder needs migrating, instead of migrating it"
        " (then run `tidegate migrate`)",
    )
    serve.add_argument(
        "--dead-letter-retention-days",
        type=positive,
        default=DEFAULT_RETENTION_DAYS,
        help="delete dead letters this many days after they failed"
        f" (default {DEFAULT_RETENTION_DAYS:g})",
    )


def upgrade_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``EngineConfig`` fields that ``add_upgrade_options`` sets."""
    return {
        "migrate": not args.no_migrate,
        "dead_letter_retention": args.dead_letter_retention_days * DAY,
    }


def add_migrate_command(sub: Any) -> None:
    command = sub.add_parser(
        "migrate",
        help="bring a data folder to this Tidegate's schema, without serving",
        description="Runs the pending schema migration steps of a data folder's state"
        " database and outbound log (or lists them with --dry-run), then exits: 0 when the"
        " folder is ready for this Tidegate, 1 when it is refused or a step failed. Stop"
        " `tidegate serve` on the folder first.",
    )
    command.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"the data folder (default ./{DEFAULT_DATA_DIR})",
    )
    command.add_argument(
        "--dry-run", action="store_true", help="list the pending steps and change nothing"
    )
    command.set_defaults(func=run_migrate)


def run_migrate(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir
    if not data_dir.is_dir():
        print(f"tidegate migrate: data folder {data_dir} does not exist", file=sys.stderr)
        return 1
    if args.dry_run:
        print("\n".join(plan(data_dir).lines()))
        return 0

    def progress(text: str) -> None:
        print(f"tidegate migrate: {text}", file=sys.stderr, flush=True)

    ran = migrate(data_dir, progress)
    stores = ", ".join(f"{sp.store.name} schema {sp.store.current}" for sp in ran.stores)
    done = f"{ran.steps} step(s) applied" if ran.steps else "nothing to migrate"
    progress(f"{done}; data folder {data_dir} is ready ({stores})")
    return 0


# -- security: serve's TLS flags and exposure guard; tokens for commands ---------------------


def add_security_options(serve: argparse.ArgumentParser) -> None:
    """``serve``'s TLS flags and the exposure guard's override."""
    serve.add_argument(
        "--tls-cert", type=Path, help="PEM certificate chain: serve gRPC and ingest over TLS"
    )
    serve.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    serve.add_argument(
        "--tls-client-ca",
        type=Path,
        help="PEM CA certificate(s): require client certificates it signed (mutual TLS)",
    )
    serve.add_argument(
        INSECURE_FLAG,
        dest="insecure_no_tls",
        action="store_true",
        help="allow a non-loopback --host without TLS (e.g. behind a proxy that terminates"
        " TLS); logged as a warning at every start",
    )


def security_problem(args: argparse.Namespace, ingest_auth_configured: bool) -> str | None:
    """Why ``serve`` must not start with these TLS and host flags, or None.
    ``ingest_auth_configured``: whether ingest requires a credential."""
    if (args.tls_cert is None) != (args.tls_key is None):
        return "--tls-cert and --tls-key go together: pass both, or neither"
    if args.tls_client_ca is not None and args.tls_cert is None:
        return "--tls-client-ca needs --tls-cert and --tls-key"
    if args.tls_cert is not None:
        try:
            TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca).server_context()
        except TidegateError as exc:
            return str(exc)
    return exposure_problem(
        args.host,
        tls=args.tls_cert is not None,
        insecure_allowed=args.insecure_no_tls,
        ingest_auth_configured=ingest_auth_configured,
    )


def security_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``EngineConfig`` fields of ``add_security_options``; warns when the guard is
    overridden."""
    if args.insecure_no_tls and args.tls_cert is None and not is_loopback(args.host):
        structlog.get_logger("tidegate.engine").warning(
            "serving_without_tls",
            host=args.host,
            flag=INSECURE_FLAG,
            risk="tokens and customer data cross the network in clear text",
        )
    if args.tls_cert is None:
        return {}
    return {"tls": TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca)}


def _token_arguments(parser: argparse.ArgumentParser, data_dir: bool = True) -> None:
    """How a command reaches the engine: its token, and the TLS files when the engine
    serves TLS."""
    parser.add_argument(
        "--token",
        default=None,
        help=f"admin API token (default: ${TOKEN_ENV}, else <data-dir>/{ADMIN_TOKEN_FILE})",
    )
    if data_dir:
        parser.add_argument(
            "--data-dir",
            type=Path,
            default=DEFAULT_DATA_DIR,
            help=f"the engine's data folder, for its {ADMIN_TOKEN_FILE} (default"
            f" ./{DEFAULT_DATA_DIR})",
        )
    parser.add_argument(
        "--tls-ca", type=Path, help="PEM CA of the engine's certificate: connect with TLS"
    )
    parser.add_argument(
        "--tls-client-cert", type=Path, help="PEM client certificate, when the engine asks"
    )
    parser.add_argument("--tls-client-key", type=Path, help="PEM key of --tls-client-cert")


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """``TidegateClient``'s keyword arguments from ``_token_arguments``' flags."""
    options: dict[str, Any] = {"token": admin_token(args)}
    if args.tls_ca is not None:
        options["root_certificates"] = _pem(args.tls_ca, "--tls-ca")
    if (args.tls_client_cert is None) != (args.tls_client_key is None):
        raise TidegateError("--tls-client-cert and --tls-client-key go together")
    if args.tls_client_cert is not None:
        if args.tls_ca is None:
            raise TidegateError("--tls-client-cert needs --tls-ca")
        options["client_cert"] = _pem(args.tls_client_cert, "--tls-client-cert")
        options["client_key"] = _pem(args.tls_client_key, "--tls-client-key")
    return options


def _pem(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TidegateError(f"cannot read {flag} {path}: {exc.strerror}") from None


def admin_token(args: argparse.Namespace) -> str:
    """The token a command sends: ``--token``, else ``TIDEGATE_TOKEN``, else the data
    folder's ``admin-token`` file."""
    return args.token or os.environ.get(TOKEN_ENV, "") or read_token(args.data_dir)


def add_token_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``tidegate token create|list|revoke``: on the data folder itself, whether an engine
    serves it or not (the engine reads tokens at each call)."""
    command = sub.add_parser(
        "token", help="make, list or revoke admin API tokens (on the data folder, offline)"
    )
    actions = command.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="make a token and print it (shown only once)")
    create.add_argument("--name", required=True, help="a name for the token, unique")
    create.add_argument(
        "--role", required=True, choices=[r.label for r in Role], help="what it may call"
    )
    create.add_argument(
        "--expires-in", default=None, metavar="DURATION", help="e.g. 30d, 12h, 2w (default: never)"
    )
    create.set_defaults(func=run_token_create)
    listing = actions.add_parser("list", help="list tokens (never the tokens themselves)")
    listing.set_defaults(func=run_token_list)
    revoke = actions.add_parser("revoke", help="revoke a token by name")
    revoke.add_argument("--name", required=True, help="the token's name")
    revoke.set_defaults(func=run_token_revoke)
    for parser in (create, listing, revoke):
        parser.add_argument(
            "--data-dir",
            type=Path,
            default=DEFAULT_DATA_DIR,
            help=f"the data folder (default ./{DEFAULT_DATA_DIR})",
        )


def _on_state(data_dir: Path, job: Callable[[sqlite3.Connection], T], create: bool = False) -> T:
    """Runs ``job`` in one transaction on the data folder's state database."""
    if not create and not (data_dir / STATE_FILE).exists():
        raise TidegateError(f"data folder {data_dir} holds no Tidegate state database")
    if data_dir.exists():
        prepare(data_dir, migrate_now=False)  # a folder that needs migrating is refused
    else:
        data_dir.mkdir(parents=True, mode=0o700)

    async def run() -> T:
        db = Database(data_dir / STATE_FILE, create=create)
        await db.start()
        try:
            return await db.write(job)
        finally:
            await db.close()

    return asyncio.run(run())


def _cli_audit(c: sqlite3.Connection, method: str, target: str, fields: dict[str, str]) -> None:
    audit.record(
        c,
        token_name=audit.CLI_PEER,
        method=method,
        target=target,
        fields=fields,
        outcome="OK",
        peer=f"{audit.CLI_PEER}, user {getpass.getuser()}",
    )


def run_token_create(args: argparse.Namespace) -> int:
    role = Role.parse(args.role)
    expires_in = (
        None if args.expires_in is None else tokens.parse_duration(args.expires_in, "--expires-in")
    )

    def create(c: sqlite3.Connection) -> tuple[str, tokens.TokenInfo]:
        made = tokens.create_token(c, args.name, role, expires_in)
        fields = {"name": args.name, "role": role.label}
        if args.expires_in is not None:
            fields["expires_in"] = args.expires_in
        _cli_audit(c, "tidegate token create", f"token {args.name}", fields)
        return made

    token, info = _on_state(args.data_dir, create, create=True)
    print(token)
    expiry = "never expires" if info.expire_time is None else f"expires {_when(info.expire_time)}"
    print(
        f"tidegate token: made token {info.name!r} ({info.role.label}, {expiry}); it is shown"
        " only this once",
        file=sys.stderr,
    )
    return 0


def add_secrets_command(sub: Any) -> None:
    secrets = sub.add_parser(
        "secrets",
        help="manage the master key that encrypts the stored API keys",
    )
    actions = secrets.add_subparsers(dest="secrets_command", required=True, metavar="ACTION")
    rotate = actions.add_parser(
        "rotate",
        help="re-encrypt every stored API key under a new master key (engine stopped)",
        description="Generates a new master key, re-encrypts every stored API key under it"
        " in one transaction, then replaces <data-dir>/secret.key; safe to interrupt (run it"
        f" again to finish). With {SECRET_KEY_ENV} set, the new key is its first one (give"
        " 'NEW,OLD') and no file is written. Stop `tidegate serve` on the folder first.",
    )
    rotate.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help=f"the data folder (default ./{DEFAULT_DATA_DIR})",
    )
    rotate.set_defaults(func=run_secrets_rotate)


def run_secrets_rotate(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir
    target = serving_engine(data_dir)
    if target is not None:
        print(
            f"tidegate secrets rotate: an engine serves {data_dir} (gRPC {target}): stop it"
            " first; the running engine holds the old key and would keep writing with it",
            file=sys.stderr,
        )
        return 1
    done = rotate_secrets(data_dir)
    print(
        f"tidegate secrets rotate: {done.api_keys} API key(s) re-encrypted under the new"
        f" key in {done.key_in}"
        + (
            f"; drop the old key from {SECRET_KEY_ENV} once every engine uses the new one"
            if done.key_in == SECRET_KEY_ENV
            else ""
        ),
        file=sys.stderr,
    )
    return 0


def run_token_list(args: argparse.Namespace) -> int:
    now = time.time()
    print(
        f"{'NAME':<24} {'ROLE':<9} {'ID':<13} {'CREATED':<21} {'EXPIRES':<21}"
        f" {'LAST USED':<21} STATE"
    )
    for t in _on_state(args.data_dir, tokens.list_tokens):
        state = (
            "revoked" if t.revoke_time is not None else ("active" if t.usable(now) else "expired")
        )
        print(
            f"{t.name:<24} {t.role.label:<9} {t.id:<13} {_when(t.create_time):<21}"
            f" {_when(t.expire_time):<21} {_when(t.last_used_time):<21} {state}"
        )
    return 0


def run_token_revoke(args: argparse.Namespace) -> int:
    def revoke(c: sqlite3.Connection) -> tokens.TokenInfo:
        info = tokens.revoke_token(c, args.name)
        _cli_audit(c, "tidegate token revoke", f"token {args.name}", {"name": args.name})
        return info

    info = _on_state(args.data_dir, revoke)
    print(f"tidegate token: revoked token {info.name!r} ({info.role.label})", file=sys.stderr)
    return 0


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _metrics_address(config: EngineConfig, engine: Engine) -> str:
    """The start line's ending: where Prometheus scrapes (the line's other parts keep
    their order; bench and tests read them)."""
    if config.metrics_port is None:
        return ", metrics off"
    return f", metrics on http://{config.host}:{engine.metrics_port}/metrics"


def _ui_address(config: EngineConfig, engine: Engine) -> str:
    """The start line's last part: where the outbound-log page is."""
    if config.ui_port is None:
        return ""
    scheme = "http" if config.tls is None else "https"
    return f", page on {scheme}://{config.host}:{engine.ui_port}/"


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
    except TidegateError as exc:  # a plugin that breaks the contract
        print(f"tidegate: {exc}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    os.umask(0o077)  # every file a command writes in a data folder or backup is private
    configure_logging(args.log_format, args.log_level)
    try:
        return int(args.func(args) or 0)
    except TidegateError as exc:
        print(f"tidegate: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
