"""Fixtures: a fresh 3-node NATS cluster with MQTT per test, stopped (every node, with its store) afterwards."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .nats_cluster import NATS_SERVER, NatsCluster


@pytest.fixture
def nats_cluster(tmp_path) -> Iterator[NatsCluster]:
    if not NATS_SERVER:
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    cluster = NatsCluster(tmp_path / "nats", size=3)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
