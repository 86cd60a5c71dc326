"""fleetlearn's host side: compiler, aggregator service, accounting and fleet simulator.

Kept import-light: the ``fleetlearn`` CLI lives here and must start on a device that has only
the core dependencies installed.
"""
