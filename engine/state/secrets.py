"""Encryption at rest for destination API keys, and the data folder's file modes.

The key lives outside the database: in ``TIDEGATE_SECRET_KEY`` or, by default, in
``<data-dir>/secret.key``, created with mode 0600 on first start. A copy of the database
alone does not reveal any API key.

``TIDEGATE_SECRET_KEY`` holds one Fernet key (44 characters of URL-safe base64), or
several separated by commas: the first encrypts, every one decrypts (Fernet's
``MultiFernet``), which is how a key given in the environment is rotated.

Rotating the key file (``rotate_secrets``) is crash-safe at every point:

1. the new key is written to ``secret.key.new`` (a temporary file, fsynced, renamed);
2. every stored API key is re-encrypted under it in one SQLite transaction;
3. ``secret.key`` is replaced by the new key (temporary file, fsync, rename);
4. ``secret.key.new`` is removed.

While ``secret.key.new`` exists, both keys decrypt (``secret.key`` encrypts), so an
engine started after a kill at any point reads every stored key; running the rotation
again finishes it with the same new key.

``secure_data_dir`` makes the folder private: it sets the process umask to 077, so what
the engine creates is 0600 (files) and 0700 (folders), and tightens what an older
release left looser, logging each path it changed. A key file that others can read is
refused: anyone may have copied it.
"""

from __future__ import annotations

import binascii
import contextlib
import os
import sqlite3
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from engine.errors import TidegateError
from engine.state.database import STATE_FILE

SECRET_KEY_ENV = "TIDEGATE_SECRET_KEY"
SECRET_KEY_FILE = "secret.key"
NEW_KEY_FILE = "secret.key.new"
"""The key a rotation re-encrypts under, kept until ``secret.key`` holds it."""
KEY_FORMAT = (
    "a Fernet key: 44 characters of URL-safe base64 (32 bytes), as "
    "`python3 -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`"
    " prints"
)
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700

log = structlog.get_logger("tidegate.secrets")


def _fernet(key: bytes, where: str) -> Fernet:
    try:
        return Fernet(key)
    except (ValueError, binascii.Error):
        raise TidegateError(
            f"{where} is not a valid secret key: expected {KEY_FORMAT}"
            + (" (several keys: separate them with commas)" if where == SECRET_KEY_ENV else "")
        ) from None


def env_keys() -> list[bytes] | None:
    """The keys ``TIDEGATE_SECRET_KEY`` holds, first the one that encrypts; None when it
    is unset or empty."""
    value = os.environ.get(SECRET_KEY_ENV, "").strip()
    if not value:
        return None
    return [part.strip().encode() for part in value.split(",") if part.strip()]


class SecretBox:
    """Encrypts with the first of its keys and decrypts with any of them."""

    def __init__(self, key: bytes, *older: bytes, where: str = "secret key") -> None:
        self._keys = [key, *older]
        self._fernet = MultiFernet([_fernet(k, where) for k in self._keys])

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> SecretBox:
        """The keys of ``data_dir``: ``TIDEGATE_SECRET_KEY`` when set, else the key file
        (created on first use) and the key of an unfinished rotation. Raises
        ``TidegateError`` for a malformed key or a key file others can read."""
        keys = env_keys()
        if keys is not None:
            return cls(*keys, where=SECRET_KEY_ENV)
        path = data_dir / SECRET_KEY_FILE
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
            _write_private(path, Fernet.generate_key())
        keys = [read_key_file(path)]
        pending = data_dir / NEW_KEY_FILE
        if pending.exists():
            keys.append(read_key_file(pending))
            log.warning(
                "secret_rotation_unfinished",
                hint=f"run `tidegate secrets rotate --data-dir {data_dir}` to finish it",
            )
        return cls(*keys, where=str(path))

    def encrypt(self, secret: str) -> bytes:
        return self._fernet.encrypt(secret.encode())

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(token).decode()
        except InvalidToken:
            raise TidegateError(
                f"cannot decrypt a stored API key: the secret key ({SECRET_KEY_ENV} or "
                f"{SECRET_KEY_FILE}) is not the one it was stored with"
            ) from None

    def rotate(self, token: bytes) -> bytes:
        """``token`` re-encrypted under the first key."""
        try:
            return self._fernet.rotate(token)
        except InvalidToken:
            raise TidegateError(
                "cannot decrypt a stored API key with any of the secret keys: give the key"
                f" it was stored with (in {SECRET_KEY_ENV}, after the new one)"
            ) from None


def hint(secret: str) -> str:
    """A masked hint that shows at most the last four characters."""
    if len(secret) <= 8:
        return "****"
    return "****" + secret[-4:]


# --- files at rest ------------------------------------------------------------------------


