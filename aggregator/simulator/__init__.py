"""The fleet simulator: an aggregator service and many simulated devices through a real MQTT broker.

``fleetlearn simulate`` (``aggregator.commands.simulate``) is the shell; ``simulate(scenario, ...)``
is the Python entry point. Parts: ``scenario`` (what to simulate), ``partition`` (how the data is
split), ``records`` (what a run reports), ``report`` (report.json and plots), ``progress`` (what the
terminal shows), and the engine that runs it.
"""
