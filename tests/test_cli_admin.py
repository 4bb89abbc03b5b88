"""``tidegate connections|mappings|logs|dead-letters|tokens``: the real ``tidegate``
command, as a subprocess, against a real in-process engine (gRPC on 127.0.0.1) and the
Insider sandbox. Expected values come from what each test sent, never from the CLI."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pty
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.client import TidegateClient, read_token
from engine.app import Engine, EngineConfig
from engine.cli import build_parser
from engine.cli_admin import log_filter
from engine.errors import TidegateError
from engine.outbound_log.rows import LogCustomer, LogRow, new_request_id
from engine.pb import connections_pb2 as cpb
from engine.security import TlsFiles
from plugins.insider.sandbox import RunningSandbox
from tests.certs import make_certs
from tests.conftest import engine_client, eventually, insider_connection, post_events
from tests.ui_support import row as log_row
from tests.ui_support import write

BIN = Path(sys.executable).parent
CONNECTION = "insider-main"


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self.err
        return json.loads(self.out)


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TIDEGATE_TOKEN", "NO_COLOR")}
    return {**env, **extra}


def engine_flags(engine: Engine) -> list[str]:
    return ["--target", f"127.0.0.1:{engine.grpc_port}", "--data-dir", str(engine.config.data_dir)]


async def tidegate(*args: str, env: dict[str, str] | None = None, stdin: bytes = b"") -> Ran:
    """Runs ``tidegate ARGS`` without blocking the engine that serves in this loop."""
    process = await asyncio.create_subprocess_exec(
        str(BIN / "tidegate"),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env or cli_env(),
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), 60)
    ran = Ran(process.returncode or 0, out.decode(), err.decode())
    assert "Traceback" not in ran.err, ran.err
    return ran


async def on(engine: Engine, *args: str, **kwargs: Any) -> Ran:
    """``tidegate ARGS`` against ``engine``, with its admin token (from its data folder)."""
    return await tidegate(*args, *engine_flags(engine), **kwargs)


async def fault(http: aiohttp.ClientSession, sandbox: RunningSandbox, **body: Any) -> None:
    async with http.post(f"{sandbox.url}/sandbox/faults", json=body) as r:
        assert r.status == 200, await r.text()


async def drained(client: TidegateClient) -> cpb.Connection:
    async def empty() -> bool:
        return (await client.get_connection(CONNECTION)).queue_depth == 0

    await eventually(empty)
    return await client.get_connection(CONNECTION)


async def log_rows(client: TidegateClient, count: int) -> None:
    async def enough() -> bool:
        return len((await client.list_logs(page_size=1000)).logs) >= count

    await eventually(enough)


def point(customer: str, n: int) -> dict[str, Any]:
    return {"customer": customer, "action": "point_add", "data": {"points": n}}


def profile(customer: str, email: str, **data: Any) -> dict[str, Any]:
    return {"customer": customer, "action": "profile", "data": {"email": email, **data}}


# -- connections and mappings ------------------------------------------------------------


async def test_connections_list_get_and_resume_a_paused_connection(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    quiet = (await on(engine, "connections", "get", CONNECTION)).out.splitlines()
    assert [line.split(":", 1)[1].strip() for line in quiet if line.startswith("last ")] == [
        "none in the last day",
        "none in the last day",
    ]
    await fault(http, sandbox, status=401, count=1)  # Insider refuses the key once
    await post_events(http, engine, point("ann", 5))

    async def paused() -> bool:
        return (await client.get_connection(CONNECTION)).state == cpb.CONNECTION_STATE_PAUSED

    await eventually(paused)

    listed = (await on(engine, "connections", "list", "--output", "json")).json()
    [row] = listed["connections"]
    assert row["id"] == CONNECTION and row["state"] == "CONNECTION_STATE_PAUSED"
    assert row["queueDepth"] == "1" and row["stateReason"]
    table = await on(engine, "connections", "list")
    [header, line] = table.out.splitlines()
    assert header.split()[:3] == ["ID", "CONNECTOR", "STATE"]
    assert line.split()[:4] == [CONNECTION, "insider", "paused", "1"]
    assert "\033[" not in table.out  # not a terminal: no colour

    shown = await on(engine, "connections", "get", CONNECTION)
    fields = dict(line.split(":", 1) for line in shown.out.splitlines())
    assert fields["state"].strip().startswith("paused (")
    assert fields["setting partner_name"].strip() == "acme"
    assert fields["api key"].strip() == "****6789"  # the hint, never the key
    assert "ucd-secret-key" not in shown.out

    resumed = await on(engine, "connections", "resume", CONNECTION, "--output", "json")
    assert resumed.json()["state"] == "CONNECTION_STATE_ACTIVE"
    assert (await drained(client)).state == cpb.CONNECTION_STATE_ACTIVE
    assert sandbox.state.lookup("uuid", "ann") is not None  # the probe delivered the item

    await log_rows(client, 2)  # the 401, then the probe's 200
    [ok, refused] = (await client.list_logs()).logs
    shown = await on(engine, "connections", "get", CONNECTION)
    fields = {k: v.strip() for k, v in (line.split(":", 1) for line in shown.out.splitlines())}
    assert fields["state"] == "active"
    assert fields["last success"].endswith(f" 200 ({ok.id})")
    assert fields["last error"].split()[2] == "401" and fields["last error"].endswith(
        f"({refused.id})"
    )


async def test_mappings_list_shows_profile_and_event_mappings(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox
) -> None:
    await insider_connection(client, sandbox)
    await insider_connection(client, sandbox, connection_id="second")
    await client.create_profile_mapping("second", "city", "city_name", custom=True)

    every = (await on(engine, "mappings", "list", "--output", "json")).json()
    assert sorted(c["connectionId"] for c in every["connections"]) == [CONNECTION, "second"]
    one = (
        await on(engine, "mappings", "list", "--connection", "second", "--output", "json")
    ).json()
    [second] = one["connections"]
    pairs = {
        (m["sourceAttribute"], m["targetAttribute"], m["custom"]) for m in second["profileMappings"]
    }
    assert pairs == {
        ("email", "email", False),
        ("first_name", "name", False),
        ("last_name", "surname", False),
        ("tier", "loyalty_tier", True),
        ("city", "city_name", True),
    }
    events = {m["sourceEvent"]: m for m in second["eventMappings"]}
    assert events["checkout"]["targetEvent"] == "purchase"
    assert {p["sourceParameter"] for p in events["checkout"]["parameters"]} == {
        "transaction_id",
        "total",
        "currency",
        "channel",
    }
    table = (await on(engine, "mappings", "list", "--connection", "second")).out.splitlines()
    assert table[0].split() == ["CONNECTION", "KIND", "ID", "SOURCE", "TARGET", "DETAILS"]
    rows = [line.split() for line in table[1:]]
    assert ["second", "profile"] == rows[0][:2]
    assert any(r[1] == "profile" and r[3:6] == ["city", "city_name", "(custom)"] for r in rows)
    assert any(
        r[1] == "event"
        and r[3:5] == ["point_add", "loyalty_points_earned"]
        and "points->points*" in r
        for r in rows
    )


# -- logs ------------------------------------------------------------------------------


async def test_logs_search_with_criteria_returns_the_requests_sent(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    await post_events(http, engine, point("ann", 1))
    await drained(client)
    await fault(http, sandbox, status=400, count=1)  # refused as a whole: a dead letter
    await post_events(http, engine, point("bob", 2))
    await drained(client)
    await post_events(http, engine, point("cid", 3))
    await drained(client)
    await log_rows(client, 3)

    async def search(*criteria: str) -> list[dict[str, Any]]:
        logs: list[dict[str, Any]] = (
            await on(engine, "logs", "search", "--output", "json", *criteria)
        ).json()["logs"]
        return logs

    def customers(rows: list[dict[str, Any]]) -> list[str]:
        return [c["customerId"] for r in rows for c in r["customers"]]

    assert customers(await search()) == ["cid", "bob", "ann"]  # newest first
    assert customers(await search("--customer", "ann")) == ["ann"]
    failed = await search("--status", "4xx")
    assert customers(failed) == ["bob"] and failed[0]["statusCode"] == 400
    assert customers(await search("--status", "200,503")) == ["cid", "ann"]
    assert customers(await search("--errors-only")) == ["bob"]
    assert await search("--status", "2xx", "--customer", "bob") == []
    assert customers(await search("--connection", CONNECTION, "--since", "1h")) == [
        "cid",
        "bob",
        "ann",
    ]
    assert await search("--connection", "other") == []
    assert await search("--end", "2020-01-01T00:00:00Z") == []
    bob = failed[0]["id"]
    assert customers(await search("--identifier", bob)) == ["bob"]
    assert customers(await search("--error", failed[0]["error"][:12].upper())) == ["bob"]

    # --limit stops the paging; the page token goes on from there.
    first = (await on(engine, "logs", "search", "--limit", "2", "--output", "json")).json()
    assert customers(first["logs"]) == ["cid", "bob"] and first["nextPageToken"]
    rest = await search("--page-token", first["nextPageToken"])
    assert customers(rest) == ["ann"]

    table = await on(engine, "logs", "search", "--customer", "bob")
    [header, row] = table.out.splitlines()
    assert header.split()[:4] == ["TIME", "(UTC)", "STATUS", "SECONDS"]
    assert bob in row and " 400 " in row and "bob" in row


async def test_logs_get_shows_pretty_bodies_and_each_customers_outcome(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    tier = "platinum-" + "x" * 5000  # a body past what the table shows
    await post_events(
        http,
        engine,
        {"events": [profile("ann", "ann@example.com", tier=tier), profile("bob", "not-an-email")]},
    )
    await drained(client)
    await log_rows(client, 1)
    [entry] = (await client.list_logs()).logs

    shown = await on(engine, "logs", "get", entry.id)
    out = shown.out
    assert f"id:               {entry.id}" in out or entry.id in out.splitlines()[0]
    outcomes = {
        line.split()[0]: line.split()[2]
        for line in out.split("customers (2):")[1].split("request body:")[0].splitlines()[2:]
        if line.strip()
    }
    assert outcomes == {"ann": "delivered", "bob": "failed"}
    assert "not a valid email address" in out  # Insider's message for bob
    request = out.split("request body:")[1].split("response body:")[0]
    assert '\n          "uuid": "ann"' in request  # indented JSON, one key a line
    assert "more characters; --full shows them" in request
    response = out.split("response body:")[1]
    assert '"fail": {' in response

    whole = await on(engine, "logs", "get", entry.id, "--full")
    assert tier in whole.out and "--full shows them" not in whole.out

    document = (await on(engine, "logs", "get", entry.id, "--output", "json")).json()
    sent = json.loads(document["requestBody"])
    assert [u["identifiers"]["uuid"] for u in sent["users"]] == ["ann", "bob"]
    assert json.loads(document["responseBody"])["data"]["fail"]["count"] == 1


@pytest.mark.parametrize("output", ["json", "table"])
async def test_logs_tail_prints_a_row_delivered_after_it_started_and_ctrl_c_ends_it(
    engine: Engine,
    client: TidegateClient,
    sandbox: RunningSandbox,
    http: aiohttp.ClientSession,
    output: str,
) -> None:
    await insider_connection(client, sandbox)
    await post_events(http, engine, point("before", 1))
    await drained(client)
    await log_rows(client, 1)

    def default_sigint() -> None:  # Ctrl-C must reach it even if this run ignores SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    tail = await asyncio.create_subprocess_exec(
        str(BIN / "tidegate"),
        "logs",
        "tail",
        "--output",
        output,
        "--customer",
        "after",
        *engine_flags(engine),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
        preexec_fn=default_sigint,
    )
    assert tail.stdout is not None and tail.stderr is not None
    try:
        started = await asyncio.wait_for(tail.stderr.readline(), 30)
        assert b"following the outbound log" in started, started  # subscribed by now
        await post_events(http, engine, {"events": [point("other", 2), point("after", 3)]})
        line = await asyncio.wait_for(tail.stdout.readline(), 30)
        if output == "json":  # one object a line
            row = json.loads(line)
            assert row["customers"][0]["customerId"] == "after" and row["statusCode"] == 200
        else:  # the header, then the row
            assert line.split()[:3] == [b"TIME", b"(UTC)", b"STATUS"]
            cells = (await asyncio.wait_for(tail.stdout.readline(), 30)).split()
            # time (2 cells), status, seconds, the customer (+N when batched with "other")
            assert cells[2] == b"200" and cells[4] == b"after" and CONNECTION.encode() in cells
        tail.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(tail.wait(), 30)
    finally:
        if tail.returncode is None:
            tail.kill()
            await tail.wait()
    rest = (await tail.stdout.read()).decode()
    assert code == 0
    assert rest == ""  # "before" was logged before the tail started: never printed
    assert "Traceback" not in (await tail.stderr.read()).decode()


# -- dead letters ------------------------------------------------------------------------


async def test_dead_letters_dry_run_counts_what_the_replay_then_replays(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    bad = ["bad1", "bad2", "bad3"]
    await post_events(
        http,
        engine,
        {
            "events": [profile(c, f"{c}-at-example") for c in bad]
            + [profile("ok", "ok@example.com")]
        },
    )
    await drained(client)

    async def three() -> bool:
        return (await client.get_connection(CONNECTION)).dead_letter_count == 3

    await eventually(three)

    listed = (await on(engine, "dead-letters", "list", "--output", "json")).json()["deadLetters"]
    assert sorted(d["customerId"] for d in listed) == bad
    assert {d["stage"] for d in listed} == {"destination"}
    one = (
        await on(engine, "dead-letters", "list", "--customer", "bad2", "--output", "json")
    ).json()
    assert [d["customerId"] for d in one["deadLetters"]] == ["bad2"]
    table = (await on(engine, "dead-letters", "list")).out.splitlines()
    assert table[0].split()[:3] == ["ID", "FAILED", "(UTC)"] and len(table) == 4

    dry = (
        await on(
            engine,
            "dead-letters",
            "replay",
            "--connection",
            CONNECTION,
            "--dry-run",
            "--output",
            "json",
        )
    ).json()
    assert dry["dryRun"] is True and dry["matched"] == 3

    # No terminal and no --yes: refused, nothing replayed.
    refused = await on(engine, "dead-letters", "replay", "--connection", CONNECTION)
    assert refused.code == 1 and "--yes" in refused.err
    assert (await client.get_connection(CONNECTION)).dead_letter_count == 3

    before = len(sandbox.state.requests)
    done = (
        await on(
            engine,
            "dead-letters",
            "replay",
            "--connection",
            CONNECTION,
            "--yes",
            "--output",
            "json",
        )
    ).json()
    assert done["dryRun"] is False and done["replayed"] == dry["replayed"] == 3
    await drained(client)

    async def sent_again() -> bool:
        return len(sandbox.state.requests) > before

    await eventually(sent_again)
    again = [
        u["identifiers"]["uuid"]
        for r in sandbox.state.requests[before:]
        for u in r["body"]["users"]
    ]
    assert sorted(again) == bad

    # A replay by id of one of the new dead letters, with the table's words.
    [first, *_] = (
        await on(engine, "dead-letters", "list", "--customer", "bad1", "--output", "json")
    ).json()["deadLetters"]
    by_id = await on(engine, "dead-letters", "replay", "--id", str(first["id"]), "--yes")
    assert by_id.code == 0 and by_id.out.startswith("replayed 1 of 1 ")
    nothing = await on(engine, "dead-letters", "replay", "--id", "999999", "--dry-run")
    assert nothing.out.startswith("dry run: 0 dead letter(s) match")


# -- tokens ----------------------------------------------------------------------------------


async def test_tokens_create_list_and_revoke_over_the_api(engine: Engine) -> None:
    made = await on(
        engine, "tokens", "create", "--name", "ci", "--role", "viewer", "--expires-in", "1d"
    )
    assert made.code == 0, made.err
    token = made.out.strip()
    assert token.startswith("tg_") and "shown only this once" in made.err
    assert token not in made.err

    listed = (await on(engine, "tokens", "list", "--output", "json")).json()["tokens"]
    ci = next(t for t in listed if t["name"] == "ci")
    assert ci["role"] == "TOKEN_ROLE_VIEWER" and "expireTime" in ci
    assert token not in json.dumps(listed)

    as_viewer = ["--target", f"127.0.0.1:{engine.grpc_port}", "--token", token]
    assert (await tidegate("connections", "list", *as_viewer)).code == 0
    weak = await tidegate("tokens", "list", *as_viewer)
    assert weak.code == 1 and "role does not allow it" in weak.err

    revoked = await on(engine, "tokens", "revoke", "--name", "ci")
    assert revoked.code == 0 and "revoked token 'ci'" in revoked.err
    gone = await tidegate("connections", "list", *as_viewer)
    assert gone.code == 1 and "refused the token" in gone.err
    again = await on(engine, "tokens", "revoke", "--name", "ci")
    assert again.code == 1 and "NOT_FOUND" in again.err

    # The environment variable serves as well as the flag.
    env = cli_env(TIDEGATE_TOKEN=read_token(engine.config.data_dir))
    assert (
        await tidegate(
            "tokens",
            "list",
            "--target",
            f"127.0.0.1:{engine.grpc_port}",
            "--data-dir",
            "/nonexistent",
            env=env,
        )
    ).code == 0


async def test_help_says_which_token_command_is_offline_and_which_calls_the_engine() -> None:
    text = (await tidegate("--help", env=cli_env(COLUMNS="300"))).out  # a line each
    token = next(line for line in text.splitlines() if line.strip().startswith("token "))
    tokens = next(line for line in text.splitlines() if line.strip().startswith("tokens "))
    assert "offline" in token
    assert "admin API" in tokens


# -- exit codes and errors ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_exit_codes_and_one_line_errors(engine: Engine, tmp_path: Path) -> None:
    nowhere = await tidegate(
        "connections", "list", "--target", f"127.0.0.1:{free_port()}", "--token", "tg_x_y"
    )
    assert nowhere.code == 1 and "cannot reach the engine" in nowhere.err
    wrong = await tidegate(
        "logs",
        "search",
        "--target",
        f"127.0.0.1:{engine.grpc_port}",
        "--token",
        "tg_000000000000_wrong",
    )
    assert wrong.code == 1 and "refused the token" in wrong.err and "wrong" not in wrong.err

    unknown = await on(engine, "connections", "get", "no-such-connection")
    assert unknown.code == 1 and "'no-such-connection' does not exist" in unknown.err
    missing_log = await on(engine, "logs", "get", "01a24d48-0000-7000-8000-000000000000")
    assert missing_log.code == 1 and "NOT_FOUND" in missing_log.err
    assert (await on(engine, "connections", "resume", "no-such-connection")).code == 1

    for flags, named in [
        (["--status", "6xx"], "--status"),
        (["--status", "700"], "--status"),
        (["--start", "yesterday"], "--start"),
        (["--start", "2026-12-06T18:00:00"], "--start"),
        (["--since", "soon"], "--since"),
        (["--since", "99999999999w"], "--since"),
        (["--start", "9999-12-31T23:59:59-14:00"], "--start"),
        (["--end", "0001-01-01T00:00:00+01:00"], "--end"),
        (["--start", "2026-12-06T18:00:00Z", "--end", "2026-12-06T17:00:00Z"], "--end"),
    ]:
        bad = await on(engine, "logs", "search", *flags)
        assert bad.code == 1, flags
        assert bad.err.startswith(f"tidegate: {named}") and bad.err.count("\n") == 1, bad.err
    long = await on(engine, "logs", "search", "--status", "9" * 500)
    assert long.code == 1 and len(long.err) < 300  # the echo of what was typed is cut

    garbled = await tidegate("connections", "list", "--target", "http://" + "h" * 400)
    assert garbled.code == 1 and garbled.err.startswith("tidegate: --target: ")
    assert len(garbled.err) < 300

    nothing = await on(engine, "dead-letters", "replay")
    assert nothing.code == 1 and "--id" in nothing.err

    for usage in (
        ["logs", "search", "--limit", "0"],
        ["connections", "get"],
        ["logs", "search", "--since", "1h", "--start", "2026-12-06T18:00:00Z"],
        ["dead-letters", "replay", "--id", "x"],
        ["logs", "search", "--output", "xml"],
    ):
        ran = await tidegate(*usage)
        assert ran.code == 2, usage
        assert ran.err.startswith("usage: tidegate")


# -- colour ------------------------------------------------------------------------------------


async def test_status_codes_are_coloured_on_a_terminal_unless_no_color(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    await post_events(http, engine, point("ann", 1))
    await drained(client)
    await log_rows(client, 1)

    async def on_terminal(env: dict[str, str]) -> str:
        leader, follower = pty.openpty()
        process = await asyncio.create_subprocess_exec(
            str(BIN / "tidegate"),
            "logs",
            "search",
            *engine_flags(engine),
            stdout=follower,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        os.close(follower)
        await asyncio.wait_for(process.wait(), 60)
        chunks = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: all read
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(leader)
        assert process.returncode == 0
        return b"".join(chunks).decode()

    coloured = await on_terminal(cli_env())
    assert "\033[32m200" in coloured  # 2xx in green
    plain = await on_terminal(cli_env(NO_COLOR="1"))
    assert " 200 " in plain and "\033[" not in plain


async def test_replay_asks_on_a_terminal_and_only_yes_replays(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    await post_events(http, engine, {"events": [profile(c, f"{c}-at") for c in ("d1", "d2")]})

    async def two() -> bool:
        return (await client.get_connection(CONNECTION)).dead_letter_count == 2

    await eventually(two)

    async def answering(answer: bytes) -> Ran:
        leader, follower = pty.openpty()
        process = await asyncio.create_subprocess_exec(
            str(BIN / "tidegate"),
            "dead-letters",
            "replay",
            "--customer",
            "d1",
            *engine_flags(engine),
            stdin=follower,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=cli_env(),
        )
        os.close(follower)
        assert process.stderr is not None
        try:
            prompt = await asyncio.wait_for(process.stderr.readuntil(b"[y/N] "), 30)
            assert b"Replay 1 dead letter(s)" in prompt
            os.write(leader, answer)
            out, err = await asyncio.wait_for(process.communicate(), 30)
        finally:
            os.close(leader)
        return Ran(process.returncode or 0, out.decode(), err.decode())

    declined = await answering(b"n\n")
    assert declined.code == 1 and "nothing was replayed" in declined.err
    assert (await client.get_connection(CONNECTION)).dead_letter_count == 2
    accepted = await answering(b"y\n")
    assert accepted.code == 0 and accepted.out.startswith("replayed 1 of 1 "), accepted.err

    async def d1_sent_again() -> bool:
        return (
            sum(
                u["identifiers"]["uuid"] == "d1"
                for r in sandbox.state.requests
                for u in r["body"]["users"]
            )
            == 2
        )

    await eventually(d1_sent_again)


async def test_logs_search_pages_through_the_log_up_to_the_limit(engine: Engine) -> None:
    """More rows than one page (1,000) holds: the command follows the page tokens."""
    start = datetime.now(UTC) - timedelta(hours=1)
    sent = []
    for n in range(1203):
        at = start + timedelta(milliseconds=n)
        row = LogRow(
            id=new_request_id(at=at),
            time=at,
            connection_id=CONNECTION,
            method="POST",
            url="https://unification.useinsider.com/api/user/v1/upsert",
            status_code=200,
            response_time=0.1,
            error="",
            customers=(LogCustomer(f"cust-{n}"),),
            mapping_version=1,
        )
        sent.append(row.id)
        await engine.logs.append(row)
    await engine.logs.flush()

    every = (await on(engine, "logs", "search", "--limit", "5000", "--output", "json")).json()
    assert [e["id"] for e in every["logs"]] == sent[::-1] and every["nextPageToken"] == ""
    some = (await on(engine, "logs", "search", "--limit", "1100", "--output", "json")).json()
    assert [e["id"] for e in some["logs"]] == sent[::-1][:1100] and some["nextPageToken"]
    rest = await on(
        engine,
        "logs",
        "search",
        "--page-token",
        some["nextPageToken"],
        "--limit",
        "5000",
        "--output",
        "json",
    )
    assert [e["id"] for e in rest.json()["logs"]] == sent[::-1][1100:]


async def test_a_long_replay_goes_in_calls_of_a_thousand_with_progress(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    await insider_connection(client, sandbox)
    customers = [f"many-{n}" for n in range(1001)]
    status, _ = await post_events(
        http, engine, {"events": [profile(c, f"{c}-at-example") for c in customers]}
    )
    assert status == 202

    async def all_dead() -> bool:
        return (await client.get_connection(CONNECTION)).dead_letter_count == 1001

    await eventually(all_dead, within=60)
    before = len(sandbox.state.requests)
    ran = await on(engine, "dead-letters", "replay", "--connection", CONNECTION, "--yes")
    assert ran.code == 0, ran.err
    assert ran.out.startswith("replayed 1001 of 1001 ")
    progress = [line for line in ran.err.splitlines() if " done, " in line]
    assert progress == [
        "tidegate dead-letters replay: 1000 of 1001 done, 1000 replayed",
        "tidegate dead-letters replay: 1001 of 1001 done, 1001 replayed",
    ]

    async def sent_again() -> bool:
        users = [u for r in sandbox.state.requests[before:] for u in r["body"]["users"]]
        return len(users) == 1001

    await eventually(sent_again, within=60)
    again = {
        u["identifiers"]["uuid"]
        for r in sandbox.state.requests[before:]
        for u in r["body"]["users"]
    }
    assert again == set(customers)


@settings(max_examples=300, deadline=None)
@given(
    flag=st.sampled_from(["--status", "--since", "--start", "--end", "--customer", "--error"]),
    value=st.text(min_size=1, max_size=300).filter(lambda v: not v.startswith("-")),
)
def test_any_filter_value_is_a_filter_or_one_clear_error(flag: str, value: str) -> None:
    """What a person may type: a filter comes out, or a TidegateError naming the flag and
    quoting at most 100 characters of the value; nothing else (no traceback)."""
    args = build_parser().parse_args(["logs", "search", flag, value])
    try:
        log_filter(args)
    except TidegateError as exc:
        message = str(exc)
        assert message.startswith(flag) or message.startswith("--end must be after")
        assert len(message) < 300


async def test_logs_tail_reconnects_after_an_engine_restart_without_gap_or_repeat(
    engine_config: EngineConfig, sandbox: RunningSandbox, http: aiohttp.ClientSession
) -> None:
    config = replace(engine_config, grpc_port=free_port())  # the same address after restart
    first = Engine(config)
    await first.start()
    second: Engine | None = None
    tail: asyncio.subprocess.Process | None = None
    try:
        async with engine_client(first) as admin:
            await insider_connection(admin, sandbox)

        def default_sigint() -> None:
            signal.signal(signal.SIGINT, signal.SIG_DFL)

        tail = await asyncio.create_subprocess_exec(
            str(BIN / "tidegate"),
            "logs",
            "tail",
            "--output",
            "json",
            *engine_flags(first),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=cli_env(),
            preexec_fn=default_sigint,
        )
        assert tail.stdout is not None and tail.stderr is not None

        async def said(text: bytes) -> None:
            assert tail is not None and tail.stderr is not None
            line = await asyncio.wait_for(tail.stderr.readline(), 60)
            assert text in line, line

        async def next_customer() -> str:
            assert tail is not None and tail.stdout is not None
            line = await asyncio.wait_for(tail.stdout.readline(), 60)
            return str(json.loads(line)["customers"][0]["customerId"])

        await said(b"following the outbound log")
        await post_events(http, first, point("one", 1))
        assert await next_customer() == "one"

        await first.stop(grace=1.0)
        await said(b"the stream ended")
        second = Engine(config)
        await second.start()
        # Logged while the tail is away (or just back): it comes once, from the list or
        # from the stream.
        await post_events(http, second, point("two", 2))
        assert await next_customer() == "two"
        await said(b"following again")
        await post_events(http, second, point("three", 3))
        assert await next_customer() == "three"

        tail.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(tail.wait(), 30) == 0
        assert await tail.stdout.read() == b""  # nothing twice
        assert b"Traceback" not in await tail.stderr.read()
    finally:
        if tail is not None and tail.returncode is None:
            tail.kill()
            await tail.wait()
        await (second or first).stop(grace=1.0)


async def test_the_commands_speak_mutual_tls_with_the_flags_config_uses(
    engine_config: EngineConfig, tmp_path: Path
) -> None:
    certs = make_certs(tmp_path / "certs")
    engine = Engine(
        replace(engine_config, tls=TlsFiles(certs.server_cert, certs.server_key, certs.ca))
    )
    await engine.start()
    try:
        tls = ["--tls-ca", str(certs.ca)]
        client = [
            "--tls-client-cert",
            str(certs.client_cert),
            "--tls-client-key",
            str(certs.client_key),
        ]
        listed = await on(engine, "tokens", "list", "--output", "json", *tls, *client)
        assert [t["name"] for t in listed.json()["tokens"]] == ["bootstrap-admin"]
        plain = await on(engine, "tokens", "list")
        assert plain.code == 1 and "cannot reach the engine" in plain.err
        half = await on(engine, "tokens", "list", *tls, "--tls-client-cert", str(certs.client_cert))
        assert half.code == 1 and "go together" in half.err
    finally:
        await engine.stop(grace=1.0)


def test_the_readme_documents_every_admin_command_and_flag() -> None:
    """The README's "The CLI" names each command, and each of its flags somewhere."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## The CLI\n", 1)[1].split("\n## ", 1)[0]
    parser = build_parser()
    top = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    shared = {
        "--output",
        "--target",
        "--token",
        "--data-dir",
        "--tls-ca",
        "--tls-client-cert",
        "--tls-client-key",
        "--help",
        "-h",
    }
    for name in ("connections", "mappings", "logs", "dead-letters", "tokens"):
        command = top.choices[name]
        actions = next(a for a in command._actions if isinstance(a, argparse._SubParsersAction))
        for action, leaf in actions.choices.items():
            assert f"`{name} {action}" in section, f"{name} {action}"
            for flag in (o for a in leaf._actions for o in a.option_strings):
                if flag not in shared:
                    assert f"`{flag}" in section, f"{name} {action} {flag}"
    for flag in shared - {"--help", "-h"}:
        assert f"`{flag}" in section, flag


async def test_logs_search_takes_tags(engine: Engine) -> None:
    plain, replayed, backfilled = (
        log_row("dee"),
        log_row("eve", tags="replay"),
        log_row("fay", tags="backfill,replay"),
    )
    await write(engine, plain, replayed, backfilled)

    async def ids(*criteria: str) -> list[str]:
        found = (await on(engine, "logs", "search", "--output", "json", *criteria)).json()
        return [r["id"] for r in found["logs"]]

    assert set(await ids("--tag", "replay")) == {replayed.id, backfilled.id}
    assert await ids("--tag", "backfill") == [backfilled.id]
    assert set(await ids("--tag", "backfill", "--tag", "erasure")) == {backfilled.id}
    refused = await on(engine, "logs", "search", "--tag", "Not A Tag")
    assert refused.code == 1 and "not a tag" in refused.err
