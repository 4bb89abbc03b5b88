"""The data folders of earlier releases, kept in ``tests/fixtures/`` (see its README), for
the upgrade tests: unpacking one, and telling whether a folder changed."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import tarfile
import time
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RELEASE_0_1_0 = FIXTURES / "release-0.1.0.tar.gz"


def unpack(archive: Path, into: Path) -> tuple[Path, dict[str, Any]]:
    """Unpacks a release's fixture into ``into``; returns its data folder and manifest."""
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    manifest: dict[str, Any] = json.loads((into / "manifest.json").read_text())
    return into / "data", manifest


def refresh_resend_marks(data_dir: Path) -> None:
    """Moves the re-send marks to now. The fixture was made on one day and the tests run
    on later ones: past its 30-day window a mark no longer makes a re-sent event a
    duplicate, whatever the upgrade did. Done before any migration, in the schema the
    release left."""
    conn = sqlite3.connect(data_dir / "state.sqlite3")
    try:
        with conn:
            conn.execute("UPDATE seen_events SET receive_time = ?", (time.time(),))
    finally:
        conn.close()


def digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes: equal digests, same folder."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
