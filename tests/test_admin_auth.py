"""Admin API authentication and roles over a real gRPC server: every RPC needs a token
except health and reflection; a missing, wrong, revoked or expired token is
UNAUTHENTICATED and a weaker role PERMISSION_DENIED, both with one fixed message; tokens
made and revoked by ``tidegate token`` while the engine serves take effect at once; the
audit trail records every change and never a secret."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import engine.pb
from clients.client import TidegateClient, read_token
from engine.admin.auth import ACCESS, OPEN_PREFIXES
from engine.app import Engine, EngineConfig
from engine.ingest.settings import IngestSettings
from engine.pb import audit_pb2 as apb
from engine.pb import audit_pb2_grpc, connections_pb2, tokens_pb2_grpc
from engine.pb import tokens_pb2 as tpb
from engine.state import tokens
from engine.state.audit import expire_audit_events
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import API_KEY, PARTNER, eventually, insider_connection
from tests.test_cli import BIN

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


def every_rpc() -> list[str]:
    """The full method name of every RPC of every service in the generated descriptors."""
    names = []
    folder = Path(engine.pb.__file__).parent
    for path in sorted(folder.glob("*_pb2.py")):
        module = __import__(f"engine.pb.{path.stem}", fromlist=["DESCRIPTOR"])
        for service in module.DESCRIPTOR.services_by_name.values():
            names += [f"/{service.full_name}/{m.name}" for m in service.methods]
    return names


def test_every_rpc_in_the_descriptors_has_a_role() -> None:
    rpcs = every_rpc()
    assert len(rpcs) >= 30  # every service was found
    assert [name for name in rpcs if name not in ACCESS] == []
    assert [name for name in ACCESS if name not in rpcs] == []  # no stale entries


def test_reads_are_viewer_changes_are_operator_or_admin() -> None:
    """The issue's roles: viewers read; operators also ingest, replay, resume; admins
    also change connections, keys, mappings, tokens, configuration and backups."""
    by_role: dict[str, set[str]] = {}
    for name, access in ACCESS.items():
        by_role.setdefault(access.role.label, set()).add(name.rsplit("/", 1)[1])
    assert by_role["operator"] == {"IngestEvents", "ReplayDeadLetters", "ResumeConnection"}
    assert {"CreateConnection", "UpdateConnection", "ApplyConfig", "CreateBackup"} <= (
        by_role["admin"]
    )
    assert {"CreateToken", "RevokeToken", "ListTokens", "ListAuditEvents"} <= by_role["admin"]
    assert all(
        name.startswith(("List", "Get", "Stream", "Export", "Preview"))
        for name in by_role["viewer"]
    )


def as_client(engine: Engine, token: str) -> TidegateClient:
    return TidegateClient(f"127.0.0.1:{engine.grpc_port}", token)


async def make_token(client: TidegateClient, name: str, role: int, expires: int = 0) -> str:
    stub = tokens_pb2_grpc.TokenServiceStub(client.channel)
    made = await stub.CreateToken(
        tpb.CreateTokenRequest(name=name, role=role, expires_in_seconds=expires)  # type: ignore[arg-type]
    )
    return made.token


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    return failure.value


@pytest.fixture
async def tokens_by_role(client: TidegateClient) -> AsyncIterator[dict[str, str]]:
    yield {
        "viewer": await make_token(client, "v", tpb.TOKEN_ROLE_VIEWER),
        "operator": await make_token(client, "o", tpb.TOKEN_ROLE_OPERATOR),
        "admin": await make_token(client, "a", tpb.TOKEN_ROLE_ADMIN),
    }


async def test_a_call_without_a_token_is_unauthenticated_health_and_reflection_are_open(
    engine: Engine,
) -> None:
    async with as_client(engine, "") as anonymous:
        failure = await refused(anonymous.list_connections())
        assert failure.code() == UNAUTHENTICATED
        assert "Bearer" in (failure.details() or "")
        health = health_pb2_grpc.HealthStub(anonymous.channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(anonymous.channel)
        call = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        services = [s.name async for r in call for s in r.list_services_response.service]
        assert "tidegate.admin.v1.TokenService" in services
    assert {p.split(".")[1] for p in OPEN_PREFIXES} == {"health", "reflection"}


async def test_wrong_revoked_expired_and_unknown_tokens_get_the_same_answer(
    engine: Engine, client: TidegateClient
) -> None:
    revoked = await make_token(client, "gone", tpb.TOKEN_ROLE_ADMIN)
    async with as_client(engine, revoked) as soon_revoked:
        await soon_revoked.list_connections()  # known good: remembered for a second
    stub = tokens_pb2_grpc.TokenServiceStub(client.channel)
    await stub.RevokeToken(tpb.RevokeTokenRequest(name="gone"))  # forgotten at once
    expired = await make_token(client, "short", tpb.TOKEN_ROLE_ADMIN, expires=1)
    good = read_token(engine.config.data_dir)
    tampered = good[:-1] + ("A" if good[-1] != "A" else "B")
    answers = set()
    for token in (
        revoked,
        expired,
        tampered,
        "tg_000000000000_" + "x" * 43,
        "nonsense",
        "x" * 5000,
    ):
        if token == expired:
            await asyncio.sleep(1.1)
        async with as_client(engine, token) as caller:
            failure = await refused(caller.list_connections())
            answers.add((failure.code(), failure.details()))
            failure = await refused(caller.list_logs())
            answers.add((failure.code(), failure.details()))
    assert len(answers) == 1
    (code, details), *_ = answers
    assert code == UNAUTHENTICATED
    assert "gone" not in (details or "") and "expired" not in (details or "")


async def test_each_role_may_call_its_rpcs_and_a_weaker_one_is_permission_denied(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, tokens_by_role: dict[str, str]
) -> None:
    await insider_connection(client, sandbox)
    event = [{"customer": "c1", "action": "point_add", "data": {"points": 1}}]
    async with as_client(engine, tokens_by_role["viewer"]) as viewer:
        assert len((await viewer.list_connections()).connections) == 1
        await viewer.list_logs()
        failure = await refused(viewer.send_events(event))
        assert failure.code() == DENIED
        assert failure.details() == "this token's role does not allow this call"
        failure = await refused(
            viewer.create_connection("x", api_key="k", settings={"partner_name": PARTNER})
        )
        assert failure.code() == DENIED
        stream = viewer.stream_logs()
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.2)
        assert not first.done()  # a viewer may stream
        first.cancel()
    async with as_client(engine, tokens_by_role["operator"]) as operator:
        assert (await operator.send_events(event)).accepted == 1
        await operator.connections.ResumeConnection(
            connections_pb2.ResumeConnectionRequest(id="insider-main")
        )
        failure = await refused(
            operator.create_connection("x", api_key="k", settings={"partner_name": PARTNER})
        )
        assert failure.code() == DENIED
        failure = await refused(
            tokens_pb2_grpc.TokenServiceStub(operator.channel).ListTokens(tpb.ListTokensRequest())
        )
        assert failure.code() == DENIED
    async with as_client(engine, tokens_by_role["admin"]) as admin:
        await admin.create_connection(
            "second", api_key=API_KEY, settings={"partner_name": PARTNER, "base_url": sandbox.url}
        )


async def test_a_stream_without_a_token_is_refused(engine: Engine) -> None:
    async with as_client(engine, "") as anonymous:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            async for _ in anonymous.stream_logs():
                pass
        assert failure.value.code() == UNAUTHENTICATED


async def test_list_tokens_never_shows_a_token_or_its_hash(
    engine: Engine, client: TidegateClient
) -> None:
    made = await make_token(client, "ci", tpb.TOKEN_ROLE_OPERATOR, expires=3600)
    listed = await tokens_pb2_grpc.TokenServiceStub(client.channel).ListTokens(
        tpb.ListTokensRequest()
    )
    text = str(listed)
    secret = made.split("_", 2)[2]  # tg_<id>_<secret>; the id is hex
    assert made not in text and secret not in text
    assert read_token(engine.config.data_dir) not in text
    assert tokens.token_hash(made).hex() not in text
    by_name = {t.name: t for t in listed.tokens}
    assert set(by_name) == {tokens.BOOTSTRAP_NAME, "ci"}
    assert by_name["ci"].role == tpb.TOKEN_ROLE_OPERATOR
    assert by_name["ci"].HasField("expire_time")
    assert not by_name[tokens.BOOTSTRAP_NAME].HasField("expire_time")
    assert made.startswith(f"tg_{by_name['ci'].id}_")
    assert len(secret) == 43  # 256 random bits, base64url


async def test_a_name_in_use_and_an_unset_role_are_refused(client: TidegateClient) -> None:
    stub = tokens_pb2_grpc.TokenServiceStub(client.channel)
    for request in (
        tpb.CreateTokenRequest(name=tokens.BOOTSTRAP_NAME, role=tpb.TOKEN_ROLE_VIEWER),
        tpb.CreateTokenRequest(name="x"),
        tpb.CreateTokenRequest(name="bad name", role=tpb.TOKEN_ROLE_VIEWER),
        tpb.CreateTokenRequest(name="y", role=tpb.TOKEN_ROLE_VIEWER, expires_in_seconds=-5),
    ):
        failure = await refused(stub.CreateToken(request))
        assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT, failure.details()
    failure = await refused(stub.RevokeToken(tpb.RevokeTokenRequest(name="nobody")))
    assert failure.code() == grpc.StatusCode.NOT_FOUND


async def test_last_used_is_written_once_a_minute_at_most(
    engine: Engine, client: TidegateClient
) -> None:
    token = await make_token(client, "ci", tpb.TOKEN_ROLE_VIEWER)
    stub = tokens_pb2_grpc.TokenServiceStub(client.channel)

    async def last_used() -> float | None:
        listed = await stub.ListTokens(tpb.ListTokensRequest())
        ci = next(t for t in listed.tokens if t.name == "ci")
        return ci.last_used_time.ToNanoseconds() / 1e9 if ci.HasField("last_used_time") else None

    assert await last_used() is None
    before = time.time()
    async with as_client(engine, token) as caller:
        await caller.list_connections()

        async def written() -> bool:
            return await last_used() is not None

        await eventually(written)
        first = await last_used()
        assert first is not None and before - 1 <= first <= time.time()
        for _ in range(5):
            await caller.list_connections()
        await asyncio.sleep(0.3)
        assert await last_used() == first


async def test_the_first_start_writes_an_admin_token_file_once(tmp_path: Path) -> None:
    config = EngineConfig(data_dir=tmp_path / "data", grpc_port=0, http_port=0)
    first = Engine(config)
    await first.start()
    try:
        path = tmp_path / "data" / "admin-token"
        assert first.admin_token_file == path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        token = path.read_text().strip()
        assert token.startswith("tg_")
        async with as_client(first, token) as admin:
            await admin.list_connections()
    finally:
        await first.stop(grace=0.5)
    path.unlink()  # gone: a restart does not make another, since a token exists
    second = Engine(config)
    await second.start()
    try:
        assert second.admin_token_file is None and not path.exists()
    finally:
        await second.stop(grace=0.5)


def tidegate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "tidegate"), *args], capture_output=True, text=True, timeout=60
    )


async def test_tokens_made_and_revoked_offline_work_at_once_on_a_serving_engine(
    engine: Engine,
) -> None:
    data_dir = str(engine.config.data_dir)
    made = await asyncio.to_thread(
        tidegate, "token", "create", "--name", "ci", "--role", "operator",
        "--expires-in", "30d", "--data-dir", data_dir,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("tg_") and "\n" not in token
    assert "shown only this once" in made.stderr and token not in made.stderr
    async with as_client(engine, token) as operator:
        await operator.send_events([{"customer": "c", "action": "x", "data": {}}])
        listing = await asyncio.to_thread(tidegate, "token", "list", "--data-dir", data_dir)
        assert listing.returncode == 0, listing.stderr
        line = next(row for row in listing.stdout.splitlines() if row.startswith("ci "))
        assert "operator" in line and "active" in line and token not in listing.stdout
        gone = await asyncio.to_thread(
            tidegate, "token", "revoke", "--name", "ci", "--data-dir", data_dir
        )
        assert gone.returncode == 0, gone.stderr

        async def refused_now() -> bool:
            try:
                await operator.list_connections()
            except grpc.aio.AioRpcError as failure:
                return failure.code() == UNAUTHENTICATED
            return False

        # Another process's revocation counts once the second the engine remembers a
        # token it found good (REMEMBER_SECONDS) is over.
        await eventually(refused_now, within=5)
    again = await asyncio.to_thread(
        tidegate, "token", "revoke", "--name", "ci", "--data-dir", data_dir
    )
    assert again.returncode == 1 and "no token named 'ci'" in again.stderr
    assert "Traceback" not in again.stderr


def test_token_commands_refuse_bad_input_clearly(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "data")
    for args, message in (
        (["--name", "a b", "--role", "admin"], "is not a token name"),
        (["--name", "x" * 300, "--role", "admin"], "(200 more characters)"),
        (["--name", "ok", "--role", "admin", "--expires-in", "3y"], "--expires-in: '3y'"),
    ):
        done = tidegate("token", "create", *args, "--data-dir", data_dir)
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    missing = tidegate("token", "list", "--data-dir", str(tmp_path / "none"))
    assert missing.returncode == 1 and "holds no Tidegate state" in missing.stderr


async def test_ingest_events_also_accepts_the_ingest_credential_and_nothing_else_does(
    tmp_path: Path,
) -> None:
    """The credential Antavo sends to the HTTP endpoint (here Bearer, configured as
    ``serve`` would) is taken for IngestEvents too, and for nothing else."""
    config = EngineConfig(
        data_dir=tmp_path / "data",
        grpc_port=0,
        http_port=0,
        ingest=IngestSettings.bearer("ingest-secret"),
    )
    running = Engine(config)
    await running.start()
    try:
        async with as_client(running, "ingest-secret") as sender:
            answer = await sender.send_events([{"customer": "c", "action": "x", "data": {}}])
            assert answer.accepted == 1
            failure = await refused(sender.list_connections())
            assert failure.code() == UNAUTHENTICATED
        async with as_client(running, "other") as stranger:
            failure = await refused(
                stranger.send_events([{"customer": "c", "action": "x", "data": {}}])
            )
            assert failure.code() == UNAUTHENTICATED
    finally:
        await running.stop(grace=0.5)


# -- the audit trail ----------------------------------------------------------------------


async def audit_events(client: TidegateClient, **filters: Any) -> list[apb.AuditEvent]:
    stub = audit_pb2_grpc.AuditServiceStub(client.channel)
    listed = await stub.ListAuditEvents(apb.ListAuditEventsRequest(page_size=1000, **filters))
    return list(listed.events)


async def test_every_change_is_audited_with_its_fields_and_never_a_secret(
    engine: Engine, client: TidegateClient, sandbox: RunningSandbox, tokens_by_role: dict[str, str]
) -> None:
    await insider_connection(client, sandbox)
    await client.connections.UpdateConnection(
        connections_pb2.UpdateConnectionRequest(
            connection=connections_pb2.Connection(
                id="insider-main", display_name="EU", api_key="new-secret-key-42"
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name", "api_key"]),
        )
    )
    failure = await refused(client.get_connection("nope"))  # a read: not audited
    assert failure.code() == grpc.StatusCode.NOT_FOUND
    await refused(client.create_connection("bad id!", api_key=API_KEY, settings={}))
    async with as_client(engine, tokens_by_role["viewer"]) as viewer:
        await refused(viewer.connections.DeleteConnection(
            connections_pb2.DeleteConnectionRequest(id="insider-main")
        ))  # fmt: skip
        await viewer.list_connections()

    events = await audit_events(client)
    methods = [e.method.rsplit("/", 1)[1] for e in reversed(events)]
    assert methods[:3] == ["CreateToken"] * 3  # the fixture's tokens, made with the admin's
    assert methods[3:] == [
        "CreateConnection",
        *["CreateProfileMapping"] * 4,
        *["CreateEventMapping"] * 2,
        "UpdateConnection",
        "CreateConnection",
        "DeleteConnection",
    ]
    created, update, bad, delete = (
        events[-4], events[2], events[1], events[0]
    )  # fmt: skip
    assert created.token_name == tokens.BOOTSTRAP_NAME
    assert created.target == "connection insider-main" and created.outcome == "OK"
    assert created.fields["connection.api_key"] == "(secret)"
    assert created.fields["connection.settings.partner_name"] == PARTNER
    assert created.peer.startswith("ipv4:127.0.0.1:")
    assert update.fields["connection.display_name"] == "EU"
    assert update.fields["connection.api_key"] == "(secret)"
    assert update.fields["update_mask"] == "display_name,api_key"
    assert bad.outcome.startswith("INVALID_ARGUMENT: connection.id")
    assert (delete.token_name, delete.outcome) == (
        "v",
        "PERMISSION_DENIED: this token's role does not allow this call",
    )
    text = str(events)
    for secret in (API_KEY, "new-secret-key-42", *tokens_by_role.values()):
        assert secret not in text
    with sqlite3.connect(engine.config.data_dir / "state.sqlite3") as db:
        stored = " ".join(str(row) for row in db.execute("SELECT * FROM audit_events"))
    assert API_KEY not in stored and "new-secret-key-42" not in stored


async def test_audit_events_filter_by_method_token_and_time(
    engine: Engine, client: TidegateClient
) -> None:
    start = time.time()
    await make_token(client, "one", tpb.TOKEN_ROLE_VIEWER)
    stub = tokens_pb2_grpc.TokenServiceStub(client.channel)
    await stub.RevokeToken(tpb.RevokeTokenRequest(name="one"))
    made = await asyncio.to_thread(
        tidegate, "token", "create", "--name", "two", "--role", "viewer",
        "--data-dir", str(engine.config.data_dir),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    revokes = await audit_events(client, method="RevokeToken")
    assert [(e.target, e.outcome) for e in revokes] == [("token one", "OK")]
    by_cli = await audit_events(client, token_name="cli")
    assert [(e.method, e.target) for e in by_cli] == [("tidegate token create", "token two")]
    assert made.stdout.strip() not in str(by_cli)
    later = timestamp_pb2.Timestamp(seconds=int(time.time()) + 3600)
    assert await audit_events(client, start_time=later) == []
    since = timestamp_pb2.Timestamp(seconds=int(start) - 1)
    assert len(await audit_events(client, start_time=since)) == 3
    failure = await refused(
        audit_pb2_grpc.AuditServiceStub(client.channel).ListAuditEvents(
            apb.ListAuditEventsRequest(start_time=later, end_time=since)
        )
    )
    assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_audit_retention_deletes_events_older_than_its_period(
    engine: Engine, client: TidegateClient
) -> None:
    await make_token(client, "one", tpb.TOKEN_ROLE_VIEWER)
    assert len(await audit_events(client)) == 1
    assert await expire_audit_events(engine.db, 365 * 86400) == 0
    assert await expire_audit_events(engine.db, 365 * 86400, now=time.time() + 366 * 86400) == 1
    assert await audit_events(client) == []


def test_a_token_file_is_read_without_its_newline(tmp_path: Path) -> None:
    (tmp_path / "admin-token").write_text("tg_abc\n")
    assert read_token(tmp_path) == "tg_abc"
    assert read_token(tmp_path / "none") == ""
    os.chmod(tmp_path / "admin-token", 0o600)
