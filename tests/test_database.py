"""The state database: grouped commits, isolated failures, durability across reopen."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from engine.state.database import Database


async def test_concurrent_writes_are_all_committed(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.sqlite3")
    await db.start()
    await db.write(lambda c: c.execute("CREATE TABLE t (n INTEGER)"))
    await asyncio.gather(
        *(db.write(lambda c, n=n: c.execute("INSERT INTO t VALUES (?)", (n,))) for n in range(300))
    )
    rows = await db.read(lambda c: [r[0] for r in c.execute("SELECT n FROM t ORDER BY n")])
    assert rows == list(range(300))
    await db.close()


async def test_a_failing_job_does_not_undo_the_jobs_grouped_with_it(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.sqlite3")
    await db.start()
    await db.write(lambda c: c.execute("CREATE TABLE t (n INTEGER PRIMARY KEY)"))
    results = await asyncio.gather(
        db.write(lambda c: c.execute("INSERT INTO t VALUES (1)")),
        db.write(lambda c: c.execute("INSERT INTO t VALUES (1)")),  # duplicate key
        db.write(lambda c: c.execute("INSERT INTO t VALUES (2)")),
        return_exceptions=True,
    )
    assert isinstance(results[1], sqlite3.IntegrityError)
    assert not isinstance(results[0], BaseException)
    assert not isinstance(results[2], BaseException)
    stored = await db.read(lambda c: [r[0] for r in c.execute("SELECT n FROM t ORDER BY n")])
    assert stored == [1, 2]
    await db.close()


async def test_committed_writes_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite3"
    db = Database(path)
    await db.start()
    await db.write(lambda c: c.execute("CREATE TABLE t (n INTEGER)"))
    await db.write(lambda c: c.execute("INSERT INTO t VALUES (42)"))
    await db.close()
    again = Database(path)
    await again.start()
    assert await again.read(lambda c: c.execute("SELECT n FROM t").fetchone()[0]) == 42
    mode = await again.read(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
    assert mode == "wal"
    await again.close()


async def test_writes_after_close_are_refused(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.sqlite3")
    await db.start()
    await db.close()
    with pytest.raises(RuntimeError):
        await db.read(lambda c: c.execute("SELECT 1").fetchone())
