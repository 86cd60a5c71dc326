"""Fixtures: a fresh Mosquitto per test, stopped afterwards whatever happens."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .mosquitto_process import MOSQUITTO, MosquittoBroker


@pytest.fixture
def start_broker(tmp_path) -> Iterator:
    if not MOSQUITTO:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    brokers: list[MosquittoBroker] = []

    def start(config: str = "", persistence: bool = False, port: int | None = None) -> MosquittoBroker:
        broker = MosquittoBroker(tmp_path, config, port=port, persistence=persistence)
        brokers.append(broker)
        return broker.start()

    yield start
    for broker in brokers:
        broker.stop()


@pytest.fixture
def broker(start_broker) -> MosquittoBroker:
    return start_broker()