def check_key_file(path: Path) -> None:
    """Refuses a key file that anyone but its owner can read or write."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise TidegateError(
            f"the secret key file {path} can be read or written by others (mode "
            f"{mode:04o}): anyone who read it can decrypt the stored API keys. Run "
            f"`chmod 600 {path}` and start again; if others may have copied it, rotate the"
            " key afterwards with `tidegate secrets rotate` and replace the API keys"
        )


def read_key_file(path: Path) -> bytes:
    check_key_file(path)
    key = path.read_bytes().strip()
    _fernet(key, str(path))
    return key


def secure_data_dir(data_dir: Path) -> list[str]:
    """Creates ``data_dir`` (0700) or makes it private: umask 077 for this process and
    its children, the key files checked (``check_key_file``), every other folder in it
    0700 and file 0600. Returns and logs (``data_files_tightened``) what it changed."""
    os.umask(0o077)
    data_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    for name in (SECRET_KEY_FILE, NEW_KEY_FILE):
        if (data_dir / name).exists():
            check_key_file(data_dir / name)
    tightened: list[str] = []
    _tighten(data_dir, PRIVATE_DIR, data_dir, tightened)
    for root, dirs, files in os.walk(data_dir):
        for name in dirs:
            _tighten(Path(root) / name, PRIVATE_DIR, data_dir, tightened)
        for name in files:
            _tighten(Path(root) / name, PRIVATE_FILE, data_dir, tightened)
    if tightened:
        log.warning("data_files_tightened", data_dir=str(data_dir), changed=tightened)
    return tightened


def _tighten(path: Path, mode: int, data_dir: Path, tightened: list[str]) -> None:
    try:
        info = path.lstat()
    except FileNotFoundError:  # removed meanwhile (a WAL checkpointed away)
        return
    if stat.S_ISLNK(info.st_mode):
        return
    old = stat.S_IMODE(info.st_mode)
    if old & 0o077 == 0:
        return
    try:
        path.chmod(old & mode)
    except OSError as exc:
        raise TidegateError(
            f"cannot make {path} private (mode {old:04o}): {exc.strerror}; run "
            f"`chmod -R go= {data_dir}` as its owner"
        ) from None
    name = str(path.relative_to(data_dir)) if path != data_dir else "."
    tightened.append(f"{name} {old:04o}->{old & mode:04o}")


def _write_private(path: Path, data: bytes, step: str = "") -> None:
    """Writes ``path`` (mode 0600) through a temporary file, fsynced and renamed, then
    fsyncs the folder: after a crash it holds either its old content or ``data``."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if step:
        _step(step)
    os.replace(temporary, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- rotation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rotation:
    """What ``rotate_secrets`` did: API keys re-encrypted, and where the key lives."""

    api_keys: int
    key_in: str


ROTATION_STEP_HOOK = "TIDEGATE_TEST_ROTATION_PAUSE"
"""For the crash tests only: the step after which the rotation stops (prints the step
name on stdout and sleeps) so the test can SIGKILL it there."""


def _step(name: str) -> None:
    if os.environ.get(ROTATION_STEP_HOOK) == name:
        print(f"paused at {name}", flush=True)
        time.sleep(3600)


def rotate_secrets(data_dir: Path) -> Rotation:
    """Re-encrypts every stored API key of ``data_dir`` under a new master key (see the
    module's description). With ``TIDEGATE_SECRET_KEY`` set, the new key is its first
    and nothing is written but the database. No engine may run on the folder."""
    database = data_dir / STATE_FILE
    if not database.exists():
        raise TidegateError(f"{data_dir} holds no {STATE_FILE}: is it a Tidegate data folder?")
    secure_data_dir(data_dir)
    keys = env_keys()
    if keys is not None:
        box = SecretBox(*keys, where=SECRET_KEY_ENV)
        count = _reencrypt(database, box)
        return Rotation(count, SECRET_KEY_ENV)
    current_path, pending_path = data_dir / SECRET_KEY_FILE, data_dir / NEW_KEY_FILE
    if not current_path.exists():
        raise TidegateError(
            f"{data_dir} holds no {SECRET_KEY_FILE} and {SECRET_KEY_ENV} is not set: "
            "there is no key to rotate"
        )
    current = read_key_file(current_path)
    if pending_path.exists():  # an interrupted rotation: finish it with its key
        new = read_key_file(pending_path)
    else:
        new = Fernet.generate_key()
        _write_private(pending_path, new)
    _step("new-key-written")
    count = _reencrypt(database, SecretBox(new, current, where=str(current_path)))
    _step("re-encrypted")
    _write_private(current_path, new, step="key-replacing")
    _step("key-replaced")
    pending_path.unlink()
    _fsync_dir(data_dir)
    return Rotation(count, str(current_path))


def _reencrypt(database: Path, box: SecretBox) -> int:
    connection = sqlite3.connect(database, timeout=30, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        rows = connection.execute("SELECT id, api_key_encrypted FROM connections").fetchall()
        for number, (connection_id, token) in enumerate(rows):
            connection.execute(
                "UPDATE connections SET api_key_encrypted=? WHERE id=?",
                (box.rotate(bytes(token)), connection_id),
            )
            if number == 0:
                _step("re-encrypting")
        connection.execute("COMMIT")
        return len(rows)
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")
        raise
    finally:
        connection.close()
