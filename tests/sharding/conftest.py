"""Fixtures: a fresh Mosquitto per test (the service tests' broker)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from transport.mosquitto_process import MOSQUITTO, MosquittoBroker


@pytest.fixture
def broker(tmp_path) -> Iterator[MosquittoBroker]:
    if not MOSQUITTO:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    running = MosquittoBroker(tmp_path, "set_tcp_nodelay true").start()
    yield running
    running.stop()


@pytest.fixture
def nats_cluster(tmp_path):
    """The cluster tests' 3-node NATS cluster with MQTT (tests/cluster/nats_cluster.py), stopped afterwards."""
    from cluster.nats_cluster import NATS_SERVER, NatsCluster

    if not NATS_SERVER:
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    cluster = NatsCluster(tmp_path / "nats", size=3)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
