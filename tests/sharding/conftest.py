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
