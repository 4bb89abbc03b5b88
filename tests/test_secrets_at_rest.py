"""Secrets and files at rest: the data folder is private (0700, files 0600) as a real
``tidegate serve`` creates it and after a start on a folder an older release wrote; a
key file others can read and a malformed ``TIDEGATE_SECRET_KEY`` are refused with a
message that says what to do; ``tidegate secrets rotate`` re-encrypts every stored API
key under a new master key and survives a SIGKILL at every step."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from cryptography.fernet import Fernet
from structlog.testing import capture_logs

from engine.app import Engine, EngineConfig
from plugins.insider.sandbox import RunningSandbox
from tests.conftest import (
    API_KEY,
    FAST_DELIVERY,
    PARTNER,
    TEST_DESTINATIONS,
    engine_client,
    eventually,
    post_events,
)
from tests.faultload import BIN, EngineProcess, admin_client, free_port
from tests.upgrade_fixture import RELEASE_0_1_0, unpack

TIDEGATE = str(BIN / "tidegate")
CONNECTIONS = {"first": "key-of-first-0001", "second": "key-of-second-002", "third": "k3-0003"}


def modes(folder: Path) -> dict[str, int]:
    """Every path under ``folder`` (and the folder itself as ".") with its mode bits."""
    found = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        found[str(path.relative_to(folder))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def loose(folder: Path) -> dict[str, str]:
    return {name: f"{mode:04o}" for name, mode in modes(folder).items() if mode & 0o077}


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TIDEGATE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def serve_args(data_dir: Path) -> list[str]:
    return [
        "serve",
        "--grpc-port",
        str(free_port()),
        "--http-port",
        str(free_port()),
        "--metrics-port",
        "off",
        "--data-dir",
        str(data_dir),
    ]


# --- file modes ------------------------------------------------------------------------------


async def test_serve_creates_every_file_private(tmp_path: Path, sandbox: RunningSandbox) -> None:
    process = EngineProcess(tmp_path / "serve.out", tmp_path / "data")
    process.start()
    try:
        async with admin_client(process.target) as client:
            await client.create_connection(
                "insider-main",
                api_key=API_KEY,
                settings={"partner_name": PARTNER, "base_url": sandbox.url},
            )
            await client.create_profile_mapping("insider-main", "email", "email")
            await client.send_events(
                [{"customer": "c1", "action": "opt_in", "data": {"email": "a@example.com"}}]
            )

            async def logged() -> bool:
                return len((await client.list_logs()).logs) > 0

            await eventually(logged, within=20)
            created = await client.create_backup(str(tmp_path / "backup"))
            assert created.state_bytes > 0
        data = tmp_path / "data"
        names = set(modes(data))
        # The files the brief names are there to be checked, while the engine runs.
        assert {"state.sqlite3", "state.sqlite3-wal", "secret.key", "engine.json"} <= names
        assert any(n.startswith("outbound-log/") and n.endswith(".duckdb") for n in names)
        assert any(n.startswith("metrics/") for n in names), names
        assert loose(data) == {}
        assert loose(tmp_path / "backup") == {}
    finally:
        process.close()
    assert loose(tmp_path / "data") == {}


async def test_a_start_tightens_a_folder_an_older_release_wrote(tmp_path: Path) -> None:
    data, _ = unpack(RELEASE_0_1_0, tmp_path / "old")
    # The modes 0.1.0 gave them (the archive keeps them; unpacking follows the umask).
    data.chmod(0o755)
    for name in ("state.sqlite3", "outbound-log.duckdb"):
        (data / name).chmod(0o644)
    assert stat.S_IMODE((data / "secret.key").stat().st_mode) == 0o600
    engine = Engine(
        EngineConfig(
            data_dir=data,
            grpc_port=0,
            http_port=0,
            metrics_port=None,
            allowed_destinations=TEST_DESTINATIONS,
        )
    )
    with capture_logs() as logs:
        await engine.start()
    try:
        assert loose(data) == {}
    finally:
        await engine.stop(grace=0.5)
    tightened = [e for e in logs if e["event"] == "data_files_tightened"]
    assert len(tightened) == 1
    changed = " ".join(tightened[0]["changed"])
    assert ". 0755->0700" in changed and "state.sqlite3 0644->0600" in changed
    assert "outbound-log.duckdb 0644->0600" in changed


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    key = data / "secret.key"
    key.write_bytes(Fernet.generate_key())
    key.chmod(0o644)
    result = run(*serve_args(data))
    assert result.returncode == 1
    assert f"chmod 600 {key}" in result.stderr
    assert "0644" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert stat.S_IMODE(key.stat().st_mode) == 0o644  # left for the operator to decide


@pytest.mark.parametrize(
    "value", ["not-a-key", "x" * 44, Fernet.generate_key().decode()[:-2], "é" * 44]
)
def test_a_malformed_secret_key_variable_is_a_clear_error(tmp_path: Path, value: str) -> None:
    result = run(*serve_args(tmp_path / "data"), env={"TIDEGATE_SECRET_KEY": value})
    assert result.returncode == 1
    assert "TIDEGATE_SECRET_KEY" in result.stderr
    assert "44 characters of URL-safe base64" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert value not in result.stderr  # a key, even a broken one, is not echoed


# --- rotation ----------------------------------------------------------------------------------


@pytest.fixture
async def folder(tmp_path: Path, sandbox: RunningSandbox) -> AsyncIterator[Path]:
    """A data folder holding three connections with their API keys, engine stopped."""
    data = tmp_path / "data"
    engine = Engine(
        EngineConfig(
            data_dir=data,
            grpc_port=0,
            http_port=0,
            metrics_port=None,
            allowed_destinations=TEST_DESTINATIONS,
        )
    )
    await engine.start()
    try:
        async with engine_client(engine) as client:
            for name, key in CONNECTIONS.items():
                await client.create_connection(
                    name, api_key=key, settings={"partner_name": PARTNER, "base_url": sandbox.url}
                )
    finally:
        await engine.stop(grace=0.5)
    yield data


def stored_tokens(data: Path) -> dict[str, bytes]:
    conn = sqlite3.connect(data / "state.sqlite3")
    try:
        return {
            i: bytes(t) for i, t in conn.execute("SELECT id, api_key_encrypted FROM connections")
        }
    finally:
        conn.close()


async def decrypted_keys(data: Path) -> dict[str, str]:
    """Starts an engine on ``data`` (as serve does) and reads the keys it decrypted."""
    engine = Engine(
        EngineConfig(
            data_dir=data,
            grpc_port=0,
            http_port=0,
            metrics_port=None,
            allowed_destinations=TEST_DESTINATIONS,
        )
    )
    await engine.start()
    try:
        return {c.id: c.api_key for c in engine.registry.runtimes()}
    finally:
        await engine.stop(grace=0.5)


def test_rotate_reencrypts_every_key_under_a_new_master_key(folder: Path) -> None:
    old_key = (folder / "secret.key").read_bytes()
    old_tokens = stored_tokens(folder)
    result = run("secrets", "rotate", "--data-dir", str(folder))
    assert result.returncode == 0, result.stderr
    assert "3 API key(s) re-encrypted" in result.stderr
    new_key = (folder / "secret.key").read_bytes()
    assert new_key != old_key
    assert not (folder / "secret.key.new").exists()
    assert stat.S_IMODE((folder / "secret.key").stat().st_mode) == 0o600
    new_tokens = stored_tokens(folder)
    for name, key in CONNECTIONS.items():
        assert new_tokens[name] != old_tokens[name]
        assert Fernet(new_key.strip()).decrypt(new_tokens[name]).decode() == key
    assert asyncio.run(decrypted_keys(folder)) == CONNECTIONS


async def test_rotated_keys_still_deliver(folder: Path, sandbox: RunningSandbox) -> None:
    result = await asyncio.to_thread(run, "secrets", "rotate", "--data-dir", str(folder))
    assert result.returncode == 0, result.stderr
    engine = Engine(
        EngineConfig(
            data_dir=folder,
            grpc_port=0,
            http_port=0,
            metrics_port=None,
            delivery=FAST_DELIVERY,
            allowed_destinations=TEST_DESTINATIONS,
        )
    )
    await engine.start()
    try:
        async with engine_client(engine) as client:
            await client.create_connection(
                "insider-main",
                api_key=API_KEY,  # the sandbox accepts only this key
                settings={"partner_name": PARTNER, "base_url": sandbox.url},
            )
            await client.create_profile_mapping("insider-main", "email", "email")
            async with aiohttp.ClientSession() as http:
                status, _ = await post_events(
                    http,
                    engine,
                    {"customer": "c1", "action": "opt_in", "data": {"email": "a@example.com"}},
                )
            assert status == 202

            async def delivered() -> bool:
                logs = (await client.list_logs()).logs
                return any(entry.status_code == 200 for entry in logs)

            await eventually(delivered)
    finally:
        await engine.stop(grace=0.5)


async def kill_rotation_at(folder: Path, step: str) -> None:
    """Runs ``tidegate secrets rotate`` and SIGKILLs it when it reaches ``step``."""
    process = await asyncio.create_subprocess_exec(
        TIDEGATE,
        "secrets",
        "rotate",
        "--data-dir",
        str(folder),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TIDEGATE_TEST_ROTATION_PAUSE": step},
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    assert line.decode().strip() == f"paused at {step}"
    process.send_signal(signal.SIGKILL)
    await process.wait()


ROTATION_STEPS = [
    "new-key-written",
    "re-encrypting",
    "re-encrypted",
    "key-replacing",
    "key-replaced",
]


@pytest.mark.parametrize("step", ROTATION_STEPS)
async def test_a_kill_at_any_step_of_a_rotation_loses_no_key(folder: Path, step: str) -> None:
    old_key = (folder / "secret.key").read_bytes()
    await kill_rotation_at(folder, step)
    # An engine started now decrypts every key, whichever key each is stored under.
    assert await decrypted_keys(folder) == CONNECTIONS
    # Running the rotation again finishes it.
    result = await asyncio.to_thread(run, "secrets", "rotate", "--data-dir", str(folder))
    assert result.returncode == 0, result.stderr
    assert not (folder / "secret.key.new").exists()
    assert not (folder / "secret.key.tmp").exists()
    assert (folder / "secret.key").read_bytes() != old_key
    new_key = (folder / "secret.key").read_bytes().strip()
    for name, token in stored_tokens(folder).items():
        assert Fernet(new_key).decrypt(token).decode() == CONNECTIONS[name]
    assert await decrypted_keys(folder) == CONNECTIONS


async def test_rotating_a_key_given_in_the_environment(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Move the folder's key into the variable, as an operator keeping keys outside would.
    old = (folder / "secret.key").read_text().strip()
    (folder / "secret.key").unlink()
    new = Fernet.generate_key().decode()
    result = await asyncio.to_thread(
        run,
        "secrets",
        "rotate",
        "--data-dir",
        str(folder),
        env={"TIDEGATE_SECRET_KEY": f"{new},{old}"},
    )
    assert result.returncode == 0, result.stderr
    assert "drop the old key" in result.stderr
    assert not (folder / "secret.key").exists()  # nothing written but the database
    monkeypatch.setenv("TIDEGATE_SECRET_KEY", new)
    assert await decrypted_keys(folder) == CONNECTIONS


async def test_rotate_refuses_while_an_engine_serves_the_folder(folder: Path) -> None:
    process = EngineProcess(folder.parent / "serve.out", folder)
    await asyncio.to_thread(process.start)
    try:
        before = stored_tokens(folder)
        result = await asyncio.to_thread(run, "secrets", "rotate", "--data-dir", str(folder))
        assert result.returncode == 1
        assert "stop it first" in result.stderr
        assert stored_tokens(folder) == before
        assert not (folder / "secret.key.new").exists()
    finally:
        await asyncio.to_thread(process.close)


def test_rotate_without_a_data_folder_says_so(tmp_path: Path) -> None:
    result = run("secrets", "rotate", "--data-dir", str(tmp_path / "nothing"))
    assert result.returncode == 1
    assert "is it a Tidegate data folder?" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_backup_taken_in_the_middle_of_a_rotation_decrypts(
    folder: Path, tmp_path: Path
) -> None:
    await kill_rotation_at(folder, "re-encrypted")  # rows under the new key, file the old
    backup = tmp_path / "backup"
    result = await asyncio.to_thread(run, "backup", "--data-dir", str(folder), "--to", str(backup))
    assert result.returncode == 0, result.stderr
    assert (backup / "secret.key.new").exists()
    assert await decrypted_keys(backup) == CONNECTIONS
