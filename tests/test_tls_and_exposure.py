"""TLS on the gRPC and ingest ports of a real ``tidegate serve`` (with its ingest worker),
checked with the real grpcurl binary and aiohttp, with certificates the test makes; and
the exposure guard that refuses to serve a non-loopback address unprotected."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from clients.client import read_token
from engine.security import INSECURE_FLAG, exposure_problem, is_loopback
from tests.certs import Certs, make_certs
from tests.faultload import BIN, EngineProcess, free_port

EVENT = {"customer": "tls-1", "action": "point_add", "id": "tls-1", "data": {"points": 1}}


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "certs")


def started(tmp_path: Path, *extra: str) -> EngineProcess:
    engine = EngineProcess(tmp_path / "serve.out", tmp_path / "data")
    engine.extra_args = list(extra)
    engine.start()
    return engine


@pytest.fixture
def tls_engine(tmp_path: Path, certs: Certs) -> Iterator[EngineProcess]:
    engine = started(
        tmp_path, "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)
    )
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture
def mtls_engine(tmp_path: Path, certs: Certs) -> Iterator[EngineProcess]:
    engine = started(
        tmp_path,
        "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
        "--tls-client-ca", str(certs.ca),
    )  # fmt: skip
    try:
        yield engine
    finally:
        engine.close()


def grpcurl(
    engine: EngineProcess, *options: str, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    token = read_token(engine.data_dir) if token is None else token
    return subprocess.run(
        [str(BIN / "grpcurl"), *options, "-H", f"authorization: Bearer {token}",
         "-d", "{}", engine.target, "tidegate.admin.v1.ConnectionService/ListConnections"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


async def ingest(url: str, context: ssl.SSLContext | None) -> int:
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=EVENT, ssl=context) as answer:
            return answer.status


def client_context(certs: Certs, with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    if with_cert:
        context.load_cert_chain(certs.client_cert, certs.client_key)
    return context


async def test_grpc_and_ingest_speak_tls_only(tls_engine: EngineProcess, certs: Certs) -> None:
    done = await asyncio.to_thread(grpcurl, tls_engine, "-cacert", str(certs.ca))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {}  # no connections yet, an answer all the same
    plain = await asyncio.to_thread(grpcurl, tls_engine, "-plaintext")
    assert plain.returncode != 0
    unknown_ca = await asyncio.to_thread(grpcurl, tls_engine)  # the system's CAs
    assert unknown_ca.returncode != 0 and "certificate" in unknown_ca.stderr
    https = tls_engine.ingest_url.replace("http://", "https://")
    assert await ingest(https, client_context(certs, with_cert=False)) == 202
    with pytest.raises(aiohttp.ClientError):
        await ingest(tls_engine.ingest_url, None)  # plain HTTP to a TLS port


async def test_client_certificates_are_required_with_a_client_ca(
    mtls_engine: EngineProcess, certs: Certs
) -> None:
    without = await asyncio.to_thread(grpcurl, mtls_engine, "-cacert", str(certs.ca))
    assert without.returncode != 0
    with_cert = await asyncio.to_thread(
        grpcurl, mtls_engine, "-cacert", str(certs.ca),
        "-cert", str(certs.client_cert), "-key", str(certs.client_key),
    )  # fmt: skip
    assert with_cert.returncode == 0, with_cert.stderr
    https = mtls_engine.ingest_url.replace("http://", "https://")
    assert await ingest(https, client_context(certs, with_cert=True)) == 202
    with pytest.raises(aiohttp.ClientError):
        await ingest(https, client_context(certs, with_cert=False))


async def test_a_denied_call_logs_one_line_without_the_token(
    tls_engine: EngineProcess, certs: Certs
) -> None:
    wrong = "tg_0123456789ab_" + "S" * 43
    done = await asyncio.to_thread(grpcurl, tls_engine, "-cacert", str(certs.ca), token=wrong)
    assert done.returncode != 0 and "Unauthenticated" in done.stderr
    log = tls_engine.tail(200_000)
    denied = [line for line in log.splitlines() if "admin_call_denied" in line]
    assert len(denied) == 1
    assert "ListConnections" in denied[0] and '"reason": "invalid"' in denied[0]
    assert '"peer": "ipv4:127.0.0.1:' in denied[0]
    assert wrong not in log and "S" * 43 not in log
    assert read_token(tls_engine.data_dir) not in log  # the bootstrap token is never logged
    assert "admin_token_written" in log


def serve_once(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``tidegate serve`` expected to refuse at once."""
    return subprocess.run(
        [str(BIN / "tidegate"), "serve", "--grpc-port", str(free_port()), "--http-port",
         str(free_port()), "--metrics-port", "0", "--ui-port", "0",
         "--data-dir", str(tmp_path / "data"), *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_serve_refuses_a_public_address_without_tls(tmp_path: Path, certs: Certs) -> None:
    plain = serve_once(tmp_path, "--host", "0.0.0.0", env={"TIDEGATE_INGEST_TOKEN": "t"})
    assert plain.returncode == 1
    assert "cannot start: --host 0.0.0.0 accepts remote connections" in plain.stderr
    assert "--tls-cert and --tls-key" in plain.stderr and INSECURE_FLAG in plain.stderr
    no_ingest_auth = serve_once(
        tmp_path, "--host", "0.0.0.0",
        "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
        env={"TIDEGATE_INGEST_TOKEN": ""},
    )  # fmt: skip
    assert no_ingest_auth.returncode == 1
    assert "ingest has no credential" in no_ingest_auth.stderr
    half = serve_once(tmp_path, "--tls-cert", str(certs.server_cert))
    assert half.returncode == 1 and "--tls-cert and --tls-key go together" in half.stderr
    missing = serve_once(tmp_path, "--tls-cert", "/nope.pem", "--tls-key", "/nope-key.pem")
    assert missing.returncode == 1 and "/nope.pem" in missing.stderr
    for done in (plain, no_ingest_auth, half, missing):
        assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was written


def test_the_loud_flag_lets_serve_bind_a_public_address_and_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIDEGATE_INGEST_TOKEN", "ingest-secret")  # the harness passes it on
    engine = EngineProcess(tmp_path / "serve.out", tmp_path / "data")
    engine.extra_args = ["--host", "0.0.0.0", INSECURE_FLAG]
    try:
        engine.start()
        assert '"event": "serving_without_tls"' in engine.tail()
    finally:
        engine.close()


def test_any_ingest_credential_satisfies_the_guard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Basic auth (no TIDEGATE_INGEST_TOKEN) is an ingest credential as much as Bearer."""
    monkeypatch.delenv("TIDEGATE_INGEST_TOKEN", raising=False)
    monkeypatch.setenv("TIDEGATE_INGEST_BASIC_USER", "antavo")
    monkeypatch.setenv("TIDEGATE_INGEST_BASIC_PASSWORD", "a-long-basic-password")
    engine = EngineProcess(tmp_path / "serve.out", tmp_path / "data")
    engine.extra_args = ["--host", "0.0.0.0", INSECURE_FLAG, "--ingest-auth", "basic"]
    try:
        engine.start()
        assert '"event": "serving_without_tls"' in engine.tail()
    finally:
        engine.close()
    refused = serve_once(
        tmp_path, "--host", "0.0.0.0", INSECURE_FLAG, "--ingest-auth", "none",
        env={"TIDEGATE_INGEST_TOKEN": ""},
    )  # fmt: skip
    assert refused.returncode == 1 and "--ingest-auth" in refused.stderr


def test_exposure_guard_rules() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
        assert (
            exposure_problem(host, tls=False, insecure_allowed=False, ingest_auth_configured=False)
            is None
        )
    for host in ("0.0.0.0", "::", "", "10.0.0.5", "example.com"):
        assert not is_loopback(host), host
        assert exposure_problem(
            host, tls=False, insecure_allowed=False, ingest_auth_configured=True
        )
        assert exposure_problem(
            host, tls=True, insecure_allowed=False, ingest_auth_configured=False
        )
        assert (
            exposure_problem(host, tls=True, insecure_allowed=False, ingest_auth_configured=True)
            is None
        )
        assert (
            exposure_problem(host, tls=False, insecure_allowed=True, ingest_auth_configured=True)
            is None
        )


def test_config_export_reaches_a_tls_engine_with_its_ca_and_token(
    tls_engine: EngineProcess, certs: Certs
) -> None:
    def export(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "tidegate"), "config", "export", "--target", tls_engine.target, *args],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    data_dir = str(tls_engine.data_dir)
    done = export("--data-dir", data_dir, "--tls-ca", str(certs.ca))
    assert done.returncode == 0, done.stderr
    assert "\nversion: 1\n" in done.stdout
    wrong = export("--token", "tg_0123456789ab_" + "x" * 43, "--tls-ca", str(certs.ca))
    assert wrong.returncode == 1 and "refused the token" in wrong.stderr
    no_tls = export("--data-dir", data_dir)
    assert no_tls.returncode == 1 and "Traceback" not in no_tls.stderr
