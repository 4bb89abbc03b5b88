"""A real 3-node JetStream cluster on loopback for the broker tests (``engine.broker.cluster``),
one per test module: its nodes are killed and restarted by the fault trials, and every test
uses streams of its own or deletes them first."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.broker.cluster import LocalCluster


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(Path(tmp_path_factory.mktemp("nats")), size=3, max_file_store="256MB")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
