"""Encryption at rest for destination API keys.

The key lives outside the database: in ``TIDEGATE_SECRET_KEY`` (a Fernet key) or, by
default, in ``<data-dir>/secret.key`` created with mode 0600 on first start. A copy of the
database alone does not reveal any API key.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from engine.errors import TidegateError

SECRET_KEY_ENV = "TIDEGATE_SECRET_KEY"
SECRET_KEY_FILE = "secret.key"


class SecretBox:
    """Encrypts and decrypts secrets with one Fernet key."""

    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> SecretBox:
        env_key = os.environ.get(SECRET_KEY_ENV)
        if env_key:
            return cls(env_key.encode())
        path = data_dir / SECRET_KEY_FILE
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(Fernet.generate_key())
        return cls(path.read_bytes().strip())

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


def hint(secret: str) -> str:
    """A masked hint that shows at most the last four characters."""
    if len(secret) <= 8:
        return "****"
    return "****" + secret[-4:]
