"""The aggregator service: ``fleetlearn aggregator serve --config aggregator.toml``.

``config`` reads aggregator.toml, ``metrics`` exports Prometheus metrics, ``logs`` writes
structured, rate-limited log lines, and ``service`` is the shell that drives the round machines
over MQTT. Submodules are imported by name.
"""
